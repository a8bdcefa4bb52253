"""I/O adapters around the core: each one translates a transport into core calls."""

"""The I/O-free core: plain code over in-memory state. Time is always passed in."""

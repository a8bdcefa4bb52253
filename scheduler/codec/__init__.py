"""Pure wire formats (no sockets): shared by the live adapters and the simulated pool."""

"""``kvsched serve``: the Endpoint Picker process, composed from the core and its adapters."""

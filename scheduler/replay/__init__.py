"""Load-test replay: against a live endpoint or in the virtual-time simulator, one report format."""

"""``kvsched tune``: scoring weights and thresholds searched for a trace in the virtual-time
simulator, measured on a held-out part of the trace, written as a SchedulingPolicy."""

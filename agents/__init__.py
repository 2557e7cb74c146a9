"""Host agents: heartbeats with metrics to the dispatcher, and supervision of the host's processes."""

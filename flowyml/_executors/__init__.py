"""Where a step body runs: on the event loop, in a thread, in a process, or on a cluster."""

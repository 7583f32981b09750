"""Where the GPUs are: NVML collection, process attribution, simulated nodes, remote nodes."""

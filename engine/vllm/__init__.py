"""vLLM servers: launch profiles, the launcher, readiness, crash diagnosis, metrics, the simulator."""

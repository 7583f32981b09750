"""The site's Slurm, through its client commands; what runs on it (a job, a vLLM server) lives with its kind."""

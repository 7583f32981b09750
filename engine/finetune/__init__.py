"""Fine-tune jobs: specs, dataset checks, backends behind one runner process, and the job records."""

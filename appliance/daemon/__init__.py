"""ferrymand: the only process that runs jobs and writes job state."""

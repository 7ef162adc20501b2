"""The paper's experiment end to end (reproduce, report) and the TPU planner."""

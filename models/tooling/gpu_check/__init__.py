"""The first look at the model on a lent GPU, in one command that fits the device tool's few minutes
(`scripts/gpu-check`, check.py): the plan, the stages, their child tasks, the runner and the report."""

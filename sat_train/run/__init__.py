"""The run, phase by phase: prepare, the step's inputs, the loop, finish; and the optimizer and lr schedule."""

import os

# Triton's interpreter runs the kernels on CPU tensors; @triton.jit reads this when sat_kernels
# is imported, so it must be set before any test module imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import os

# Triton's interpreter runs the kernels on CPU tensors; @triton.jit reads this when sat_kernels
# is imported, so it must be set before any test module imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Under pytest-xdist (the README's `-n 2`, one worker a core) each worker, and what it spawns, keeps to one
# thread: two workers of two threads each fight over two cores (the suite took 18 min without xdist, 11 with).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

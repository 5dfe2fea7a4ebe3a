import os

# Triton's interpreter runs the kernels on CPU tensors; @triton.jit reads this when sat_kernels
# is imported, so it must be set before any test module imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Demo-mode runs (tiny_config, run_cli without a model) train demo.build_components' tiny random model: they
# need only its shapes, it is faster than the shipped pretrained one, and their results do not move when that
# is retrained. tests/test_demo_model.py clears it to test the shipped model (sat_train.demo.DEMO_MODEL_ENV).
os.environ.setdefault("SAT_DEMO_MODEL", "random")
# Under pytest-xdist (the README's `-n 2`, one worker a core) each worker, and what it spawns, keeps to one
# thread: two workers of two threads each fight over two cores (the suite took 18 min without xdist, 11 with).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

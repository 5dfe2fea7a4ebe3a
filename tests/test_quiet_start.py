"""A run prints sat's own lines and real warnings only: no library chatter such as transformers'
"`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
notices, which importing diffusers' SD/SDXL pipeline modules logs where torchvision is missing (sat
does not depend on it). Runs in a fresh process: those notices are logged once per process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from train_helpers import REPO

MARK = "--- the real warnings follow ---"
SCRIPT = textwrap.dedent(f"""
    import sys, warnings
    from sat_train.cli import main

    main(["--output_dir", sys.argv[1], "--max_train_steps", "2"])  # the demo: trains, then exports the LoRA

    from sat_train.demo import build_demo_components

    build_demo_components().pipeline()  # the pipeline validation and sampling build

    from transformers.utils import logging as transformers_logging

    print({MARK!r}, file=sys.stderr, flush=True)
    warnings.warn("REAL-1 a Python warning")
    transformers_logging.get_logger("transformers.utils.import_utils").warning("REAL-2 from the notices' logger")
    transformers_logging.get_logger("transformers.modeling_utils").warning("REAL-3 from another transformers logger")
""")
CHATTER = ("torchvision", "falling back to", "ImageProcessor")


def test_demo_and_pipeline_print_no_library_chatter_but_real_warnings(tmp_path):
    # a user's environment: conftest's TRANSFORMERS_VERBOSITY=error (inherited by subprocesses) would hide
    # the chatter and the real warnings alike
    # the same for conftest's SAT_DEMO_MODEL: the README's demo loads the shipped model
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "SAT_DEMO_MODEL")}
    env.update(HF_HUB_OFFLINE="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LoRA weights:" in proc.stdout  # sat's own lines still print
    lines = (proc.stdout + proc.stderr).replace("\r", "\n").splitlines()
    assert not [line for line in lines if any(word in line for word in CHATTER)]
    run_err, _, real = proc.stderr.partition(MARK)
    # before the mark, stderr holds the progress bar and nothing else
    assert not [line for line in run_err.replace("\r", "\n").splitlines() if line.strip()
                and not line.startswith("steps:")]
    for sentinel in ("REAL-1", "REAL-2", "REAL-3"):
        assert sentinel in real, real

"""The whole trainer as two CPU processes (torchrun, gloo), as README's multi-process command runs it:
what a run says once (banner, data check, run summary, final paths) is printed once, one LoRA file,
checkpoints that hold every process's state, and a second two-process run resumed from ``latest``
ends with exactly the weights and loss history of the uninterrupted two-process run; and what the main
process does alone (the --cache_latents_to_disk files) stops every process with a one-line error when it
fails, instead of leaving the others waiting for it. (tests/test_train_ddp.py checks the guide's gradients
under raw DDP.)"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from train_helpers import LORA_FILE, REPO, assert_same_tensors

# the demo model and photos at 64 px: 6 photos, batch 2 → 3 batches, 2 per process (accelerate evens
# them out), so 2 optimizer steps per epoch; checkpoint-2 ends epoch 0
FLAGS = ["--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
         "--seed", "0", "--report_to", "none", "--random_flip", "--guide", "sac", "--max_train_steps", "4",
         "--checkpointing_steps", "2"]


def torchrun(out, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    env.pop("SAT_TEST_KILL_AT", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "sat_train", *FLAGS, "--output_dir", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def lines_starting(proc: subprocess.CompletedProcess, prefix: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith(prefix)]


def test_two_processes_speak_once_and_resume_to_the_uninterrupted_result(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    straight = tmp_path / "straight"
    proc = torchrun(straight)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for prefix in ("=== sat_train DEMO", "data check ", "sat_train: guide=sac", "mask pictures: ", "LoRA weights: "):
        assert len(lines_starting(proc, prefix)) == 1, (prefix, proc.stdout)
    assert "x 2 processes" in lines_starting(proc, "sat_train: guide=sac")[0]
    assert json.loads((straight / "train_config.json").read_text())["resolved"]["num_processes"] == 2
    assert [p.name for p in straight.glob("*.safetensors")] == [LORA_FILE]
    assert not [p.name for p in straight.iterdir() if p.name.startswith(".")]  # no process left a temporary
    for step in (2, 4):  # each process's part of the state is inside the one renamed folder
        saved = {p.name for p in (straight / f"checkpoint-{step}").iterdir()}
        assert {"COMPLETE", LORA_FILE, "random_states_0.pkl", "random_states_1.pkl"} <= saved, saved

    # as if the first run had stopped after checkpoint-2: a second two-process run takes it up
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    proc = torchrun(resumed, "--resume_from_checkpoint", "latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines_starting(proc, "resuming from ") == [f"resuming from {resumed / 'checkpoint-2'}"], proc.stdout
    expected, got = load_file(straight / LORA_FILE), load_file(resumed / LORA_FILE)
    assert_same_tensors(got, expected)
    at_step_2 = load_file(straight / "checkpoint-2" / LORA_FILE)
    assert any(not torch.equal(at_step_2[k], expected[k]) for k in expected), "steps 3-4 must change the LoRA"
    history = json.loads((resumed / "loss_history.json").read_text())
    assert history == json.loads((straight / "loss_history.json").read_text()) and history["steps"] == [1, 2, 3, 4]


def test_two_processes_report_run_totals_and_errors_once(tmp_path):
    """CAC's fallback report counts every process's samples (2 steps x batch 2 x 2 processes = 8),
    and a usage error, which every process raises alike, is printed once."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    proc = torchrun(tmp_path / "cac", "--guide", "cac", "--cac_words", "astronaut", "--max_train_steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = lines_starting(proc, "CAC: ")
    assert len(report) == 1 and " of 8 samples had none of --cac_words (astronaut)" in report[0], proc.stdout
    proc = torchrun(tmp_path / "bad", "--resolution", "32")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "sat-train: error:" in line]
    assert len(errors) == 1 and "--resolution 32" in errors[0], proc.stderr[-3000:]


BUCKETS = ["--enable_bucket", "--min_bucket_reso", "48", "--max_bucket_reso", "128", "--bucket_reso_steps", "16"]
STOP_TIMEOUT = 180  # seconds; a run that stops at its first failure takes well under a minute here


def launch_two_ranks(out, *extra: str, timeout: float = STOP_TIMEOUT, program=("-m", "sat_train"), env=None):
    """The CLI (``program``: python's arguments before the flags) as two plain processes (RANK 0 and 1 of
    WORLD_SIZE 2, gloo), each launched as torchrun launches it but without torchrun's agent, which SIGTERMs
    the others at the first failure (as nothing does across nodes or under srun): each process's own exit
    code, stdout and stderr (code None: still running at ``timeout``, then killed). Returns
    ([(returncode, stdout, stderr)] by rank, seconds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    base.pop("SAT_TEST_KILL_AT", None)
    base.update(env or {})
    command = [sys.executable, *program, *FLAGS, "--output_dir", str(out), *extra]
    start = time.monotonic()
    procs = [subprocess.Popen(command, env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for rank in (0, 1)]
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))
            results.append((proc.returncode, stdout, stderr))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            results.append((None, stdout, stderr))
    return results, time.monotonic() - start


def test_a_failure_while_caching_latents_stops_both_processes_with_one_line_each(tmp_path):
    """The main process fails while writing the --cache_latents_to_disk files (their folder cannot be made:
    a file holds its name): it prints its own error, the other process one line naming that failure, and
    both exit 1 at once, instead of the other waiting for files that never come."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "out"
    out.mkdir()
    (out / "latent_cache").write_text("not a folder")
    ranks, seconds = launch_two_ranks(out, "--cache_latents_to_disk", *BUCKETS)
    assert [code for code, _, _ in ranks] == [1, 1], (seconds, [stderr[-2000:] for _, _, stderr in ranks])
    occupied = FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(out / "latent_cache"))
    cause = f"FileExistsError: {occupied}"  # "[Errno 17] File exists: '...'" on Linux
    assert ranks[0][2].strip().splitlines() == [
        f"[rank 0] sat-train: error: {cause} (run with --debug for the traceback)"]
    assert ranks[1][2].strip().splitlines() == [
        f"[rank 1] sat-train: error: RuntimeError: the main process failed while caching latents: {cause}; "
        "see its error (run with --debug for the traceback)"]
    assert seconds < STOP_TIMEOUT


# the CLI with every PIL.Image.open logged to $SAT_TEST_OPEN_LOG.RANK as "calling-module file-name"
OPEN_LOGGING_CLI = """
import os, sys
from PIL import Image
opened = Image.open
def logged(fp, *args, **kwargs):
    with open(os.environ["SAT_TEST_OPEN_LOG"] + "." + os.environ["RANK"], "a") as log:
        log.write(sys._getframe(1).f_globals["__name__"] + " " + os.path.basename(str(fp)) + "\\n")
    return opened(fp, *args, **kwargs)
Image.open = logged
from sat_train.cli import main
main()
"""


def test_only_the_main_process_checks_the_data_and_opens_images(tmp_path):
    """A bucketed --cache_latents_to_disk run on the demo's 6 photos as two ranks: the main process checks
    the data (opening each photo once) and encodes it (once more), the buckets and the cache taking the sizes
    from its check; the other process gets records, names and sizes from one broadcast and trains on the
    cached files: it opens no image at all."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    log = tmp_path / "opened"
    ranks, seconds = launch_two_ranks(tmp_path / "out", "--cache_latents_to_disk", *BUCKETS, "--max_train_steps",
                                      "2", program=("-c", OPEN_LOGGING_CLI), env={"SAT_TEST_OPEN_LOG": str(log)})
    assert [code for code, _, _ in ranks] == [0, 0], (seconds, [stderr[-2000:] for _, _, stderr in ranks])
    photos = [f"person_{i:02d}.jpg" for i in range(6)]
    assert Counter((tmp_path / "opened.0").read_text().splitlines()) == Counter(
        [f"sat_train.data.datacheck {p}" for p in photos] + [f"sat_train.data.dataset {p}" for p in photos])
    assert not (tmp_path / "opened.1").exists()
    assert [line for line in ranks[0][1].splitlines() if line.startswith("data check ")] == [
        f"data check {REPO / 'sat_train' / 'assets' / 'demo_data'}: 6 usable samples of 6 lines, 0 skipped, 0 fatal"]
    assert "data check" not in ranks[1][1] and (tmp_path / "out" / LORA_FILE).is_file()

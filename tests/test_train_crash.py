"""Crash safety: a run SIGKILLed while and right after it writes a checkpoint, and while it writes
its final LoRA file, resumes with ``--resume_from_checkpoint latest`` and ends with exactly the
LoRA of an uninterrupted run. The kills use the test-only hook SAT_TEST_KILL_AT (sat_train/faults.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from sat_train.config.settings import TrainConfig
from sat_train.errors import UsageError
from sat_train import train
from sat_train.outputs.checkpoints import CHECKPOINT_MARKER, find_resume_checkpoint, list_checkpoints, prune_checkpoints
from train_helpers import LORA_FILE, REPO, assert_same_tensors, tiny_config

# the demo model at tiny_config's settings: 6 photos, batch 2 → 3 steps per epoch
FLAGS = ["--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
         "--seed", "0", "--report_to", "none", "--random_flip", "--guide", "sac", "--max_train_steps", "4",
         "--checkpointing_steps", "2", "--checkpoints_total_limit", "1"]


def run(out, kill_at: str | None, resume: bool, extra=()) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    env.pop("SAT_TEST_KILL_AT", None)
    if kill_at:
        env["SAT_TEST_KILL_AT"] = kill_at
    args = [*FLAGS, *extra, "--output_dir", str(out)] + (["--resume_from_checkpoint", "latest"] if resume else [])
    return subprocess.run([sys.executable, "-m", "sat_train", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def names(out) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    expected = load_file(train(tiny_config(tmp_path / "straight", max_train_steps=4, guide="sac")))
    out = tmp_path / "crashy"

    # 1. killed while checkpoint-4 is being written (state saved, not yet marked complete / renamed)
    proc = run(out, "checkpoint-4:mid", resume=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "checkpoint-4").exists() and not (out / LORA_FILE).exists()
    partial = [p for p in out.iterdir() if p.name.startswith(".checkpoint-4.tmp-")]
    assert len(partial) == 1 and (partial[0] / LORA_FILE).is_file()  # the half-written one, never resumed from
    assert not (partial[0] / CHECKPOINT_MARKER).exists()

    # 2. resumes from checkpoint-2; killed right after checkpoint-4 is renamed into place (before pruning)
    proc = run(out, "checkpoint-4:after", resume=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint-2'}" in proc.stdout
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not any(n.startswith(".checkpoint-") for n in names(out)), names(out)  # stale temp cleaned
    assert not (out / LORA_FILE).exists()

    # 3. resumes from checkpoint-4 (nothing left to train); killed while writing the final LoRA
    proc = run(out, "lora:mid", resume=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint-4'}" in proc.stdout
    assert not (out / LORA_FILE).exists()  # only its temporary folder was written

    # 4. a clean finish
    proc = run(out, None, resume=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = load_file(out / LORA_FILE)
    assert_same_tensors(got, expected)
    # run 2 died before pruning: the limit is enforced at the next save, never by deleting first
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert not any(n.startswith((".checkpoint-", ".lora-")) for n in names(out)), names(out)


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / CHECKPOINT_MARKER).write_text(f"{step}\n")
    (tmp_path / ".checkpoint-8.tmp-123").mkdir()
    config = TrainConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest")
    assert find_resume_checkpoint(config) == tmp_path / "checkpoint-4"
    with pytest.raises(UsageError, match="incomplete"):
        find_resume_checkpoint(TrainConfig(output_dir=str(tmp_path), resume_from_checkpoint="checkpoint-6"))
    prune_checkpoints(tmp_path, 1)  # never deletes the only complete one, never counts the incomplete one
    assert names(tmp_path) == [".checkpoint-8.tmp-123", "checkpoint-4", "checkpoint-6"]

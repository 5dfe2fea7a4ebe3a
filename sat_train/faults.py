"""Crash-safety helpers shared by the modules that write files: atomic writes, fsync and the
test-only kill hook.

``SAT_TEST_KILL_AT`` is a TEST-ONLY hook: when set to one of the names below the process SIGKILLs
itself at that point, so tests (tests/test_train_crash.py) can crash a run exactly there and check
that resuming with ``--resume_from_checkpoint latest`` still gives the uninterrupted result.
Never set it in real runs.

    checkpoint-N:mid    accelerate state written to .checkpoint-N.tmp-PID, not yet marked or renamed
    checkpoint-N:after  checkpoint-N complete and renamed into place, older ones not yet pruned
    lora:mid            final LoRA file written to its temporary folder, not yet renamed into place
    kohya:mid           final kohya LoRA file written as .NAME.tmp, not yet renamed into place
    latent_cache:mid    a --cache_latents_to_disk file (or its manifest) written to its temporary, not yet renamed
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

KILL_ENV = "SAT_TEST_KILL_AT"


def crash_hook(name: str) -> None:
    """SIGKILL this process if ``SAT_TEST_KILL_AT == name`` (test-only; a no-op otherwise)."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Makes a rename inside ``folder`` durable (best effort: not every OS can open directories)."""
    try:
        fd = os.open(Path(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: str | os.PathLike, data: bytes, crash_point: str | None = None) -> Path:
    """``path`` appears whole or not at all: ``data`` goes to ``.NAME.tmp`` beside it, is fsynced, then
    os.replace'd into place. A failed write removes the temporary (a killed one's is removed at the next
    start); ``crash_point`` names the crash_hook between the write and the rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if crash_point is not None:
            crash_hook(crash_point)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

"""loss.png covers the whole run: the (step, loss) history is saved inside every checkpoint (before
its COMPLETE marker) and restored on resume; a checkpoint without it (older versions) still resumes.
The exact-match resume against an uninterrupted run is in test_train_loop.py."""

from __future__ import annotations

import json

import sat_train.outputs.pictures as pictures_module
import sat_train.outputs.checkpoints as checkpoints_module
from sat_train.outputs.pictures import LOSS_HISTORY_NAME, read_loss_history, write_loss_history
from sat_train import train
from sat_train.outputs.checkpoints import CHECKPOINT_MARKER
from train_helpers import tiny_config


def history(folder) -> dict:
    return json.loads((folder / LOSS_HISTORY_NAME).read_text())


def test_history_file_round_trips_exactly_and_keeps_steps_up_to_the_checkpoint(tmp_path):
    losses = [0.1, 1 / 3, 2.5e-300, 1e300, 0.7]
    write_loss_history(tmp_path / LOSS_HISTORY_NAME, [1, 2, 3, 4, 5], losses)
    assert read_loss_history(tmp_path / LOSS_HISTORY_NAME, 3) == ([1, 2, 3], losses[:3])
    assert read_loss_history(tmp_path / LOSS_HISTORY_NAME, 9) == ([1, 2, 3, 4, 5], losses)
    assert read_loss_history(tmp_path / "missing.json", 3) == ([], [])
    assert [p.name for p in tmp_path.iterdir()] == [LOSS_HISTORY_NAME]  # no temp file left


def test_history_is_in_the_checkpoint_before_its_marker_one_entry_per_optimizer_step(tmp_path, monkeypatch):
    seen = {}

    def snapshot(name):  # the kill point of tests/test_train_crash.py: state saved, not yet marked
        if name.endswith(":mid"):
            [tmp] = tmp_path.glob(".checkpoint-*.tmp-*")
            seen[name] = (sorted(p.name for p in tmp.iterdir()), history(tmp))

    monkeypatch.setattr(checkpoints_module, "crash_hook", snapshot)
    # 3 micro-batches per epoch, accumulation 2: step 1 = batches 1-2, step 2 = batch 3 (epoch end)
    train(tiny_config(tmp_path, guide="none", max_train_steps=2, gradient_accumulation_steps=2,
                      checkpointing_steps=1))
    final = history(tmp_path)
    assert final["steps"] == [1, 2]  # optimizer steps, not micro-batches
    assert set(seen) == {"checkpoint-1:mid", "checkpoint-2:mid"}
    for step in (1, 2):
        names, saved = seen[f"checkpoint-{step}:mid"]
        assert LOSS_HISTORY_NAME in names and CHECKPOINT_MARKER not in names
        assert saved == {k: v[:step] for k, v in final.items()}
        assert history(tmp_path / f"checkpoint-{step}") == saved  # renamed into place with it


def test_resume_from_an_earlier_checkpoint_draws_the_whole_run(tmp_path, monkeypatch):
    train(tiny_config(tmp_path, guide="none", max_train_steps=3, checkpointing_steps=1))
    uninterrupted = history(tmp_path)
    assert uninterrupted["steps"] == [1, 2, 3]
    drawn, real_loss_curve = [], pictures_module.loss_curve

    def recording_loss_curve(steps, losses):
        drawn.append((list(steps), list(losses)))
        return real_loss_curve(steps, losses)

    monkeypatch.setattr(pictures_module, "loss_curve", recording_loss_curve)
    # steps 2-3 again from checkpoint-1 (checkpoint-2/3 and the first run's loss_history.json get replaced)
    train(tiny_config(tmp_path, guide="none", max_train_steps=3, checkpointing_steps=1,
                      resume_from_checkpoint="checkpoint-1"))
    assert history(tmp_path) == uninterrupted  # the seeding makes the resumed losses exact
    assert history(tmp_path / "checkpoint-3") == uninterrupted
    assert drawn == [(uninterrupted["steps"], uninterrupted["losses"])]  # loss.png is drawn from it
    assert (tmp_path / "loss.png").is_file()


def test_checkpoint_without_history_resumes_with_history_from_the_resume_step(tmp_path):
    train(tiny_config(tmp_path, guide="none", max_train_steps=3, checkpointing_steps=2))
    uninterrupted = history(tmp_path)
    (tmp_path / "checkpoint-2" / LOSS_HISTORY_NAME).unlink()  # as written before the history was saved
    train(tiny_config(tmp_path, guide="none", max_train_steps=3, checkpointing_steps=2,
                      resume_from_checkpoint="latest"))
    assert history(tmp_path) == {"steps": [3], "losses": uninterrupted["losses"][2:]}
    assert (tmp_path / "loss.png").is_file()

"""The accelerate loop in-process: forwards per step, exact resume, checkpoint pruning, round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import sat_train.demo
import sat_train.run.prepare as prepare_module
from sat_train.demo import build_components, save_components
from sat_train.models.load import load_components
from sat_train import train
from train_helpers import DEMO_DATA_DIR, LORA_FILE, assert_same_tensors, count_forwards, tiny_config


@pytest.mark.parametrize("guide, capture, accumulation, per_batch", [
    ("none", "inline", 1, 1), ("sac", "inline", 1, 2), ("sac", "separate", 1, 3), ("sac", "inline", 2, 2)])
def test_training_loop_calls_unet_per_step(tmp_path, monkeypatch, guide, capture, accumulation, per_batch):
    counters = []

    def counted_components(*args, **kwargs):
        components = build_components(*args, **kwargs)
        counters.append(count_forwards(components.unet))
        return components

    monkeypatch.setattr(sat_train.demo, "build_components", counted_components)
    steps = 2 if accumulation == 1 else 1  # (6 photos / batch 2 = 3 batches: an epoch end forces a step)
    train(tiny_config(tmp_path, guide=guide, guide_capture=capture, max_train_steps=steps,
                      gradient_accumulation_steps=accumulation))
    assert counters[0][0] == steps * accumulation * per_batch
    resolved = json.loads((tmp_path / "train_config.json").read_text())
    assert resolved["guide"] == guide and resolved["resolved"]["unet_forwards_per_step"] == per_batch


def read_history(folder) -> dict:
    return json.loads((folder / "loss_history.json").read_text())


def test_resume_from_latest_matches_uninterrupted_run(tmp_path):
    # 6 photos, batch 2: 3 steps per epoch, so step 4 is mid-epoch and resume must skip a batch
    straight = train(tiny_config(tmp_path / "straight", max_train_steps=6))
    interrupted = tmp_path / "resumed"
    train(tiny_config(interrupted, max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=1))
    assert sorted(p.name for p in interrupted.glob("checkpoint-*")) == ["checkpoint-4"]  # checkpoint-2 pruned
    first_half = load_file(interrupted / LORA_FILE)
    # loss.png's data: the whole run, from step 1, exactly the uninterrupted run's (JSON floats are exact)
    expected_history = read_history(tmp_path / "straight")
    assert expected_history["steps"] == [1, 2, 3, 4, 5, 6]
    assert read_history(interrupted / "checkpoint-4") == {k: v[:4] for k, v in expected_history.items()}
    resume_config = tiny_config(interrupted, max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=1,
                                resume_from_checkpoint="latest")
    # the preparing phase alone: 6 photos / batch 2 = 3 steps an epoch, so step 4 is epoch 1 after 1 batch
    run = prepare_module.prepare_run(resume_config)
    assert (run.global_step, run.steps_per_epoch, run.first_epoch, run.skip_batches) == (4, 3, 1, 1)
    assert run.pictures.steps == [1, 2, 3, 4]
    run.accelerator.end_training()
    resumed = train(resume_config)
    expected, got = load_file(straight), load_file(resumed)
    assert_same_tensors(got, expected)
    assert any(not torch.equal(first_half[k], expected[k]) for k in expected), "steps 5-6 must change the LoRA"
    assert sorted(p.name for p in interrupted.glob("checkpoint-*")) == ["checkpoint-6"]
    assert read_history(interrupted) == expected_history  # not only steps 5-6
    assert read_history(interrupted / "checkpoint-6") == expected_history


def test_round_trip_from_saved_components(tmp_path):
    original = build_components(seed=3)
    folder = save_components(original, tmp_path / "tiny-sd")
    config = tiny_config(tmp_path / "out", pretrained_model_name_or_path=str(folder),
                         train_data_dir=str(DEMO_DATA_DIR), max_train_steps=1)
    loaded = load_components(config)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    caption = "a portrait of a woman, face, eyes"
    assert original.tokenizer(caption).input_ids == loaded.tokenizer(caption).input_ids
    assert loaded.noise_scheduler.config.beta_schedule == "scaled_linear"
    lora = train(config)
    assert lora.is_file() and len(load_file(lora)) > 0


def test_validation_images_are_written(tmp_path):
    train(tiny_config(tmp_path, max_train_steps=3, validation_prompt="a photo of a face", num_validation_images=1))
    images = sorted((tmp_path / "validation").glob("*.png"))
    assert [p.name for p in images] == ["epoch0001-0.png"]  # 3 steps = one epoch of 6 photos
    from PIL import Image

    assert Image.open(images[0]).size == (64, 64)

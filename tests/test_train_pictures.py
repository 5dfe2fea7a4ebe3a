"""Pictures of a run: mask previews (content against an independent composition: the overlay written
here, the blur from diffusers' SAG pipeline), validation PNGs every --validation_steps, TensorBoard
images, the loss curve; all PNGs decode with the right sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d
from PIL import Image

import sat_train.outputs.samples as validation_module
from sat_train import demo
from sat_train.cli import main, parse_config
from sat_train.demo import build_components
from sat_train.outputs.pictures import loss_curve, mask_preview
from sat_train import train
from train_helpers import tiny_config


def test_mask_preview_columns_are_image_overlay_and_decoded_blur():
    vae = build_components().vae
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        x0 = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor  # (2, 4, 8, 8)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    mask[1, 3, :] = True
    grid = np.asarray(mask_preview(pixels, x0, mask, vae), dtype=np.float64)
    assert grid.shape == (128, 192, 3)
    image = np.round((pixels.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    big = mask.repeat_interleave(16, 1).repeat_interleave(16, 2).numpy()[..., None]  # nearest 4x4 → 64x64
    for row in range(2):
        cells = grid[row * 64:(row + 1) * 64]
        np.testing.assert_array_equal(cells[:, :64], image[row])
        overlay = np.where(big[row], np.round(image[row] * 0.45 + np.array([255, 40, 40]) * 0.55), image[row])
        np.testing.assert_allclose(cells[:, 64:128], overlay, atol=1)
        m = torch.from_numpy(big[row, ::8, ::8, 0]).float()  # the mask at latent size (8x8)
        # the oracle blur: diffusers' SAG gaussian_blur_2d (81-tap conv2d), not the code's sat_kernels path
        blended = m * gaussian_blur_2d(x0[row:row + 1], 9, 1.0) + (1 - m) * x0[row:row + 1]
        with torch.no_grad():
            decoded = vae.decode(blended / vae.config.scaling_factor).sample
        expected = np.round((decoded[0].clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(cells[:, 128:], expected, atol=1)


def test_loss_curve_draws_the_points():
    image = np.asarray(loss_curve([1, 2, 3], [3.0, 1.0, 2.0]))
    assert image.shape == (360, 640, 3)
    blue = np.array([31, 119, 180])
    # plot box: x 60..620, y 30..320; (step 1, 3.0) top left, (2, 1.0) bottom middle, (3, 2.0) right middle
    for x, y in ((60, 30), (340, 320), (620, 175)):
        patch = image[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3)
        assert (np.abs(patch - blue).sum(axis=1) < 30).any(), (x, y)
    assert (np.abs(image[100:110, 500:510] - 255).sum() == 0)  # far from the line: white


def test_run_writes_mask_validation_and_loss_pngs(tmp_path, monkeypatch):
    monkeypatch.setattr(validation_module, "INFERENCE_STEPS", 2)
    train(tiny_config(tmp_path, guide="sac", max_train_steps=3, mask_preview_steps=2, validation_steps=2,
                      validation_prompt="a photo of a face", num_validation_images=1, validation_epochs=50,
                      report_to="tensorboard"))
    masks = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert masks == ["step000002.png", "step000003.png"]  # every 2 steps, and at the end (step 3)
    for name in masks:
        with Image.open(tmp_path / "masks" / name) as im:
            im.load()
            assert im.format == "PNG" and im.size == (3 * 64, 2 * 64)  # 3 columns, one row per sample
    shown = np.asarray(Image.open(tmp_path / "masks" / "step000003.png"), dtype=np.int16)
    assert np.abs(shown[:, 64:128] - shown[:, :64]).max() > 0  # some area is masked
    assert sorted(p.name for p in (tmp_path / "validation").iterdir()) == ["step000002-0.png"]
    for p in (tmp_path / "validation").iterdir():
        with Image.open(p) as im:
            im.load()
            assert im.size == (64, 64)
    with Image.open(tmp_path / "loss.png") as im:
        im.load()
        assert im.size == (640, 360)
    history = json.loads((tmp_path / "loss_history.json").read_text())  # what loss.png draws
    assert history["steps"] == [1, 2, 3] and len(history["losses"]) == 3
    assert all(np.isfinite(history["losses"])) and min(history["losses"]) > 0
    assert not [p for p in tmp_path.rglob(".*.tmp")]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = {}
    for path in (tmp_path / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path)).Reload()
        for tag in acc.Tags()["images"]:
            images[tag] = [(e.step, e.width, e.height) for e in acc.Images(tag)]
    assert images == {"validation": [(2, 64, 64)], "masks": [(2, 192, 128), (3, 192, 128)]}, images


def test_flags_are_checked():
    from sat_train.errors import UsageError

    with pytest.raises(UsageError, match="--mask_preview_steps"):
        tiny_config("x", mask_preview_steps=0).validate()
    with pytest.raises(UsageError, match="--validation_steps"):
        tiny_config("x", validation_steps=0).validate()
    with pytest.raises(UsageError, match="--cac_words"):
        tiny_config("x", guide="cac", cac_words=" , ").validate()
    with pytest.raises(UsageError, match="--mask_preview_steps"):
        tiny_config("x", guide="none", mask_preview_steps=5).validate()


def test_demo_writes_mask_pictures_without_the_flag(tmp_path, monkeypatch, capsys):
    # the README's first command: `python -m sat_train` with no model/data flags (here 3 steps at 64 px,
    # the demo's interval shortened from 10 to 2 steps): pictures at step 2 and the last, step 3
    monkeypatch.setattr(demo, "MASK_PREVIEW_STEPS", 2)
    out = tmp_path / "demo"
    main(["--output_dir", str(out), "--max_train_steps", "3", "--resolution", "64", "--report_to", "none"])
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["step000002.png", "step000003.png"]
    with Image.open(out / "masks" / "step000003.png") as im:
        assert im.size == (3 * 64, 2 * 64)
    assert f"mask pictures: {out / 'masks'}" in capsys.readouterr().out


def test_mask_picture_interval_demo_default_and_flag():
    assert demo.mask_preview_steps(parse_config([])) == 10  # the demo's 30 steps: 10, 20, 30
    assert demo.demo_defaults()["max_train_steps"] == 30
    assert demo.mask_preview_steps(parse_config(["--mask_preview_steps", "4"])) == 4  # the flag overrides
    assert demo.mask_preview_steps(parse_config(["--guide", "none"])) is None  # no mask to show; not an error
    real = ["--pretrained_model_name_or_path", "x", "--train_data_dir", "d"]
    assert demo.mask_preview_steps(parse_config(real)) is None  # real runs: only with the flag
    assert demo.mask_preview_steps(parse_config([*real, "--mask_preview_steps", "7"])) == 7

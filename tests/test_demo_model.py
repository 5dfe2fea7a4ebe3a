"""The shipped pretrained demo model (sat_train/assets/demo_model, made by assets/make_demo_model.py): it
loads through a user's folder loader with its checksums checked, its VAE reconstructs photos, its UNet draws
a training caption's photo, the demo's mask pictures show photo | mask | photo blurred under the mask, and
the make script reproduces its recorded losses."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image

from sat_train import demo
from sat_train.cli import main
from sat_train.models.load import CHECKSUMS_NAME
from train_helpers import DEMO_DATA_DIR, REPO

MODEL = demo.DEMO_MODEL_DIR
SIZE = 128
SAMPLED_PHOTO = 1  # the demo's validation caption is this photo's
TRAINING = json.loads((MODEL / "training.json").read_text(encoding="utf-8"))


def photos() -> tuple[torch.Tensor, list[str]]:
    """The six bundled photos (6, 3, 128, 128) in [-1, 1] and their captions."""
    lines = [json.loads(line) for line in (DEMO_DATA_DIR / "metadata.jsonl").read_text().splitlines() if line]
    arrays = [np.asarray(Image.open(DEMO_DATA_DIR / line["file_name"]).convert("RGB"), dtype=np.float32)
              for line in lines]
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1).permute(0, 3, 1, 2), [line["text"] for line in lines]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE), pixels scaled to [0, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    return vae.decode(vae.encode(images).latent_dist.mean).sample


@pytest.fixture(scope="module")
def shipped():
    return demo.load_demo_model()


def test_shipped_model_loads_in_float32_with_recorded_checksums(shipped):
    record = json.loads((MODEL / CHECKSUMS_NAME).read_text())
    files = sorted(p.relative_to(MODEL).as_posix() for p in MODEL.rglob("*")
                   if p.is_file() and p.name != CHECKSUMS_NAME)
    assert sorted(record) == files and any(name.endswith(".safetensors") for name in files)
    import hashlib

    assert all(hashlib.sha256((MODEL / name).read_bytes()).hexdigest() == digest for name, digest in record.items())
    for model in (shipped.text_encoder, shipped.vae, shipped.unet):
        assert next(model.parameters()).dtype == torch.float32
    from safetensors import safe_open

    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(MODEL / name, "pt") as f:
                assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, name


def test_vae_reconstructs_photos_far_better_than_a_random_one(shipped):
    images, _ = photos()
    shipped_psnr = psnr(reconstruct(shipped.vae, images), images)
    torch.manual_seed(0)
    random_vae = AutoencoderKL.from_config(shipped.vae.config)
    random_psnr = psnr(reconstruct(random_vae, images), images)
    assert shipped_psnr >= 20.0 and shipped_psnr > random_psnr + 10, (shipped_psnr, random_psnr)
    # faces it never saw: Labeled Faces in the Wild crops (scikit-image's lfw_subset), upscaled to 128 px
    from skimage import data

    faces = torch.from_numpy(data.lfw_subset()[:8]).float()[:, None]  # (8, 1, 25, 25) in [0, 1]
    faces = F.interpolate(faces, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    faces = faces.expand(-1, 3, -1, -1) * 2 - 1
    held_out = psnr(reconstruct(shipped.vae, faces), faces)
    assert held_out >= shipped_psnr - 3.0, (held_out, shipped_psnr)


def test_sampling_a_training_caption_draws_its_own_photo(shipped):
    """The demo's validation caption (SAMPLED_PHOTO's), sampled as its validation is (DPM-Solver++, CFG 7.5):
    nearer its own photo than any other. (Of the six captions at seeds 0-5 two pass this; three more draw
    another photo of the same subject: benchmarks/RESULTS.md.)"""
    from sat_train.outputs.samples import make_pipeline

    images, captions = photos()
    with torch.no_grad():
        out = make_pipeline(shipped, "dpmsolver++")(
            captions[SAMPLED_PHOTO], num_inference_steps=20, height=SIZE, width=SIZE, output_type="pt",
            generator=torch.Generator().manual_seed(SAMPLED_PHOTO)).images  # (1, 3, H, W) in [0, 1]
    distances = (out * 2 - 1 - images).pow(2).flatten(1).mean(1)
    assert int(distances.argmin()) == SAMPLED_PHOTO, distances.tolist()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's first command on the shipped model, cut to 2 steps (a mask picture at the last)."""
    out = tmp_path_factory.mktemp("demo") / "sat-demo-output"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(demo.DEMO_MODEL_ENV, raising=False)
        main(["--guide", "sac", "--output_dir", str(out), "--max_train_steps", "2", "--report_to", "none"])
    return out


def test_demo_mask_pictures_show_the_photo_blurred_under_the_mask(shipped, demo_run):
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d

    pictures = sorted((demo_run / "masks").iterdir())
    assert pictures, "the demo writes a mask picture at its last step"
    grid = np.asarray(Image.open(pictures[-1]).convert("RGB"), dtype=np.float32)
    vae, scale = shipped.vae, shipped.vae.config.scaling_factor
    coverage, compared_inside, compared_far = [], 0, 0
    for row in range(grid.shape[0] // SIZE):
        photo, overlay, blurred = (grid[row * SIZE:(row + 1) * SIZE, c * SIZE:(c + 1) * SIZE] for c in range(3))
        # the mask: where the overlay is the photo tinted red (0.45 photo + 0.55 red), not the photo itself
        tinted = np.abs(overlay - (0.45 * photo + 0.55 * np.array([255, 40, 40]))).max(-1) <= 1.5
        mask = tinted & (np.abs(overlay - photo).max(-1) > 1.5)
        latent_mask = torch.from_numpy(mask[4::8, 4::8].astype(np.float32))[None, None]  # one pixel per latent
        coverage.append(float(latent_mask.mean()))
        x = torch.from_numpy(photo / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            x0 = vae.encode(x).latent_dist.mean * scale
            # the reference: SAG's blur (diffusers) under the mask, decoded
            expected = vae.decode((latent_mask * gaussian_blur_2d(x0, 9, 1.0) + (1 - latent_mask) * x0) / scale).sample
        expected = ((expected[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).numpy()
        # the run encoded the float image (the picture shows it rounded) and sampled its latent: a few levels
        assert np.abs(expected - blurred).mean() < 4.0
        # outside the mask (2 latent pixels away from it), the third panel is the photo up to the VAE's error
        near = F.max_pool2d(latent_mask, 5, stride=1, padding=2)
        far = F.interpolate(near, scale_factor=8, mode="nearest")[0, 0].numpy() == 0
        inside = F.interpolate(latent_mask, scale_factor=8, mode="nearest")[0, 0].numpy() == 1
        diff = np.abs(blurred - photo).mean(-1)
        if far.any():
            far_mse = float((((blurred - photo) / 255) ** 2)[far].mean())
            assert 10 * np.log10(1 / far_mse) >= TRAINING["vae_psnr_demo_photos"] - 3.0
            compared_far += 1
        if inside.any() and far.any():
            assert diff[inside].mean() > diff[far].mean()
            compared_inside += 1
    assert compared_far and compared_inside, coverage


def test_sample_after_the_demo_draws_on_the_pretrained_base(demo_run, monkeypatch):
    from sat_train import sample

    monkeypatch.delenv(demo.DEMO_MODEL_ENV, raising=False)
    images, captions = photos()
    i = SAMPLED_PHOTO
    sample.main(["--lora", str(demo_run), "--prompt", captions[i], "--num_inference_steps", "20",
                 "--sag_scale", "0", "--device", "cpu", "--output_dir", str(demo_run / "sampled")])
    (path,) = (demo_run / "sampled").glob("*.png")
    drawn = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1)
    distances = (drawn.permute(2, 0, 1)[None] - images).pow(2).flatten(1).mean(1)
    assert int(distances.argmin()) == i, distances.tolist()


def test_make_script_short_run_reproduces_recorded_losses():
    proc = subprocess.run([sys.executable, str(REPO / "sat_train/assets/make_demo_model.py"), "--short"],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    recorded = TRAINING["short_run"]
    for stage in ("vae_losses", "unet_losses"):
        assert len(got[stage]) == len(recorded[stage]) > 0
        np.testing.assert_allclose(got[stage], recorded[stage], rtol=1e-5, err_msg=stage)


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_a_damaged_shipped_file_stops_in_one_line(tmp_path, monkeypatch, capsys, damage):
    copy = tmp_path / "demo_model"
    shutil.copytree(MODEL, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    weights.write_bytes(bytes(data[: len(data) // 2]) if damage == "truncate" else bytes(data[:-1] + b"\x00"))
    monkeypatch.setattr(demo, "DEMO_MODEL_DIR", copy)
    monkeypatch.delenv(demo.DEMO_MODEL_ENV, raising=False)
    for flags in ([], ["--pretrained_model_name_or_path", str(copy), "--train_data_dir", str(DEMO_DATA_DIR)]):
        with pytest.raises(SystemExit) as exit_info:
            main(["--guide", "sac", "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1", *flags])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
        assert str(weights) in err and "truncated or altered" in err and "reinstall" in err

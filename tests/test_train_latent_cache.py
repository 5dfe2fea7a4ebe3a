"""Latent caching (--cache_latents, --cache_latents_to_disk; sat_train/latent_cache.py).

A cached run must be the uncached center-crop run: the cached distribution is sampled as diffusers'
DiagonalGaussianDistribution samples, each sample's flip is the uncached flip draw, and whole runs
agree step by step (x0, loss, LoRA) under every guide. The disk cache lives under --output_dir, is
reused, and is rebuilt when the image, the resolution or the VAE changes, or a file is cut short.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import sat_train.run.loop as train_module
from sat_train.errors import UsageError
from sat_train.data.dataset import ImageTransform, LATENT_PARAMS, build_dataset
from sat_train.data.records import read_records
from sat_train.demo import build_components, build_tokenizer, save_components
from sat_train.data.latent_cache import CACHE_FOLDER, TENSOR_NAMES, cache_latents
from sat_train.models.vae import sample_latents
from sat_train import train
from sat_train.models.family import SD15
from train_helpers import DEMO_DATA_DIR, LORA_FILE, REPO, run_cli, tiny_config

NUM_IMAGES = 6  # the demo's photos


@pytest.fixture
def encoded_rows(monkeypatch) -> list[int]:
    """The batch size of every AutoencoderKL.encode call (images and their mirror images)."""
    rows: list[int] = []
    original = AutoencoderKL.encode

    def counting(self, x, *args, **kwargs):
        rows.append(int(x.shape[0]))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    return rows


@pytest.fixture
def step_latents(monkeypatch) -> list[torch.Tensor]:
    """x0 of every micro-batch a run trains on."""
    seen: list[torch.Tensor] = []
    original = train_module.make_step_inputs

    def recording(*args, **kwargs):
        inputs = original(*args, **kwargs)
        seen.append(inputs.x0.detach().clone())
        return inputs

    monkeypatch.setattr(train_module, "make_step_inputs", recording)
    return seen


def losses(out) -> list[float]:
    return json.loads((out / "loss_history.json").read_text())["losses"]


def assert_same_lora(got_path, expected_path, **tolerance) -> None:
    got, expected = load_file(got_path), load_file(expected_path)
    assert got.keys() == expected.keys() and len(got) > 0
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key, **tolerance)


def test_sample_latents_is_the_diagonal_gaussian_draw():
    vae = build_components().vae
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        params = vae.encode(pixels).latent_dist.parameters
        diffusers_draw = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(7))
    got = sample_latents(params, torch.Generator().manual_seed(7))
    mean, logvar = params.chunk(2, dim=1)  # the formula written out: mean + exp(logvar / 2) * N(0, 1)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise)
    torch.testing.assert_close(got, diffusers_draw)


def make_dataset(config):
    records, names = read_records(config, DEMO_DATA_DIR, quiet=True)
    return build_dataset(config, records, names, [build_tokenizer()], SD15(), seed=0)


def quiet_accelerator():
    return SimpleNamespace(print=lambda *a: None, is_main_process=True, wait_for_everyone=lambda: None)


def test_cached_items_carry_the_uncached_flip_pick(tmp_path):
    """Every item of a cached dataset (two epochs, both flips) is the VAE's distribution of the item the
    uncached center-crop dataset gives for that index and epoch (same flip draw)."""
    vae = build_components().vae
    uncached = make_dataset(tiny_config(tmp_path, center_crop=True))
    cached_config = tiny_config(tmp_path, cache_latents=True)
    cached = make_dataset(cached_config)
    cache_latents(cached_config, quiet_accelerator(), vae, cached, torch.float32)
    assert cached_config.random_flip and LATENT_PARAMS in cached[0] and "pixel_values" not in cached[0]
    picks = set()
    for epoch in (0, 1):
        uncached.set_epoch(epoch)
        cached.set_epoch(epoch)
        for index in range(len(cached)):
            pixels = uncached[index]["pixel_values"]
            with torch.no_grad():
                expected = vae.encode(pixels[None]).latent_dist.parameters[0]
            torch.testing.assert_close(cached[index][LATENT_PARAMS], expected, rtol=1e-4, atol=1e-5)
            picks.add(torch.allclose(cached[index][LATENT_PARAMS], cached.latent_cache.params(index, True)))
    assert picks == {False, True}  # both cached flips were drawn


@pytest.mark.parametrize("guide", ["none", "sac", "cac"])
def test_cached_run_matches_the_uncached_center_crop_run(tmp_path, step_latents, guide):
    """Same x0 and loss at every step (step 2's loss is taken after step 1's update), up to the float noise
    of another VAE batch. The LoRA files are not compared: Adam's first step moves each weight by about
    ±lr whatever its gradient's size, so that noise can flip a near-zero gradient's sign."""
    previews = dict(mask_preview_steps=1) if guide != "none" else {}
    train(tiny_config(tmp_path / "plain", guide=guide, center_crop=True, **previews))
    plain = list(step_latents)
    step_latents.clear()
    train(tiny_config(tmp_path / "cached", guide=guide, cache_latents=True, **previews))
    assert len(step_latents) == len(plain) == 2
    for got, expected in zip(step_latents, plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert losses(tmp_path / "cached") == pytest.approx(losses(tmp_path / "plain"), rel=1e-4)
    assert not (tmp_path / "cached" / CACHE_FOLDER).exists()  # in memory only
    if previews:  # mask pictures of cached batches: the decoded latent means | mask | blurred
        with Image.open(tmp_path / "cached" / "masks" / "step000002.png") as picture:
            assert picture.size == (3 * 64, 2 * 64)


def tree(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.fixture
def model_and_data(tmp_path):
    model = save_components(build_components(), tmp_path / "tiny-sd")
    data = shutil.copytree(DEMO_DATA_DIR, tmp_path / "data")
    return model, data


def disk_config(out, model, data, **overrides):
    return tiny_config(out, guide="none", pretrained_model_name_or_path=str(model), train_data_dir=str(data),
                       cache_latents_to_disk=True, **overrides)


def test_disk_cache_is_written_under_output_dir_and_reused(tmp_path, model_and_data, encoded_rows):
    model, data = model_and_data
    out = tmp_path / "out"
    data_before, model_before = tree(data), tree(model)
    first = train(disk_config(out, model, data))
    assert sum(encoded_rows) == 2 * NUM_IMAGES  # each image and its mirror image, once
    files = sorted((out / CACHE_FOLDER).glob("*.safetensors"))
    assert len(files) == NUM_IMAGES and (out / CACHE_FOLDER / "manifest.json").is_file()
    assert tree(data) == data_before and tree(model) == model_before  # nothing written beside the inputs
    with safe_open(str(files[0]), framework="pt") as f:
        key = json.loads(f.metadata()["key"])
        assert sorted(f.keys()) == sorted(TENSOR_NAMES.values())
    assert key["target_size"] == [64, 64] and key["flips"] == [False, True] and str(data) in key["image"]

    encoded_rows.clear()
    shutil.copy(first, tmp_path / "first.safetensors")
    second = train(disk_config(out, model, data))
    assert encoded_rows == []  # the VAE encoded nothing
    assert_same_lora(second, tmp_path / "first.safetensors", rtol=0, atol=0)


def test_disk_cache_is_rebuilt_where_it_no_longer_fits(tmp_path, model_and_data, encoded_rows, capsys):
    model, data = model_and_data
    out = tmp_path / "out"
    train(disk_config(out, model, data))
    folder = out / CACHE_FOLDER
    files = sorted(folder.glob("*.safetensors"))

    # a file cut short (a crash mid-write) and one of garbage: both encoded again, the rest reused
    files[0].write_bytes(files[0].read_bytes()[:-100])
    files[1].write_bytes(b"not a safetensors file")
    encoded_rows.clear()
    train(disk_config(out, model, data))
    assert sum(encoded_rows) == 2 * 2
    assert all(len(load_file(f)) == 2 for f in files)

    # an image file changed (another picture): only it is encoded again, and its latents are the new image's
    image = data / "person_03.jpg"
    with Image.open(image) as original:
        original.transpose(Image.FLIP_TOP_BOTTOM).save(image)
    encoded_rows.clear()
    train(disk_config(out, model, data))
    assert sum(encoded_rows) == 2 * 1

    # another resolution, then another VAE: everything encoded again, the log says why
    encoded_rows.clear()
    capsys.readouterr()
    train(disk_config(out, model, data, resolution=32))
    assert sum(encoded_rows) == 2 * NUM_IMAGES
    assert "was made for another target size: rebuilding it" in capsys.readouterr().out
    build_components(seed=1).vae.save_pretrained(model / "vae")
    encoded_rows.clear()
    capsys.readouterr()
    train(disk_config(out, model, data, resolution=32))
    assert sum(encoded_rows) == 2 * NUM_IMAGES
    assert "was made for another vae: rebuilding it" in capsys.readouterr().out
    assert len(list(folder.glob("*.safetensors"))) == NUM_IMAGES  # rewritten in place, not added beside


def test_rebuilt_cache_holds_the_new_images_latents(tmp_path, model_and_data):
    """After an image changes, its cached distribution is the VAE's of the new center crop (both flips)."""
    model, data = model_and_data
    config = disk_config(tmp_path / "out", model, data)
    vae = build_components().vae
    records, names = read_records(config, quiet=True)
    dataset = build_dataset(config, records, names, [build_tokenizer()], SD15())
    cache_latents(config, quiet_accelerator(), vae, dataset, torch.float32)
    index = next(i for i, (path, _) in enumerate(records) if path.name == "person_03.jpg")
    with Image.open(records[index][0]) as original:
        original.transpose(Image.FLIP_TOP_BOTTOM).save(records[index][0])
    cache_latents(config, quiet_accelerator(), vae, dataset, torch.float32)
    with Image.open(records[index][0]) as changed:  # as saved (JPEG is lossy), center-cropped, unflipped
        pixels = ImageTransform(64, center_crop=True, random_flip=False)(changed)
    with torch.no_grad():
        expected = vae.encode(torch.stack([pixels, pixels.flip(-1)])).latent_dist.parameters
    torch.testing.assert_close(dataset.latent_cache.params(index, False), expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dataset.latent_cache.params(index, True), expected[1], rtol=1e-4, atol=1e-5)


def test_random_crop_with_a_cache_is_refused():
    for flag in ("cache_latents", "cache_latents_to_disk"):
        with pytest.raises(UsageError, match=f"--random_crop with --{flag}"):
            tiny_config("unused", random_crop=True, **{flag: True}).validate()
    with pytest.raises(UsageError, match="--random_crop and --center_crop"):
        tiny_config("unused", random_crop=True, center_crop=True).validate()
    tiny_config("unused", random_crop=True).validate()  # uncached: the default crop, stated
    proc = run_cli("--random_crop", "--cache_latents", "--output_dir", "unused-never-created")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "--random_crop" in proc.stderr, proc.stderr
    assert not (REPO / "unused-never-created").exists()


CLI_FLAGS = ["--resolution", "64", "--train_batch_size", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
             "--seed", "0", "--report_to", "none", "--random_flip", "--guide", "sac", "--max_train_steps", "4",
             "--checkpointing_steps", "2", "--cache_latents_to_disk"]


def run_killable(out, kill_at: str | None) -> subprocess.CompletedProcess:
    """The CLI with --resume_from_checkpoint latest (a fresh start when there is none), SIGKILLed at ``kill_at``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
    env.pop("SAT_TEST_KILL_AT", None)
    if kill_at:
        env["SAT_TEST_KILL_AT"] = kill_at
    args = [*CLI_FLAGS, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    return subprocess.run([sys.executable, "-m", "sat_train", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_killed_while_caching_then_while_training_resumes_to_the_uninterrupted_result(tmp_path):
    # the uninterrupted run through the same CLI and environment (thread count included: float sums must match)
    proc = run_killable(tmp_path / "straight", None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = tmp_path / "straight" / LORA_FILE
    out = tmp_path / "crashy"
    folder = out / CACHE_FOLDER

    # 1. killed while writing the first cache file: only its temporary exists, never read as a cache file
    proc = run_killable(out, "latent_cache:mid")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name.startswith(".") and p.name.endswith(".tmp") for p in folder.iterdir()] == [True]

    # 2. the cache is built anew; killed right after checkpoint-2
    proc = run_killable(out, "checkpoint-2:after")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert f"latent cache: {NUM_IMAGES} images encoded, 0 reused" in proc.stdout
    assert not any(p.name.startswith(".") for p in folder.iterdir())  # the crash's temporary is gone

    # 3. resumed from checkpoint-2 on the cache as it is: the uninterrupted run's LoRA, bit for bit
    proc = run_killable(out, None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint-2'}" in proc.stdout
    assert f"latent cache: 0 images encoded, {NUM_IMAGES} reused" in proc.stdout
    assert_same_lora(out / LORA_FILE, expected, rtol=0, atol=0)


def test_dataset_name_rows_are_cached_and_reused(tmp_path, encoded_rows, monkeypatch):
    """--dataset_name rows (keyed by the dataset's fingerprint and row): cached as their uncached center
    crops, and a second build over the same dataset encodes nothing."""
    datasets = pytest.importorskip("datasets")
    import numpy as np

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # a local parquet folder: never the network
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (80, 64, 3), dtype=np.uint8)) for _ in range(3)]
    table = datasets.Dataset.from_dict({"image": images, "text": ["a face", "eyes", "hair"]})
    (tmp_path / "rows").mkdir()
    table.cast_column("image", datasets.Image()).to_parquet(tmp_path / "rows" / "train.parquet")
    settings = dict(pretrained_model_name_or_path="unused", dataset_name=str(tmp_path / "rows"),
                    cache_dir=str(tmp_path / "hf-cache"), random_flip=False)
    config = tiny_config(tmp_path / "out", cache_latents_to_disk=True, **settings)
    vae = build_components().vae
    for build in (1, 2):
        encoded_rows.clear()
        records, names = read_records(config)
        dataset = build_dataset(config, records, names, [build_tokenizer()], SD15())
        cache_latents(config, quiet_accelerator(), vae, dataset, torch.float32)
        assert sum(encoded_rows) == (3 if build == 1 else 0)
    uncached_config = tiny_config(tmp_path / "out", center_crop=True, **settings)
    uncached = build_dataset(uncached_config, *read_records(uncached_config), [build_tokenizer()], SD15())
    for index in range(3):
        with torch.no_grad():
            expected = vae.encode(uncached[index]["pixel_values"][None]).latent_dist.parameters[0]
        torch.testing.assert_close(dataset[index][LATENT_PARAMS], expected, rtol=1e-4, atol=1e-5)


class PlacedModel:
    """Stands in for the VAE where only placement matters: its device, and every move asked of it."""

    def __init__(self, device: str):
        self.device, self.moves = torch.device(device), []

    def to(self, device):
        self.device = torch.device(device)
        self.moves.append(str(self.device))
        return self


def test_vae_on_device_brings_the_vae_and_puts_it_back():
    from sat_train.models.vae import vae_on_device

    parked = PlacedModel("cpu")  # a cached GPU run's VAE between pictures
    with vae_on_device(parked, "cuda:0"):
        assert parked.device == torch.device("cuda:0")
    assert parked.moves == ["cuda:0", "cpu"]
    with pytest.raises(RuntimeError), vae_on_device(parked, "cuda:0"):  # put back even when decoding fails
        raise RuntimeError("decode failed")
    assert parked.device == torch.device("cpu")
    home = PlacedModel("cpu")  # a CPU run, or an uncached one: nothing moves
    with vae_on_device(home, "cpu"):
        pass
    assert home.moves == []

"""A training step with and without --cache_latents (issue 12), for --guide none and sac.

The demo model and photos at the demo's 128 px, B=2, center crops and --random_flip. A step here is
what the loop does per micro-batch outside accelerate: build the batch from the dataset (uncached:
open, resize, crop and flip each image; cached: look up its latent distribution), make_step_inputs
(uncached: the VAE encodes the batch; cached: sample the cached distribution), the guide's loss and
backward. ``step_ratio`` is the cached step's time over the uncached one's. The demo VAE is tiny
(8–16 channels), so what this measures is mostly the saved image decode and resize; with SD v1.5's
VAE at 512 px the encode the cache removes is a much larger share of a step.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from conftest import device_name, interleaved_medians, record, run_ours

from sat_train.guide.capture import resolve_backend, stock_processor
from sat_train.config.settings import TrainConfig
from sat_train.data.dataset import build_dataset, collate
from sat_train.data.records import read_records
from sat_train.demo import DEMO_DATA_DIR, build_components
from sat_train.guide.guidance import build_guide
from sat_train.data.latent_cache import cache_latents
from sat_train.models.lora import add_lora
from sat_train.run.inputs import make_step_inputs

BATCH, RESOLUTION = 2, 128


@functools.lru_cache(maxsize=None)
def _models(device_type: str, guide: str):
    """(components with LoRA on the device, the guide installed on its UNet)."""
    device = torch.device(device_type)
    components = build_components()
    for model in (components.unet, components.vae, components.text_encoder):
        model.requires_grad_(False)
    add_lora(components.unet, rank=4)
    for model in (components.unet, components.vae, components.text_encoder):
        model.to(device)
    backend = resolve_backend("auto", device)
    components.unet.set_attn_processor(stock_processor(backend))
    components.unet.train()
    config = TrainConfig(guide=guide, resolution=RESOLUTION)
    return components, build_guide(config, components.unet, components.noise_scheduler)


def _step_fn(device: torch.device, guide: str, cached: bool):
    components, run_guide = _models(device.type, guide)
    config = TrainConfig(guide=guide, resolution=RESOLUTION, train_batch_size=BATCH, center_crop=not cached,
                         random_flip=True, cache_latents=cached, seed=0, output_dir="unused")
    records, names = read_records(config, DEMO_DATA_DIR, quiet=True)
    dataset = build_dataset(config, records, names, components.tokenizers, components.family, seed=0)
    accelerator = SimpleNamespace(print=lambda *a: None, is_main_process=False, wait_for_everyone=lambda: None)
    cache_latents(config, accelerator, components.vae, dataset, torch.float32)
    if cached and device.type != "cpu":
        components.vae.to(device)  # cache_latents parks it on the CPU; the uncached step needs it here
    position = [0]

    def step():
        indices = [(position[0] + i) % len(dataset) for i in range(BATCH)]
        position[0] += BATCH
        batch = {key: value.to(device) for key, value in collate([dataset[i] for i in indices]).items()}
        generator = torch.Generator(device=device).manual_seed(position[0])
        inputs = make_step_inputs(batch, components, config, torch.float32, generator)
        run_guide(components.unet, inputs).loss.backward()
        components.unet.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("guide", ["none", "sac"])
def test_step_with_latent_cache(benchmark, device, guide):
    uncached = _step_fn(device, guide, cached=False)
    cached = _step_fn(device, guide, cached=True)
    times = interleaved_medians({"uncached": uncached, "cached": cached}, device, min_run_time=5.0)
    run_ours(benchmark, cached, device)
    record(benchmark, f"step --guide {guide} --cache_latents vs uncached, demo model {RESOLUTION}px B={BATCH} "
           f"[{device_name(device)}]", uncached_ms=times["uncached"] * 1e3, cached_ms=times["cached"] * 1e3,
           step_ratio=times["cached"] / times["uncached"])

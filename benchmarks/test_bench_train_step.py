"""One training step per guide, against a plain LoRA step (issue: benchmarks, items 3-5).

CPU: the embedded tiny SD-shaped UNet, B=4, 32x32 latents. CUDA: a full-size SD v1.5 UNet built
from its config (random weights, no download), 512 px (64x64 latents), fp16, B=4, with xformers
when it loads, else SDPA. A step is forward(s) + backward of the LoRA loss. ``step_ratio`` is the
step time over the ``none`` step's; ``peak_ratio`` the step's peak memory over ``none``'s (CUDA:
the allocator's peak; CPU: peak bytes of live tensors, counted op by op, since RSS cannot resolve
a tiny model's activations); ``saved_ratio`` the memory autograd saves for backward.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import device_name, interleaved_medians, record, run_ours
from guided_step import GUIDES, GuideSteps, bench_step_vs_plain, noised_inputs, with_lora

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


@functools.lru_cache(maxsize=None)
def _setup(device_type: str) -> GuideSteps:
    """The steps of every guide on this device's UNet (with LoRA) and batch."""
    from diffusers import UNet2DConditionModel

    device = torch.device(device_type)
    torch.manual_seed(0)
    if device.type == "cuda":
        unet = UNet2DConditionModel(**SD15_UNET).to(device, torch.float16)
        batch, side, dtype = 4, 64, torch.float16
    else:
        from sat_train.demo import build_components

        unet = build_components().unet
        batch, side, dtype = 4, 32, torch.float32
    s, alphas = noised_inputs(batch, side, unet.config.cross_attention_dim, device, dtype)
    return GuideSteps(with_lora(unet), s, alphas, device, torch.float16 if device.type == "cuda" else None)


def _step_fn(device: torch.device, guide_name: str):
    """One step of ``guide_name`` on the shared UNet, whose previous guide's capture hooks go first."""
    return _setup(device.type).step(guide_name)


@pytest.mark.parametrize("guide_name", [g for g in GUIDES if g != "none"])
def test_train_step_vs_plain(benchmark, device, guide_name):
    bench_step_vs_plain(benchmark, _setup(device.type), guide_name, f"step {guide_name} [{device_name(device)}]")


def test_hook_capture_cost(benchmark, device, monkeypatch):
    """What the hook's recomputed q/k add to a SAC step: the hook capture against the same step
    with q/k handed to the capture for free (cached from the first call, as the removed processor
    capture had them inside the attention), and the plain step; interleaved."""
    import sat_train.guide.capture as capture

    plain = _step_fn(device, "none")
    hooked = _step_fn(device, "sac")
    project_qk, cached = capture.project_qk, {}

    def free_qk(*args, **kwargs):  # same inputs every step: the first call's q/k are the step's
        return cached.setdefault("qk", project_qk(*args, **kwargs))

    def qk_free():
        with monkeypatch.context() as patch:
            patch.setattr(capture, "project_qk", free_qk)
            hooked()

    times = interleaved_medians({"plain": plain, "hook": hooked, "qk_free": qk_free}, device, min_run_time=10.0)
    run_ours(benchmark, hooked, device)
    record(benchmark, f"hook capture sac [{device_name(device)}]", plain_ms=times["plain"] * 1e3,
           hook_ms=times["hook"] * 1e3, qk_free_ms=times["qk_free"] * 1e3,
           hook_ratio=times["hook"] / times["plain"], qk_free_ratio=times["qk_free"] / times["plain"],
           added_ms=(times["hook"] - times["qk_free"]) * 1e3)

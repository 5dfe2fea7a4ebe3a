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
from memory import peak_mib, saved_activation_mib

from sat_train.capture import resolve_backend, stock_processor
from sat_train.config import GuideSettings
from sat_train.guidance import Guide, SATGuide, StepInputs, make_saliency
from sat_train.models import add_lora

# name -> (guide, its options); "none" is the plain LoRA step every ratio divides by
GUIDES = {
    "none": ("none", {}),
    "sac": ("sac", {}),
    "sac-separate (original, 3 forwards)": ("sac", dict(capture="separate")),
    "sac --guide_detach_degraded": ("sac", dict(detach_degraded=True)),
    "sac --guide_recompute": ("sac", dict(recompute=True)),
    "cac": ("cac", {}),
    "cac --guide_detach_degraded": ("cac", dict(detach_degraded=True)),
    "cac --guide_recompute": ("cac", dict(recompute=True)),
}

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


@functools.lru_cache(maxsize=None)
def _setup(device_type: str):
    """(unet with LoRA, step inputs, alphas_cumprod, attention backend) for this device."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    device = torch.device(device_type)
    torch.manual_seed(0)
    if device.type == "cuda":
        unet = UNet2DConditionModel(**SD15_UNET).to(device, torch.float16)
        batch, side, context, dtype = 4, 64, 768, torch.float16
    else:
        from sat_train.demo import build_components

        unet = build_components().unet
        batch, side, context, dtype = 4, 32, unet.config.cross_attention_dim, torch.float32
    unet.requires_grad_(False)
    add_lora(unet, rank=4)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA trains in fp32 next to fp16 frozen weights
    unet.train()
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, 4, side, side, generator=gen).to(device, dtype)
    noise = torch.randn(batch, 4, side, side, generator=gen).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    cond = torch.randn(batch, 77, context, generator=gen).to(device, dtype)
    # CAC: two caption positions per sample stand for the chosen words (the map is random either way)
    tokens = torch.tensor([[3, 5]] * batch, device=device)
    s = StepInputs(x0=x0, noise=noise, noisy=scheduler.add_noise(x0, noise, t), timesteps=t, cond=cond, target=noise,
                   tokens=tokens)
    backend = resolve_backend("auto", device)
    return unet, s, scheduler.alphas_cumprod.to(device), backend


_HOOKED = []  # the saliency whose capture hooks are on the shared UNet


def _step_fn(device: torch.device, guide_name: str):
    """One step of ``guide_name`` on the shared UNet, whose previous guide's capture hooks go first."""
    unet, s, alphas, backend = _setup(device.type)
    unet.set_attn_processor(stock_processor(backend))
    while _HOOKED:
        _HOOKED.pop().remove_hooks()
    kind, options = GUIDES[guide_name]
    if kind == "none":
        guide = Guide()
    else:
        _HOOKED.append(make_saliency(unet, kind))
        guide = SATGuide(_HOOKED[-1], alphas, GuideSettings(ratio=0.01, **options))
    return train_step(unet, s, guide, device)


def train_step(unet, s: StepInputs, guide: Guide, device: torch.device):
    """One step: ``guide``'s loss (fp16 autocast on CUDA), backward, gradients cleared."""
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = guide(unet, s).loss
        loss.backward()
        unet.zero_grad(set_to_none=True)

    return step


def _memory(step, device: torch.device) -> dict:
    return {"peak_mib": peak_mib(step, device), "saved_mib": saved_activation_mib(step)}


@pytest.mark.parametrize("guide_name", [g for g in GUIDES if g != "none"])
def test_train_step_vs_plain(benchmark, device, guide_name):
    plain = _step_fn(device, "none")  # built first: building a step resets the processors and hooks
    step = _step_fn(device, guide_name)
    times = interleaved_medians({"plain": plain, "guided": step}, device, min_run_time=10.0)
    mem_plain, mem_guide = _memory(plain, device), _memory(step, device)
    run_ours(benchmark, step, device)
    ratios = {f"{key[:-4]}_ratio": mem_guide[key] / mem_plain[key] for key in mem_plain}
    record(
        benchmark, f"step {guide_name} [{device_name(device)}]", plain_ms=times["plain"] * 1e3,
        guided_ms=times["guided"] * 1e3, step_ratio=times["guided"] / times["plain"], **ratios,
    )


def test_hook_capture_cost(benchmark, device, monkeypatch):
    """What the hook's recomputed q/k add to a SAC step: the hook capture against the same step
    with q/k handed to the capture for free (cached from the first call, as the removed processor
    capture had them inside the attention), and the plain step; interleaved."""
    import sat_train.capture as capture

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

"""The step benchmarks' shared parts: the guides each compares with a plain LoRA step, a batch of
noised inputs, and one training step of a guide on a given UNet (SD v1.5's or SDXL's).

Used by test_bench_train_step.py, test_bench_sdxl.py and sdxl_gpu_step.py; no side effects on import.
"""

from __future__ import annotations

import torch
from conftest import interleaved_medians, record, run_ours
from memory import peak_mib, saved_activation_mib

from sat_train.guide.capture import resolve_backend, stock_processor
from sat_train.guide.settings import GuideSettings
from sat_train.guide.guidance import Guide, SATGuide, StepInputs, make_saliency
from sat_train.models.lora import add_lora

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


def with_lora(unet: torch.nn.Module) -> torch.nn.Module:
    """``unet`` frozen, with the trainer's rank-4 LoRA in fp32 next to its (maybe half) weights, in train mode."""
    unet.requires_grad_(False)
    add_lora(unet, rank=4)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA trains in fp32 next to fp16 frozen weights
    return unet.train()


def sdxl_added_cond(unet, batch: int, pixels: int, device, dtype) -> dict:
    """SDXL's ``added_cond_kwargs`` for a square ``pixels`` image: a random pooled text embedding and
    the time ids (original size, crop top-left (0, 0), target size), the widths read off ``unet``'s config."""
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    gen = torch.Generator().manual_seed(2)
    time_ids = torch.tensor([[pixels, pixels, 0, 0, pixels, pixels]] * batch, dtype=dtype, device=device)
    return {"text_embeds": torch.randn(batch, pooled, generator=gen).to(device, dtype), "time_ids": time_ids}


def noised_inputs(batch: int, side: int, context: int, device, dtype, added_cond_kwargs: dict | None = None):
    """(StepInputs, alphas_cumprod): random latents (B, 4, side, side) noised at random timesteps by
    SD's training scheduler, random text embeddings (B, 77, context); CAC's chosen words are two
    caption positions per sample (the map is random either way)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(batch, 4, side, side, generator=gen).to(device, dtype)
    noise = torch.randn(batch, 4, side, side, generator=gen).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    cond = torch.randn(batch, 77, context, generator=gen).to(device, dtype)
    tokens = torch.tensor([[3, 5]] * batch, device=device)
    s = StepInputs(x0=x0, noise=noise, noisy=scheduler.add_noise(x0, noise, t), timesteps=t, cond=cond, target=noise,
                   tokens=tokens, added_cond_kwargs=added_cond_kwargs)
    return s, scheduler.alphas_cumprod.to(device)


class GuideSteps:
    """Training steps of each guide on one shared UNet and batch. Building a guide's step first
    removes the previous guide's capture hooks, so build the plain step before the guided one;
    ``exclusive=False`` keeps every guide's hooks instead (a hook not armed by its own guide does
    nothing), so that steps of several guides can be timed in turn."""

    def __init__(self, unet, s: StepInputs, alphas_cumprod: torch.Tensor, device: torch.device,
                 autocast_dtype: torch.dtype | None = None, exclusive: bool = True):
        self.unet, self.s, self.alphas, self.device = unet, s, alphas_cumprod, device
        self.autocast_dtype, self.exclusive = autocast_dtype, exclusive
        self.backend = resolve_backend("auto", device)
        self.hooked = []  # the saliency whose capture hooks are on the shared UNet

    def step(self, guide_name: str):
        """One forward(s) + backward of ``guide_name``'s loss, gradients cleared after."""
        unet, s = self.unet, self.s
        unet.set_attn_processor(stock_processor(self.backend))
        if self.exclusive:
            self.remove_hooks()
        kind, options = GUIDES[guide_name]
        if kind == "none":
            guide = Guide()
        else:
            self.hooked.append(make_saliency(unet, kind))
            guide = SATGuide(self.hooked[-1], self.alphas, GuideSettings(ratio=0.01, **options))

        def step():
            with self.autocast():
                loss = guide(unet, s).loss
            loss.backward()
            unet.zero_grad(set_to_none=True)

        return step

    def remove_hooks(self) -> None:
        """Take every capture hook these steps put on the UNet off it."""
        while self.hooked:
            self.hooked.pop().remove_hooks()

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def step_memory(step, device: torch.device) -> dict:
    return {"peak_mib": peak_mib(step, device), "saved_mib": saved_activation_mib(step)}


def bench_step_vs_plain(benchmark, steps: GuideSteps, guide_name: str, case: str, min_run_time: float = 10.0):
    """``guide_name``'s step against the plain one on ``steps``, interleaved; times, step_ratio and
    the peak and saved memory ratios recorded under ``case``."""
    plain = steps.step("none")  # built first: building a step resets the processors and hooks
    step = steps.step(guide_name)
    times = interleaved_medians({"plain": plain, "guided": step}, steps.device, min_run_time=min_run_time)
    mem_plain, mem_guide = step_memory(plain, steps.device), step_memory(step, steps.device)
    run_ours(benchmark, step, steps.device)
    ratios = {f"{key[:-4]}_ratio": mem_guide[key] / mem_plain[key] for key in mem_plain}
    record(benchmark, case, plain_ms=times["plain"] * 1e3, guided_ms=times["guided"] * 1e3,
           step_ratio=times["guided"] / times["plain"], **ratios)

"""The SAT step's settings (``GuideSettings``, and ``LossSettings`` for its loss), its flags' choices and
defaults, and their checks.

Imports no torch: the flags are built from these (``python -m sat_train --help`` stays light).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

GUIDES = ("none", "sac", "cac")
GUIDE_CAPTURES = ("inline", "separate")
ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "eager")
DEFAULT_CAC_WORDS = "face,eyes,eye,hair,hand,hands,mouth,nose"
# SAC's layer, SD v1.5's and SDXL's alike: the mid block's first self-attention. SDXL's mid block stacks ten
# transformer blocks; the first one's attn1 reads the mid block's own features (after its first ResNet),
# the input closest to SD v1.5's single mid-block attn1, where the paper captured the map.
DEFAULT_SAC_LAYER = "mid_block.attentions[0].transformer_blocks[0].attn1"
# Every family's VAE (SD v1.5's, SDXL's, the demo's) turns a px x px image into px/8 x px/8 latents.
VAE_SCALE_FACTOR = 8


def parse_threshold(value: str) -> float | str:
    """A --guide_threshold / --sat_threshold value: "mean" (per sample), else a float."""
    return value if value == "mean" else float(value)


@dataclass(frozen=True)
class GuideSettings:
    """How the SAT step degrades and guides (DESIGN.md, "The method"); one value passed whole."""

    ratio: float = 0.01  # r in pred + r * (pred - pred_deg)
    threshold: float | str = 1.0  # SAC: mask tokens whose mass exceeds this, or "mean" (per sample)
    kernel_size: int = 9  # Gaussian blur of the masked latents
    sigma: float = 1.0
    capture: str = "inline"  # inline: saliency from the first forward; separate: the original's extra forward
    detach_degraded: bool = False  # no gradient through the degraded forward (an approximation)
    recompute: bool = False  # backward reruns the first forward (exact; peak memory ~ a plain step's)
    kernel_backend: str = "auto"  # sat_kernels backend: auto | triton | torch


# kohya-ss/sd-scripts' --loss_type and --huber_schedule choices (library/train_util.py)
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


@dataclass(frozen=True)
class LossSettings:
    """The step's loss, kohya's options and defaults (guide/loss.py has the formulas)."""

    loss_type: str = "l2"  # per element: l2 (today's mse), l1, huber or smooth_l1
    huber_schedule: str = "snr"  # huber / smooth_l1: how the threshold c varies with the timestep
    huber_c: float = 0.1  # the threshold (constant), its value at t = T (exponential), or at infinite noise (snr)
    huber_scale: float = 1.0  # multiplies c under constant and exponential (kohya's snr schedule ignores it)
    debiased_estimation: bool = False  # weight each sample by 1/sqrt(snr) (v-prediction: 1/(snr + 1))

    @property
    def uses_huber_c(self) -> bool:
        return self.loss_type in ("huber", "smooth_l1")


def check_loss_flags(config) -> None:
    """--huber_* shape the huber and smooth_l1 losses only; c must be positive (exponential takes its log)."""
    settings, default = config.loss_settings, LossSettings()
    if not settings.uses_huber_c:
        for name in ("huber_schedule", "huber_c", "huber_scale"):
            if getattr(settings, name) != getattr(default, name):
                raise UsageError(f"--{name} shapes the huber and smooth_l1 losses: use it with --loss_type huber or "
                                 f"smooth_l1 (got --loss_type {settings.loss_type})")
        return
    if not settings.huber_c > 0:
        raise UsageError(f"--huber_c must be > 0, got {settings.huber_c}")
    if not settings.huber_scale > 0:
        raise UsageError(f"--huber_scale must be > 0, got {settings.huber_scale}")


def check_guide_mode_flags(config) -> None:
    """--guide_recompute, --guide_detach_degraded and --guide_capture separate act on a guide's forwards."""
    if config.guide_recompute and config.guide == "none":
        raise UsageError("--guide_recompute recomputes the first of the guide's two forwards: use it with "
                         "--guide sac or cac")
    if config.guide_recompute and config.guide_detach_degraded:
        raise UsageError("--guide_recompute and --guide_detach_degraded both cut a step's memory to about a "
                         "plain step's; pick one (recompute keeps exact gradients, detach is faster)")
    if config.guide_capture == "separate" and config.guide == "none":
        raise UsageError("--guide_capture separate is the original code's extra capture forward: use it with "
                         "--guide sac or cac")


def check_sac_layer_flag(config) -> None:
    """--sac_layer is a dotted module path, and only means something with a guide."""
    if not re.fullmatch(r"[A-Za-z_]\w*(\.\w+|\[\d+\])*", config.sac_layer):
        raise UsageError(f"--sac_layer {config.sac_layer!r} is not a dotted module path: give one like "
                         f"{DEFAULT_SAC_LAYER}")
    if config.sac_layer != DEFAULT_SAC_LAYER and config.guide == "none":
        raise UsageError("--sac_layer picks the layer SAC captures: use it with --guide sac or cac")


def check_cac_words_flag(config) -> None:
    if config.guide == "cac" and not config.cac_word_list:
        raise UsageError("--cac_words is empty: give comma-separated words, e.g. face,eyes,hair")


def check_blur_flags(config) -> None:
    if config.guide_kernel_size < 1 or config.guide_kernel_size % 2 == 0:
        raise UsageError(f"--guide_kernel_size must be an odd positive int, got {config.guide_kernel_size}")
    if not config.guide_sigma > 0:
        raise UsageError(f"--guide_sigma must be > 0, got {config.guide_sigma}")


def check_latents_fit_the_blur(config) -> None:
    """The blur reflect-pads the latents by kernel_size // 2, which needs latents wider than that on
    the smallest side a batch can have (with --enable_bucket, the smallest bucket's): checked before
    any model loads, instead of failing at the first step."""
    if config.guide == "none":
        return
    radius = config.guide_kernel_size // 2
    smallest = (radius + 1) * VAE_SCALE_FACTOR
    if config.enable_bucket:
        side = min(min(bucket) for bucket in config.bucket_resolutions)
        if side // VAE_SCALE_FACTOR <= radius:
            latents = side // VAE_SCALE_FACTOR
            raise UsageError(
                f"--min_bucket_reso {config.min_bucket_reso} gives buckets {side} px wide ({latents} "
                f"latents), too small for --guide_kernel_size {config.guide_kernel_size} (the blur needs latents "
                f"wider than {radius}): use --min_bucket_reso >= {smallest} or --guide_kernel_size <= "
                f"{max(1, 2 * latents - 1)}")
        return
    width, height = config.resolution_wh
    latent_side = min(width, height) // VAE_SCALE_FACTOR
    if latent_side <= radius:
        shape = f"{width // VAE_SCALE_FACTOR}x{height // VAE_SCALE_FACTOR}"
        raise UsageError(
            f"--resolution {config.resolution} gives {shape} latents, too small for "
            f"--guide_kernel_size {config.guide_kernel_size} (the blur needs latents wider than {radius}): "
            f"use --resolution >= {smallest} or --guide_kernel_size <= {max(1, 2 * latent_side - 1)}")


def check_attention_flags(config) -> None:
    if config.enable_xformers_memory_efficient_attention and config.attention_backend not in ("auto", "xformers"):
        raise UsageError("--enable_xformers_memory_efficient_attention conflicts with "
                         f"--attention_backend {config.attention_backend}")

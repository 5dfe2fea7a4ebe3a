"""The SAT training step: the loss of one batch under a guide ("none" | "sac"), nothing else.

SAC (DESIGN.md, "The method"):

    pred     = unet(x_t, t, c)                       # captures the mid-block attention mass
    x_deg    = sqrt(ab_t) * (m * blur(x0) + (1 - m) * x0) + sqrt(1 - ab_t) * pred
    pred_deg = unet(x_deg, t, c)
    loss     = mse(pred + r * (pred - pred_deg), target)

Gradients flow through both forwards and through ``pred`` inside ``x_deg``. ``pred`` there is the
noise estimate: a v-prediction model's v is converted to eps first (as diffusers' SAG pipeline
does), since re-noising with v would not match the noise level. A CAC guide slots in as another
``Guide`` subclass picked by ``build_guide``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .capture import MidBlockCapture


@dataclass
class StepInputs:
    """One batch, noised: everything a guide needs; ``unet`` may be wrapped (DDP)."""

    x0: torch.Tensor  # clean latents (B, 4, H, W)
    noise: torch.Tensor  # eps
    noisy: torch.Tensor  # x_t
    timesteps: torch.Tensor  # (B,) long
    cond: torch.Tensor  # text embeddings (B, S, D)
    target: torch.Tensor  # eps, or v for v-prediction
    loss_weights: torch.Tensor | None = None  # (B,) min-SNR weights, or None for a plain mean


@dataclass
class StepResult:
    loss: torch.Tensor  # what backward() runs on
    pred_loss: torch.Tensor  # detached mse(pred, target): the unguided loss, for logging
    guide_delta: torch.Tensor | None = None  # detached mean (pred - pred_deg)^2: the guide term's size
    mask_coverage: torch.Tensor | None = None  # detached % of mid-block tokens masked (the blurred area)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error in float32; per-sample weighted (min-SNR) as in diffusers' example."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def predict(unet, latents: torch.Tensor, s: StepInputs) -> torch.Tensor:
    return unet(latents, s.timesteps, s.cond, return_dict=False)[0]


class Guide:
    """No guidance: the plain LoRA loss, one UNet forward."""

    forwards_per_step = 1

    def __call__(self, unet, s: StepInputs) -> StepResult:
        pred = predict(unet, s.noisy, s)
        loss = weighted_mse(pred, s.target, s.loss_weights)
        return StepResult(loss=loss, pred_loss=loss.detach())


class SACGuide(Guide):
    """Self-attention control: guide each prediction away from a copy blurred where the mid block attends."""

    def __init__(self, capture: MidBlockCapture, alphas_cumprod: torch.Tensor, ratio: float,
                 threshold: float | str = 1.0, kernel_size: int = 9, sigma: float = 1.0,
                 separate_capture: bool = False, kernel_backend: str = "auto",
                 prediction_type: str = "epsilon", detach_degraded: bool = False):
        self.capture, self.alphas_cumprod, self.ratio = capture, alphas_cumprod, ratio
        self.prediction_type, self.detach_degraded = prediction_type, detach_degraded
        self.threshold, self.kernel_size, self.sigma = threshold, kernel_size, sigma
        self.separate_capture, self.kernel_backend = separate_capture, kernel_backend
        self.forwards_per_step = 3 if separate_capture else 2

    def saliency(self, unet, s: StepInputs) -> tuple[torch.Tensor, tuple[int, int]]:
        """The original code's extra forward: no gradients, LoRA off in the captured layer."""
        self.capture.arm(bypass_lora=True)
        with torch.no_grad():
            predict(unet, s.noisy, s)
        return self.capture.take()

    def noise_estimate(self, pred: torch.Tensor, s: StepInputs, alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """eps from the model output: itself, or sqrt(ab) v + sqrt(1 - ab) x_t for v-prediction."""
        if self.prediction_type != "v_prediction":
            return pred.float()
        ab = alphas_cumprod[s.timesteps].float().view(-1, 1, 1, 1)
        return ab.sqrt() * pred.float() + (1 - ab).sqrt() * s.noisy.float()

    def __call__(self, unet, s: StepInputs) -> StepResult:
        from sat_kernels import degrade_latents, saliency_mask

        if self.separate_capture:
            mass, map_size = self.saliency(unet, s)
            pred = predict(unet, s.noisy, s)
        else:
            self.capture.arm()
            pred = predict(unet, s.noisy, s)
            mass, map_size = self.capture.take()
        alphas_cumprod = self.alphas_cumprod.to(s.x0.device)
        # --guide_detach_degraded: no graph through the degraded forward (nor its input), so its
        # backward, about a third of the step, is skipped.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_degraded):
            x_deg = degrade_latents(s.x0.float(), self.noise_estimate(pred, s, alphas_cumprod), mass, map_size,
                                    alphas_cumprod, s.timesteps, self.threshold, self.kernel_size, self.sigma,
                                    backend=self.kernel_backend)
            pred_deg = predict(unet, x_deg.to(s.noisy.dtype), s)
        pred_f = pred.float()
        guided = pred_f + self.ratio * (pred_f - pred_deg.float())
        loss = weighted_mse(guided, s.target, s.loss_weights)
        with torch.no_grad():
            mask = saliency_mask(mass, map_size, self.threshold, backend=self.kernel_backend)
            return StepResult(
                loss=loss,
                pred_loss=weighted_mse(pred_f, s.target, s.loss_weights).detach(),
                guide_delta=(pred_f - pred_deg.float()).pow(2).mean().detach(),
                mask_coverage=mask.float().mean() * 100,
            )


def build_guide(config, unet, noise_scheduler, attention_backend: str) -> Guide:
    """The guide ``config.guide`` names, installed on the bare ``unet`` (before accelerate wraps it)."""
    if config.guide == "none":
        return Guide()
    if config.guide == "sac":
        capture = MidBlockCapture(unet, attention_backend)
        return SACGuide(capture, noise_scheduler.alphas_cumprod, config.guide_ratio, config.guide_threshold,
                        config.guide_kernel_size, config.guide_sigma,
                        separate_capture=config.sac_capture == "separate",
                        prediction_type=noise_scheduler.config.prediction_type,
                        detach_degraded=config.guide_detach_degraded)
    raise ValueError(f"unknown guide {config.guide!r}")

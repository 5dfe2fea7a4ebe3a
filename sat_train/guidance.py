"""The SAT training step: the loss of one batch under a guide ("none" | "sac" | "cac"), nothing else.

SAC (DESIGN.md, "The method"):

    pred     = unet(x_t, t, c)                       # captures the mid-block attention mass
    x_deg    = sqrt(ab_t) * (m * blur(x0) + (1 - m) * x0) + sqrt(1 - ab_t) * pred
    pred_deg = unet(x_deg, t, c)
    loss     = mse(pred + r * (pred - pred_deg), target)

Gradients flow through both forwards and through ``pred`` inside ``x_deg``. ``pred`` there is the
noise estimate: a v-prediction model's v is converted to eps first (as diffusers' SAG pipeline
does), since re-noising with v would not match the noise level. CAC (``CACGuide``) is the same
step with the saliency taken from the highest-resolution cross-attention probabilities of chosen
caption words (thresholded at the per-sample mean), falling back to SAC per sample without them.

Both forwards carry gradients, so by default a step holds two forwards' activations at the start
of backward (~2x a plain step's memory). ``recompute`` (--guide_recompute) keeps none of the first
forward's and reruns it inside backward: the same gradients for one more forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .capture import CrossAttentionCapture, MidBlockCapture


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
    tokens: torch.Tensor | None = None  # --guide cac: (B, S) caption positions of the chosen words, -1 = padding


@dataclass
class StepResult:
    loss: torch.Tensor  # what backward() runs on
    pred_loss: torch.Tensor  # detached mse(pred, target): the unguided loss, for logging
    guide_delta: torch.Tensor | None = None  # detached mean (pred - pred_deg)^2: the guide term's size
    mask_coverage: torch.Tensor | None = None  # detached % of mid-block tokens masked (the blurred area)
    mask: torch.Tensor | None = None  # detached bool (B, h, w) blur mask, for the mask pictures
    cac_fallback: torch.Tensor | None = None  # detached fraction of samples that fell back to the SAC mask


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error in float32; per-sample weighted (min-SNR) as in diffusers' example."""
    if weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def predict(unet, latents: torch.Tensor, s: StepInputs) -> torch.Tensor:
    return unet(latents, s.timesteps, s.cond, return_dict=False)[0]


def predict_recomputed(unet, latents: torch.Tensor, s: StepInputs) -> torch.Tensor:
    """``predict`` keeping none of its activations: backward reruns the forward (the captures are
    one-shot, so the rerun captures nothing). Non-reentrant checkpointing restores the RNG state
    for the rerun (dropout) and nests with the UNet's own gradient checkpointing."""
    if not torch.is_grad_enabled():
        return predict(unet, latents, s)
    return checkpoint(predict, unet, latents, s, use_reentrant=False)


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
                 prediction_type: str = "epsilon", detach_degraded: bool = False, recompute: bool = False):
        self.capture, self.alphas_cumprod, self.ratio = capture, alphas_cumprod, ratio
        self.prediction_type, self.detach_degraded = prediction_type, detach_degraded
        self.threshold, self.kernel_size, self.sigma = threshold, kernel_size, sigma
        self.separate_capture, self.kernel_backend = separate_capture, kernel_backend
        # --guide_recompute: the first forward's activations are not kept while the degraded
        # forward runs; backward recomputes them after the degraded forward's are freed. Peak
        # memory is then one forward's, for one more forward of time; gradients are unchanged.
        self.recompute = recompute
        self.forwards_per_step = (3 if separate_capture else 2) + int(recompute)

    def first_forward(self, unet, s: StepInputs) -> torch.Tensor:
        """pred = unet(x_t): the forward that captures the saliency (unless separate_capture)."""
        return (predict_recomputed if self.recompute else predict)(unet, s.noisy, s)

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
            pred = self.first_forward(unet, s)
        else:
            self.capture.arm()
            pred = self.first_forward(unet, s)
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
                mask=mask,
            )


class CACGuide(SACGuide):
    """Cross-attention control: blur where the highest-resolution cross-attention looks at the
    caption's chosen words (DESIGN.md, CAC). Captured inside the first forward like SAC (two UNet
    forwards per step); a sample whose caption has none of the words uses its SAC (mid-block mass)
    mask instead, and is counted in ``fallbacks``. ``threshold`` is the SAC fallback's threshold;
    the CAC map is always thresholded at its per-sample mean."""

    cac_threshold = "mean"

    def __init__(self, capture: MidBlockCapture, cross_capture: CrossAttentionCapture | None,
                 alphas_cumprod: torch.Tensor, ratio: float, threshold: float | str = 1.0, kernel_size: int = 9,
                 sigma: float = 1.0, kernel_backend: str = "auto", prediction_type: str = "epsilon",
                 detach_degraded: bool = False, recompute: bool = False):
        super().__init__(capture, alphas_cumprod, ratio, threshold, kernel_size, sigma, separate_capture=False,
                         kernel_backend=kernel_backend, prediction_type=prediction_type,
                         detach_degraded=detach_degraded, recompute=recompute)
        self.cross_capture = cross_capture
        self.fallbacks = self.samples = 0  # totals over the guide's life, for the end-of-run report

    def guided_forwards(self, unet, s: StepInputs):
        """(pred, pred_deg, mask (B, H, W) bool, has_words (B,) bool): the two forwards of a step."""
        from sat_kernels import degrade_latents, saliency_mask

        batch = s.x0.shape[0]
        if s.tokens is None or self.cross_capture is None:
            has_words = torch.zeros(batch, dtype=torch.bool, device=s.x0.device)
        else:
            has_words = (s.tokens >= 0).any(dim=1).to(s.x0.device)
        use_cac = bool(has_words.any())
        self.capture.arm()
        if use_cac:
            self.cross_capture.arm(s.tokens)
        pred = self.first_forward(unet, s)
        mass, mid_size = self.capture.take()
        cac_map, cac_size = self.cross_capture.take() if use_cac else (None, None)
        alphas_cumprod = self.alphas_cumprod.to(s.x0.device)
        size = tuple(s.x0.shape[-2:])
        x0 = s.x0.float()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_degraded):
            eps = self.noise_estimate(pred, s, alphas_cumprod)
            common = dict(alphas_cumprod=alphas_cumprod, timesteps=s.timesteps, kernel_size=self.kernel_size,
                          sigma=self.sigma, backend=self.kernel_backend)
            x_deg = None
            if use_cac:
                x_deg = degrade_latents(x0, eps, cac_map, cac_size, threshold=self.cac_threshold, **common)
            if not has_words.all():  # fallback samples: the SAC mask (computed for all; picked per sample)
                x_sac = degrade_latents(x0, eps, mass, mid_size, threshold=self.threshold, **common)
                x_deg = x_sac if x_deg is None else torch.where(has_words.view(-1, 1, 1, 1), x_deg, x_sac)
            pred_deg = predict(unet, x_deg.to(s.noisy.dtype), s)
        with torch.no_grad():
            mask = saliency_mask(mass, mid_size, self.threshold, size=size, backend=self.kernel_backend)
            if use_cac:
                cac_mask = saliency_mask(cac_map, cac_size, self.cac_threshold, size=size, backend=self.kernel_backend)
                mask = torch.where(has_words.view(-1, 1, 1), cac_mask, mask)
        return pred, pred_deg, mask, has_words

    def __call__(self, unet, s: StepInputs) -> StepResult:
        pred, pred_deg, mask, has_words = self.guided_forwards(unet, s)
        fallbacks = int((~has_words).sum())
        self.fallbacks += fallbacks
        self.samples += has_words.numel()
        pred_f = pred.float()
        guided = pred_f + self.ratio * (pred_f - pred_deg.float())
        return StepResult(
            loss=weighted_mse(guided, s.target, s.loss_weights),
            pred_loss=weighted_mse(pred_f, s.target, s.loss_weights).detach(),
            guide_delta=(pred_f - pred_deg.float()).pow(2).mean().detach(),
            mask_coverage=mask.float().mean() * 100,
            mask=mask,
            cac_fallback=torch.tensor(fallbacks / has_words.numel(), device=pred.device),
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
                        detach_degraded=config.guide_detach_degraded, recompute=config.guide_recompute)
    if config.guide == "cac":
        return CACGuide(MidBlockCapture(unet, attention_backend), CrossAttentionCapture(unet, attention_backend),
                        noise_scheduler.alphas_cumprod, config.guide_ratio, config.guide_threshold,
                        config.guide_kernel_size, config.guide_sigma,
                        prediction_type=noise_scheduler.config.prediction_type,
                        detach_degraded=config.guide_detach_degraded, recompute=config.guide_recompute)
    raise ValueError(f"unknown guide {config.guide!r}")

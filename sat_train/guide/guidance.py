"""The SAT training step: the loss of one batch under a guide ("none" | "sac" | "cac"), nothing else.

``SATGuide.guided_prediction`` is DESIGN.md's method, line for line:

    pred     = unet(x_t, t, c)                    # the saliency is captured inside this forward
    x_deg    = sqrt(ab_t) * (m * blur(x0) + (1 - m) * x0) + sqrt(1 - ab_t) * pred
    pred_deg = unet(x_deg, t, c)
    pred_g   = pred + r * (pred - pred_deg)       # SATGuide.__call__: loss = mse(pred_g, target)

(mse by default; --loss_type and its kohya options: ``guide.loss.StepLoss``, the loss every guide applies.)
With regularization images r is per sample (``guide_ratio``): r for the samples ``StepInputs.guided`` names,
0 for the others, which are the regularization samples unless --guide_reg_samples (they preserve the base
model's behaviour, which SAT is not meant to change; their second forward still runs, batched with the rest).

SAC and CAC differ only in where the saliency comes from, a small object with ``arm`` / ``take``:
``MidBlockSaliency`` (the attention mass each mid-block token receives, thresholded at
``GuideSettings.threshold``) and ``CaptionWordSaliency`` (the highest-resolution cross-attention on
the caption's chosen words, thresholded at its per-sample mean; a sample without those words uses
its mid-block mass). The blur mask every path hands out is (B, H, W) bool at latent size.

Gradients flow through both forwards and through ``pred`` inside ``x_deg``; ``pred`` there is the
noise estimate (a v-prediction model's v is turned into eps first, as diffusers' SAG pipeline does).
Settings (``GuideSettings``): ``capture="separate"`` adds the original code's extra no-gradient
capture forward with LoRA off (SAC: in the captured layer; CAC: in every layer), 3 forwards a step;
``detach_degraded`` runs the degraded forward without gradients (an approximation); ``recompute``
keeps none of the first forward's activations and reruns it inside backward (exact gradients, peak
memory about a plain step's instead of ~2x, one more forward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from .capture import CrossAttentionCapture, MidBlockCapture, lora_disabled, sac_layer
from .loss import StepLoss
from .masks import LossMask, degrade_with_mask
from .settings import GuideSettings, LossSettings


@dataclass
class StepInputs:
    """One batch, noised: everything a guide needs; ``unet`` may be wrapped (DDP)."""

    x0: torch.Tensor  # clean latents (B, 4, H, W)
    noise: torch.Tensor | None  # eps
    noisy: torch.Tensor  # x_t
    timesteps: torch.Tensor  # (B,) long
    cond: torch.Tensor  # text embeddings (B, S, D)
    target: torch.Tensor | None  # eps, or v for v-prediction
    # (B,) per-sample loss weights, or None for a plain mean: min-SNR's times kohya's loss_weights
    # (--prior_loss_weight on regularization samples; run/inputs.py)
    loss_weights: torch.Tensor | None = None
    tokens: torch.Tensor | None = None  # --guide cac: (B, S) caption positions of the chosen words, -1 = padding
    # SDXL: {"text_embeds": (B, 1280) pooled, "time_ids": (B, 6)}, passed to every UNet forward of the step
    added_cond_kwargs: dict | None = None
    # another trainer's own UNet call, latents -> prediction (kohya's call_unet, which builds its SDXL
    # conditioning itself); None: diffusers' call with cond and added_cond_kwargs
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    # --masked_loss: the batch's mask at latent size (guide/masks.py); None: no mask, or every mask full
    loss_mask: LossMask | None = None
    is_reg: torch.Tensor | None = None  # (B,) bool: regularization samples (data/regularization.py), or None
    guided: torch.Tensor | None = None  # (B,) bool: the samples SAT guides (ratio r; the others 0); None: all


@dataclass
class StepResult:
    loss: torch.Tensor  # what backward() runs on
    pred_loss: torch.Tensor  # detached loss(pred, target): the unguided loss, for logging
    guide_delta: torch.Tensor | None = None  # detached mean (pred - pred_deg)^2: the guide term's size
    mask_coverage: torch.Tensor | None = None  # detached % of latent pixels masked (the blurred area)
    mask: torch.Tensor | None = None  # detached (B, H, W) bool blur mask at latent size, for the pictures
    cac_fallback: torch.Tensor | None = None  # detached fraction of samples that fell back to the SAC mask


# ----------------------------------------------------------------------------- saliency: where to blur


@dataclass
class SaliencyMap:
    values: torch.Tensor  # (B, h*w) float32: a mass, or a CAC map
    map_size: tuple[int, int]  # (h, w)
    threshold: float | str  # a token is blurred where its value exceeds this ("mean": the sample's mean)
    samples: torch.Tensor | None = None  # (B,) bool: the samples this map decides; None = all


@dataclass
class Saliency:
    """The maps of one step: each sample is decided by the last map whose ``samples`` hold it."""

    maps: list[SaliencyMap]
    fallback: torch.Tensor | None = None  # CAC: (B,) bool, the samples without chosen words (SAC map)

    def _per_sample(self, of_map) -> torch.Tensor:
        """``of_map(m)`` of every map, each sample's row taken from the map that decides it."""
        out = None
        for m in self.maps:
            value = of_map(m)
            if out is None or m.samples is None:
                out = value
            else:
                out = torch.where(m.samples.view(-1, *[1] * (value.dim() - 1)), value, out)
        return out

    def degrade(self, x0, eps, alphas_cumprod, timesteps, settings: GuideSettings) -> torch.Tensor:
        """x_deg: blurred where the mask is, re-noised with ``eps`` (sat_kernels.degrade_latents)."""
        from sat_kernels import degrade_latents

        return self._per_sample(lambda m: degrade_latents(
            x0, eps, m.values, m.map_size, alphas_cumprod, timesteps, m.threshold, settings.kernel_size,
            settings.sigma, backend=settings.kernel_backend))

    def mask(self, size: tuple[int, int], kernel_backend: str = "auto") -> torch.Tensor:
        """(B, H, W) bool: the blur mask nearest-upsampled to the latents' ``size``."""
        from sat_kernels import saliency_mask

        with torch.no_grad():
            return self._per_sample(lambda m: saliency_mask(m.values, m.map_size, m.threshold, size=size,
                                                            backend=kernel_backend))


class MidBlockSaliency:
    """SAC: the attention mass each mid-block self-attention token receives."""

    def __init__(self, capture: MidBlockCapture):
        self.capture = capture

    def arm(self, s: StepInputs, bypass_lora: bool = False) -> None:
        self.capture.arm(bypass_lora)

    def take(self, s: StepInputs, threshold: float | str) -> Saliency:
        mass, map_size = self.capture.take()
        return Saliency([SaliencyMap(mass, map_size, threshold)])

    def capture_separately(self, unet, s: StepInputs, threshold: float | str) -> Saliency:
        """The original code's extra forward: no gradients, LoRA off in the captured layer only (the
        hook projects q and k without LoRA; the mass depends on nothing else of that layer)."""
        self.arm(s, bypass_lora=True)
        with torch.no_grad():
            predict(unet, s.noisy, s)
        return self.take(s, threshold)

    def summary(self, total=int) -> str | None:
        return None

    def remove_hooks(self) -> None:
        self.capture.remove()


class CaptionWordSaliency:
    """CAC: the highest-resolution cross-attention probabilities of the caption's chosen words
    (mean over layers and heads, max over the words), thresholded at each sample's mean. A sample
    whose caption has none of the words takes the mid-block mass instead (and is counted)."""

    threshold = "mean"

    def __init__(self, mid: MidBlockSaliency, cross: CrossAttentionCapture | None, words: str = "the chosen words"):
        self.mid, self.cross, self.words = mid, cross, words  # words: how the end-of-run report names them
        self.fallbacks = self.samples = 0  # totals over the guide's life, for the end-of-run report

    def _has_words(self, s: StepInputs) -> torch.Tensor:
        if s.tokens is None or self.cross is None:
            return torch.zeros(s.x0.shape[0], dtype=torch.bool, device=s.x0.device)
        return (s.tokens >= 0).any(dim=1).to(s.x0.device)

    def arm(self, s: StepInputs) -> None:
        self.mid.arm(s)
        if self._has_words(s).any():
            self.cross.arm(s.tokens)

    def take(self, s: StepInputs, threshold: float | str) -> Saliency:
        has_words = self._has_words(s)
        (sac,) = self.mid.take(s, threshold).maps
        maps = [] if has_words.all() else [SaliencyMap(sac.values, sac.map_size, threshold, ~has_words)]
        if has_words.any():
            cac_map, map_size = self.cross.take()
            maps.append(SaliencyMap(cac_map, map_size, self.threshold, has_words))
        self.fallbacks += int((~has_words).sum())
        self.samples += has_words.numel()
        return Saliency(maps, fallback=~has_words)

    def capture_separately(self, unet, s: StepInputs, threshold: float | str) -> Saliency:
        """The original code's extra forward: no gradients, LoRA off in every layer."""
        self.arm(s)
        with torch.no_grad(), lora_disabled(unet):
            predict(unet, s.noisy, s)
        return self.take(s, threshold)

    def summary(self, total=int) -> str | None:
        """The fallback count; ``total`` sums a count over processes (every process must call this)."""
        fallbacks, samples = total(self.fallbacks), total(self.samples)
        if not samples:
            return None
        return f"CAC: {fallbacks} of {samples} samples had none of {self.words} in their caption and used the SAC mask"

    def remove_hooks(self) -> None:
        self.mid.remove_hooks()
        if self.cross is not None:
            self.cross.remove()


# ----------------------------------------------------------------------------- the step


def predict(unet, latents: torch.Tensor, s: StepInputs) -> torch.Tensor:
    if s.forward is not None:
        return s.forward(latents)
    if s.added_cond_kwargs is None:
        return unet(latents, s.timesteps, s.cond, return_dict=False)[0]
    return unet(latents, s.timesteps, s.cond, added_cond_kwargs=s.added_cond_kwargs, return_dict=False)[0]


def predict_recomputed(unet, latents: torch.Tensor, s: StepInputs) -> torch.Tensor:
    """``predict`` keeping none of its activations: backward reruns the forward (the captures are
    one-shot, so the rerun captures nothing). Non-reentrant checkpointing restores the RNG state
    for the rerun (dropout) and nests with the UNet's own gradient checkpointing."""
    if not torch.is_grad_enabled():
        return predict(unet, latents, s)
    return checkpoint(predict, unet, latents, s, use_reentrant=False)


def noise_estimate(pred: torch.Tensor, s: StepInputs, alphas_cumprod: torch.Tensor, prediction_type: str):
    """eps from the model output: itself, or sqrt(ab) v + sqrt(1 - ab) x_t for v-prediction."""
    if prediction_type != "v_prediction":
        return pred.float()
    ab = alphas_cumprod[s.timesteps].float().view(-1, 1, 1, 1)
    return ab.sqrt() * pred.float() + (1 - ab).sqrt() * s.noisy.float()


class Guide:
    """No guidance: the plain LoRA loss, one UNet forward. ``loss``: the run's (--loss_type ...; default mse)."""

    forwards_per_step = 1

    def __init__(self, loss: StepLoss | None = None):
        self.loss = loss or StepLoss()

    def loss_of(self, pred: torch.Tensor, s: StepInputs) -> torch.Tensor:
        return self.loss(pred, s.target, s.timesteps, s.loss_weights, s.loss_mask)

    def __call__(self, unet, s: StepInputs) -> StepResult:
        pred = predict(unet, s.noisy, s)
        loss = self.loss_of(pred, s)
        return StepResult(loss=loss, pred_loss=loss.detach())

    def end_of_run_summary(self, total=int) -> str | None:
        """What the guide has to say once a run ends (None: nothing); ``total`` sums a count over
        processes, and every process must call this."""
        return None


@dataclass
class GuidedPrediction:
    guided: torch.Tensor  # pred + r * (pred - pred_deg), float32
    pred: torch.Tensor
    pred_degraded: torch.Tensor
    saliency: Saliency
    within: torch.Tensor | None = None  # --guide_within_mask: (B, H, W) bool, where blurring is allowed


def guide_ratio(ratio: float, s: StepInputs) -> float | torch.Tensor:
    """r, or per sample (B, 1, 1, 1) r for the samples ``s.guided`` names and 0 for the others (by default the
    regularization samples: their loss is the unguided prediction's)."""
    if s.guided is None:
        return ratio
    return ratio * s.guided.to(torch.float32).view(-1, *[1] * (s.x0.dim() - 1))


class SATGuide(Guide):
    """Guide each prediction away from a copy blurred where ``saliency`` says the UNet attends."""

    def __init__(self, saliency: MidBlockSaliency | CaptionWordSaliency, alphas_cumprod: torch.Tensor,
                 settings: GuideSettings = GuideSettings(), prediction_type: str = "epsilon",
                 loss: StepLoss | None = None):
        super().__init__(loss)
        self.saliency, self.alphas_cumprod = saliency, alphas_cumprod
        self.settings, self.prediction_type = settings, prediction_type

    @property
    def forwards_per_step(self) -> int:
        return 2 + int(self.settings.capture == "separate") + int(self.settings.recompute)

    def guided_prediction(self, unet, s: StepInputs) -> GuidedPrediction:
        settings = self.settings
        first_forward = predict_recomputed if settings.recompute else predict
        if settings.capture == "separate":
            saliency = self.saliency.capture_separately(unet, s, settings.threshold)
            pred = first_forward(unet, s.noisy, s)
        else:
            self.saliency.arm(s)
            pred = first_forward(unet, s.noisy, s)
            saliency = self.saliency.take(s, settings.threshold)
        alphas_cumprod = self.alphas_cumprod.to(s.x0.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not settings.detach_degraded):
            eps = noise_estimate(pred, s, alphas_cumprod, self.prediction_type)
            within = s.loss_mask.blur_region if s.loss_mask is not None and s.loss_mask.within_mask else None
            if within is None:
                x_deg = saliency.degrade(s.x0.float(), eps, alphas_cumprod, s.timesteps, settings)
            else:  # --guide_within_mask: the saliency mask AND the loss mask, degraded with that explicit mask
                mask = saliency.mask(tuple(s.x0.shape[-2:]), settings.kernel_backend) & within
                x_deg = degrade_with_mask(s.x0, eps, mask, alphas_cumprod, s.timesteps, settings.kernel_size,
                                          settings.sigma, settings.kernel_backend)
            pred_deg = predict(unet, x_deg.to(s.noisy.dtype), s)
        guided = pred.float() + guide_ratio(settings.ratio, s) * (pred.float() - pred_deg.float())
        return GuidedPrediction(guided, pred, pred_deg, saliency, within)

    def __call__(self, unet, s: StepInputs) -> StepResult:
        g = self.guided_prediction(unet, s)
        return self.step_result(self.loss_of(g.guided, s), g, s)

    def step_result(self, loss: torch.Tensor, g: GuidedPrediction, s: StepInputs) -> StepResult:
        mask = g.saliency.mask(tuple(s.x0.shape[-2:]), self.settings.kernel_backend)
        if g.within is not None:
            mask = mask & g.within
        with torch.no_grad():
            return StepResult(
                loss=loss,
                pred_loss=self.loss_of(g.pred, s),
                guide_delta=(g.pred.float() - g.pred_degraded.float()).pow(2).mean(),
                mask_coverage=mask.float().mean() * 100,
                mask=mask,
                cac_fallback=None if g.saliency.fallback is None else g.saliency.fallback.float().mean(),
            )

    def end_of_run_summary(self, total=int) -> str | None:
        return self.saliency.summary(total)


def build_guide(config, unet, noise_scheduler) -> Guide:
    """The guide ``config.guide`` names, its capture hooked on the bare ``unet`` (before accelerate wraps it),
    with the run's loss."""
    loss = build_loss(config.loss_settings, noise_scheduler)
    if config.guide == "none":
        return Guide(loss)
    settings = config.guide_settings
    saliency = make_saliency(unet, config.guide, settings.kernel_backend, words=f"--cac_words ({config.cac_words})",
                             self_attention=sac_layer(unet, config.sac_layer))
    return SATGuide(saliency, noise_scheduler.alphas_cumprod, settings, noise_scheduler.config.prediction_type, loss)


def build_loss(settings: LossSettings, noise_scheduler) -> StepLoss:
    """The step loss of ``settings`` on ``noise_scheduler``'s schedule and prediction type."""
    return StepLoss(settings, noise_scheduler.alphas_cumprod, noise_scheduler.config.num_train_timesteps,
                    noise_scheduler.config.prediction_type)


def make_saliency(unet, guide: str, kernel_backend: str = "auto", words: str = "the chosen words",
                  self_attention=None, cross_attentions=None):
    """The saliency source of ``guide`` ("sac" | "cac"), its capture hooks on ``unet``'s
    ``self_attention`` layer (SAC, and CAC's fallback) and ``cross_attentions`` (CAC): modules or
    dotted paths, by default the mid-block attn1 and the highest-resolution attn2 layers."""
    if guide not in ("sac", "cac"):
        raise ValueError(f'guide must be "sac" or "cac", got {guide!r}')
    mid = MidBlockSaliency(MidBlockCapture(unet, kernel_backend, self_attention))
    if guide == "sac":
        return mid
    return CaptionWordSaliency(mid, CrossAttentionCapture(unet, kernel_backend, cross_attentions), words)

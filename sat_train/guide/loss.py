"""The step's loss of a prediction, kohya-ss/sd-scripts' options (``LossSettings``), in kohya's order:

    per element  --loss_type: l2 (mse), l1, huber or smooth_l1 with a per-sample threshold c(t),
                 times the loss mask's weight (--masked_loss; guide/masks.py)
    per sample   mean over the other dims, times the min-SNR weights (StepInputs.loss_weights)
                 and, with --debiased_estimation_loss, the debiased weights
    the batch    mean

Formulas from sd-scripts' library/train_util.py (``conditional_loss``, ``get_huber_threshold_if_needed``)
and library/custom_train_functions.py (``apply_debiased_estimation``); snr = ab / (1 - ab), ab the
scheduler's alphas_cumprod at t.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .masks import LossMask
from .settings import LossSettings


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """(B,) signal-to-noise ratio at each timestep, float32."""
    ab = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ab / (1 - ab)


def huber_threshold(settings: LossSettings, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                    num_train_timesteps: int) -> torch.Tensor:
    """(B,) c(t): constant c * scale; exponential c^(t / T) * scale (c at t = T, scale at t = 0); snr
    (1 - c) / (1 + sigma)^2 + c with sigma = sqrt(1 / snr) (1 at clean inputs, c at pure noise)."""
    c, scale = settings.huber_c, settings.huber_scale
    if settings.huber_schedule == "constant":
        return torch.full(timesteps.shape, c * scale, device=timesteps.device)
    if settings.huber_schedule == "exponential":
        return torch.exp(math.log(c) / num_train_timesteps * timesteps.float()) * scale
    sigma = snr(alphas_cumprod, timesteps).rsqrt()
    return (1 - c) / (1 + sigma) ** 2 + c


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The unreduced loss; ``huber_c`` (B,) for huber (2c(sqrt(d^2 + c^2) - c), ~d^2 near 0, ~2c|d| far) and
    smooth_l1 (the same divided by c)."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = huber_c.view(-1, *[1] * (pred.dim() - 1))
    smooth = 2 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
    return c * smooth if loss_type == "huber" else smooth


def debiased_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """(B,) 1 / sqrt(snr), or 1 / (snr + 1) for v-prediction; snr capped at 1000 (infinite at ab = 1)."""
    ratio = snr(alphas_cumprod, timesteps).clamp(max=1000)
    return 1 / (ratio + 1) if prediction_type == "v_prediction" else ratio.rsqrt()


class StepLoss:
    """The loss every guide applies to its (guided) prediction; built once per run from the settings and
    the noise scheduler's ``alphas_cumprod``, ``num_train_timesteps`` and prediction type."""

    def __init__(self, settings: LossSettings = LossSettings(), alphas_cumprod: torch.Tensor | None = None,
                 num_train_timesteps: int = 1000, prediction_type: str = "epsilon"):
        needs_schedule = settings.debiased_estimation or (settings.uses_huber_c and settings.huber_schedule == "snr")
        if needs_schedule and alphas_cumprod is None:
            raise ValueError("this loss needs the noise scheduler's alphas_cumprod")
        self.settings, self.alphas_cumprod = settings, alphas_cumprod
        self.num_train_timesteps, self.prediction_type = num_train_timesteps, prediction_type

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                 weights: torch.Tensor | None = None, mask: LossMask | None = None) -> torch.Tensor:
        """Float32 loss of ``pred``; ``weights`` (B,): the min-SNR weights, or None; ``mask``: the loss mask
        (--masked_loss, guide/masks.py: weights each element before the per-sample mean), or None."""
        settings = self.settings
        pred, target = pred.float(), target.float()
        if settings.loss_type == "l2" and weights is None and not settings.debiased_estimation and mask is None:
            # the loss before --loss_type existed, kept bit for bit: mse_loss's own mean reduction
            # (the per-sample path below rounds its gradient differently)
            return F.mse_loss(pred, target, reduction="mean")
        huber_c = None
        if settings.uses_huber_c:
            huber_c = huber_threshold(settings, timesteps, self.alphas_cumprod, self.num_train_timesteps)
        elementwise = elementwise_loss(pred, target, settings.loss_type, huber_c)
        if mask is not None:
            per_sample = mask.per_sample(elementwise)
        else:
            per_sample = elementwise.mean(dim=tuple(range(1, pred.dim())))
        if weights is not None:
            per_sample = per_sample * weights
        if settings.debiased_estimation:
            per_sample = per_sample * debiased_weights(self.alphas_cumprod, timesteps, self.prediction_type)
        return per_sample.mean()

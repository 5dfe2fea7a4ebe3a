"""The loss mask of one step (--masked_loss; its files and transforms: data/masks.py): how it weights the
loss and, with --guide_within_mask, where SAT may blur.

kohya-ss/sd-scripts (library/custom_train_functions.py ``apply_masked_loss``): the mask, 0..1 at the
image's trained size, is downsampled to the latents' size with ``F.interpolate(mode="area")`` and
multiplies the elementwise loss before each sample's mean. OneTrainer's options on top:

    weight   = mask + unmasked_weight * (1 - mask)       # --unmasked_weight W: the loss outside the mask
    per_sample = mean(loss * weight) [/ mean(weight)]    # --normalize_masked_area_loss: the division

W = 0 is kohya's behaviour. (OneTrainer clamps instead, weight = clamp(mask, W, 1): the same on a 0/1
mask; on a feathered edge the linear blend keeps the feather's ramp from W up to 1.)

--guide_within_mask (sat's own extension, not the paper's method): SAT blurs only where its saliency mask
and the loss mask (> 0.5 at latent size) both are; that degrade takes the explicit mask through
sat_kernels' blur instead of the one-launch thresholded degrade_latents, since the loss mask lives at
latent size while the saliency lives on the coarser attention map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLUR_REGION_THRESHOLD = 0.5  # --guide_within_mask: a latent pixel is inside the mask above this


@dataclass
class LossMask:
    """One batch's mask at latent size and how the loss uses it."""

    region: torch.Tensor  # (B, 1, h, w) float32 in [0, 1]: the mask area-downsampled to the latents
    unmasked_weight: float = 0.0  # the loss weight where the mask is 0 (kohya: 0)
    normalize: bool = False  # divide each sample's loss by its mean weight (OneTrainer's normalization)
    within_mask: bool = False  # --guide_within_mask: SAT blurs only inside the region

    @property
    def weight(self) -> torch.Tensor:
        """(B, 1, h, w) mask + W * (1 - mask); exactly the mask when W = 0."""
        if not self.unmasked_weight:
            return self.region
        return self.region + self.unmasked_weight * (1 - self.region)

    def per_sample(self, elementwise: torch.Tensor) -> torch.Tensor:
        """(B,) the mean of ``elementwise`` (B, C, h, w) times the weight, divided by the mean weight
        when normalizing."""
        weight = self.weight
        dims = tuple(range(1, elementwise.dim()))
        per_sample = (elementwise * weight).mean(dim=dims)
        if self.normalize:
            per_sample = per_sample / weight.mean(dim=dims)
        return per_sample

    @property
    def blur_region(self) -> torch.Tensor:
        """(B, h, w) bool: where --guide_within_mask lets SAT blur."""
        return self.region[:, 0] > BLUR_REGION_THRESHOLD


def latent_loss_mask(pixel_mask: torch.Tensor, size: tuple[int, int], unmasked_weight: float = 0.0,
                     normalize: bool = False, within_mask: bool = False) -> LossMask | None:
    """The batch's LossMask from its (B, 1, H, W) masks at image size, area-downsampled to ``size`` (h, w) as
    kohya does; None when every mask is full (all 1): the step is then the unmasked one, bit for bit."""
    region = F.interpolate(pixel_mask.float(), size=tuple(size), mode="area")
    if bool((region == 1).all()):
        return None
    return LossMask(region, unmasked_weight, normalize, within_mask)


def degrade_with_mask(x0: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor, alphas_cumprod: torch.Tensor,
                      timesteps: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0,
                      kernel_backend: str = "auto") -> torch.Tensor:
    """x_deg = sqrt(ab_t) * (m * blur(x0) + (1 - m) * x0) + sqrt(1 - ab_t) * eps for an explicit (B, H, W)
    bool ``mask`` m (DESIGN.md's degrade, the mask given instead of thresholded); float32, differentiable
    w.r.t. ``x0`` and ``eps``."""
    from sat_kernels import gaussian_blur

    x0, eps = x0.float(), eps.float()
    m = mask[:, None].to(x0.dtype)
    ab = alphas_cumprod.to(x0.device)[timesteps.to(x0.device)].float().view(-1, 1, 1, 1)
    blurred = gaussian_blur(x0, kernel_size, sigma, backend=kernel_backend)
    return ab.sqrt() * (m * blurred + (1 - m) * x0) + (1 - ab).sqrt() * eps

"""A batch → the SAT step's inputs (``guide.guidance.StepInputs``): latents, noise, timesteps, the
noised latents, the target, the text conditioning and the min-SNR weights; kohya's noise options
(--multires_noise_iterations, --ip_noise_gamma) and their checks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..data.dataset import IS_REG, LATENT_PARAMS, LOSS_MASK
from ..errors import UsageError
from ..guide.guidance import StepInputs
from ..guide.masks import latent_loss_mask
from ..guide.prior import with_prior_loss_weights
from ..models.vae import sample_latents

if TYPE_CHECKING:
    from ..config.settings import TrainConfig


def make_step_inputs(batch, components, config: TrainConfig, weight_dtype, generator=None,
                     trained_text_encoders=()) -> StepInputs:
    """Encode images and captions, draw noise and timesteps, noise the latents, pick the target.
    ``trained_text_encoders``: the (prepared) text encoders whose LoRA trains (the family's order);
    captions then encode with gradients. The family encodes the batch into the context and, for
    SDXL, the pooled embeddings and time ids as ``added_cond_kwargs`` (models/family.py)."""
    from diffusers.training_utils import compute_snr

    scheduler = components.noise_scheduler
    with torch.no_grad():
        if LATENT_PARAMS in batch:  # --cache_latents: the VAE encoded the images before training
            latents = sample_latents(batch[LATENT_PARAMS].to(weight_dtype), generator)
        else:  # in the VAE's dtype: float32 for a force_upcast SDXL VAE under fp16 (models.vae.vae_dtype)
            vae = components.vae
            latents = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist.sample(generator).to(weight_dtype)
        latents = latents * components.vae.config.scaling_factor
    trainable = bool(trained_text_encoders)
    cond, added = components.family.encode_batch(trained_text_encoders or components.text_encoders, batch,
                                                 weight_dtype, trainable)
    noise, timesteps, noisy = noise_latents(latents, config, scheduler, generator)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UsageError(f"unsupported prediction type {scheduler.config.prediction_type!r}")
    weights = None
    if config.snr_gamma is not None:  # min-SNR weighting (Hang et al. 2023), as in diffusers' example
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=config.snr_gamma)
        weights = weights / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weights / snr
    loss_mask = None
    if LOSS_MASK in batch:  # --masked_loss: area-downsampled to the latents (guide/masks.py); None when all full
        loss_mask = latent_loss_mask(batch[LOSS_MASK].to(latents.device), latents.shape[-2:], config.unmasked_weight,
                                     config.normalize_masked_area_loss, config.guide_within_mask)
    is_reg = batch.get(IS_REG)
    if is_reg is not None:  # regularization images: kohya's loss_weights and who SAT guides (guide/prior.py)
        weights = with_prior_loss_weights(weights, is_reg, config.prior_loss_weight)
    return StepInputs(x0=latents, noise=noise, noisy=noisy, timesteps=timesteps, cond=cond, target=target,
                      loss_weights=weights, tokens=batch.get("cac_tokens"), added_cond_kwargs=added,
                      loss_mask=loss_mask, is_reg=is_reg,
                      guided=None if is_reg is None or config.guide_reg_samples else ~is_reg)


def noise_latents(latents: torch.Tensor, config: TrainConfig, scheduler, generator=None):
    """(noise, timesteps, x_t): the target's noise (--noise_offset, then --multires_noise_iterations), the
    timesteps, and x_t = ``scheduler.add_noise``(latents, noise + --ip_noise_gamma x fresh noise). Drawn from
    ``generator`` in kohya's order, each draw only when its flag is on (a run without them draws as before)."""
    batch_size, channels, device = latents.shape[0], latents.shape[1], latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if config.noise_offset:
        noise += config.noise_offset * torch.randn((batch_size, channels, 1, 1), generator=generator, device=device,
                                                   dtype=latents.dtype)
    if config.multires_noise_iterations:
        noise = pyramid_noise(noise, config.multires_noise_iterations, config.multires_noise_discount, generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator,
                              device=device).long()
    noised_with = noise
    if config.ip_noise_gamma:  # input perturbation (Ning et al. 2023): x_t gets more noise than the target says
        noised_with = noise + config.ip_noise_gamma * torch.randn(latents.shape, generator=generator, device=device,
                                                                  dtype=latents.dtype)
    return noise, timesteps, scheduler.add_noise(latents, noised_with, timesteps)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, generator=None) -> torch.Tensor:
    """Multi-resolution noise (kohya's ``pyramid_noise_like``, after Whitaker's report): ``noise`` plus, for
    i = 0.., fresh noise at 1/r^i the size (r drawn in [2, 4) each time) bilinearly upsampled and weighted
    discount^i, until a side reaches 1; rescaled to unit std over the whole batch."""
    batch, channels, height, width = noise.shape
    ratios = (2 + 2 * torch.rand(iterations, generator=generator, device=noise.device)).tolist()  # one sync
    for i, r in enumerate(ratios):
        h, w = max(1, int(height / r ** i)), max(1, int(width / r ** i))
        layer = torch.randn((batch, channels, h, w), generator=generator, device=noise.device, dtype=noise.dtype)
        noise = noise + F.interpolate(layer, size=(height, width), mode="bilinear") * discount ** i
        if h == 1 or w == 1:
            break
    return noise / noise.std()


def check_noise_flags(config) -> None:
    """--multires_noise_iterations >= 0 (0 = off, as in kohya) with a positive discount; --ip_noise_gamma >= 0."""
    iterations = config.multires_noise_iterations
    if iterations is not None and iterations < 0:
        raise UsageError(f"--multires_noise_iterations must be >= 0, got {iterations}")
    default_discount = type(config).__dataclass_fields__["multires_noise_discount"].default
    if config.multires_noise_discount != default_discount and not iterations:
        raise UsageError("--multires_noise_discount weights the layers of --multires_noise_iterations: give that too")
    if not config.multires_noise_discount > 0:
        raise UsageError(f"--multires_noise_discount must be > 0, got {config.multires_noise_discount}")
    if config.ip_noise_gamma is not None and not config.ip_noise_gamma >= 0:
        raise UsageError(f"--ip_noise_gamma must be >= 0, got {config.ip_noise_gamma}")

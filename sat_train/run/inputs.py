"""A batch → the SAT step's inputs (``guide.guidance.StepInputs``): latents, noise, timesteps, the
noised latents, the target, the text conditioning and the min-SNR weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..data.dataset import LATENT_PARAMS
from ..errors import UsageError
from ..guide.guidance import StepInputs
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
    batch_size, channels, device = latents.shape[0], latents.shape[1], latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if config.noise_offset:
        noise += config.noise_offset * torch.randn((batch_size, channels, 1, 1), generator=generator, device=device,
                                                   dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator,
                              device=device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
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
    return StepInputs(x0=latents, noise=noise, noisy=noisy, timesteps=timesteps, cond=cond, target=target,
                      loss_weights=weights, tokens=batch.get("cac_tokens"), added_cond_kwargs=added)

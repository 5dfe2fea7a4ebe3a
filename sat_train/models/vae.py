"""The VAE's helpers: its dtype in training, where it sits, and latents from or to it."""

from __future__ import annotations

import contextlib

import torch


def vae_dtype(components, weight_dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype in training: the family's rule (SDXL's force_upcast VAE stays float32 under fp16)."""
    return components.family.vae_dtype(components.vae, weight_dtype)


def fp16_vae_warning(components, weight_dtype: torch.dtype) -> str | None:
    """The warning for fp16 with a VAE that asks to be upcast (None when there is nothing to say)."""
    if vae_dtype(components, weight_dtype) == weight_dtype:
        return None
    return ("warning: --mixed_precision fp16 with an SDXL VAE whose config sets force_upcast (the stock SDXL VAE "
            "overflows in fp16): it encodes in float32, slower and larger; pass --pretrained_vae_model_name_or_path "
            "madebyollin/sdxl-vae-fp16-fix for an fp16-safe one")


def sample_latents(params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw from a cached distribution: diffusers' DiagonalGaussianDistribution(params).sample,
    the very code ``latent_dist.sample(generator)`` runs on an uncached batch."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(params).sample(generator)


@contextlib.contextmanager
def vae_on_device(vae, device):
    """Inside: the VAE on ``device`` (validation, mask pictures); after: back where it was (with a latent
    cache, the CPU). A no-op when it is there already."""
    home = vae.device
    if home == torch.device(device):
        yield vae
        return
    vae.to(device)
    try:
        yield vae
    finally:
        vae.to(home)


@torch.no_grad()
def decode_latent_means(params: torch.Tensor, vae) -> torch.Tensor:
    """(B, 3, H, W) images of cached latent distributions: the VAE decoding each mean (the picture a
    cached batch shows instead of its pixels)."""
    mean = params[:, : params.shape[1] // 2]
    return vae.decode(mean.to(vae.device, vae.dtype), return_dict=False)[0].float()

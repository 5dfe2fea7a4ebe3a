"""Self-attention guidance (SAG, Hong et al. 2023) at inference, on sat_kernels, for SD v1.5 and SDXL.

The math is diffusers' StableDiffusionSAGPipeline (pipelines/deprecated/stable_diffusion_sag):
per step, classifier-free guidance, then

    pred_x0  = (x_t - sqrt(1 - ab_t) eps_u) / sqrt(ab_t)          # DDIM-like x0 from the uncond eps
    x_deg    = sqrt(ab_t) (m * blur(pred_x0) + (1 - m) * pred_x0) + sqrt(1 - ab_t) eps_u
    eps      = eps_cfg + sag_scale * (eps_u - unet(x_deg, t, c_uncond))

where m is the mid-block self-attention mass of the uncond half > 1. The mass comes from q and k
(``MidBlockCapture``, a hook beside the memory-efficient attention: no N x N map) and ``x_deg`` is
one ``sat_kernels.degrade_latents`` call, so inference keeps xformers/SDPA in every layer.

SDXL (diffusers has no SAG pipeline for it) runs the same loop: its conditioning (``Conditioning``,
from the family's ``prompt_conditioning``) adds ``added_cond_kwargs`` (pooled text embeddings, time
ids) to every UNet call, the degraded forward's included, and comes from
``StableDiffusionXLPipeline.encode_prompt`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import MidBlockCapture, resolve_backend, stock_processor


def pred_x0_and_eps(scheduler, sample, model_output, t):
    """diffusers' SAG ``pred_x0`` and ``pred_epsilon`` for epsilon / v-prediction models."""
    ab = scheduler.alphas_cumprod.to(sample.device)[t].to(sample.dtype)
    a, b = ab.sqrt(), (1 - ab).sqrt()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - b * model_output) / a, model_output
    if kind == "v_prediction":
        return a * sample - b * model_output, a * model_output + b * sample
    raise ValueError(f"SAG supports epsilon and v_prediction models, not {kind!r}")


# ----------------------------------------------------------------------------- conditioning


def concat_kwargs(first: dict, second: dict) -> dict:
    """Two halves' UNet keyword arguments as one batch (nested dicts such as added_cond_kwargs too)."""
    return {name: concat_kwargs(value, second[name]) if isinstance(value, dict) else torch.cat([value, second[name]])
            for name, value in first.items()}


@dataclass(frozen=True)
class Conditioning:
    """The UNet's keyword arguments for the prompt half (``cond``) and, under classifier-free guidance,
    the negative half (``uncond``; None without CFG): ``encoder_hidden_states``, and for SDXL
    ``added_cond_kwargs`` too."""

    cond: dict
    uncond: dict | None = None

    def batch(self) -> dict:
        """The guided forward's: [uncond, cond] as the latents are stacked (cond alone without CFG)."""
        return self.cond if self.uncond is None else concat_kwargs(self.uncond, self.cond)

    def reference(self) -> dict:
        """SAG's degraded forward's: the half whose eps SAG degrades (the uncond one under CFG)."""
        return self.cond if self.uncond is None else self.uncond


# ----------------------------------------------------------------------------- the sampler


@torch.no_grad()
def sag_sample(components, prompt: str, negative_prompt: str = "", num_images: int = 1, height: int | None = None,
               width: int | None = None, num_inference_steps: int = 30, guidance_scale: float = 7.5,
               sag_scale: float = 0.75, generator: torch.Generator | None = None, attention_backend: str = "auto",
               kernel_backend: str = "auto", output_type: str = "pil",
               self_attention: torch.nn.Module | str | None = None,
               force_zeros_for_empty_prompt: bool | None = None):
    """Images (PIL) or final latents (``output_type="latent"``) for ``prompt`` with CFG + SAG, from SD v1.5
    or SDXL ``components``.

    Uses a DDIM scheduler (eta 0) built from the model's scheduler config: deterministic given
    ``generator``. ``sag_scale=0`` skips the mask capture and the extra forward. The mask is the mass of
    ``self_attention`` (a module or path; default the first transformer block's attn1 of the mid block,
    the layer training's SAC reads). ``force_zeros_for_empty_prompt``: SDXL's pipeline option (default:
    the model's, ``components.force_zeros_for_empty_prompt``).
    """
    from diffusers import DDIMScheduler

    unet, vae = components.unet, components.vae
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    height = height or components.default_image_side
    width = width or components.default_image_side
    scheduler = DDIMScheduler.from_config(components.noise_scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=device)

    backend = resolve_backend(attention_backend, device)
    unet.set_attn_processor(stock_processor(backend))
    cfg = guidance_scale > 1.0
    if force_zeros_for_empty_prompt is None:
        force_zeros_for_empty_prompt = components.force_zeros_for_empty_prompt
    conditioning = Conditioning(*components.family.prompt_conditioning(
        components, prompt, negative_prompt, num_images, cfg, device, dtype, (height, width),
        force_zeros_for_empty_prompt))
    guided_kwargs = conditioning.batch()
    shape = (num_images, unet.config.in_channels, height // scale_factor, width // scale_factor)
    latents = torch.randn(shape, generator=generator, device=generator.device if generator else device,
                          dtype=torch.float32).to(device, dtype) * scheduler.init_noise_sigma
    capture = MidBlockCapture(unet, kernel_backend, self_attention) if sag_scale > 0 else None
    try:
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
            if capture is not None:
                capture.arm()
            noise_pred = unet(model_in, t, **guided_kwargs, return_dict=False)[0]
            if cfg:
                eps_uncond, eps_text = noise_pred.chunk(2)
                noise_pred = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            if capture is not None:
                from sat_kernels import degrade_latents

                mass, map_size = capture.take()
                ref = eps_uncond if cfg else noise_pred
                mass = mass[:num_images]  # the uncond half under CFG (eq. 25 of the SAG paper)
                pred_x0, eps = pred_x0_and_eps(scheduler, latents, ref, t)
                degraded = degrade_latents(pred_x0, eps, mass, map_size, scheduler.alphas_cumprod, t.long(),
                                           threshold=1.0, backend=kernel_backend).to(dtype)
                degraded_pred = unet(degraded, t, **conditioning.reference(), return_dict=False)[0]
                noise_pred = noise_pred + sag_scale * (ref - degraded_pred)
            latents = scheduler.step(noise_pred, t, latents, eta=0.0, return_dict=False)[0]
    finally:
        if capture is not None:
            capture.remove()
    if output_type == "latent":
        return latents
    return decode_to_pil(vae, latents)


def decode_to_pil(vae, latents: torch.Tensor) -> list:
    from PIL import Image

    image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    image = (image.float() / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray((im * 255).round().astype("uint8")) for im in image]

"""Sample images from the model being trained (the LoRA active) for the logs."""

from __future__ import annotations

import torch

from .latent_cache import vae_on_device

INFERENCE_STEPS = 30  # as diffusers' LoRA example


def generate_images(components, unet, config, device, weight_dtype) -> list:
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer, unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    # a private generator: validation never moves the training RNG (resume stays exact)
    generator = torch.Generator(device=device)
    if config.seed is not None:
        generator.manual_seed(config.seed)
    was_training = unet.training
    unet.eval()
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    # vae_on_device: a latent cache keeps the VAE on the CPU while training
    with torch.no_grad(), autocast, vae_on_device(components.vae, device):
        images = [pipeline(config.validation_prompt, num_inference_steps=INFERENCE_STEPS, generator=generator,
                           height=config.resolution, width=config.resolution).images[0]
                  for _ in range(config.num_validation_images)]
    unet.train(was_training)
    return images

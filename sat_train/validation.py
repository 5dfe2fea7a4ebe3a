"""Sample images from the model being trained (the LoRA active) for the logs."""

from __future__ import annotations

import torch

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
    # eval mode (no LoRA dropout) for the UNet and the text encoder, whose LoRA may be training too
    models = (unet, components.text_encoder)
    was_training = [model.training for model in models]
    for model in models:
        model.eval()
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    with torch.no_grad(), autocast:
        images = [pipeline(config.validation_prompt, num_inference_steps=INFERENCE_STEPS, generator=generator,
                           height=config.resolution, width=config.resolution).images[0]
                  for _ in range(config.num_validation_images)]
    for model, training in zip(models, was_training, strict=True):
        model.train(training)
    return images

"""Sample images from the model being trained (the LoRA active) for the logs.

One generator for both kinds: a ``SamplePrompt`` (sample_prompts.py) -> images, with its sampler
(a diffusers scheduler built from the model's scheduler config) and optional SAG (guide/sag.py).
``--validation_prompt`` is the one-prompt form (``validation_prompt``); ``TrainingSamples`` runs
``--sample_prompts`` at the steps and epochs its flags ask for. Sampling never moves the training
RNG: every image's noise comes from a private CPU generator.

Both take an optional ``score(step, source, images)`` callable (--sample_metrics:
evaluate.training_metrics.SampleMetrics, handed in by run.prepare: this room imports nothing above it),
called once per sampling with each image as a ``SampledImage``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ..guide.sag import sag_sample
from ..models.vae import vae_on_device
from ..seeding import derived_generator
from .pictures import save_png
from .sample_prompts import SamplePrompt

INFERENCE_STEPS = 30  # as diffusers' LoRA example
VALIDATION_SAMPLER = "dpmsolver++"  # what --validation_prompt sampled with before --sample_sampler existed
SAMPLES_FOLDER = "samples"

# sample_prompts.SAMPLE_SAMPLERS (kohya's names) -> (diffusers scheduler class, config overrides), as kohya's
# get_my_scheduler
SCHEDULER_CLASSES = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    # diffusers >= 0.27 refuses DPM-Solver (not ++) with its default final_sigmas_type="zero" (kohya's call)
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


class SampledImage(NamedTuple):
    """One sampled image as a ``score`` callable receives it."""

    file: str  # relative to --output_dir, e.g. samples/step000500_00.png
    prompt_index: int
    seed: int | None  # the seed that alone gives this image (its generator's first draw), else None
    image: Image.Image


def first_draw_seed(prompt: SamplePrompt, index: int) -> int | None:
    """The seed that reproduces image ``index`` of ``prompt`` alone: the prompt's seed (--d, or --seed
    for --validation_prompt) for the first image; later images are later draws of that generator."""
    return prompt.seed if index == 0 else None


def make_scheduler(sampler: str, scheduler_config):
    """The scheduler of a --sample_sampler name, on the model's own noise schedule (kohya builds SD v1.5's
    betas from constants instead, and forces clip_sample on)."""
    import diffusers

    class_name, overrides = SCHEDULER_CLASSES[sampler]
    return getattr(diffusers, class_name).from_config(scheduler_config, **overrides)


def validation_prompt(config) -> SamplePrompt:
    """--validation_prompt as a SamplePrompt: --num_validation_images at --resolution, seeded by --seed."""
    width, height = config.resolution_wh
    return SamplePrompt(config.validation_prompt, width=width, height=height,
                        steps=INFERENCE_STEPS, seed=config.seed, sampler=VALIDATION_SAMPLER,
                        num_images=config.num_validation_images, source="--validation_prompt")


def generate_images(components, unet, prompt: SamplePrompt, generator: torch.Generator, weight_dtype,
                    attention_backend: str = "auto") -> list:
    """``prompt.num_images`` PIL images, drawn one after another from ``generator``, with ``unet`` (the
    bare model, LoRA active) and the text encoders (SDXL's two; their LoRA too, with --train_text_encoder)
    in eval mode (no LoRA dropout); their training modes and the UNet's attention processors (which
    SAG's sampler replaces while it runs) are restored afterwards. SD v1.5 or SDXL ``components``: diffusers'
    pipeline of the family, or sag.sag_sample for a --sag line. Under mixed precision
    (``weight_dtype`` not float32) the UNet runs under autocast, as in training."""
    device = next(unet.parameters()).device
    components = dataclasses.replace(components, unet=unet)
    models = [unet, *components.text_encoders]
    was_training, processors = [model.training for model in models], unet.attn_processors
    for model in models:
        model.eval()
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    try:
        # vae_on_device: a latent cache keeps the VAE on the CPU while training
        with torch.no_grad(), autocast, vae_on_device(components.vae, device):
            if prompt.sag_scale > 0:
                return [sag_image(components, prompt, generator, attention_backend) for _ in range(prompt.num_images)]
            pipeline = make_pipeline(components, prompt.sampler)
            return [pipeline(prompt.prompt, negative_prompt=prompt.negative_prompt or None,
                             num_inference_steps=prompt.steps, guidance_scale=prompt.cfg_scale, generator=generator,
                             height=prompt.height, width=prompt.width).images[0]
                    for _ in range(prompt.num_images)]
    finally:
        unet.set_attn_processor(processors)
        for model, training in zip(models, was_training, strict=True):
            model.train(training)


def make_pipeline(components, sampler: str):
    """diffusers' pipeline of ``components`` (StableDiffusionPipeline, or StableDiffusionXLPipeline for
    SDXL) sampling with ``sampler``."""
    return components.pipeline(make_scheduler(sampler, components.noise_scheduler.config))


def sag_image(components, prompt: SamplePrompt, generator: torch.Generator, attention_backend: str):
    return sag_sample(components, prompt.prompt, prompt.negative_prompt, 1, prompt.height, prompt.width,
                      prompt.steps, prompt.cfg_scale, prompt.sag_scale, generator, attention_backend)[0]


def prompt_generator(prompt: SamplePrompt, run_seed: int | None, index: int) -> torch.Generator:
    """A private CPU generator: seeded by the prompt's seed (--d, or --seed for --validation_prompt), else
    from (the run's seed, the prompt's index), so a prompt gets the same noise at every sampling."""
    if prompt.seed is not None:
        return torch.Generator().manual_seed(prompt.seed)
    if run_seed is None:
        return torch.Generator()  # torch's fixed default seed
    return derived_generator(run_seed, index)


def log_images(accelerator, tag: str, images: list, step: int) -> None:
    """``images`` (PIL, one size) to TensorBoard under ``tag`` at ``step``, when it is a tracker."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")


def write_validation_images(accelerator, components, unet, config, weight_dtype, step: int,
                            epoch: int | None = None, score=None) -> None:
    """Images for --validation_prompt at the run's ``step``: output_dir/validation/stepNNNNNN-i.png, or
    epochNNNN-i.png for the validation at the end of ``epoch``; then ``score(step, "validation", ...)``."""
    if not accelerator.is_main_process:
        return
    prompt = validation_prompt(config)
    images = generate_images(components, accelerator.unwrap_model(unet), prompt, prompt_generator(prompt, None, 0),
                             weight_dtype, config.attention)
    sampled = []
    when = f"step{step:06d}" if epoch is None else f"epoch{epoch:04d}"
    for i, image in enumerate(images):
        name = f"validation/{when}-{i}.png"
        save_png(image, Path(config.output_dir) / name)
        sampled.append(SampledImage(name, 0, first_draw_seed(prompt, i), image))
    log_images(accelerator, "validation", images, step if epoch is None else epoch)
    if score is not None:
        score(step, "validation", sampled)


class TrainingSamples:
    """--sample_prompts during training: before it (--sample_at_first, step 0), every
    --sample_every_n_steps optimizer steps, or every --sample_every_n_epochs epochs (which, as in
    kohya, overrides the steps). Prompt i at step s goes to ``output_dir/samples/step{s:06d}_{i:02d}.png``
    and to TensorBoard as ``samples/{i:02d}`` at step s. Only the main process samples."""

    def __init__(self, accelerator, components, unet, config, weight_dtype, seed: int, attention_backend: str,
                 score=None):
        self.accelerator, self.components, self.unet, self.config = accelerator, components, unet, config
        self.weight_dtype, self.seed, self.attention_backend = weight_dtype, seed, attention_backend
        self.score = score  # score(step, "samples", [SampledImage, ...]) after each sampling, or None
        self.prompts = config.sample_prompt_list
        self.folder = Path(config.output_dir) / SAMPLES_FOLDER

    def before_training(self, step: int) -> None:
        """--sample_at_first: the baseline at step 0 (a resumed run, past step 0, already has it)."""
        if self.config.sample_at_first and step == 0:
            self.write(step)

    def after_step(self, step: int) -> None:
        every = self.config.sample_every_n_steps
        if every and not self.config.sample_every_n_epochs and step % every == 0:
            self.write(step)

    def at_epoch_end(self, epoch: int, step: int) -> None:
        """``epoch`` counts from 1; the images are named by ``step``, the run's step at the epoch's end."""
        every = self.config.sample_every_n_epochs
        if every and epoch % every == 0:
            self.write(step)

    def write(self, step: int) -> list[Path]:
        if not self.prompts or not self.accelerator.is_main_process:
            return []
        unet = self.accelerator.unwrap_model(self.unet)
        paths, sampled = [], []
        for index, prompt in enumerate(self.prompts):
            generator = prompt_generator(prompt, self.seed, index)
            images = generate_images(self.components, unet, prompt, generator, self.weight_dtype,
                                     self.attention_backend)
            name = f"step{step:06d}_{index:02d}.png"
            paths.append(save_png(images[0], self.folder / name))
            sampled.append(SampledImage(f"{SAMPLES_FOLDER}/{name}", index, first_draw_seed(prompt, 0), images[0]))
            log_images(self.accelerator, f"{SAMPLES_FOLDER}/{index:02d}", images, step)
        if self.score is not None:
            self.score(step, SAMPLES_FOLDER, sampled)
        return paths

"""The training loop (accelerate): data → noise → guide step → optimizer, with logging,
checkpoints, resume, validation and the final LoRA export.

Follows diffusers' examples/text_to_image/train_text_to_image_lora.py; the loss comes from a
``guidance.Guide``. ``train`` runs five phases, which share one ``Run``:

1. ``prepare_run``: data check, models + LoRA, data loader, optimizer, lr schedule, resume.
2. ``train_micro_batch``: noise one micro-batch, the guide's loss, backward, optimizer step.
3. ``record_metrics`` / ``log_step``: metrics averaged over processes, to the trackers and the bar.
4. ``checkpoint_if_due`` / ``validate_at_epoch_end``: atomic checkpoints, validation images.
5. ``finish_run``: the last pictures, the guide's report, the LoRA export.

Resuming restores model, optimizer, scheduler and RNG state (accelerate's save_state/load_state)
and the loss history (for loss.png), reseeds the shuffle per epoch (seedable sampler) and skips the
batches already seen, so a resumed run reproduces an uninterrupted one. Under several processes
(torchrun, accelerate launch) every process runs every phase; what a run says once (banner, data
check, summary, final paths) comes from the main process only.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import demo
from .buckets import BucketBatchSampler, bucket_table_text
from .capture import resolve_backend, stock_processor
from .config import TrainConfig, UsageError
from .data import LATENT_PARAMS, build_dataset, collate, read_records
from .export import LORA_WEIGHTS_NAME, export_lora, export_precision_problem, load_lora, save_lora, save_lora_kohya
from .faults import crash_hook, fsync_dir
from .guidance import StepInputs, build_guide
from .latent_cache import cache_latents, sample_latents
from .lora_files import kohya_file_metadata
from .models import Components, add_lora, fp16_vae_warning, load_components, lora_parameters, vae_dtype
from .optimizers import build_optimizer
from .pictures import RunPictures
from .sdxl import added_cond_kwargs, encode_sdxl_prompt
from .seeding import derived_generator, seeded_global_rng
from .text_encoder import (FILE_PREFIX_2, add_text_encoder_loras, check_checkpoint_text_encoder,
                           enable_text_encoder_checkpointing, encode_captions, load_text_encoder_lora,
                           optimizer_param_groups, split_hook_models)
from .validation import TrainingSamples

CONFIG_NAME = "train_config.json"
DROPOUT_STREAM = 1  # last key of the LoRA dropout stream; (seed, process, step, micro-batch) alone keys the noise
METRICS = ("loss", "pred_loss", "guide_delta", "mask_coverage", "cac_fallback")
CHECKPOINT_MARKER = "COMPLETE"


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    output_dir = Path(config.output_dir)
    report_to = None if config.report_to == "none" else config.report_to
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / config.logging_dir)),
        # the shuffle order then depends only on (seed, epoch): resume can replay it exactly
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: ``checkpoint-N`` folders holding the COMPLETE marker
    (written last, before the folder is renamed into place; see save_checkpoint)."""
    found = [p for p in output_dir.glob("checkpoint-*")
             if p.is_dir() and p.name.split("-", 1)[1].isdigit() and checkpoint_is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    output_dir = Path(config.output_dir)
    if config.resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(config.resume_from_checkpoint)
    for candidate in (path, output_dir / path.name):
        if candidate.is_dir():
            if not checkpoint_is_complete(candidate):
                raise UsageError(f"--resume_from_checkpoint {candidate} is incomplete (no {CHECKPOINT_MARKER}: "
                                 "its save was interrupted); pass another checkpoint or \"latest\"")
            return candidate
    raise UsageError(f"--resume_from_checkpoint {path} does not exist (nor {output_dir / path.name}); "
                     "pass a checkpoint-N folder or \"latest\"")


def prune_checkpoints(output_dir: Path, limit: int | None) -> None:
    """Removes the oldest complete checkpoints so that at most ``limit`` remain. Called after a new
    checkpoint is in place, so a crash while saving never leaves a run with no checkpoint."""
    if limit is None:
        return
    found = list_checkpoints(output_dir)
    for old in found[: max(0, len(found) - limit)]:
        shutil.rmtree(old)


def checkpoint_is_complete(folder: Path) -> bool:
    return (folder / CHECKPOINT_MARKER).is_file()


def save_checkpoint(accelerator, output_dir: Path, step: int, tag: int, write_extra=None) -> Path:
    """``accelerator.save_state`` into ``.checkpoint-N.tmp-TAG``, then the COMPLETE marker, then one
    ``os.replace`` to ``checkpoint-N``: a crash at any point leaves either no ``checkpoint-N`` or a
    complete one (``--resume_from_checkpoint latest`` only considers folders with the marker).
    ``tag`` (the main process's pid, main_process_pid) is the same on every process, so each one's
    part of the state lands in the one folder that is renamed. ``write_extra(tmp_folder)`` runs on
    the main process before the marker (the loss history), so its files are part of the same atomic
    checkpoint. Every process must call this (barriers)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp-{tag}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_extra is not None:
            write_extra(tmp)
        crash_hook(f"checkpoint-{step}:mid")
        marker = tmp / CHECKPOINT_MARKER
        with open(marker, "w", encoding="utf-8") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # e.g. the same step saved again after a resume: the new state replaces it
            stale = output_dir / f".checkpoint-{step}.old-{os.getpid()}"
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(output_dir)
        crash_hook(f"checkpoint-{step}:after")
    accelerator.wait_for_everyone()
    return final


def remove_stale_temporaries(output_dir: Path) -> None:
    """Leftovers of saves a crash interrupted (never picked up by resume; removed at the next start)."""
    for pattern in (".checkpoint-*.tmp-*", ".checkpoint-*.old-*", ".lora-*"):
        for stale in output_dir.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    for stale in output_dir.glob(".*.tmp"):  # single files written as .NAME.tmp then renamed
        if stale.is_file():
            stale.unlink(missing_ok=True)


class NonFiniteLossError(RuntimeError):
    """The loss (or the LoRA weights) became NaN/inf; the run stopped without saving (the CLI prints it as
    one line, exit 1)."""


def _latest_name(output_dir: Path) -> str:
    found = list_checkpoints(output_dir)
    return str(found[-1]) if found else "none (no checkpoint was written yet)"


def check_output_paths(config: TrainConfig) -> None:
    """Everything a run writes lies inside --output_dir: refuse a --logging_dir that leaves it."""
    root = Path(config.output_dir).resolve()
    logs = (root / config.logging_dir).resolve()
    if logs != root and root not in logs.parents:
        raise UsageError(f"--logging_dir {config.logging_dir} resolves to {logs}, outside --output_dir {root}; "
                         "give a folder relative to --output_dir (e.g. logs)")


def make_optimizer(config: TrainConfig, params):
    """--optimizer (or --use_8bit_adam) on ``params`` at --learning_rate, with its arguments
    (optimizers.optimizer_kwargs: the --adam_* flags for the AdamWs, then --optimizer_args)."""
    return build_optimizer(config, params, lr=config.learning_rate)


def make_step_inputs(batch, components, config: TrainConfig, weight_dtype, generator=None,
                     text_encoder=None, text_encoder_2=None) -> StepInputs:
    """Encode images and captions, draw noise and timesteps, noise the latents, pick the target.
    ``text_encoder``: the (prepared) text encoder whose LoRA trains; captions then encode with gradients.
    SDXL: both text encoders (``text_encoder_2``: the prepared second, when they train), and the pooled
    embeddings and time ids as ``added_cond_kwargs`` (sdxl.py)."""
    from diffusers.training_utils import compute_snr

    scheduler = components.noise_scheduler
    with torch.no_grad():
        if LATENT_PARAMS in batch:  # --cache_latents: the VAE encoded the images before training
            latents = sample_latents(batch[LATENT_PARAMS].to(weight_dtype), generator)
        else:  # in the VAE's dtype: float32 for a force_upcast SDXL VAE under fp16 (models.vae_dtype)
            vae = components.vae
            latents = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist.sample(generator).to(weight_dtype)
        latents = latents * components.vae.config.scaling_factor
    trained_encoder = components.text_encoder if text_encoder is None else text_encoder
    added = None
    if components.is_sdxl:
        second = components.text_encoder_2 if text_encoder_2 is None else text_encoder_2
        cond, pooled = encode_sdxl_prompt(trained_encoder, second, batch["input_ids"],
                                          batch["input_ids_2"], trainable=text_encoder is not None)
        added = added_cond_kwargs(batch, pooled, weight_dtype)
    else:
        cond = encode_captions(trained_encoder, batch["input_ids"], trainable=text_encoder is not None)
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


@dataclass
class Run:
    """What the phases of one run share: built by ``prepare_run``; the fields after ``pictures``
    are the run's position, which the loop advances and ``resume_run`` restores."""

    config: TrainConfig
    accelerator: Any
    components: Components  # its unet is the bare model; ``unet`` below is accelerate's wrapper
    unet: torch.nn.Module
    params: list[torch.nn.Parameter]  # the LoRA parameters: what the optimizer trains and clipping sees
    optimizer: Any
    lr_scheduler: Any
    dataloader: Any
    guide: Any
    weight_dtype: torch.dtype
    seed: int  # keys every derived random stream (seeding.py), --seed or the one torch drew
    output_dir: Path
    max_train_steps: int
    steps_per_epoch: int
    num_epochs: int
    checkpoint_tag: int  # the main process's pid: every process saves into the same temporary folder
    text_encoder: torch.nn.Module | None = None  # --train_text_encoder: accelerate's wrapper of it, else None
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second, likewise
    pictures: RunPictures | None = None
    global_step: int = 0
    first_epoch: int = 0
    skip_batches: int = 0  # micro-batches of first_epoch the checkpoint had already trained on
    micro_batch: int = 0  # micro-batches since the last optimizer step
    running: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRICS, 0.0))
    progress: Any = None  # the tqdm bar of optimizer steps


def train(config: TrainConfig) -> Path:
    """Runs the job ``config`` describes; returns the path of the LoRA weights it wrote."""
    from tqdm.auto import tqdm

    run = prepare_run(config)
    run.pictures.samples.before_training(run.global_step)  # --sample_at_first
    run.progress = tqdm(range(run.max_train_steps), initial=run.global_step, desc="steps",
                        disable=not run.accelerator.is_local_main_process)
    for epoch in range(run.first_epoch, run.num_epochs):
        if run.global_step >= run.max_train_steps:
            break
        train_epoch(run, epoch)
        validate_at_epoch_end(run, epoch)
    return finish_run(run)


# ----------------------------------------------------------------------------- 1. preparing the run


def prepare_run(config: TrainConfig) -> Run:
    """Data check, models with LoRA, data loader, optimizer and lr schedule (through accelerate),
    the run's announcement, then the resume. LoRA's initial weights are drawn from the global
    generator after set_seed, so nothing that draws may move before add_lora: resume relies on it."""
    config.validate()
    check_output_paths(config)
    accelerator = start_accelerator(config)
    # the data check runs before any model loads; every process reads the data, the main one reports
    records, names = read_records(config, demo.DEMO_DATA_DIR if config.is_demo else None,
                                  quiet=not accelerator.is_main_process)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    components, backend = prepare_models(config, accelerator, weight_dtype)
    guide = build_guide(config, components.unet, components.noise_scheduler)
    if config.torch_compile:
        compile_unet(components.unet, config.dynamo_backend, accelerator.device)
    trained_text_encoder = components.text_encoder if config.train_text_encoder else None
    trained_text_encoder_2 = components.text_encoder_2 if config.train_text_encoder else None  # None but for SDXL
    register_lora_checkpoint_hooks(accelerator, components.unet, weight_dtype, trained_text_encoder,
                                   trained_text_encoder_2, sdxl=components.is_sdxl)
    params = lora_parameters(components.unet)
    text_encoder_params, text_encoder_2_params = (lora_parameters(m) if m is not None else []
                                                  for m in (trained_text_encoder, trained_text_encoder_2))
    optimizer, learning_rate = make_scaled_optimizer(config, params, accelerator.num_processes, text_encoder_params,
                                                     text_encoder_2_params)
    seed = config.seed if config.seed is not None else int(torch.initial_seed() % 2**31)
    dataset = build_dataset(config, records, names, components.tokenizer, seed=seed, tokenizer_2=components.tokenizer_2)
    # no-op without --cache_latents*; encodes in the VAE's dtype (models.vae_dtype)
    cache_latents(config, accelerator, components.vae, dataset, components.vae.dtype)
    dataloader = make_dataloader(config, dataset, seed)
    if dataset.buckets is not None:
        accelerator.print(bucket_table_text(dataset.buckets))
    lr_scheduler, max_train_steps = make_lr_scheduler(config, optimizer, len(dataloader), accelerator.num_processes)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(components.unet, optimizer, dataloader,
                                                                    lr_scheduler)
    text_encoder, text_encoder_2 = (None if m is None else accelerator.prepare(m)
                                    for m in (trained_text_encoder, trained_text_encoder_2))
    steps_per_epoch = math.ceil(len(dataloader) / config.gradient_accumulation_steps)  # per process, prepared
    run = Run(config=config, accelerator=accelerator, components=components, unet=unet,
              params=params + text_encoder_params + text_encoder_2_params, text_encoder=text_encoder,
              text_encoder_2=text_encoder_2,
              optimizer=optimizer, lr_scheduler=lr_scheduler, dataloader=dataloader, guide=guide,
              weight_dtype=weight_dtype, seed=seed, output_dir=Path(config.output_dir),
              max_train_steps=max_train_steps, steps_per_epoch=steps_per_epoch,
              num_epochs=math.ceil(max_train_steps / steps_per_epoch), checkpoint_tag=main_process_pid(accelerator))
    run.pictures = RunPictures(accelerator, config, components.vae, mask_every=demo.mask_preview_steps(config),
                               validate=lambda step: run_validation(accelerator, components, unet, config, None,
                                                                    weight_dtype, step=step),
                               samples=TrainingSamples(accelerator, components, unet, config, weight_dtype, seed,
                                                       backend))
    announce_run(run, backend, learning_rate, len(dataset))
    resume_run(run)
    return run


def compile_unet(unet, backend: str, device: torch.device) -> None:
    """--torch_compile: ``unet`` compiled in place (the module, its parameter names and the capture hooks
    stay). Inductor on CPU compiles without its layout optimization: with it, torch 2.13's inductor zeroes
    the gradient through a frozen ResnetBlock2D + Upsample2D (benchmarks/inductor_gap_repro.py), which
    made every LoRA gradient before the first up block wrong. The setting is this compile's option, not
    inductor's global config, which other compiles in the process keep."""
    if backend == "inductor" and device.type == "cpu":
        unet.compile(backend=backend, options={"layout_optimization": False})
    else:
        unet.compile(backend=backend)


def make_dataloader(config: TrainConfig, dataset, seed: int):
    """Shuffled batches of --train_batch_size; with --enable_bucket each batch from one bucket
    (buckets.BucketBatchSampler, keyed by (seed, epoch) as the seedable sampler is)."""
    if dataset.buckets is None:
        return torch.utils.data.DataLoader(dataset, shuffle=True, collate_fn=collate,
                                           batch_size=config.train_batch_size,
                                           num_workers=config.dataloader_num_workers)
    sampler = BucketBatchSampler(dataset.buckets, config.train_batch_size, seed)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=config.dataloader_num_workers)


def start_accelerator(config: TrainConfig):
    """The Accelerator, an output folder cleared of interrupted saves (main process), the seed."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(config)
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(Path(config.output_dir))
    if config.seed is not None:
        set_seed(config.seed)
    return accelerator


def prepare_models(config: TrainConfig, accelerator, weight_dtype):
    """SD components (the demo's or --pretrained_model_name_or_path's), frozen, with a trainable LoRA
    on the UNet, on the device; returns them and the attention backend their processors use."""
    from diffusers.training_utils import cast_training_params

    components = demo.build_demo_components(config.demo_model) if config.is_demo else load_components(config)
    unet, vae = components.unet, components.vae
    text_encoders = [m for m in (components.text_encoder, components.text_encoder_2) if m is not None]
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    if config.prediction_type is not None:
        components.noise_scheduler.register_to_config(prediction_type=config.prediction_type)
    add_lora(unet, config.rank, alpha=config.resolved_lora_alpha, dropout=config.lora_dropout)
    if config.train_text_encoder:  # after the UNet's: its A matrices are the next draws of the seeded generator
        add_text_encoder_loras(components, config.rank, alpha=config.resolved_lora_alpha, dropout=config.lora_dropout)
    warning = fp16_vae_warning(components, weight_dtype)
    if warning:
        accelerator.print(warning)
    for model in (unet, vae, *text_encoders):
        model.to(accelerator.device)
        dtype = vae_dtype(components, weight_dtype) if model is vae else weight_dtype
        if dtype != torch.float32:
            model.to(dtype=dtype)
    if weight_dtype != torch.float32:
        # frozen weights in half precision, LoRA in fp32 (a frozen text encoder has no trainable params)
        cast_training_params([unet, *text_encoders], dtype=torch.float32)
    backend = resolve_backend(config.attention, accelerator.device)
    unet.set_attn_processor(stock_processor(backend))
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for text_encoder in text_encoders:
                enable_text_encoder_checkpointing(text_encoder)
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return components, backend


def register_lora_checkpoint_hooks(accelerator, unet, weight_dtype, text_encoder=None, text_encoder_2=None,
                                   sdxl: bool = False) -> None:
    """Checkpoints hold the LoRA (safetensors), not the whole UNet (nor the whole text encoders, whose
    LoRA goes into the same file when they train); loading puts it back in fp32. ``sdxl``: the file
    is SDXL's pipeline's."""
    from diffusers.training_utils import cast_training_params

    classes = [type(unet)] + [None if m is None else type(m) for m in (text_encoder, text_encoder_2)]

    def save_model_hook(models, weights, checkpoint_dir):
        unet_model, text_encoder_model, text_encoder_2_model = split_hook_models(accelerator, models, *classes)
        if accelerator.is_main_process:
            save_lora(unet_model, checkpoint_dir, text_encoder=text_encoder_model,
                      text_encoder_2=text_encoder_2_model, sdxl=sdxl)
        for _ in models:
            weights.pop()  # only the LoRA is saved, not the whole models

    def load_model_hook(models, checkpoint_dir):
        unet_model, text_encoder_model, text_encoder_2_model = split_hook_models(accelerator, models, *classes)
        models.clear()  # accelerate loads nothing more: the LoRA is all a checkpoint holds
        check_checkpoint_text_encoder(checkpoint_dir, text_encoder_model is not None, sdxl=sdxl)
        load_lora(unet_model, checkpoint_dir, sdxl=sdxl)
        if text_encoder_model is not None:
            load_text_encoder_lora(text_encoder_model, checkpoint_dir)
        if text_encoder_2_model is not None:
            load_text_encoder_lora(text_encoder_2_model, checkpoint_dir, FILE_PREFIX_2)
        if weight_dtype != torch.float32:
            trained = [m for m in (unet_model, text_encoder_model, text_encoder_2_model) if m is not None]
            cast_training_params(trained, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def make_scaled_optimizer(config: TrainConfig, params, num_processes: int, text_encoder_params=(),
                          text_encoder_2_params=()):
    """The optimizer and the UNet's learning rate (--scale_lr: times accumulation x batch x processes);
    with ``text_encoder_params`` (and SDXL's ``text_encoder_2_params``), a param group each at
    --text_encoder_lr, scaled alike."""
    scale = config.gradient_accumulation_steps * config.train_batch_size * num_processes if config.scale_lr else 1
    optimizer = make_optimizer(config, optimizer_param_groups(config, params, text_encoder_params, lr_scale=scale,
                                                              text_encoder_2_params=text_encoder_2_params))
    return optimizer, optimizer.param_groups[0]["lr"]


def make_lr_scheduler(config: TrainConfig, optimizer, batches: int, num_processes: int):
    """The lr schedule and the run's length in optimizer steps. As in diffusers' example, warmup and
    total steps are multiplied by the processes: accelerate's prepared scheduler advances that many
    steps per optimizer step."""
    from diffusers.optimization import get_scheduler

    batches_per_process = math.ceil(batches / num_processes)
    steps_per_epoch = math.ceil(batches_per_process / config.gradient_accumulation_steps)
    max_train_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * num_processes,
                                 num_training_steps=max_train_steps * num_processes,
                                 num_cycles=config.lr_num_cycles, power=config.lr_power)
    return lr_scheduler, max_train_steps


def main_process_pid(accelerator) -> int:
    """The main process's pid, on every process (one broadcast): it names the temporary folder of a
    checkpoint, into which every process writes its part (its random_states_N.pkl)."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([os.getpid()])[0]


def announce_run(run: Run, backend: str, learning_rate: float, num_samples: int) -> None:
    """train_config.json and the trackers (main process); the banner and the run summary, printed once."""
    config, accelerator = run.config, run.accelerator
    if accelerator.is_main_process:
        config.write_json(run.output_dir / CONFIG_NAME, resolved={
            "demo": config.is_demo, "attention_backend": backend, "learning_rate": learning_rate,
            "max_train_steps": run.max_train_steps, "num_processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision, "unet_forwards_per_step": run.guide.forwards_per_step,
            "lora_alpha": config.resolved_lora_alpha,
            "text_encoder_lr": run.optimizer.param_groups[1]["initial_lr"] if run.text_encoder is not None else None,
            "mask_preview_steps": run.pictures.mask_every})
        tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(config).items()}
        accelerator.init_trackers("sat_train", config=tracker_config)
    if config.is_demo:
        accelerator.print(demo.banner(config.demo_model, num_samples))
    accelerator.print(f"sat_train: guide={config.guide} ({run.guide.forwards_per_step} UNet forwards/step), "
                      f"attention={backend}, {num_samples} samples, {run.max_train_steps} steps, "
                      f"batch {config.train_batch_size} x {config.gradient_accumulation_steps} accumulation "
                      f"x {accelerator.num_processes} processes, output in {run.output_dir}")


def resume_run(run: Run) -> None:
    """--resume_from_checkpoint: model, optimizer, scheduler and RNG state (accelerate), the position
    (step, epoch, batches to skip) from the checkpoint's name, and the loss history for loss.png."""
    if not run.config.resume_from_checkpoint:
        return
    checkpoint = find_resume_checkpoint(run.config)
    if checkpoint is None:
        run.accelerator.print(f"no checkpoint in {run.output_dir}: starting a new run")
        return
    run.accelerator.print(f"resuming from {checkpoint}")
    check_same_optimizer(run, checkpoint)
    # weights_only: torch's restricted unpickler for the optimizer/scheduler/RNG state (no code runs)
    run.accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    run.global_step = int(checkpoint.name.split("-", 1)[1])
    run.first_epoch = run.global_step // run.steps_per_epoch
    # optimizer steps already taken in that epoch, in micro-batches
    run.skip_batches = (run.global_step % run.steps_per_epoch) * run.config.gradient_accumulation_steps
    run.pictures.resume(checkpoint, run.global_step)  # loss.png covers the whole run, not only this part


def check_same_optimizer(run: Run, checkpoint: Path) -> None:
    """Refuse a checkpoint whose optimizer state another --optimizer saved: torch's load_state_dict
    would take its param groups as they are, and the first step would crash on a missing setting
    (or train with the other algorithm's state). Each optimizer class has its own set of group
    settings (lr, betas, eps, ... vs lr, beta2_decay, d, ...), so differing sets mean another class."""
    from accelerate.utils import OPTIMIZER_NAME

    path = checkpoint / f"{OPTIMIZER_NAME}.bin"
    if not path.is_file():
        return  # accelerate's load_state names the missing file itself
    saved_groups = torch.load(path, map_location="cpu", weights_only=True)["param_groups"]
    saved = {key for group in saved_groups for key in group} - {"params"}
    current = {key for group in run.optimizer.param_groups for key in group} - {"params"}
    if saved != current:
        raise UsageError(f"{checkpoint} was saved by another optimizer (its settings: {', '.join(sorted(saved))}), "
                         f"not this run's --optimizer {run.config.optimizer_name}: resume with the --optimizer "
                         "(and --use_8bit_adam) of the run that saved it")


# ----------------------------------------------------------------------------- 2. one micro-batch


def train_epoch(run: Run, epoch: int) -> None:
    """Every micro-batch of ``epoch`` (after those a resume skips), until the run's last step."""
    run.unet.train()
    for text_encoder in trained_text_encoders(run):
        text_encoder.train()
    run.dataloader.set_epoch(epoch)
    batches = run.dataloader
    if epoch == run.first_epoch and run.skip_batches:
        batches = run.accelerator.skip_first_batches(run.dataloader, run.skip_batches)
    for batch in batches:
        inputs, result = train_micro_batch(run, batch)
        record_metrics(run, result, epoch)
        run.pictures.observe(batch, inputs, result)
        if not run.accelerator.sync_gradients:
            continue
        finish_optimizer_step(run)
        if run.global_step >= run.max_train_steps:
            break


def train_micro_batch(run: Run, batch):
    """Noise, the guide's loss, backward; the optimizer steps when accelerate says the accumulation
    is complete (inside accumulate, optimizer.step() is a no-op until then)."""
    accelerator = run.accelerator
    with accelerator.accumulate(run.unet, *trained_text_encoders(run)):
        # the noise of a micro-batch is a function of where it is in the run (see seeding.py)
        generator = derived_generator(run.seed, accelerator.process_index, run.global_step, run.micro_batch,
                                      device=accelerator.device)
        # LoRA dropout's masks keyed like the noise, not by the draws before (default runs: no dropout);
        # the captions encode inside too: a trained text encoder's LoRA has dropout as well
        dropout_rng = (seeded_global_rng(run.seed, accelerator.process_index, run.global_step, run.micro_batch,
                                         DROPOUT_STREAM, device=accelerator.device)
                       if run.config.lora_dropout > 0 else contextlib.nullcontext())
        with dropout_rng:
            inputs = make_step_inputs(batch, run.components, run.config, run.weight_dtype, generator,
                                      run.text_encoder, run.text_encoder_2)
            result = run.guide(run.unet, inputs)
        accelerator.backward(result.loss)
        if accelerator.sync_gradients and run.config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.params, run.config.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad()
    return inputs, result


# ----------------------------------------------------------------------------- 3. logging and metrics


def record_metrics(run: Run, result, epoch: int) -> None:
    """Adds this micro-batch's metrics, averaged over the processes, to the step's running means;
    stops every process together on a NaN/inf loss, before anything more is saved."""
    accelerator = run.accelerator
    # one all-gather per micro-batch for every metric (NaN marks "not produced by this guide")
    nan = torch.tensor(float("nan"), device=accelerator.device)
    values = [result.loss.detach()] + [getattr(result, name) for name in METRICS[1:]]
    local = torch.stack([nan if v is None else v.float().reshape(()) for v in values])
    gathered = accelerator.gather(local[None]).mean(dim=0).tolist()
    if not math.isfinite(gathered[0]):  # the same value on every process: all stop together
        stop_run(run, NonFiniteLossError(
            f"loss is {gathered[0]} at step {run.global_step + 1} (epoch {epoch}): stopping before anything "
            f"is saved; the last good checkpoint is {_latest_name(run.output_dir)}. Try a lower "
            "--learning_rate, --mixed_precision no, or check the data"))
    for name, value in zip(METRICS, gathered, strict=True):
        run.running[name] += value / run.config.gradient_accumulation_steps
    run.micro_batch += 1


def finish_optimizer_step(run: Run) -> None:
    """After an optimizer step: the logs, the pictures due, the checkpoint due."""
    run.global_step, run.micro_batch = run.global_step + 1, 0
    loss = log_step(run)
    run.pictures.after_step(run.global_step, loss)
    checkpoint_if_due(run)


def log_step(run: Run) -> float:
    """The step's means (and the lr) to the trackers and the progress bar; returns the step's loss."""
    run.progress.update(1)
    logs = {f"train/{name}": value for name, value in run.running.items() if not math.isnan(value)}
    logs["train/lr"] = run.lr_scheduler.get_last_lr()[0]
    if run.text_encoder is not None:
        logs["train/text_encoder_lr"] = run.lr_scheduler.get_last_lr()[1]
    run.accelerator.log(logs, step=run.global_step)
    run.progress.set_postfix(loss=f"{run.running['loss']:.4f}", lr=f"{logs['train/lr']:.2e}")
    run.running = dict.fromkeys(METRICS, 0.0)
    return logs["train/loss"]


# ----------------------------------------------------------------------------- 4. checkpoints and validation


def checkpoint_if_due(run: Run) -> None:
    """Every --checkpointing_steps: an atomic checkpoint (see save_run_checkpoint) of weights known finite."""
    if run.global_step % run.config.checkpointing_steps:
        return
    stop_on_nonfinite_weights(run)
    save_run_checkpoint(run)


def stop_on_nonfinite_weights(run: Run) -> None:
    """A step whose loss was finite can still leave NaN/inf LoRA weights (a huge update); the next loss
    would stop the run, but a checkpoint or export due first would save them as "the last good". The
    weights are the same on every process (DDP), so all stop together without a collective."""
    if all(torch.isfinite(p.detach()).all() for p in run.params):
        return
    stop_run(run, NonFiniteLossError(
        f"LoRA weights became NaN/inf at step {run.global_step} (the update after a finite loss): stopping before "
        f"they are saved; the last good checkpoint is {_latest_name(run.output_dir)}. Try a lower --learning_rate "
        "or --max_grad_norm, or --mixed_precision no"))


def save_run_checkpoint(run: Run) -> Path:
    """An atomic checkpoint (see save_checkpoint) holding the loss history (for resume's loss.png)
    and, with --export_format kohya|both, the kohya file in --save_precision; then the oldest beyond
    --checkpoints_total_limit are removed. A kohya copy that would overflow --save_precision is left
    out: the checkpoint (float) is saved, then the run stops with the error (on every process)."""
    kohya = run.config.export_format in ("kohya", "both")
    problem = (export_precision_problem(run.accelerator.unwrap_model(run.unet), "kohya", run.config.save_precision,
                                        **exported_models(run)) if kohya else None)

    def write_extra(folder: Path) -> None:
        run.pictures.save_history(folder)
        if kohya and not problem:
            save_lora_kohya(run.accelerator.unwrap_model(run.unet), folder, run.config.save_precision,
                            describe=kohya_describer(run), **exported_models(run))

    checkpoint = save_checkpoint(run.accelerator, run.output_dir, run.global_step, run.checkpoint_tag,
                                 write_extra=write_extra)
    if run.accelerator.is_main_process:
        prune_checkpoints(run.output_dir, run.config.checkpoints_total_limit)
    if problem:
        stop_on_save_precision(run, problem, checkpoint)
    return checkpoint


def trained_text_encoders(run: Run) -> list:
    """The (prepared) text encoders whose LoRA trains: none, SD v1.5's one, or SDXL's two."""
    return [m for m in (run.text_encoder, run.text_encoder_2) if m is not None]


def exported_models(run: Run) -> dict:
    """The export functions' text-encoder and family arguments: the trained text encoders, unwrapped
    (None where one does not train), and whether the files are SDXL's."""
    def bare(model):
        return None if model is None else run.accelerator.unwrap_model(model)

    return {"text_encoder": bare(run.text_encoder), "text_encoder_2": bare(run.text_encoder_2),
            "sdxl": run.components.is_sdxl}


def kohya_describer(run: Run):
    """state → the kohya file's metadata at the run's current step (lora_files.kohya_file_metadata)."""
    return functools.partial(kohya_file_metadata, config=run.config, steps=run.global_step,
                             epoch=math.ceil(run.global_step / run.steps_per_epoch),
                             max_train_steps=run.max_train_steps,
                             prediction_type=run.components.noise_scheduler.config.prediction_type,
                             sdxl=run.components.is_sdxl)


def stop_on_save_precision(run: Run, problem: str, checkpoint: Path) -> None:
    """Ends the run with the one-line error naming the tensor and the way out."""
    stop_run(run, UsageError(f"--save_precision {run.config.save_precision}: {problem}; the float weights are saved "
                             f"in {checkpoint}: export them with --save_precision bf16 (or float) "
                             f"--resume_from_checkpoint {checkpoint}"))


def stop_run(run: Run, error: Exception) -> NoReturn:
    """Closes the progress bar and the trackers, then raises ``error`` (the CLI prints it as one line)."""
    if run.progress is not None:
        run.progress.close()
    run.accelerator.end_training()
    raise error


def validate_at_epoch_end(run: Run, epoch: int) -> None:
    """--validation_prompt every --validation_epochs (step-based validation is RunPictures')."""
    config = run.config
    if config.validation_prompt and (epoch + 1) % config.validation_epochs == 0:
        run_validation(run.accelerator, run.components, run.unet, config, epoch + 1, run.weight_dtype)
    run.pictures.samples.at_epoch_end(epoch + 1, run.global_step)  # --sample_every_n_epochs


# ----------------------------------------------------------------------------- 5. finishing


def finish_run(run: Run) -> Path:
    """The last mask picture and loss.png, the guide's end-of-run report, the LoRA export; the final
    paths are printed once (main process)."""
    accelerator = run.accelerator
    run.progress.close()
    run.pictures.finish(run.global_step)
    report = run.guide.end_of_run_summary(total=lambda count: int(  # e.g. CAC's fallbacks, summed over processes
        accelerator.reduce(torch.tensor(count, device=accelerator.device), reduction="sum").item()))
    if report:
        accelerator.print(report)
    accelerator.wait_for_everyone()
    stop_on_nonfinite_weights(run)
    check_final_export_fits(run)
    lora_path = run.output_dir / LORA_WEIGHTS_NAME
    if accelerator.is_main_process:
        lora_path = export_lora(accelerator.unwrap_model(run.unet), run.output_dir, run.config.export_format,
                                run.config.save_precision, describe_kohya=kohya_describer(run),
                                **exported_models(run))
        if run.pictures.last_written is not None:
            accelerator.print(f"mask pictures: {run.pictures.masks_folder}")
        accelerator.print(f"LoRA weights: {lora_path}")
    accelerator.end_training()
    return lora_path


def check_final_export_fits(run: Run) -> None:
    """Before any final file is written (every process): LoRA values beyond --save_precision's range
    stop the run with the error, after a float checkpoint of the last step is saved (unless it was)."""
    problem = export_precision_problem(run.accelerator.unwrap_model(run.unet), run.config.export_format,
                                       run.config.save_precision, **exported_models(run))
    if problem is None:
        return
    checkpoint = run.output_dir / f"checkpoint-{run.global_step}"
    if run.global_step % run.config.checkpointing_steps or not checkpoint_is_complete(checkpoint):
        checkpoint = save_run_checkpoint(run)  # stops the run itself when it holds a kohya copy
    stop_on_save_precision(run, problem, checkpoint)


def run_validation(accelerator, components, unet, config: TrainConfig, epoch: int | None, weight_dtype,
                   step: int | None = None) -> None:
    """Images for --validation_prompt: output_dir/validation/epochNNNN-i.png (or stepNNNNNN-i.png)."""
    from .pictures import save_png
    from .validation import generate_images, log_images, prompt_generator, validation_prompt

    if not accelerator.is_main_process:
        return
    prompt = validation_prompt(config)
    images = generate_images(components, accelerator.unwrap_model(unet), prompt, prompt_generator(prompt, None, 0),
                             weight_dtype, config.attention)
    folder = Path(config.output_dir) / "validation"
    for i, image in enumerate(images):
        save_png(image, folder / (f"epoch{epoch:04d}-{i}.png" if step is None else f"step{step:06d}-{i}.png"))
    log_images(accelerator, "validation", images, epoch if step is None else step)

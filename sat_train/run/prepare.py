"""The run's first phase: everything a run needs before its first step, gathered into one ``Run``.

``prepare_run`` reads and checks the data (before any model loads), loads the models and adds the
LoRA, builds the guide, the optimizer, the data loader and the lr schedule, hands them to accelerate,
announces the run and resumes it from a checkpoint when asked (``resume_run``: model, optimizer,
scheduler and RNG state through accelerate's load_state, the position from the checkpoint's name, the
loss history for loss.png).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import demo
from ..data.buckets import BucketBatchSampler, bucket_table_text
from ..data.dataset import build_dataset, collate
from ..data.latent_cache import cache_latents
from ..data.masks import LossMasks
from ..data.records import Records, kohya_dataset_metadata, read_run_records
from ..data.regularization import read_run_reg_images, reg_metadata, with_regularization
from ..errors import UsageError
from ..evaluate.training_metrics import SampleMetrics
from ..guide.capture import resolve_backend, stock_processor
from ..guide.guidance import build_guide
from ..models.components import Components
from ..models.load import load_components
from ..models.lora import add_lora, enable_text_encoder_checkpointing, lora_parameters
from ..models.vae import fp16_vae_warning, vae_dtype
from ..outputs.checkpoints import (CONFIG_NAME, check_same_optimizer, find_resume_checkpoint,
                                   register_lora_checkpoint_hooks, remove_stale_temporaries)
from ..outputs.pictures import RunPictures
from ..outputs.samples import TrainingSamples, write_validation_images
from .class_images import ensure_class_images
from .face_masks import loss_mask_sources
from .optimizers import make_lr_scheduler, make_scaled_optimizer

if TYPE_CHECKING:
    from ..config.settings import TrainConfig

METRICS = ("loss", "pred_loss", "guide_delta", "mask_coverage", "cac_fallback")


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
    seed: int  # keys every derived random stream (sat_train/seeding.py), --seed or the one torch drew
    output_dir: Path
    max_train_steps: int
    steps_per_epoch: int
    num_epochs: int
    checkpoint_tag: int  # the main process's pid: every process saves into the same temporary folder
    # --train_text_encoder: accelerate's wrappers of the text encoders (the family's order), else empty
    text_encoders: list[torch.nn.Module] = field(default_factory=list)
    pictures: RunPictures | None = None
    sample_metrics: SampleMetrics | None = None  # --sample_metrics, on the main process
    global_step: int = 0
    first_epoch: int = 0
    skip_batches: int = 0  # micro-batches of first_epoch the checkpoint had already trained on
    micro_batch: int = 0  # micro-batches since the last optimizer step
    running: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METRICS, 0.0))
    progress: Any = None  # the tqdm bar of optimizer steps
    data_metadata: dict[str, str] = field(default_factory=dict)  # the data's kohya keys (folders, tags, regularization)


def prepare_run(config: TrainConfig) -> Run:
    """Data check, models with LoRA, data loader, optimizer and lr schedule (through accelerate),
    the run's announcement, then the resume. LoRA's initial weights are drawn from the global
    generator after set_seed, so nothing that draws may move before add_lora: resume relies on it."""
    config.validate()
    check_output_paths(config)
    accelerator = start_accelerator(config)
    # the data check runs before any model loads: on the main process, which reports it and sends the others
    # its records, names and image sizes
    records = read_run_records(config, accelerator, demo.DEMO_DATA_DIR if config.is_demo else None)
    # --masked_loss: the masks found and checked (the face masks made) before any model loads, main process
    mask_sources = loss_mask_sources(config, accelerator, records, demo.DEMO_DATA_DIR if config.is_demo else None)
    # regularization images (None without); --with_prior_preservation's once the base model made them
    reg = None if config.with_prior_preservation else read_run_reg_images(config, accelerator)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    sample_metrics = SampleMetrics.for_run(config, accelerator)  # reference photos without a face stop here
    components, backend = prepare_models(config, accelerator, weight_dtype)
    if config.with_prior_preservation:  # class images need the base model: generated once it is loaded
        ensure_class_images(config, accelerator, components)
        reg = read_run_reg_images(config, accelerator)
    guide = build_guide(config, components.unet, components.noise_scheduler)
    if config.torch_compile:
        compile_unet(components.unet, config.dynamo_backend, accelerator.device)
    trained_text_encoders = components.text_encoders if config.train_text_encoder else []
    register_lora_checkpoint_hooks(accelerator, components.unet, weight_dtype, trained_text_encoders)
    params = lora_parameters(components.unet)
    text_encoder_params = [lora_parameters(m) for m in trained_text_encoders]
    optimizer, learning_rate = make_scaled_optimizer(config, params, accelerator.num_processes, text_encoder_params)
    seed = config.seed if config.seed is not None else int(torch.initial_seed() % 2**31)
    trained, is_reg = with_regularization(records, reg)  # the training records, then the regularization ones
    dataset, dataloader = prepare_data(config, accelerator, components, trained, seed, is_reg, mask_sources)
    lr_scheduler, max_train_steps = make_lr_scheduler(config, optimizer, len(dataloader), accelerator.num_processes)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(components.unet, optimizer, dataloader,
                                                                    lr_scheduler)
    steps_per_epoch = math.ceil(len(dataloader) / config.gradient_accumulation_steps)  # per process, prepared
    data_metadata = {**kohya_dataset_metadata(records, reg.records if reg else []), **reg_metadata(reg, config)}
    run = Run(config=config, accelerator=accelerator, components=components, unet=unet,
              params=params + [p for group in text_encoder_params for p in group],
              text_encoders=[accelerator.prepare(m) for m in trained_text_encoders],
              optimizer=optimizer, lr_scheduler=lr_scheduler, dataloader=dataloader, guide=guide,
              weight_dtype=weight_dtype, seed=seed, output_dir=Path(config.output_dir),
              max_train_steps=max_train_steps, steps_per_epoch=steps_per_epoch,
              num_epochs=math.ceil(max_train_steps / steps_per_epoch), checkpoint_tag=main_process_pid(accelerator),
              sample_metrics=sample_metrics, data_metadata=data_metadata)
    # validate(step, epoch=None): every --validation_steps (RunPictures) and at the --validation_epochs (the loop)
    validate = functools.partial(write_validation_images, accelerator, components, unet, config, weight_dtype,
                                 score=sample_metrics)
    run.pictures = RunPictures(accelerator, config, components.vae, mask_every=demo.mask_preview_steps(config),
                               validate=validate,
                               samples=TrainingSamples(accelerator, components, unet, config, weight_dtype, seed,
                                                       backend, score=sample_metrics))
    announce_run(run, backend, learning_rate, len(dataset))
    resume_run(run)
    return run


def prepare_data(config: TrainConfig, accelerator, components, records: Records, seed: int,
                 is_reg: list[bool] | None = None, mask_sources: list | None = None):
    """The dataset of ``records`` for the model's family and tokenizers (its latents cached with
    --cache_latents*, in the VAE's dtype; buckets and cache from the data check's image sizes) and its
    data loader; the bucket table printed. ``is_reg``: each record's regularization flag, carried in batches;
    ``mask_sources``: the training records' loss-mask sources (run/face_masks.py); the regularization records
    that follow them train unmasked."""
    dataset = build_dataset(config, records.records, records.names, components.tokenizers, components.family,
                            seed=seed, sizes=records.sizes, subsets=records.subsets)
    dataset.is_reg = is_reg
    if mask_sources is not None:
        full = [None] * (len(dataset.records) - len(mask_sources))  # regularization records: a full mask
        dataset.loss_masks = LossMasks(mask_sources + full, dataset.records, dataset.transform)
    cache_latents(config, accelerator, components.vae, dataset, components.vae.dtype)
    dataloader = make_dataloader(config, dataset, seed)
    if dataset.buckets is not None:
        accelerator.print(bucket_table_text(dataset.buckets))
    return dataset, dataloader


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


def check_output_paths(config: TrainConfig) -> None:
    """Everything a run writes lies inside --output_dir: refuse a --logging_dir that leaves it."""
    root = Path(config.output_dir).resolve()
    logs = (root / config.logging_dir).resolve()
    if logs != root and root not in logs.parents:
        raise UsageError(f"--logging_dir {config.logging_dir} resolves to {logs}, outside --output_dir {root}; "
                         "give a folder relative to --output_dir (e.g. logs)")


def prepare_models(config: TrainConfig, accelerator, weight_dtype):
    """SD components (the demo's or --pretrained_model_name_or_path's), frozen, with a trainable LoRA
    on the UNet, on the device; returns them and the attention backend their processors use."""
    from diffusers.training_utils import cast_training_params

    components = demo.build_demo_components(config.demo_model) if config.is_demo else load_components(config)
    unet, vae = components.unet, components.vae
    text_encoders = components.text_encoders
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
    if config.prediction_type is not None:
        components.noise_scheduler.register_to_config(prediction_type=config.prediction_type)
    add_lora(unet, config.rank, alpha=config.resolved_lora_alpha, dropout=config.lora_dropout)
    if config.train_text_encoder:  # after the UNet's: its A matrices are the next draws of the seeded generator
        components.family.add_text_encoder_loras(components, config.rank, config.resolved_lora_alpha,
                                                 config.lora_dropout)
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
            "text_encoder_lr": run.optimizer.param_groups[1]["initial_lr"] if run.text_encoders else None,
            "mask_preview_steps": run.pictures.mask_every})
        flags = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}  # not cached derived values
        tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flags.items()}
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
    check_same_optimizer(run.optimizer, run.config.optimizer_name, checkpoint)
    # weights_only: torch's restricted unpickler for the optimizer/scheduler/RNG state (no code runs)
    run.accelerator.load_state(str(checkpoint), load_kwargs={"weights_only": True})
    run.global_step = int(checkpoint.name.split("-", 1)[1])
    run.first_epoch = run.global_step // run.steps_per_epoch
    # optimizer steps already taken in that epoch, in micro-batches
    run.skip_batches = (run.global_step % run.steps_per_epoch) * run.config.gradient_accumulation_steps
    run.pictures.resume(checkpoint, run.global_step)  # loss.png covers the whole run, not only this part
    if run.sample_metrics is not None:
        run.sample_metrics.resume(run.global_step)  # samples/metrics.csv keeps the steps sampled before


def check_compile_flags(config) -> None:
    if not config.torch_compile:
        if config.dynamo_backend != "inductor":
            raise UsageError(f"--dynamo_backend {config.dynamo_backend} picks the backend of --torch_compile: "
                             "add --torch_compile, or drop --dynamo_backend")
        return
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if config.dynamo_backend not in backends:
        raise UsageError(f"--dynamo_backend {config.dynamo_backend} is not a torch.compile backend here; "
                         f"choose one of {', '.join(backends)}")


def check_mixed_precision_flag(config) -> None:
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed_precision fp16 needs a CUDA GPU; on CPU use --mixed_precision bf16 or no")

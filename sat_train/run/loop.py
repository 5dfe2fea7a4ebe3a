"""The training loop (accelerate), as a table of contents over its phases:

1. ``run.prepare.prepare_run``: data check, models + LoRA, data loader, optimizer, lr schedule, resume.
2. ``train_micro_batch``: the step's inputs (``run.inputs``), the guide's loss, backward, optimizer step.
3. ``record_metrics`` / ``log_step``: metrics averaged over processes, to the trackers and the bar.
4. ``checkpoint_if_due`` / ``validate_at_epoch_end``: atomic checkpoints, validation images.
5. ``run.finish.finish_run``: the last pictures, the guide's report, the LoRA export.

Follows diffusers' examples/text_to_image/train_text_to_image_lora.py; the loss comes from a
``guide.guidance.Guide``. A resumed run reproduces an uninterrupted one: the shuffle is reseeded per
epoch (seedable sampler), the batches already seen are skipped, and every random stream is keyed by
the run's position (sat_train/seeding.py). Under several processes (torchrun, accelerate launch)
every process runs every phase; what a run says once (banner, data check, summary, final paths)
comes from the main process only.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import NonFiniteLossError
from ..guide.prior import with_base_targets
from ..outputs.checkpoints import latest_checkpoint_name
from ..seeding import derived_generator, seeded_global_rng
from .finish import finish_run, save_run_checkpoint, stop_on_nonfinite_weights, stop_run
from .inputs import make_step_inputs
from .prepare import METRICS, Run, prepare_run

if TYPE_CHECKING:
    from ..config.settings import TrainConfig

DROPOUT_STREAM = 1  # last key of the LoRA dropout stream; (seed, process, step, micro-batch) alone keys the noise


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


def train_epoch(run: Run, epoch: int) -> None:
    """Every micro-batch of ``epoch`` (after those a resume skips), until the run's last step."""
    run.unet.train()
    for text_encoder in run.text_encoders:
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
    with accelerator.accumulate(run.unet, *run.text_encoders):
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
                                      run.text_encoders)
            if run.config.prior_target == "base":
                inputs = with_base_targets(run.unet, inputs)
            result = run.guide(run.unet, inputs)
        accelerator.backward(result.loss)
        if accelerator.sync_gradients and run.config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.params, run.config.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad()
    return inputs, result


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
            f"is saved; the last good checkpoint is {latest_checkpoint_name(run.output_dir)}. Try a lower "
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
    if run.text_encoders:
        logs["train/text_encoder_lr"] = run.lr_scheduler.get_last_lr()[1]
    run.accelerator.log(logs, step=run.global_step)
    run.progress.set_postfix(loss=f"{run.running['loss']:.4f}", lr=f"{logs['train/lr']:.2e}")
    run.running = dict.fromkeys(METRICS, 0.0)
    return logs["train/loss"]


def checkpoint_if_due(run: Run) -> None:
    """Every --checkpointing_steps: an atomic checkpoint (see save_run_checkpoint) of weights known finite."""
    if run.global_step % run.config.checkpointing_steps:
        return
    stop_on_nonfinite_weights(run)
    save_run_checkpoint(run)


def validate_at_epoch_end(run: Run, epoch: int) -> None:
    """--validation_prompt every --validation_epochs (step-based validation is RunPictures')."""
    config = run.config
    if config.validation_prompt and (epoch + 1) % config.validation_epochs == 0:
        run.pictures.validate(run.global_step, epoch=epoch + 1)  # outputs.samples.write_validation_images
    run.pictures.samples.at_epoch_end(epoch + 1, run.global_step)  # --sample_every_n_epochs

"""The run's saving and stopping: checkpoints of the run, the end-of-run export, and the stops that
close the progress bar and the trackers before raising the one-line error (a NaN loss, weights that
became NaN/inf, a LoRA beyond --save_precision's range)."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import NoReturn

import torch

from ..errors import NonFiniteLossError, UsageError
from ..outputs.checkpoints import checkpoint_is_complete, latest_checkpoint_name, prune_checkpoints, save_checkpoint
from ..outputs.kohya_metadata import kohya_file_metadata
from ..outputs.lora_files import LORA_WEIGHTS_NAME, export_lora, export_precision_problem, save_lora_kohya
from .prepare import Run


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
                                text_encoders=bare_text_encoders(run))
        if run.pictures.last_written is not None:
            accelerator.print(f"mask pictures: {run.pictures.masks_folder}")
        accelerator.print(f"LoRA weights: {lora_path}")
    accelerator.end_training()
    return lora_path


def check_final_export_fits(run: Run) -> None:
    """Before any final file is written (every process): LoRA values beyond --save_precision's range
    stop the run with the error, after a float checkpoint of the last step is saved (unless it was)."""
    problem = export_precision_problem(run.accelerator.unwrap_model(run.unet), run.config.export_format,
                                       run.config.save_precision, text_encoders=bare_text_encoders(run))
    if problem is None:
        return
    checkpoint = run.output_dir / f"checkpoint-{run.global_step}"
    if run.global_step % run.config.checkpointing_steps or not checkpoint_is_complete(checkpoint):
        checkpoint = save_run_checkpoint(run)  # stops the run itself when it holds a kohya copy
    stop_on_save_precision(run, problem, checkpoint)


def stop_on_nonfinite_weights(run: Run) -> None:
    """A step whose loss was finite can still leave NaN/inf LoRA weights (a huge update); the next loss
    would stop the run, but a checkpoint or export due first would save them as "the last good". The
    weights are the same on every process (DDP), so all stop together without a collective."""
    if all(torch.isfinite(p.detach()).all() for p in run.params):
        return
    stop_run(run, NonFiniteLossError(
        f"LoRA weights became NaN/inf at step {run.global_step} (the update after a finite loss): stopping before "
        f"they are saved; the last good checkpoint is {latest_checkpoint_name(run.output_dir)}. Try a lower "
        "--learning_rate or --max_grad_norm, or --mixed_precision no"))


def save_run_checkpoint(run: Run) -> Path:
    """An atomic checkpoint (see save_checkpoint) holding the loss history (for resume's loss.png)
    and, with --export_format kohya|both, the kohya file in --save_precision; then the oldest beyond
    --checkpoints_total_limit are removed. A kohya copy that would overflow --save_precision is left
    out: the checkpoint (float) is saved, then the run stops with the error (on every process)."""
    kohya = run.config.export_format in ("kohya", "both")
    problem = (export_precision_problem(run.accelerator.unwrap_model(run.unet), "kohya", run.config.save_precision,
                                        text_encoders=bare_text_encoders(run)) if kohya else None)

    def write_extra(folder: Path) -> None:
        run.pictures.save_history(folder)
        if kohya and not problem:
            save_lora_kohya(run.accelerator.unwrap_model(run.unet), folder, run.config.save_precision,
                            describe=kohya_describer(run), text_encoders=bare_text_encoders(run))

    checkpoint = save_checkpoint(run.accelerator, run.output_dir, run.global_step, run.checkpoint_tag,
                                 write_extra=write_extra)
    if run.accelerator.is_main_process:
        prune_checkpoints(run.output_dir, run.config.checkpoints_total_limit)
    if problem:
        stop_on_save_precision(run, problem, checkpoint)
    return checkpoint


def bare_text_encoders(run: Run) -> list:
    """The trained text encoders, unwrapped, for the LoRA files (empty when none trains)."""
    return [run.accelerator.unwrap_model(model) for model in run.text_encoders]


def kohya_describer(run: Run):
    """state → the kohya file's metadata at the run's current step (kohya_metadata.kohya_file_metadata)."""
    return functools.partial(kohya_file_metadata, config=run.config, steps=run.global_step,
                             epoch=math.ceil(run.global_step / run.steps_per_epoch),
                             max_train_steps=run.max_train_steps, family=run.components.family,
                             prediction_type=run.components.noise_scheduler.config.prediction_type,
                             data_keys=run.data_metadata)


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

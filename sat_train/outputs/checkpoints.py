"""Checkpoints: the protocol that keeps a run resumable through any crash, and what they hold.

A checkpoint is accelerate's ``save_state`` (optimizer, lr schedule, RNG states) plus the LoRA (the
hooks below put the LoRA's safetensors in place of whole models), the loss history, and with
--export_format kohya|both a kohya file; written into a temporary folder, marked COMPLETE, then
renamed into place in one ``os.replace``. ``--resume_from_checkpoint latest`` only considers
complete ones. ``train_config.json`` (CONFIG_NAME) records the run's settings beside them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..errors import UsageError
from ..faults import crash_hook, fsync_dir
from .lora_files import check_checkpoint_text_encoder, load_lora, load_text_encoder_loras, save_lora

CONFIG_NAME = "train_config.json"
CHECKPOINT_MARKER = "COMPLETE"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: ``checkpoint-N`` folders holding the COMPLETE marker
    (written last, before the folder is renamed into place; see save_checkpoint)."""
    found = [p for p in output_dir.glob("checkpoint-*")
             if p.is_dir() and checkpoint_step(p) is not None and checkpoint_is_complete(p)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int | None:
    """N of a ``checkpoint-N`` folder's name, else None."""
    prefix, _, number = folder.name.partition("-")
    return int(number) if prefix == "checkpoint" and number.isdigit() else None


def find_resume_checkpoint(config) -> Path | None:
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


def latest_checkpoint_name(output_dir: Path) -> str:
    found = list_checkpoints(output_dir)
    return str(found[-1]) if found else "none (no checkpoint was written yet)"


def register_lora_checkpoint_hooks(accelerator, unet, weight_dtype, text_encoders=()) -> None:
    """Checkpoints hold the LoRA (safetensors), not the whole UNet (nor the whole text encoders, whose
    LoRA goes into the same file when they train: ``text_encoders``, the trained ones in the family's
    order, empty when none trains); loading puts it back in fp32."""
    from diffusers.training_utils import cast_training_params

    classes = [type(unet)] + [type(m) for m in text_encoders]

    def save_model_hook(models, weights, checkpoint_dir):
        unet_model, *text_encoder_models = split_hook_models(accelerator, models, classes)
        if accelerator.is_main_process:
            save_lora(unet_model, checkpoint_dir, text_encoders=text_encoder_models)
        for _ in models:
            weights.pop()  # only the LoRA is saved, not the whole models

    def load_model_hook(models, checkpoint_dir):
        unet_model, *text_encoder_models = split_hook_models(accelerator, models, classes)
        models.clear()  # accelerate loads nothing more: the LoRA is all a checkpoint holds
        check_checkpoint_text_encoder(checkpoint_dir, bool(text_encoder_models), unet_model)
        load_lora(unet_model, checkpoint_dir)
        load_text_encoder_loras(unet_model, text_encoder_models, checkpoint_dir)
        if weight_dtype != torch.float32:
            cast_training_params([unet_model, *text_encoder_models], dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def split_hook_models(accelerator, models, classes) -> list:
    """The bare models accelerate hands a checkpoint hook, in the order of ``classes`` (the UNet's, then
    each trained text encoder's), told apart by type as diffusers' train_dreambooth_lora_sdxl does
    (CLIPTextModelWithProjection is no subclass of CLIPTextModel); None for a class not among them."""
    found = [None] * len(classes)
    for model in models:
        bare = accelerator.unwrap_model(model)
        slot = next((i for i, cls in enumerate(classes) if isinstance(bare, cls)), None)
        if slot is None:
            raise ValueError(f"unexpected model in the checkpoint hook: {type(bare).__name__}")
        found[slot] = bare
    return found


def check_same_optimizer(optimizer, optimizer_name: str, checkpoint: Path) -> None:
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
    current = {key for group in optimizer.param_groups for key in group} - {"params"}
    if saved != current:
        raise UsageError(f"{checkpoint} was saved by another optimizer (its settings: {', '.join(sorted(saved))}), "
                         f"not this run's --optimizer {optimizer_name}: resume with the --optimizer "
                         "(and --use_8bit_adam) of the run that saved it")

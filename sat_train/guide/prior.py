"""What a regularization sample changes in the step (data/regularization.py reads the images): its loss weight,
kohya's ``loss_weights`` (--prior_loss_weight), and with ``--prior_target base`` its target, the UNet's own
prediction with every LoRA layer off ("diff output preservation": the LoRA learns to leave such inputs as the
base model has them). Who SAT guides is ``StepInputs.guided`` (guidance.guide_ratio)."""

from __future__ import annotations

import dataclasses

import torch

from .capture import lora_disabled
from .guidance import StepInputs, predict


def with_prior_loss_weights(weights: torch.Tensor | None, is_reg: torch.Tensor, prior_loss_weight: float
                            ) -> torch.Tensor:
    """(B,) float32: ``weights`` (min-SNR's, or None) times kohya's loss_weights, --prior_loss_weight for a
    regularization sample and 1 for a training sample (kohya multiplies every sample's loss by them)."""
    prior = torch.where(is_reg, prior_loss_weight, 1.0).to(torch.float32)
    return prior if weights is None else weights * prior


def with_base_targets(unet, s: StepInputs) -> StepInputs:
    """``s`` whose regularization samples' target is ``unet``'s prediction of their x_t with LoRA off, without
    gradients; the LoRA-off forward runs on those samples alone, and only when the batch holds any."""
    if s.is_reg is None or not bool(s.is_reg.any()):
        return s
    index = s.is_reg.nonzero().squeeze(1)
    added = None if s.added_cond_kwargs is None else {k: v[index] for k, v in s.added_cond_kwargs.items()}
    only_reg = StepInputs(x0=s.x0[index], noise=None, noisy=s.noisy[index], timesteps=s.timesteps[index],
                          cond=s.cond[index], target=None, added_cond_kwargs=added)
    with torch.no_grad(), lora_disabled(unet):
        base = predict(unet, only_reg.noisy, only_reg)
    target = s.target.clone()
    target[index] = base.to(target.dtype)
    return dataclasses.replace(s, target=target)

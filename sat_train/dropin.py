"""SAT guidance for any diffusers UNet2DConditionModel training loop, in two calls.

    from sat_train.dropin import install_sat_capture, guided_prediction

    handle = install_sat_capture(unet, guide="sac")          # once, before accelerator.prepare
    ...
    pred, info = guided_prediction(unet, noisy_latents, latents, timesteps, encoder_hidden_states,
                                   noise_scheduler, handle, ratio=0.01)
    loss = F.mse_loss(pred, target)                          # instead of mse(unet(...).sample, target)

The first UNet forward captures the saliency inside memory-efficient attention (SAC: mid-block
self-attention mass; CAC: highest-resolution cross-attention probabilities of chosen caption
tokens, see ``caption_token_positions``); the second runs on the blurred, re-noised latents
(``sat_kernels.degrade_latents``). Gradients flow through both, as in sat_train's own loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import CrossAttentionCapture, MidBlockCapture, resolve_backend, stock_processor
from .config import DEFAULT_CAC_WORDS
from .guidance import CACGuide, StepInputs

__all__ = ["SATCaptureHandle", "caption_token_positions", "guided_prediction", "install_sat_capture"]


@dataclass
class SATCaptureHandle:
    guide: str  # "sac" | "cac"
    attention_backend: str  # the resolved one: xformers | sdpa | eager
    kernel_backend: str
    mid: MidBlockCapture
    cross: CrossAttentionCapture | None

    def remove(self) -> None:
        """Removes the hooks (the processors stay; call unet.set_attn_processor to replace them)."""
        self.mid.remove()
        if self.cross is not None:
            self.cross.remove()


def _bare(model):
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


def install_sat_capture(unet, guide: str = "sac", attention_backend: str = "auto", kernel_backend: str = "auto",
                        replace_processors: bool = True) -> SATCaptureHandle:
    """Installs the capture processors on ``unet`` (a diffusers UNet2DConditionModel with an
    SD-v1.5-style cross-attention mid block). ``replace_processors`` first sets every layer to
    memory-efficient attention (``attention_backend``: auto = xformers on CUDA when installed, else
    PyTorch SDPA); with False only the captured layers change. Call it after anything else that
    sets attention processors (e.g. ``unet.set_attn_processor``), which would remove the capture."""
    if guide not in ("sac", "cac"):
        raise ValueError(f'guide must be "sac" or "cac", got {guide!r}')
    unet = _bare(unet)
    backend = resolve_backend(attention_backend, next(unet.parameters()).device)
    if replace_processors:
        unet.set_attn_processor(stock_processor(backend))
    mid = MidBlockCapture(unet, backend, kernel_backend)
    cross = CrossAttentionCapture(unet, backend, kernel_backend) if guide == "cac" else None
    return SATCaptureHandle(guide, backend, kernel_backend, mid, cross)


def guided_prediction(unet, noisy_latents: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor,
                      cond: torch.Tensor, scheduler, handle: SATCaptureHandle, ratio: float = 0.01,
                      tokens: torch.Tensor | None = None, threshold: float | str = 1.0, kernel_size: int = 9,
                      sigma: float = 1.0, detach_degraded: bool = False, recompute: bool = False,
                      prediction_type: str | None = None):
    """``pred + ratio * (pred - pred_deg)`` (float32) and an info dict, from two UNet forwards.

    ``x0`` are the clean latents that ``noisy_latents`` were made from; ``scheduler`` gives
    ``alphas_cumprod`` and the prediction type (v-prediction outputs are turned into eps before
    re-noising). With ``handle.guide == "cac"``, ``tokens`` (B, S) long are the caption positions of
    the chosen words (-1 = padding; see ``caption_token_positions``); samples without any use the
    SAC mask with ``threshold``. ``detach_degraded`` / ``recompute`` are ``--guide_detach_degraded``
    / ``--guide_recompute`` (the latter needs one ``backward`` of a loss on the result, as usual).
    info: ``pred``, ``pred_degraded``, ``mask`` (B, H, W) bool at latent size, ``used_cac`` (B,) bool.
    """
    if handle.guide == "cac" and tokens is None:
        raise ValueError("a CAC handle needs tokens=(B, S) caption positions; see caption_token_positions")
    guide = CACGuide(handle.mid, handle.cross if handle.guide == "cac" else None, scheduler.alphas_cumprod, ratio,
                     threshold, kernel_size, sigma, kernel_backend=handle.kernel_backend,
                     prediction_type=prediction_type or scheduler.config.prediction_type,
                     detach_degraded=detach_degraded, recompute=recompute)
    inputs = StepInputs(x0=x0, noise=None, noisy=noisy_latents, timesteps=timesteps, cond=cond, target=None,
                        tokens=tokens if handle.guide == "cac" else None)
    pred, pred_deg, mask, has_words = guide.guided_forwards(unet, inputs)
    pred_f = pred.float()
    guided = pred_f + ratio * (pred_f - pred_deg.float())
    return guided, {"pred": pred, "pred_degraded": pred_deg, "mask": mask, "used_cac": has_words}


def caption_token_positions(tokenizer, captions: list[str], words: list[str] | str = DEFAULT_CAC_WORDS
                            ) -> torch.Tensor:
    """(B, S) long positions of ``words`` (list or comma-separated) in each caption as ``tokenizer``
    pads/truncates it to model_max_length (the input_ids the text encoder sees); -1 = padding."""
    from .data import pad_token_positions, tokenize, word_token_ids, word_token_positions

    if isinstance(words, str):
        words = [w.strip() for w in words.split(",") if w.strip()]
    word_ids = word_token_ids(tokenizer, words)
    ids = tokenize(tokenizer, captions)
    return pad_token_positions([torch.tensor(word_token_positions(tokenizer, row, word_ids), dtype=torch.long)
                                for row in ids])

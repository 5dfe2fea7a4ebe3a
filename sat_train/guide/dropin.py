"""SAT guidance for any diffusers UNet2DConditionModel training loop, in two calls.

    from sat_train import install_sat_capture, guided_prediction

    handle = install_sat_capture(unet, guide="sac")          # once, before accelerator.prepare
    ...
    pred, info = guided_prediction(unet, noisy_latents, latents, timesteps, encoder_hidden_states,
                                   noise_scheduler, handle, ratio=0.01)
    loss = F.mse_loss(pred, target)                          # instead of mse(unet(...).sample, target)

The first UNet forward captures the saliency with forward pre-hooks that recompute q and k of the
captured layers (SAC: mid-block self-attention mass; CAC: highest-resolution cross-attention
probabilities of chosen caption tokens, see ``caption_token_positions``); every attention layer
keeps the implementation the trainer gave it. The second forward runs on the blurred, re-noised
latents (``sat_kernels.degrade_latents``). Gradients flow through both, as in sat_train's own loop.

SDXL (diffusers' train_text_to_image_lora_sdxl.py): pass the UNet's ``added_cond_kwargs``
(``{"text_embeds": pooled, "time_ids": add_time_ids}``) to ``guided_prediction``; both forwards get
them. The default layers suit SDXL as they are: SAC's is the mid block's first transformer block's
attn1, CAC's the highest-resolution level that has cross-attention (SDXL's second); CAC's ``tokens``
come from the first tokenizer (``caption_token_positions(tokenizer, ...)``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .capture import resolve_backend, stock_processor
from .settings import DEFAULT_CAC_WORDS, GuideSettings
from .guidance import CaptionWordSaliency, MidBlockSaliency, SATGuide, StepInputs, make_saliency

__all__ = ["GuideSettings", "SATCaptureHandle", "caption_token_positions", "guided_prediction",
           "install_sat_capture"]


@dataclass
class SATCaptureHandle:
    guide: str  # "sac" | "cac"
    attention_backend: str | None  # the resolved one when replace_processors=True, else None: the trainer's
    settings: GuideSettings  # what guided_prediction uses unless it is given other values
    saliency: MidBlockSaliency | CaptionWordSaliency

    @property
    def kernel_backend(self) -> str:
        return self.settings.kernel_backend

    def remove(self) -> None:
        """Removes the capture hooks (processors that replace_processors=True set stay)."""
        self.saliency.remove_hooks()


def bare_model(model):
    """The model under DDP / accelerate wrappers and torch.compile."""
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


def install_sat_capture(unet, guide: str = "sac", attention_backend: str = "auto", kernel_backend: str = "auto",
                        replace_processors: bool = False, settings: GuideSettings | None = None,
                        self_attention=None, cross_attentions=None) -> SATCaptureHandle:
    """Hooks the saliency capture onto ``unet``: a diffusers UNet2DConditionModel, or any UNet with
    diffusers' module names (kohya sd-scripts' SD1.5 UNet), with an SD-v1.5-style mid block.

    Every attention implementation stays as the trainer set it, the captured layers' included: a
    forward pre-hook on each captured module recomputes q and k from its input with its own
    (LoRA-wrapped) ``to_q`` / ``to_k`` (the module contract is in ``sat_train.guide.capture``; a missing
    attribute is a UsageError naming it). ``self_attention`` (SAC, and CAC's fallback) and
    ``cross_attentions`` (CAC) pick the layers, as modules or dotted paths; by default the mid-block
    ``attn1`` and the highest-resolution ``attn2`` layers. ``replace_processors=True`` first sets
    every diffusers ``Attention`` layer to memory-efficient attention (``attention_backend``: auto =
    xformers on CUDA when installed, else PyTorch SDPA). Hooks survive ``set_attn_processor``.
    ``settings`` (ratio, threshold, blur, capture mode, ...) are the step's defaults for this handle;
    ``kernel_backend`` is the sat_kernels backend (auto | triton | torch)."""
    settings = dataclasses.replace(settings or GuideSettings(), kernel_backend=kernel_backend)
    unet = bare_model(unet)
    if guide not in ("sac", "cac"):
        raise ValueError(f'guide must be "sac" or "cac", got {guide!r}')
    backend = None
    if replace_processors:
        backend = resolve_backend(attention_backend, next(unet.parameters()).device)
        unet.set_attn_processor(stock_processor(backend))
    saliency = make_saliency(unet, guide, kernel_backend, self_attention=self_attention,
                             cross_attentions=cross_attentions)
    return SATCaptureHandle(guide, backend, settings, saliency)


def guided_prediction(unet, noisy_latents: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor,
                      cond: torch.Tensor, scheduler, handle: SATCaptureHandle, tokens: torch.Tensor | None = None,
                      prediction_type: str | None = None, added_cond_kwargs: dict | None = None, forward=None,
                      **settings):
    """``pred + ratio * (pred - pred_deg)`` (float32) and an info dict, from the SAT step's UNet
    forwards (sat_train.guide.guidance.SATGuide, the trainer's own step).

    ``x0`` are the clean latents that ``noisy_latents`` were made from; ``scheduler`` gives
    ``alphas_cumprod`` and the prediction type (v-prediction outputs are turned into eps before
    re-noising). With ``handle.guide == "cac"``, ``tokens`` (B, S) long are the caption positions of
    the chosen words (-1 = padding; see ``caption_token_positions``); samples without any use the
    SAC mask. ``added_cond_kwargs`` (SDXL: ``text_embeds`` (B, 1280) pooled, ``time_ids`` (B, 6)) go to
    every UNet forward (sat_train.models.family's encode_prompt and time_ids build them). ``forward``, a
    callable latents -> prediction, replaces the UNet call in both forwards (a trainer's own call that
    conditions the UNet itself, as kohya's ``call_unet``; ``cond`` and ``added_cond_kwargs`` are then
    unused, and ``unet`` is only needed for ``capture="separate"``). ``settings``
    override fields of ``handle.settings`` for this call (``GuideSettings``: ratio, threshold,
    kernel_size, sigma, capture, detach_degraded, recompute, kernel_backend); ``recompute`` needs one
    ``backward`` of a loss on the result, as usual.
    info: ``pred``, ``pred_degraded``, ``mask`` (B, H, W) bool at latent size, ``used_cac`` (B,) bool.
    """
    if handle.guide == "cac" and tokens is None:
        raise ValueError("a CAC handle needs tokens=(B, S) caption positions; see caption_token_positions")
    guide = SATGuide(handle.saliency, scheduler.alphas_cumprod, dataclasses.replace(handle.settings, **settings),
                     prediction_type or scheduler.config.prediction_type)
    inputs = StepInputs(x0=x0, noise=None, noisy=noisy_latents, timesteps=timesteps, cond=cond, target=None,
                        tokens=tokens, added_cond_kwargs=added_cond_kwargs, forward=forward)
    g = guide.guided_prediction(unet, inputs)
    fallback = g.saliency.fallback
    used_cac = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device) if fallback is None else ~fallback
    return g.guided, {"pred": g.pred, "pred_degraded": g.pred_degraded, "used_cac": used_cac,
                      "mask": g.saliency.mask(tuple(x0.shape[-2:]), handle.kernel_backend)}


def caption_token_positions(tokenizer, captions: list[str], words: list[str] | str = DEFAULT_CAC_WORDS
                            ) -> torch.Tensor:
    """(B, S) long positions of ``words`` (list or comma-separated) in each caption as ``tokenizer``
    pads/truncates it to model_max_length (the input_ids the text encoder sees); -1 = padding."""
    from ..models.family import tokenize
    from ..models.words import pad_token_positions, word_token_ids, word_token_positions

    if isinstance(words, str):
        words = [w.strip() for w in words.split(",") if w.strip()]
    word_ids = word_token_ids(tokenizer, words)
    ids = tokenize(tokenizer, captions)
    return pad_token_positions([torch.tensor(word_token_positions(tokenizer, row, word_ids), dtype=torch.long)
                                for row in ids])

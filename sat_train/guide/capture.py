"""The saliency capture: forward pre-hooks that leave every attention implementation alone.

SAC reads the attention mass each token of the mid-block self-attention receives
(``unet.mid_block.attentions[0].transformer_blocks[0].attn1``); CAC reads, for chosen caption
tokens, the cross-attention probabilities of the highest-resolution ``attn2`` layers. Both come
from q and k alone (``sat_kernels.attention_mass_from_qk`` / ``token_attention_probs``: no N x N
map is ever built), so the capture does not need to be inside the attention computation: a
forward pre-hook on the captured module recomputes q and k from the module's input with the
module's own (LoRA-wrapped) projections, and the module's forward then runs unchanged, with
whatever attention the trainer chose (xformers, SDPA, a fused or compiled processor, or a module
that is not diffusers' ``Attention`` at all).

The module contract (diffusers' ``Attention`` and kohya sd-scripts' ``CrossAttention`` meet it):
its forward takes the tokens first (``hidden_states`` or ``x``), then optionally the context
(``encoder_hidden_states`` / ``context``) and a mask (``attention_mask`` / ``mask``, which must be
None for the captured call); it has ``to_q``, ``to_k`` (callables on the last dimension) and
``heads``, and optionally ``scale`` (default head_dim ** -0.5) and diffusers' ``spatial_norm``,
``group_norm``, ``norm_cross`` with ``norm_encoder_hidden_states``, ``norm_q``, ``norm_k``, applied
as diffusers' AttnProcessor2_0 applies them before projecting. The map size (h, w) is the spatial
size of the innermost enclosing module (or the module itself) whose input is a 4-D feature map
with h * w tokens (the Transformer2DModel for SD's UNets), so non-square maps work.

The capture is one-shot: ``arm()`` before the forward, and the first call disarms it. That keeps
the capture correct when gradient checkpointing recomputes the forward during backward, and when
the second (degraded) forward of a step runs the same layer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re

import torch

from ..errors import UsageError
from .settings import DEFAULT_SAC_LAYER

REQUIRED_ATTRIBUTES = ("to_q", "to_k", "heads")


def resolve_backend(requested: str, device: torch.device) -> str:
    """'auto' → xformers on CUDA when installed, else sdpa; an impossible request → UsageError."""
    has_xformers = importlib.util.find_spec("xformers") is not None
    if requested == "auto":
        return "xformers" if device.type == "cuda" and has_xformers else "sdpa"
    if requested == "xformers":
        if device.type != "cuda":
            raise UsageError("xformers attention needs a CUDA GPU; use --attention_backend sdpa (or auto)")
        if not has_xformers:
            raise UsageError("xformers is not installed: pip install xformers, or use --attention_backend sdpa")
    return requested


def stock_processor(backend: str):
    """diffusers' processor for an attention backend (our own runs set it on every layer)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

    return {"xformers": XFormersAttnProcessor, "sdpa": AttnProcessor2_0, "eager": AttnProcessor}[backend]()


# ----------------------------------------------------------------------------- which module, where


def module_path(unet: torch.nn.Module, module: torch.nn.Module | str) -> str:
    """The dotted path of ``module`` in ``unet``; a path may be given as it is, or with kohya-style
    indices (``mid_block.attentions[0].transformer_blocks[0].attn1``)."""
    if isinstance(module, str):
        path = re.sub(r"\[(\d+)\]", r".\1", module)
        try:
            unet.get_submodule(path)
        except AttributeError:
            raise UsageError(f"the SAT capture's layer {module!r} is not a submodule of the "
                             f"{type(unet).__name__}; give a module or a dotted path inside it") from None
        return path
    for name, candidate in unet.named_modules():
        if candidate is module:
            return name
    raise UsageError(f"the SAT capture's layer ({type(module).__name__}) is not a submodule of the "
                     f"{type(unet).__name__} it was installed on")


def check_attention_contract(module: torch.nn.Module, path: str) -> None:
    """A UsageError naming the first attribute of the module contract that ``module`` lacks."""
    for name in REQUIRED_ATTRIBUTES:
        if not hasattr(module, name):
            raise UsageError(f"the SAT capture's layer {path} ({type(module).__name__}) has no attribute "
                             f"{name!r}: a captured attention module needs {', '.join(REQUIRED_ATTRIBUTES)} "
                             "(see sat_train.guide.capture)")


def attention_inputs(args, kwargs):
    """(tokens, context, mask) of an attention module's call, by diffusers' or kohya's names."""
    def pick(position, *names):
        if len(args) > position:
            return args[position]
        return next((kwargs[n] for n in names if kwargs.get(n) is not None), None)

    return (pick(0, "hidden_states", "x"), pick(1, "encoder_hidden_states", "context"),
            pick(2, "attention_mask", "mask"))


def project_qk(attn, hidden_states, context, temb=None, bypass_lora: bool = False):
    """(q, k) as (B, heads, N, head_dim) and the softmax scale, the way diffusers' AttnProcessor2_0
    computes them from the module's input; ``bypass_lora`` projects with peft's frozen
    ``base_layer`` (the original code's capture forward: this layer without LoRA)."""
    def project(layer, x):
        return (getattr(layer, "base_layer", layer) if bypass_lora else layer)(x)

    if getattr(attn, "spatial_norm", None) is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.reshape(batch, channel, height * width).transpose(1, 2)
    batch = hidden_states.shape[0]
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = project(attn.to_q, hidden_states)
    if context is None:
        context = hidden_states
    elif getattr(attn, "norm_cross", None):
        context = attn.norm_encoder_hidden_states(context)
    key = project(attn.to_k, context)
    head_dim = key.shape[-1] // attn.heads
    query, key = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key))
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    return query, key, getattr(attn, "scale", head_dim ** -0.5)


# ----------------------------------------------------------------------------- the hook


class QKCaptureHook:
    """A forward pre-hook on one attention module: armed, its next call hands out
    ``reduce(q, k, scale)`` (no gradients) and the map size; the module's forward is untouched."""

    def __init__(self, unet: torch.nn.Module, module: torch.nn.Module | str, reduce, what: str):
        self.path = module_path(unet, module)
        self.module = unet.get_submodule(self.path)
        check_attention_contract(self.module, self.path)
        self.reduce, self.what = reduce, what  # what: how errors name the capture
        self.armed = False  # capture on the next call only
        self.bypass_lora = False  # for the capturing call only
        self.captured: tuple[torch.Tensor, tuple[int, int]] | None = None
        self._spatial: tuple[int, int] | None = None  # (h, w) of the innermost 4-D input on the way in
        self._hooks = [m.register_forward_pre_hook(self._record_spatial_size, with_kwargs=True)
                       for m in self._enclosing_modules(unet)]
        self._hooks.append(self.module.register_forward_pre_hook(self._capture, with_kwargs=True))

    def _enclosing_modules(self, unet):
        parts = self.path.split(".")
        return [unet.get_submodule(".".join(parts[:i])) for i in range(len(parts))]  # outermost first

    def _record_spatial_size(self, module, args, kwargs):
        if self.armed:
            hidden_states = attention_inputs(args, kwargs)[0]
            if isinstance(hidden_states, torch.Tensor) and hidden_states.ndim == 4:
                self._spatial = tuple(hidden_states.shape[-2:])

    def arm(self, bypass_lora: bool = False) -> None:
        self.captured, self._spatial = None, None
        self.armed, self.bypass_lora = True, bypass_lora

    def disarm(self) -> None:
        self.armed = self.bypass_lora = False

    def _capture(self, module, args, kwargs):
        if not self.armed:
            return None
        bypass_lora = self.bypass_lora
        self.disarm()  # one-shot, before anything can raise
        hidden_states, context, mask = attention_inputs(args, kwargs)
        if mask is not None:
            raise RuntimeError(f"the {self.what} capture at {self.path} expects an attention call without a mask")
        if hidden_states.ndim == 4:
            self._spatial = tuple(hidden_states.shape[-2:])
        with torch.no_grad():
            q, k, scale = project_qk(module, hidden_states, context, kwargs.get("temb"), bypass_lora)
            if self._spatial is None or self._spatial[0] * self._spatial[1] != q.shape[2]:
                raise RuntimeError(f"{self.path}: {q.shape[2]} query tokens do not match the map size "
                                   f"{self._spatial} of the feature map it runs on")
            self.captured = (self.reduce(q, k, scale), self._spatial)
        return None

    def take(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """(values, (h, w)) of the armed call; a RuntimeError when the module did not run."""
        self.disarm()
        captured, self.captured = self.captured, None
        if captured is None:
            raise RuntimeError(f"the {self.what} capture at {self.path} did not run during the armed forward "
                               "(was the capture removed, or is this layer not part of the UNet's forward?)")
        return captured

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


@contextlib.contextmanager
def lora_disabled(model: torch.nn.Module):
    """Every peft LoRA layer of ``model`` (bare or wrapped) off for the block, as the original CAC
    capture forward ran; each layer's own enabled/disabled state is restored afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    was_disabled = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in zip(layers, was_disabled, strict=True):
            layer.enable_adapters(not disabled)


# ----------------------------------------------------------------------------- SAC


def mid_block_self_attention(unet):
    try:
        return unet.mid_block.attentions[0].transformer_blocks[0].attn1
    except (AttributeError, IndexError, TypeError):
        raise UsageError(f"--guide sac needs an SD-v1.5-style UNet whose mid block has self-attention "
                         f"(UNetMidBlock2DCrossAttn); this one has {type(unet.mid_block).__name__}") from None


def sac_layer(unet, path: str, flag: str = "--sac_layer") -> torch.nn.Module:
    """--sac_layer's (or sample.py's ``flag`` --sag_layer's) module in ``unet``: a self-attention module
    with the capture's contract (the default path: mid_block_self_attention, whose message names a UNet
    without mid-block attention)."""
    if path == DEFAULT_SAC_LAYER:
        return mid_block_self_attention(unet)
    try:
        module = unet.get_submodule(re.sub(r"\[(\d+)\]", r".\1", path))
    except AttributeError:
        raise UsageError(f"{flag} {path}: the {type(unet).__name__} has no such module; give a self-attention "
                         f"layer such as {DEFAULT_SAC_LAYER}") from None
    if any(not hasattr(module, name) for name in REQUIRED_ATTRIBUTES) or getattr(module, "is_cross_attention", False):
        raise UsageError(f"{flag} {path} is a {type(module).__name__}, not a self-attention layer: give an "
                         f"attn1 such as {DEFAULT_SAC_LAYER}")
    return module


class MidBlockCapture:
    """The SAC capture: the attention mass each token of ``self_attention`` (default: the mid-block
    attn1) receives, from a hook on the bare ``unet`` (hooks stay with the module, so capturing works
    through DDP or any other wrapper)."""

    def __init__(self, unet, kernel_backend: str = "auto", self_attention: torch.nn.Module | str | None = None):
        self.kernel_backend = kernel_backend
        self.hook = QKCaptureHook(unet, self_attention if self_attention is not None
                                  else mid_block_self_attention(unet), self._mass, "SAC")

    def _mass(self, q, k, scale):
        from sat_kernels import attention_mass_from_qk

        return attention_mass_from_qk(q, k, None, scale, backend=self.kernel_backend)

    def arm(self, bypass_lora: bool = False) -> None:
        self.hook.arm(bypass_lora)

    def take(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """(mass (B, h*w) float32, (h, w)) from the armed forward; an error if none happened."""
        return self.hook.take()

    def remove(self) -> None:
        self.hook.remove()


# ----------------------------------------------------------------------------- CAC


def highest_resolution_cross_attentions(unet) -> list[torch.nn.Module]:
    """The attn2 layers of the down/up blocks at the largest latent resolution.

    down_blocks[i] runs at level i (it downsamples at its end), up_blocks[j] at level n-1-j (it
    upsamples at its end); the lowest level that has cross-attention wins (level 0 for SD v1.5:
    down_blocks[0] and up_blocks[3], five attn2 layers at 64x64 tokens for 512 px).
    """
    levels: dict[int, list] = {}
    blocks = [(i, b) for i, b in enumerate(unet.down_blocks)]
    blocks += [(len(unet.up_blocks) - 1 - j, b) for j, b in enumerate(unet.up_blocks)]
    for level, block in blocks:
        for transformer in getattr(block, "attentions", None) or []:
            for tb in getattr(transformer, "transformer_blocks", []):
                attn2 = getattr(tb, "attn2", None)
                if attn2 is not None and getattr(attn2, "is_cross_attention", True):  # kohya's has no flag
                    levels.setdefault(level, []).append(attn2)
    if not levels:
        raise UsageError("--guide cac needs a UNet with cross-attention in its down/up blocks (SD-v1.5-style)")
    return levels[min(levels)]


class CrossAttentionCapture:
    """The CAC capture: hooks on ``cross_attentions`` (default: the highest-resolution attn2 layers
    of ``unet``); one armed forward gives the CAC map: the head-mean probabilities of the chosen
    caption tokens, averaged over those layers, max over the tokens (no Nq x 77 map is stored)."""

    def __init__(self, unet, kernel_backend: str = "auto", cross_attentions=None):
        self.kernel_backend = kernel_backend
        self.tokens: torch.Tensor | None = None  # (B, S) long positions in the caption, -1 = padding
        layers = highest_resolution_cross_attentions(unet) if cross_attentions is None else list(cross_attentions)
        if not layers:
            raise UsageError("the CAC capture needs at least one cross-attention layer (cross_attentions=[])")
        self.hooks = [QKCaptureHook(unet, layer, self._token_probs, "CAC") for layer in layers]

    def _token_probs(self, q, k, scale):
        from sat_kernels import token_attention_probs

        return token_attention_probs(q, k, self.tokens.to(q.device), None, scale, backend=self.kernel_backend)

    def arm(self, tokens: torch.Tensor) -> None:
        """Capture the next forward's probabilities of ``tokens`` (B, S) long, -1 = padding."""
        self.tokens = tokens
        for hook in self.hooks:
            hook.arm()

    def take(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """(map (B, h*w) float32, (h, w)): mean over layers of the head-mean token probabilities,
        max over the tokens; every layer must have captured exactly once since ``arm``."""
        self.tokens = None
        captured, missing = [], None
        for hook in self.hooks:
            try:
                captured.append(hook.take())
            except RuntimeError as err:  # take every hook, so that none stays armed
                missing = missing or err
        if missing is not None:
            raise missing
        sizes = {size for _, size in captured}
        if len(sizes) != 1:
            raise RuntimeError(f"the captured cross-attention layers disagree on their map size: {sorted(sizes)}")
        probs = torch.stack([c for c, _ in captured]).mean(dim=0)  # (B, N, S)
        return probs.amax(dim=-1), sizes.pop()

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()

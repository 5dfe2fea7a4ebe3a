"""Attention processors: memory-efficient attention everywhere, and the SAC saliency capture.

Every attention layer runs xformers (CUDA, when installed), PyTorch SDPA, or eager attention.
The mid-block self-attention (``unet.mid_block.attentions[0].transformer_blocks[0].attn1``)
gets a ``MassCaptureProcessor``: it computes attention the same way and, when armed, also hands
out the attention mass each token receives, computed from q and k by
``sat_kernels.attention_mass_from_qk`` — no N x N map is ever built.

The capture is one-shot: ``arm()`` before the forward, and the first call disarms it. That keeps
the capture correct when gradient checkpointing recomputes the forward during backward, and when
the second (degraded) forward of a step runs the same layer.
"""

from __future__ import annotations

import contextlib
import importlib.util

import torch
import torch.nn.functional as F

from .config import UsageError


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
    """diffusers' processor for every layer but the captured one."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

    return {"xformers": XFormersAttnProcessor, "sdpa": AttnProcessor2_0, "eager": AttnProcessor}[backend]()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, scale: float,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale q k^T + mask) v for (B, heads, N, D) tensors with the chosen backend."""
    if backend == "xformers":
        import xformers.ops

        out = xformers.ops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=mask, scale=scale)
        return out.transpose(1, 2)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = scale * q @ k.transpose(-1, -2)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1).to(v.dtype) @ v


class MassCaptureProcessor:
    """Self-attention processor that can also hand out the attention mass of one forward."""

    def __init__(self, backend: str, mass_backend: str = "auto"):
        self.backend, self.mass_backend = backend, mass_backend
        self.armed = False  # capture on the next call only
        self.bypass_lora = False  # the original code's capture forward: this layer without LoRA
        self.map_size: tuple[int, int] | None = None  # (h, w) of the mid block, set by a pre-hook
        self.captured: tuple[torch.Tensor, tuple[int, int]] | None = None

    def _project(self, layer, x):
        if self.bypass_lora:
            layer = getattr(layer, "base_layer", layer)  # peft wraps the Linear; base_layer is the frozen one
        return layer(x)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        # The body follows diffusers' AttnProcessor2_0 line by line, with attention by backend.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        context_length = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self._project(attn.to_q, hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = self._project(attn.to_k, encoder_hidden_states)
        value = self._project(attn.to_v, encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        capturing = self.armed
        if capturing:
            self._capture(query, key, attn.scale, attention_mask)
        hidden_states = attend(query, key, value, self.backend, attn.scale, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = self._project(attn.to_out[0], hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if capturing:
            self.bypass_lora = False  # bypass lasts for the capturing call only
        return hidden_states / attn.rescale_output_factor

    def _capture(self, query, key, scale, attention_mask) -> None:
        from sat_kernels import attention_mass_from_qk

        if attention_mask is not None:
            raise RuntimeError("SAC capture expects an unmasked self-attention layer")
        if self.map_size is None or self.map_size[0] * self.map_size[1] != key.shape[2]:
            raise RuntimeError(f"mid-block token count {key.shape[2]} does not match its map size {self.map_size}")
        with torch.no_grad():
            mass = attention_mass_from_qk(query.detach(), key.detach(), None, scale, backend=self.mass_backend)
        self.captured = (mass, self.map_size)
        self.armed = False


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


def mid_block_self_attention(unet):
    try:
        return unet.mid_block.attentions[0].transformer_blocks[0].attn1
    except (AttributeError, IndexError, TypeError):
        raise UsageError(f"--guide sac needs an SD-v1.5-style UNet whose mid block has self-attention "
                         f"(UNetMidBlock2DCrossAttn); this one has {type(unet.mid_block).__name__}") from None


class MidBlockCapture:
    """Installs a MassCaptureProcessor on the mid-block attn1 of ``unet`` (the bare model, not a
    DDP wrapper: the processor object is shared, so capturing works through any wrapper)."""

    def __init__(self, unet, backend: str, mass_backend: str = "auto"):
        self.processor = MassCaptureProcessor(backend, mass_backend)
        mid_block_self_attention(unet).set_processor(self.processor)
        transformer = unet.mid_block.attentions[0]
        self._hook = transformer.register_forward_pre_hook(self._record_map_size, with_kwargs=True)

    def _record_map_size(self, module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        self.processor.map_size = tuple(hidden_states.shape[-2:])

    def arm(self, bypass_lora: bool = False) -> None:
        self.processor.captured = None
        self.processor.armed = True
        self.processor.bypass_lora = bypass_lora

    def take(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """(mass (B, h*w) float32, (h, w)) from the armed forward; an error if none happened."""
        proc = self.processor
        proc.bypass_lora = False
        if proc.captured is None:
            proc.armed = False
            raise RuntimeError("the mid-block self-attention did not run its SAC capture processor; "
                               "was unet.set_attn_processor called after the guide was installed?")
        captured, proc.captured = proc.captured, None
        return captured

    def remove(self) -> None:
        self._hook.remove()


# ----------------------------------------------------------------------------- CAC


class TokenProbsCaptureProcessor(MassCaptureProcessor):
    """Cross-attention processor that can also hand out, for chosen caption tokens, the head-mean
    attention probability of every query, from q and k by ``sat_kernels.token_attention_probs``
    (no Nq x 77 map is stored). One-shot like MassCaptureProcessor: armed, the next call captures."""

    def __init__(self, backend: str, kernel_backend: str = "auto"):
        super().__init__(backend, kernel_backend)
        self.tokens: torch.Tensor | None = None  # (B, S) long positions in the caption, -1 = padding

    def _capture(self, query, key, scale, attention_mask) -> None:
        from sat_kernels import token_attention_probs

        if attention_mask is not None:
            raise RuntimeError("CAC capture expects cross-attention without an attention mask")
        if self.map_size is None or self.map_size[0] * self.map_size[1] != query.shape[2]:
            raise RuntimeError(f"cross-attention query count {query.shape[2]} does not match its map size {self.map_size}")
        with torch.no_grad():
            probs = token_attention_probs(query.detach(), key.detach(), self.tokens.to(query.device), None, scale,
                                          backend=self.mass_backend)
        self.captured = (probs, self.map_size)
        self.armed = False


def highest_resolution_cross_attentions(unet) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(Transformer2DModel, attn2) pairs of the down/up blocks at the largest latent resolution.

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
                if attn2 is not None and attn2.is_cross_attention:
                    levels.setdefault(level, []).append((transformer, attn2))
    if not levels:
        raise UsageError("--guide cac needs a UNet with cross-attention in its down/up blocks (SD-v1.5-style)")
    return levels[min(levels)]


class CrossAttentionCapture:
    """Installs TokenProbsCaptureProcessors on the highest-resolution attn2 layers of ``unet``; one
    armed forward gives the CAC map: token probs averaged over those layers, max over the tokens."""

    def __init__(self, unet, backend: str, kernel_backend: str = "auto"):
        self.processors = []
        self._hooks = []
        for transformer, attn2 in highest_resolution_cross_attentions(unet):
            processor = TokenProbsCaptureProcessor(backend, kernel_backend)
            attn2.set_processor(processor)
            self.processors.append(processor)
            self._hooks.append(transformer.register_forward_pre_hook(self._map_size_hook(processor), with_kwargs=True))

    @staticmethod
    def _map_size_hook(processor):
        def record(module, args, kwargs):
            hidden_states = args[0] if args else kwargs["hidden_states"]
            processor.map_size = tuple(hidden_states.shape[-2:])
        return record

    def arm(self, tokens: torch.Tensor) -> None:
        """Capture the next forward's probabilities of ``tokens`` (B, S) long, -1 = padding."""
        for processor in self.processors:
            processor.captured, processor.tokens, processor.armed = None, tokens, True

    def take(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """(map (B, h*w) float32, (h, w)): mean over layers of the head-mean token probabilities,
        max over the tokens; every layer must have captured exactly once since ``arm``."""
        captured = [p.captured for p in self.processors]
        for p in self.processors:
            p.captured, p.armed, p.tokens = None, False, None
        if any(c is None for c in captured):
            raise RuntimeError("a highest-resolution cross-attention layer did not run its CAC capture processor; "
                               "was unet.set_attn_processor called after the guide was installed?")
        sizes = {size for _, size in captured}
        if len(sizes) != 1:
            raise RuntimeError(f"the captured cross-attention layers disagree on their map size: {sorted(sizes)}")
        probs = torch.stack([c for c, _ in captured]).mean(dim=0)  # (B, N, S)
        return probs.amax(dim=-1), sizes.pop()

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

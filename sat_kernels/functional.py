"""Public API: check arguments, then run the Triton kernel or the torch reference.

``backend="auto"`` runs Triton on CUDA tensors (when triton is installed) and the torch path on
CPU tensors; ``"triton"`` forces the kernel (on CPU only under ``TRITON_INTERPRET=1``, set before
``sat_kernels`` is imported); ``"torch"`` forces ``sat_kernels.reference``. Every check runs
before any kernel launch and raises ``ValueError``/``TypeError`` naming the argument.
"""

from __future__ import annotations

import importlib
import os

import torch

from . import reference

try:  # triton is optional at import time: the torch path needs only torch
    import triton  # noqa: F401

    TRITON_IMPORT_ERROR = None
except ImportError as err:  # pragma: no cover - depends on the install
    TRITON_IMPORT_ERROR = err

# @triton.jit reads TRITON_INTERPRET when a kernel module is imported; the kernel modules are
# imported on first use (torch-only users never pay for them), so the setting is pinned here.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_BACKENDS = ("auto", "triton", "torch")


def _op(name: str):
    """The Triton op module ``sat_kernels.ops.<name>``, imported on first use."""
    if (os.environ.get("TRITON_INTERPRET", "0") == "1") != INTERPRETING:
        raise RuntimeError(
            "TRITON_INTERPRET changed after sat_kernels was imported; set it before the import"
        )
    return importlib.import_module(f"{__package__}.ops.{name}")


# ----------------------------------------------------------------------------- checks


def _check_tensor(name: str, x, ndim: int | tuple[int, ...], layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in ndims:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")


def _check_floating(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16), got {x.dtype}")


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")


def _check_map_size(map_size, tokens: int | None = None) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in map_size)
    except (TypeError, ValueError):
        raise ValueError(f"map_size must be a pair of positive ints (h, w), got {map_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"map_size must be a pair of positive ints (h, w), got {map_size!r}")
    if tokens is not None and h * w != tokens:
        raise ValueError(
            f"map_size {(h, w)} has {h * w} tokens but the saliency has {tokens}; "
            "pass the (h, w) of the attention layer the map came from"
        )
    return h, w


def _check_threshold(threshold) -> float | str:
    if isinstance(threshold, str):
        if threshold != "mean":
            raise ValueError(f'threshold must be a float or "mean", got {threshold!r}')
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f'threshold must be a float or "mean", got {type(threshold).__name__}')
    return float(threshold)


def _check_blur(kernel_size, sigma, height: int, width: int) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive int, got {kernel_size!r}")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not sigma > 0:
        raise ValueError(f"sigma must be a positive float, got {sigma!r}")
    radius = kernel_size // 2
    if radius >= min(height, width):
        raise ValueError(
            f"latents of {height}x{width} are too small for kernel_size={kernel_size}: reflect padding "
            f"needs height and width > {radius}; use kernel_size <= {2 * min(height, width) - 1}"
        )


def _check_qk(q, k, lse, scale) -> None:
    _check_tensor("q", q, 4, "(B, heads, Nq, head_dim)")
    _check_tensor("k", k, 4, "(B, heads, Nk, head_dim)")
    _check_floating("q", q)
    _check_floating("k", k)
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, heads and head_dim: "
            "q (B, heads, Nq, D), k (B, heads, Nk, D)"
        )
    _check_same_device(q=q, k=k)
    if lse is not None:
        _check_tensor("lse", lse, 3, "(B, heads, Nq)")
        if lse.shape != q.shape[:-1]:
            raise ValueError(f"lse must have shape (B, heads, Nq) = {tuple(q.shape[:-1])}, got {tuple(lse.shape)}")
        _check_floating("lse", lse)
        _check_same_device(q=q, lse=lse)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None (None = head_dim ** -0.5), got {type(scale).__name__}")


def _probs_as_4d(probs, heads) -> torch.Tensor:
    """(B*heads, Nq, Nk) or (B, heads, Nq, Nk) probabilities as a (B, heads, Nq, Nk) view."""
    _check_tensor("probs", probs, (3, 4), "(B*heads, Nq, Nk) or (B, heads, Nq, Nk)")
    _check_floating("probs", probs)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if probs.dim() == 4:
        if probs.shape[1] != heads:
            raise ValueError(f"probs (B, heads, Nq, Nk) has {probs.shape[1]} heads but heads={heads}")
        return probs
    if probs.shape[0] % heads:
        raise ValueError(
            f"probs has {probs.shape[0]} rows, not a multiple of heads={heads}: expected (B*heads, Nq, Nk) "
            "in diffusers' head_to_batch_dim layout"
        )
    return probs.view(probs.shape[0] // heads, heads, *probs.shape[1:])


def _saliency_as_mass_or_probs(saliency, heads, batch: int | None):
    """Returns (mass (B, N), None) or (None, probs (B, heads, N, N)) after checking shapes."""
    _check_tensor("saliency", saliency, (2, 3, 4), "a mass (B, h*w) or probabilities (B*heads, N, N)")
    _check_floating("saliency", saliency)
    if saliency.dim() == 2:
        if heads is not None:
            raise ValueError("heads is only for saliency given as probabilities; a (B, h*w) mass takes heads=None")
        mass, probs = saliency, None
    else:
        if heads is None:
            raise ValueError("saliency given as attention probabilities needs heads= (number of attention heads)")
        mass, probs = None, _probs_as_4d(saliency, heads)
        if probs.shape[-1] != probs.shape[-2]:
            raise ValueError(f"self-attention probabilities must be square (N, N), got {tuple(probs.shape[-2:])}")
    rows = (mass if mass is not None else probs).shape[0]
    if batch is not None and rows != batch:
        raise ValueError(f"saliency holds {rows} samples but the latents hold {batch}; batch sizes must match")
    return mass, probs


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return device.type == "cuda" and TRITON_IMPORT_ERROR is None
    if TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"backend='triton' needs triton: pip install triton ({TRITON_IMPORT_ERROR})")
    if device.type == "cpu" and not INTERPRETING:
        raise RuntimeError(
            "backend='triton' on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "importing sat_kernels, or use backend='torch' (or move the tensors to CUDA)"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='triton' supports CUDA (or CPU under the interpreter), got {device}")
    return True


# ----------------------------------------------------------------------------- API


def attention_mass(probs: torch.Tensor, heads: int, *, backend: str = "auto") -> torch.Tensor:
    """(B, Nk) float32: mean over heads of the attention each key receives (sum over queries)."""
    probs4 = _probs_as_4d(probs, heads)
    if _use_triton(backend, probs.device):
        return _op("attention_mass").attention_mass(probs4, heads)
    return reference.attention_mass(probs4, heads)


def attention_mass_from_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """(B, Nk) float32 attention mass of softmax(scale q k^T) from q, k and the row lse.

    q (B, heads, Nq, D), k (B, heads, Nk, D); lse (B, heads, Nq) natural-log, or None to compute it.
    Never holds more than a tile (Triton) or a 64 MiB chunk (torch) of the Nq x Nk map.
    """
    _check_qk(q, k, lse, scale)
    scale = reference.default_scale(q, scale)
    with torch.no_grad():
        if _use_triton(backend, q.device):
            return _op("attention_mass").attention_mass_from_qk(q, k, lse, scale)
        return reference.attention_mass_from_qk(q, k, lse, scale)


def token_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    tokens: torch.Tensor,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """(B, Nq, S) float32 head-mean probability of each query for the key tokens (B, S); -1 = none."""
    _check_qk(q, k, lse, scale)
    _check_tensor("tokens", tokens, 2, "(B, S) of key-token indices, -1 for padding")
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"tokens must be an integer tensor (B, S), got {tokens.dtype}")
    if tokens.shape[0] != q.shape[0]:
        raise ValueError(f"tokens has batch {tokens.shape[0]} but q has {q.shape[0]}")
    if tokens.numel() and (tokens.max() >= k.shape[2] or tokens.min() < -1):
        raise ValueError(f"tokens must be in [-1, {k.shape[2] - 1}] (Nk = {k.shape[2]}; -1 = padding)")
    tokens = tokens.to(q.device, torch.int64)
    scale = reference.default_scale(q, scale)
    with torch.no_grad():
        if _use_triton(backend, q.device):
            return _op("token_probs").token_attention_probs(q, k, tokens, lse, scale)
        return reference.token_attention_probs(q, k, tokens, lse, scale)


def gaussian_blur(
    x: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0, *, backend: str = "auto"
) -> torch.Tensor:
    """(B, C, H, W) separable Gaussian blur with reflect padding; equals SAG's gaussian_blur_2d."""
    _check_tensor("x", x, 4, "(B, C, H, W)")
    _check_floating("x", x)
    _check_blur(kernel_size, sigma, *x.shape[-2:])
    if _use_triton(backend, x.device):
        return _op("blur").gaussian_blur(x, kernel_size, float(sigma))
    return reference.gaussian_blur(x, kernel_size, float(sigma))


def saliency_mask(
    saliency: torch.Tensor,
    map_size: tuple[int, int],
    threshold: float | str = 1.0,
    size: tuple[int, int] | None = None,
    *,
    heads: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Bool mask (B, h, w) of salient tokens (mass > threshold), or nearest-upsampled to ``size``."""
    mass, probs = _saliency_as_mass_or_probs(saliency, heads, None)
    if mass is None:
        mass = attention_mass(probs, heads, backend=backend)
    map_size = _check_map_size(map_size, mass.shape[1])
    threshold = _check_threshold(threshold)
    if size is not None:
        size = _check_map_size(size)
    if _use_triton(backend, mass.device):
        return _op("saliency_mask").saliency_mask(mass, map_size, threshold, size)
    return reference.saliency_mask(mass, map_size, threshold, size)


def _timesteps_for_batch(timesteps, alphas_cumprod: torch.Tensor, batch: int, device) -> torch.Tensor:
    if isinstance(timesteps, int) and not isinstance(timesteps, bool):
        timesteps = torch.tensor(timesteps)
    _check_tensor("timesteps", timesteps, (0, 1), "(B,) or a scalar")
    if timesteps.is_floating_point() or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must be an integer tensor (indices into alphas_cumprod), got {timesteps.dtype}")
    if timesteps.dim() == 1 and timesteps.shape[0] not in (1, batch):
        raise ValueError(f"timesteps must have shape (B,) = ({batch},) or be a scalar, got {tuple(timesteps.shape)}")
    # bounds are checked for CPU timesteps only: on CUDA the check would sync every training step
    if timesteps.device.type == "cpu" and timesteps.numel() and (
        timesteps.min() < 0 or timesteps.max() >= alphas_cumprod.shape[0]
    ):
        raise ValueError(f"timesteps must lie in [0, {alphas_cumprod.shape[0] - 1}] (len(alphas_cumprod))")
    return timesteps.to(device, torch.int64).reshape(-1).expand(batch).contiguous()


def degrade_latents(
    x0: torch.Tensor,
    eps: torch.Tensor,
    saliency: torch.Tensor,
    map_size: tuple[int, int],
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    threshold: float | str = 1.0,
    kernel_size: int = 9,
    sigma: float = 1.0,
    *,
    heads: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """x_deg = sqrt(ab_t) (m * blur(x0) + (1 - m) * x0) + sqrt(1 - ab_t) eps, in one launch (Triton).

    ``saliency`` is a mass (B, h*w) or self-attention probabilities (B*heads, N, N) or
    (B, heads, N, N) with ``heads=``; m is ``saliency_mask(..., threshold, size=x0's H, W)``.
    Differentiable w.r.t. ``x0`` and ``eps``.
    """
    _check_tensor("x0", x0, 4, "(B, C, H, W)")
    _check_floating("x0", x0)
    _check_tensor("eps", eps, 4, "(B, C, H, W)")
    _check_floating("eps", eps)
    if eps.shape != x0.shape:
        raise ValueError(f"eps must have the shape of x0 {tuple(x0.shape)}, got {tuple(eps.shape)}")
    mass, probs = _saliency_as_mass_or_probs(saliency, heads, x0.shape[0])
    map_size = _check_map_size(map_size, (mass if mass is not None else probs).shape[-1])
    _check_tensor("alphas_cumprod", alphas_cumprod, 1, "(num_train_timesteps,)")
    _check_floating("alphas_cumprod", alphas_cumprod)
    threshold = _check_threshold(threshold)
    _check_blur(kernel_size, sigma, *x0.shape[-2:])
    _check_same_device(x0=x0, eps=eps, saliency=saliency)
    timesteps = _timesteps_for_batch(timesteps, alphas_cumprod, x0.shape[0], x0.device)
    alphas_cumprod = alphas_cumprod.to(x0.device)
    if _use_triton(backend, x0.device):
        return _op("degrade").degrade_latents(
            x0, eps, probs if probs is not None else mass, heads, map_size,
            alphas_cumprod, timesteps, threshold, kernel_size, float(sigma),
        )
    if mass is None:
        mass = reference.attention_mass(probs, heads)
    return reference.degrade_latents(
        x0, eps, mass, map_size, alphas_cumprod, timesteps, threshold, kernel_size, float(sigma)
    )

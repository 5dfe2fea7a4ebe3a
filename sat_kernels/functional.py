"""Public API: check arguments, then run the Triton kernel or the torch reference.

``backend="auto"`` runs Triton on CUDA tensors (when triton is installed) and the torch path on
CPU tensors; ``"triton"`` forces the kernel (on CPU only under ``TRITON_INTERPRET=1``, set before
``sat_kernels`` is imported); ``"torch"`` forces ``sat_kernels.reference``. Every check
(``sat_kernels.checks``) runs before any kernel launch and raises ``ValueError``/``TypeError``
naming the argument.
"""

from __future__ import annotations

import os

import torch

from . import checks, reference


def _op(name: str):
    """The Triton op module ``sat_kernels.ops.<name>``, imported on first use (an import statement,
    not importlib: dynamo traces it, so a compiled caller keeps one graph)."""
    if (os.environ.get("TRITON_INTERPRET", "0") == "1") != checks.INTERPRETING:
        raise RuntimeError(
            "TRITON_INTERPRET changed after sat_kernels was imported; set it before the import"
        )
    from . import ops
    from .ops import attention_mass, blur, degrade, saliency_mask, token_probs  # noqa: F401

    return getattr(ops, name)


def attention_mass(probs: torch.Tensor, heads: int, *, backend: str = "auto") -> torch.Tensor:
    """(B, Nk): mean over heads of the attention each key receives (sum over queries).

    float32, or float64 for float64 probs (computed in float64 on both backends).
    """
    probs4 = checks.probs_as_4d(probs, heads)
    if checks.use_triton(backend, probs.device):
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
    """(B, Nk) attention mass of softmax(scale q k^T) from q, k and the row lse.

    q (B, heads, Nq, D), k (B, heads, Nk, D); lse (B, heads, Nq) natural-log, or None to compute it.
    Never holds more than a tile (Triton) or a 64 MiB chunk (torch) of the Nq x Nk map. float32, or
    float64 when q or k is float64 (computed in float64 on both backends; a given lse is read in it).
    """
    checks.check_qk_for_mass(q, k, lse, scale)
    scale = reference.default_scale(q, scale)
    with torch.no_grad():
        if checks.use_triton(backend, q.device):
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
    """(B, Nq, S) head-mean probability of each query for the key tokens (B, S); -1 = none.

    float32, or float64 when q or k is float64 (computed in float64 on both backends).
    """
    checks.check_qk(q, k, lse, scale)
    tokens = checks.check_tokens(tokens, q, k)
    scale = reference.default_scale(q, scale)
    with torch.no_grad():
        if checks.use_triton(backend, q.device):
            return _op("token_probs").token_attention_probs(q, k, tokens, lse, scale)
        return reference.token_attention_probs(q, k, tokens, lse, scale)


def gaussian_blur(
    x: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0, *, backend: str = "auto"
) -> torch.Tensor:
    """(B, C, H, W) separable Gaussian blur with reflect padding; equals SAG's gaussian_blur_2d.

    Differentiable to any order on both backends (its backward is the adjoint blur).
    """
    checks.check_tensor("x", x, 4, "(B, C, H, W)")
    checks.check_floating("x", x)
    checks.check_blur(kernel_size, sigma, *x.shape[-2:])
    if checks.use_triton(backend, x.device):
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
    mass, probs = checks.saliency_as_mass_or_probs(saliency, heads, None)
    if mass is None:
        mass = attention_mass(probs, heads, backend=backend)
    map_size = checks.check_map_size(map_size, mass.shape[1])
    threshold = checks.check_threshold(threshold)
    if size is not None:
        size = checks.check_map_size(size)
    if checks.use_triton(backend, mass.device):
        return _op("saliency_mask").saliency_mask(mass, map_size, threshold, size)
    return reference.saliency_mask(mass, map_size, threshold, size)


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
    Differentiable w.r.t. ``x0`` and ``eps``, to any order on both backends.
    """
    mass, probs, map_size, threshold, alphas_cumprod, timesteps = checks.degrade_arguments(
        x0, eps, saliency, heads, map_size, alphas_cumprod, timesteps, threshold, kernel_size, sigma
    )
    if checks.use_triton(backend, x0.device):
        return _op("degrade").degrade_latents(
            x0, eps, probs if probs is not None else mass, heads, map_size,
            alphas_cumprod, timesteps, threshold, kernel_size, float(sigma),
        )
    if mass is None:
        mass = reference.attention_mass(probs, heads)
    return reference.degrade_latents(
        x0, eps, mass, map_size, alphas_cumprod, timesteps, threshold, kernel_size, float(sigma)
    )

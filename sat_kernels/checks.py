"""Argument checks of the public API (``sat_kernels.functional``) and its backend choice.

Every check runs before any kernel launch and raises ``ValueError``/``TypeError`` with a one-line
message naming the argument and what it must be; the helpers that normalize an argument (a
(B*heads, N, N) map to (B, heads, N, N), a scalar timestep to (B,)) return the normalized value.
"""

from __future__ import annotations

import os
import re
import warnings

import torch

# triton is optional: the torch path needs only torch. 3.5 is the first release that runs every kernel
# (setup.py says why); CUDA torch pins its own triton (torch 2.6, which kohya-ss/sd-scripts uses: 3.2),
# so sat does not require one and runs the torch path where the installed triton is older.
MIN_TRITON = (3, 5)


def triton_problem() -> str | None:
    """Why the Triton kernels cannot run here (None: they can)."""
    try:
        import triton
    except ImportError as err:  # pragma: no cover - depends on the install
        return f"triton is not installed ({err})"
    release = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if release < MIN_TRITON:
        return f"triton {triton.__version__} is older than 3.5, the first that runs these kernels (torch >= 2.9 brings one)"
    return None


TRITON_PROBLEM = triton_problem()

# @triton.jit reads TRITON_INTERPRET when a kernel module is imported; the kernel modules are
# imported on first use (torch-only users never pay for them), so the setting is pinned here.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
BACKENDS = ("auto", "triton", "torch")


def use_triton(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` runs the Triton kernel for tensors on ``device`` (False: the torch path)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        if device.type == "cuda" and TRITON_PROBLEM is not None:
            warnings.warn(f"sat_kernels: the torch path runs on CUDA: {TRITON_PROBLEM}", stacklevel=3)
        return device.type == "cuda" and TRITON_PROBLEM is None
    if TRITON_PROBLEM is not None:
        raise RuntimeError(f"backend='triton' cannot run: {TRITON_PROBLEM}; use backend='torch' or auto")
    if device.type == "cpu" and not INTERPRETING:
        raise RuntimeError(
            "backend='triton' on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 before "
            "importing sat_kernels, or use backend='torch' (or move the tensors to CUDA)"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='triton' supports CUDA (or CPU under the interpreter), got {device}")
    return True


# ----------------------------------------------------------------------------- single arguments


def check_tensor(name: str, x, ndim: int | tuple[int, ...], layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in ndims:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")


def check_floating(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16), got {x.dtype}")


def check_nonempty(name: str, x: torch.Tensor, dim: int, what: str) -> None:
    """ValueError unless ``x`` has at least one ``what`` (e.g. "key (Nk >= 1)") along ``dim``."""
    if x.shape[dim] == 0:
        raise ValueError(f"{name} must have at least one {what}, got shape {tuple(x.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")


def check_map_size(map_size, tokens: int | None = None) -> tuple[int, int]:
    """``map_size`` as (h, w) ints; with ``tokens``, h * w must be that many."""
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


def check_threshold(threshold) -> float | str:
    """A float threshold as float, or "mean"."""
    if isinstance(threshold, str):
        if threshold != "mean":
            raise ValueError(f'threshold must be a float or "mean", got {threshold!r}')
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f'threshold must be a float or "mean", got {type(threshold).__name__}')
    return float(threshold)


def check_blur(kernel_size, sigma, height: int, width: int) -> None:
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


# ----------------------------------------------------------------------------- attention inputs


def check_qk(q, k, lse, scale) -> None:
    check_tensor("q", q, 4, "(B, heads, Nq, head_dim)")
    check_tensor("k", k, 4, "(B, heads, Nk, head_dim)")
    check_floating("q", q)
    check_floating("k", k)
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, heads and head_dim: "
            "q (B, heads, Nq, D), k (B, heads, Nk, D)"
        )
    # a softmax over no keys and a mean over no heads have no value (the reference would fail or
    # return NaN); a zero head_dim has no default scale. B = 0 is an empty batch and is allowed.
    check_nonempty("q", q, 1, "head (heads >= 1)")
    if q.shape[-1] == 0:
        raise ValueError(f"q must have head_dim >= 1, got shape {tuple(q.shape)}")
    check_nonempty("k", k, 2, "key (Nk >= 1)")
    check_same_device(q=q, k=k)
    if lse is not None:
        check_tensor("lse", lse, 3, "(B, heads, Nq)")
        if lse.shape != q.shape[:-1]:
            raise ValueError(f"lse must have shape (B, heads, Nq) = {tuple(q.shape[:-1])}, got {tuple(lse.shape)}")
        check_floating("lse", lse)
        check_same_device(q=q, lse=lse)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None (None = head_dim ** -0.5), got {type(scale).__name__}")


def check_qk_for_mass(q, k, lse, scale) -> None:
    """check_qk, and at least one query: the mass is a sum over the queries (no queries, no mass),
    as attention_mass refuses probabilities without queries."""
    check_qk(q, k, lse, scale)
    check_nonempty("q", q, 2, "query (Nq >= 1)")


def check_index_range(t: torch.Tensor, low: int, high: int, message: str) -> None:
    """ValueError(message) unless low <= t < high everywhere. Under torch.compile the check is an
    op of the graph (torch._assert_async: a RuntimeError when the graph runs), since a Python branch
    on tensor values would break the graph. A meta tensor has no values to check."""
    if not t.numel() or t.is_meta:
        return
    if torch.compiler.is_compiling():
        torch._assert_async(((t >= low) & (t < high)).all(), message)
    elif t.min() < low or t.max() >= high:
        raise ValueError(message)


def check_tokens(tokens, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, S) key-token indices in [-1, Nk) (-1 = padding), as int64 on q's device."""
    check_tensor("tokens", tokens, 2, "(B, S) of key-token indices, -1 for padding")
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"tokens must be an integer tensor (B, S), got {tokens.dtype}")
    if tokens.shape[0] != q.shape[0]:
        raise ValueError(f"tokens has batch {tokens.shape[0]} but q has {q.shape[0]}")
    check_index_range(tokens, -1, k.shape[2], f"tokens must be in [-1, {k.shape[2] - 1}] (Nk = {k.shape[2]}; "
                      "-1 = padding)")
    return tokens.to(q.device, torch.int64)


def probs_as_4d(probs, heads, name: str = "probs") -> torch.Tensor:
    """(B*heads, Nq, Nk) or (B, heads, Nq, Nk) probabilities as a (B, heads, Nq, Nk) view.

    At least one query and one key: the mass sums over the queries of rows that are softmaxes
    over the keys. ``name`` is the argument's name in the messages.
    """
    check_tensor(name, probs, (3, 4), "(B*heads, Nq, Nk) or (B, heads, Nq, Nk)")
    check_floating(name, probs)
    check_nonempty(name, probs, -2, "query (Nq >= 1)")
    check_nonempty(name, probs, -1, "key (Nk >= 1)")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if probs.dim() == 4:
        if probs.shape[1] != heads:
            raise ValueError(f"{name} (B, heads, Nq, Nk) has {probs.shape[1]} heads but heads={heads}")
        return probs
    if probs.shape[0] % heads:
        raise ValueError(
            f"{name} has {probs.shape[0]} rows, not a multiple of heads={heads}: expected (B*heads, Nq, Nk) "
            "in diffusers' head_to_batch_dim layout"
        )
    return probs.view(probs.shape[0] // heads, heads, *probs.shape[1:])


def saliency_as_mass_or_probs(saliency, heads, batch: int | None):
    """Returns (mass (B, N), None) or (None, probs (B, heads, N, N)) after checking shapes."""
    check_tensor("saliency", saliency, (2, 3, 4), "a mass (B, h*w) or probabilities (B*heads, N, N)")
    check_floating("saliency", saliency)
    if saliency.dim() == 2:
        if heads is not None:
            raise ValueError("heads is only for saliency given as probabilities; a (B, h*w) mass takes heads=None")
        mass, probs = saliency, None
    else:
        if heads is None:
            raise ValueError("saliency given as attention probabilities needs heads= (number of attention heads)")
        mass, probs = None, probs_as_4d(saliency, heads, "saliency")
        if probs.shape[-1] != probs.shape[-2]:
            raise ValueError(f"self-attention probabilities must be square (N, N), got {tuple(probs.shape[-2:])}")
    rows = (mass if mass is not None else probs).shape[0]
    if batch is not None and rows != batch:
        raise ValueError(f"saliency holds {rows} samples but the latents hold {batch}; batch sizes must match")
    return mass, probs


# ----------------------------------------------------------------------------- degrade_latents


def timesteps_for_batch(timesteps, alphas_cumprod: torch.Tensor, batch: int, device) -> torch.Tensor:
    """An int, a scalar or a (B,) / (1,) integer tensor as (B,) int64 on ``device``."""
    if isinstance(timesteps, int) and not isinstance(timesteps, bool):
        timesteps = torch.tensor(timesteps)
    check_tensor("timesteps", timesteps, (0, 1), "(B,) or a scalar")
    if timesteps.is_floating_point() or timesteps.dtype == torch.bool:
        raise TypeError(f"timesteps must be an integer tensor (indices into alphas_cumprod), got {timesteps.dtype}")
    if timesteps.dim() == 1 and timesteps.shape[0] not in (1, batch):
        raise ValueError(f"timesteps must have shape (B,) = ({batch},) or be a scalar, got {tuple(timesteps.shape)}")
    # bounds are checked for CPU timesteps only: on CUDA the check would sync every training step
    if timesteps.device.type == "cpu":
        check_index_range(timesteps, 0, alphas_cumprod.shape[0],
                          f"timesteps must lie in [0, {alphas_cumprod.shape[0] - 1}] (len(alphas_cumprod))")
    return timesteps.to(device, torch.int64).reshape(-1).expand(batch).contiguous()


def degrade_arguments(x0, eps, saliency, heads, map_size, alphas_cumprod, timesteps, threshold, kernel_size,
                      sigma):
    """Every check of ``degrade_latents``, in the order its messages are documented; returns
    (mass or None, probs or None, map_size, threshold, alphas_cumprod and timesteps (B,) on x0's
    device)."""
    check_tensor("x0", x0, 4, "(B, C, H, W)")
    check_floating("x0", x0)
    check_tensor("eps", eps, 4, "(B, C, H, W)")
    check_floating("eps", eps)
    if eps.shape != x0.shape:
        raise ValueError(f"eps must have the shape of x0 {tuple(x0.shape)}, got {tuple(eps.shape)}")
    mass, probs = saliency_as_mass_or_probs(saliency, heads, x0.shape[0])
    map_size = check_map_size(map_size, (mass if mass is not None else probs).shape[-1])
    check_tensor("alphas_cumprod", alphas_cumprod, 1, "(num_train_timesteps,)")
    check_floating("alphas_cumprod", alphas_cumprod)
    threshold = check_threshold(threshold)
    check_blur(kernel_size, sigma, *x0.shape[-2:])
    check_same_device(x0=x0, eps=eps, saliency=saliency)
    timesteps = timesteps_for_batch(timesteps, alphas_cumprod, x0.shape[0], x0.device)
    return mass, probs, map_size, threshold, alphas_cumprod.to(x0.device), timesteps

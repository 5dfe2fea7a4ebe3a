"""The SAT math in plain PyTorch: the readable oracle, and the path CPU tensors run.

Every function here is the definition the Triton kernels in ``sat_kernels.ops`` are tested
against; they take already-validated arguments (``sat_kernels.functional`` checks them). Each
computes in, and returns, its compute dtype (``compute_dtype``): float64 for float64 inputs (so
gradcheck can run and float64 callers get float64 accuracy), float32 for every other floating
dtype (fp16/bf16 are read exactly and computed in float32). The attention statistics take it from
q and k together (float64 when either is; a given lse is read in it) or from probs; the blur and
the degrade from x0. The Triton kernels follow the same rule on both devices. Saliency masks are
the exception: a mass is compared with its threshold in float32 on both paths (the threshold is a
float32 kernel argument on GPU).

The blur is two matrix products, ``blur(x) = B_H @ x @ B_W^T``, with each 1-D blur (reflect
padding included) written out as an n x n matrix: on CPU a GEMM beats the stencils (shifted
multiply-adds, SAG's grouped conv2d, two 1-D ``F.conv2d``; benchmarks/RESULTS.md has the timings).
Its work grows with the side, so past ``_MATMUL_BLUR_MAX_SIDE`` the shifted multiply-adds take
over; they also take non-finite inputs, which a product would smear over the whole plane
(0 * NaN), so a NaN or inf only reaches the outputs whose window holds it, as in SAG's convolution.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F

# Largest score block (elements) the chunked q.k^T loops hold at once: 4 Mi fp32 = 16 MiB, the
# fastest chunk measured (bigger blocks fall out of cache; benchmarks/RESULTS.md).
_MAX_BLOCK_ELEMENTS = 1 << 22
# Longest side blurred by matrix products: a row costs 2n flops per element instead of 2 * taps,
# and the product stops winning past about this side (benchmarks/RESULTS.md).
_MATMUL_BLUR_MAX_SIDE = 512


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any of ``tensors`` is float64 (for gradcheck and float64 callers); every other
    floating dtype is computed in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gaussian_kernel1d(kernel_size: int, sigma: float, device=None) -> torch.Tensor:
    """The normalized 1-D Gaussian taps SAG's ``gaussian_blur_2d`` uses (float32)."""
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return (pdf / pdf.sum()).to(device)


@functools.lru_cache(maxsize=32)
def blur_matrix(n: int, kernel_size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n, n) matrix of the 1-D blur with reflect padding: blur(v) = M @ v (cached; do not modify).

    Row i holds taps[d + R] at column reflect(i + d), d = -R..R. Reflection (no edge repeat:
    -1 -> 1, n -> n-2) lands two taps on one column near a border; those add up.
    """
    taps = gaussian_kernel1d(kernel_size, sigma).to(dtype)  # normalized in fp32 like SAG's, then cast
    radius = kernel_size // 2
    cols = (torch.arange(n)[:, None] + torch.arange(-radius, radius + 1)).abs()
    cols = torch.where(cols > n - 1, 2 * (n - 1) - cols, cols)
    matrix = torch.zeros(n, n, dtype=dtype).scatter_add_(1, cols, taps.expand(n, -1))
    return matrix.to(device)


@functools.lru_cache(maxsize=64)
def blur_gather_weights(n: int, kernel_size: int, sigma: float, adjoint: bool, device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
    """(n, kernel_size) weights w of the 1-D reflect blur, or of its transpose (``adjoint``), written
    as a gather: out[s] = sum_j w[s, j] * v[reflect(s + j - R)] (cached; do not modify).

    Forward: w[s, j] = taps[j] (rows of ``blur_matrix``). The transpose has the same gather form
    because the taps are symmetric: input s collects taps[j] from every output whose padded window
    holds s or a mirror image of s. So w is the taps except at the borders, with p = s + j - R:
    doubled where p is the first (last) index and s is not (that sample is read directly and as its
    own mirror), zero where s is the first (last) index and p lies outside (an edge sample has no
    mirror partner). The Triton blur walks both directions with these weights.
    """
    taps = gaussian_kernel1d(kernel_size, sigma).to(dtype)
    weights = taps.expand(n, -1).clone()
    if adjoint:
        s = torch.arange(n)[:, None]
        p = s + torch.arange(kernel_size) - kernel_size // 2
        twice = ((p == 0) & (s > 0)) | ((p == n - 1) & (s < n - 1))
        never = ((p < 0) & (s == 0)) | ((p > n - 1) & (s == n - 1))
        weights = torch.where(never, 0.0, torch.where(twice, 2 * weights, weights))
    return weights.to(device)


def _blur_last_dim(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    radius = taps.numel() // 2
    n = x.shape[-1]
    padded = F.pad(x, (radius, radius), mode="reflect")
    out = padded[..., 0:n] * taps[0]
    for i in range(1, taps.numel()):
        out = out + padded[..., i : i + n] * taps[i]
    return out


def gaussian_blur(x: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding; equals SAG's gaussian_blur_2d."""
    x = x.to(compute_dtype(x))
    height, width = x.shape[-2:]
    # a finite sum means finite inputs (a sum that overflows only sends them the slow way); a meta
    # tensor has no values to sum, and either path gives the same shape and dtype
    if max(height, width) <= _MATMUL_BLUR_MAX_SIDE and (x.is_meta or math.isfinite(x.detach().sum())):
        rows = blur_matrix(height, kernel_size, float(sigma), x.device, x.dtype)
        cols = blur_matrix(width, kernel_size, float(sigma), x.device, x.dtype)
        with _autocast_off(x.device):  # a trainer's bf16 autocast must not round the products
            return rows @ (x @ cols.T)
    planes = x.reshape(-1, height, width)  # reflect pad wants 3-D input
    taps = gaussian_kernel1d(kernel_size, sigma, x.device).to(x.dtype)
    blurred_rows = _blur_last_dim(planes, taps)
    return _blur_last_dim(blurred_rows.transpose(-1, -2), taps).transpose(-1, -2).reshape(x.shape)


def attention_mass(probs: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Nk) attention each key receives: sum over queries, mean over heads.

    ``probs`` is (B*heads, Nq, Nk) in diffusers' head_to_batch_dim layout (row b*heads + h)
    or (B, heads, Nq, Nk). Summed in, and returned as, compute_dtype(probs).
    """
    nq, nk = probs.shape[-2:]
    per_head = probs.reshape(-1, heads, nq, nk).sum(dim=-2, dtype=compute_dtype(probs))
    return per_head.mean(dim=1)


def _query_chunks(q: torch.Tensor, nk: int):
    """Slices over the query axis so a (B, H, chunk, Nk) score block stays under the cap."""
    b, h, nq, _ = q.shape
    chunk = max(1, _MAX_BLOCK_ELEMENTS // max(1, b * h * nk))
    for start in range(0, nq, chunk):
        yield slice(start, min(start + chunk, nq))


def default_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _autocast_off(device: torch.device):
    """A context with the caller's autocast switched off on ``device`` (a no-op where none is on,
    and on devices without autocast, such as meta, where asking ``is_autocast_enabled`` raises).

    The blur's matrix products and the attention statistics below run under it. The trainer
    captures q and k inside its bf16/fp16-autocast UNet forward; left on, autocast would run the
    q @ k^T products as half-precision GEMMs and round every score before the exponential. The
    results must equal the math in the compute dtype, whatever the caller.
    """
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def attention_lse(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """(B, H, Nq) natural-log log-sum-exp of each row of scale * q @ k^T, in query chunks, in
    compute_dtype(q, k)."""
    scale = default_scale(q, scale)
    dtype = compute_dtype(q, k)
    q_scaled, k_t = scale * q.to(dtype), k.to(dtype).transpose(-1, -2)
    lse = torch.empty(q.shape[:-1], dtype=dtype, device=q.device)
    with _autocast_off(q.device):
        for rows in _query_chunks(q, k.shape[-2]):
            lse[..., rows] = torch.logsumexp(torch.matmul(q_scaled[..., rows, :], k_t), dim=-1)
    return lse


def attention_mass_from_qk(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """attention_mass(softmax(scale q k^T)) without the Nq x Nk map:

    mass[b, j] = mean_h sum_i exp(scale * q[b,h,i] . k[b,h,j] - lse[b,h,i])

    Without ``lse`` it is still one pass: a query chunk holds whole score rows, so their softmax
    is exact inside the chunk (a separate lse pass would double the time). In, and returned as,
    compute_dtype(q, k); a given lse is read in it.
    """
    scale = default_scale(q, scale)
    dtype = compute_dtype(q, k)
    q_scaled, k_t = scale * q.to(dtype), k.to(dtype).transpose(-1, -2)
    mass = torch.zeros(k.shape[:-1], dtype=dtype, device=q.device)  # (B, H, Nk)
    with _autocast_off(q.device):
        for rows in _query_chunks(q, k.shape[-2]):
            # probabilities of these query rows, built in place in one buffer
            scores = torch.matmul(q_scaled[..., rows, :], k_t)
            if lse is not None:
                mass += scores.sub_(lse[..., rows, None].to(dtype)).exp_().sum(dim=-2)
            else:
                exp = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
                # sum_i exp[i, j] / rowsum[i] as one (1 x chunk) @ (chunk x Nk) product
                mass += torch.matmul(exp.sum(dim=-1).reciprocal_()[..., None, :], exp)[..., 0, :]
    return mass.mean(dim=1)


def token_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    tokens: torch.Tensor,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """(B, Nq, S): head-mean softmax probability of each query for the key tokens ``tokens``.

    ``tokens`` is (B, S) long; -1 marks padding and gives probability 0. In, and returned as,
    compute_dtype(q, k); a given lse is read in it.
    """
    scale = default_scale(q, scale)
    dtype = compute_dtype(q, k)
    if lse is None:
        lse = attention_lse(q, k, scale)
    valid = tokens >= 0
    index = tokens.clamp(min=0)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
    k_sel = torch.gather(k.to(dtype), 2, index)  # (B, H, S, D)
    with _autocast_off(q.device):
        scores = scale * q.to(dtype) @ k_sel.transpose(-1, -2)  # (B, H, Nq, S)
        probs = torch.exp(scores - lse.to(dtype)[..., None]).mean(dim=1)
    return probs * valid[:, None, :]


def saliency_threshold(mass: torch.Tensor, threshold: float | str) -> torch.Tensor:
    """(B, 1) threshold per sample: the given constant, or each sample's mean for "mean"."""
    if isinstance(threshold, str):  # "mean", checked by the caller
        return mass.mean(dim=1, keepdim=True)
    return torch.full((mass.shape[0], 1), float(threshold), device=mass.device)


def saliency_mask(
    mass: torch.Tensor,
    map_size: tuple[int, int],
    threshold: float | str = 1.0,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Bool mask (B, h, w) of tokens whose mass exceeds the threshold; nearest-upsampled to size."""
    mass = mass.float()
    mask = (mass > saliency_threshold(mass, threshold)).view(-1, *map_size)
    if size is None:
        return mask
    rows = nearest_source_index(map_size[0], size[0], mask.device)
    cols = nearest_source_index(map_size[1], size[1], mask.device)
    return mask.index_select(1, rows).index_select(2, cols)


@functools.lru_cache(maxsize=64)
def nearest_source_index(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """Source index of each output of F.interpolate(mode="nearest"), bit for bit (cached; do not
    modify): min(floor(dst * float32(n_in / n_out)), n_in - 1), the product taken in float32."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    dst = torch.arange(n_out, dtype=torch.float32)
    return (dst * scale).long().clamp_(max=n_in - 1).to(device)


def degrade_latents(
    x0: torch.Tensor,
    eps: torch.Tensor,
    mass: torch.Tensor,
    map_size: tuple[int, int],
    alphas_cumprod: torch.Tensor,
    timesteps: torch.Tensor,
    threshold: float | str = 1.0,
    kernel_size: int = 9,
    sigma: float = 1.0,
) -> torch.Tensor:
    """x_deg = sqrt(ab_t) * (m * blur(x0) + (1 - m) * x0) + sqrt(1 - ab_t) * eps.

    ``mass`` is the (B, h*w) saliency; m is its thresholded map nearest-upsampled to x0's size.
    """
    dtype = compute_dtype(x0)
    x0c = x0.to(dtype)
    m = saliency_mask(mass, map_size, threshold, size=x0.shape[-2:])[:, None].to(dtype)
    ab = alphas_cumprod.to(x0.device, dtype)[timesteps.to(x0.device)].view(-1, 1, 1, 1)
    sa, sb = ab.sqrt(), (1 - ab).sqrt()
    # sa * (m * blur + (1 - m) * x0) + sb * eps, with the (B, 1, H, W) weights sa * m and
    # sa * (1 - m) formed first: three passes over the latents instead of six. m is 0 or 1, so
    # every product is the same number, and 0 * NaN = NaN keeps SAG's blend on non-finite input.
    out = torch.addcmul(sb * eps.to(dtype), sa * (1 - m), x0c)
    return out.addcmul_(sa * m, gaussian_blur(x0c, kernel_size, sigma))

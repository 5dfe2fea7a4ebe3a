"""Separable Gaussian blur with reflect padding (SAG's ``gaussian_blur_2d``), in Triton.

Tile design (shared with ``degrade.py`` through ``_blur_tile``): a program owns a ROWS x BW
output tile of one (b, c) plane. It blurs HALO >= ROWS + 2R input rows horizontally with KS
loads at affine (shifted, masked) columns, plus one small ``tl.dot`` that adds the taps falling
off the image (the 2R columns reflection reads, times a matrix of folded taps); then blurs
vertically with one ``tl.dot``: a (ROWS x HALO) band matrix of taps times the (HALO x BW)
row-blurred tile. Reflect padding is index math only; nothing is padded in memory and no
intermediate leaves the program. The dots would smear a NaN/inf over whole tile columns (0 * NaN),
so a forward tile that read one is redone with the reference's shifted adds (``_blur_tile_exact``).

The backward is the exact adjoint. Reflect padding makes the 1-D blur matrix non-symmetric at
the borders (an output near the edge reads some inputs twice), so the adjoint cannot reuse the
forward: input index ``s`` receives from every position whose tap lands on a preimage of ``s``
under reflect, i.e. ``s`` itself, ``-s`` (if s > 0) and ``2(n-1) - s`` (if s < n-1). The
same two pieces carry it: affine loads for the ``s`` term, the folded-tap dot for the mirrored
ones (horizontally), and the reflection folded into the band matrix (vertically).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import reference

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _reflect(i, n):
    """Reflect padding without edge repeat (-1 -> 1, n -> n-2); valid for -n < i < 2n - 1."""
    i = tl.where(i < 0, -i, i)
    return tl.where(i > n - 1, 2 * (n - 1) - i, i)


@triton.jit
def _taps_at(TAPS, i, KS: tl.constexpr):
    """Gather taps[i], 0 where i is outside [0, KS)."""
    ok = (i >= 0) & (i < KS)
    return tl.load(TAPS + tl.where(ok, i, 0), mask=ok, other=0.0)


@triton.jit
def _gather(ROW_PTR, MROW_PTR, row_ok, cols, col_ok, s_w, m_w, HAS_MASK: tl.constexpr, CDT: tl.constexpr):
    """Tile SRC[rows, cols] (times MSK[rows, cols] when HAS_MASK), 0 off-mask.

    Index math stays 1-D (row pointers come in precomputed; column offsets are a vector), only
    the final pointer add broadcasts to 2-D: cheap on GPU and in the interpreter alike.
    """
    ok = row_ok[:, None] & col_ok[None, :]
    c = tl.where(col_ok, cols, 0)
    v = tl.load(ROW_PTR[:, None] + (c * s_w)[None, :], mask=ok, other=0.0).to(CDT)
    if HAS_MASK:
        v = v * tl.load(MROW_PTR[:, None] + (c * m_w)[None, :], mask=ok, other=0).to(CDT)
    return v


@triton.jit
def _blur_tile(
    SRC, s_h, s_w,  # one (H, W) plane of the input, any strides
    MSK, m_h, m_w,  # adjoint only: a 0/1 plane multiplied into the input (HAS_MASK)
    TAPS, y0, x0, H, W,
    KS: tl.constexpr, ROWS: tl.constexpr, HALO: tl.constexpr, BW: tl.constexpr, BORDER: tl.constexpr,
    ADJOINT: tl.constexpr, HAS_MASK: tl.constexpr, CDT: tl.constexpr,
):
    """Blurred (ROWS, BW) tile at rows y0.., columns x0.. (its adjoint when ADJOINT).

    Halo row k stands for input row p = y0 - R + k, k < ROWS + 2R. Forward: row p of the
    reflect-padded image is input row reflect(p), so the vertical pass is the plain band
    out[a] = sum_i taps[i] * hb[a + i]. Adjoint: rows are read unreflected (0 outside the image)
    and the reflection moves into the band matrix instead.
    """
    R: tl.constexpr = KS // 2
    # int64 index vectors: free on GPU (1-D), and the interpreter skips its per-op int32
    # overflow check for them (that check dominated interpreter time)
    k = tl.arange(0, HALO).to(tl.int64)
    a = tl.arange(0, ROWS).to(tl.int64)
    x = x0 + tl.arange(0, BW).to(tl.int64)
    p = y0 - R + k
    if ADJOINT:
        row_ok = (k < ROWS + 2 * R) & (p >= 0) & (p < H)
        rows = p
    else:
        # p > H - 1 + R only feeds output rows >= H (discarded): do not load it
        row_ok = (k < ROWS + 2 * R) & (p < H + R)
        rows = _reflect(p, H)
    rows = tl.where(row_ok, rows, 0)
    row_ptr = SRC + rows * s_h
    mrow_ptr = MSK + rows * m_h

    # horizontal pass over the HALO rows. The KS tap loads use affine columns (x + d): they
    # coalesce (a reflected index would make every load a scattered gather: ~20x slower on an
    # H100) and are masked to the image. Taps that fall off the image come back through a small
    # dot: the 2R columns that reflection reads, times a (BORDER, BW) matrix of folded taps.
    hb = tl.zeros((HALO, BW), CDT)
    x_ok = x < W
    v = tl.arange(0, BORDER).to(tl.int64)
    left = v < R
    v_ok = v < 2 * R
    for j in tl.static_range(KS):
        # forward: out[x] += taps[j] * in[x + d]; adjoint: in[c] += taps[j] * g[c - d]
        if ADJOINT:
            cj = x - (j - R)
        else:
            cj = x + (j - R)
        hb += tl.load(TAPS + j) * _gather(row_ptr, mrow_ptr, row_ok, cj, x_ok & (cj >= 0) & (cj < W), s_w, m_w,
                                          HAS_MASK, CDT)
    xo = x[None, :]
    if ADJOINT:
        # g columns that reflected taps read: v < R -> column v (left), else W-1-(v-R) (right).
        # Column c gets taps[j] * g[src] where src = -c - d (c > 0) or 2(W-1) - c - d (c < W-1).
        src = tl.where(left, v, W - 1 - (v - R))
        sv = src[:, None]
        fold = tl.where(left[:, None], tl.where(xo > 0, _taps_at(TAPS, R - sv - xo, KS), 0.0),
                        tl.where(xo < W - 1, _taps_at(TAPS, 2 * (W - 1) - xo - sv + R, KS), 0.0))
    else:
        # input columns reflection reaches: v < R -> column 1 + v (left), else W-2-(v-R) (right).
        # Output x reads src through tap j where x + d = -src (left) or 2(W-1) - src (right).
        src = tl.where(left, 1 + v, W - 2 - (v - R))
        sv = src[:, None]
        fold = tl.where(left[:, None], _taps_at(TAPS, R - sv - xo, KS),
                        _taps_at(TAPS, 2 * (W - 1) - sv - xo + R, KS))
    fold = tl.where(v_ok[:, None] & x_ok[None, :], fold, 0.0).to(CDT)
    edge = _gather(row_ptr, mrow_ptr, row_ok, src, v_ok, s_w, m_w, HAS_MASK, CDT)  # (HALO, BORDER)
    hb += tl.dot(edge, fold, input_precision="ieee", out_dtype=CDT)

    # vertical pass: (ROWS, HALO) band matrix @ (HALO, BW)
    if ADJOINT:
        # band[a, k] = sum over preimages P of s = y0 + a of taps[P - p + R], p = y0 - R + k
        s = (y0 + a)[:, None]
        pk = p[None, :]
        band = _taps_at(TAPS, s - pk + R, KS)
        band += tl.where(s > 0, _taps_at(TAPS, -s - pk + R, KS), 0.0)
        band += tl.where(s < H - 1, _taps_at(TAPS, 2 * (H - 1) - s - pk + R, KS), 0.0)
    else:
        band = _taps_at(TAPS, k[None, :] - a[:, None], KS)
    out = tl.dot(band.to(CDT), hb, input_precision="ieee", out_dtype=CDT)
    if not ADJOINT:
        # both dots multiply every loaded value, zero taps included (0 * inf = NaN): a NaN/inf
        # read by the tile leaves at least a whole output column non-finite, so all-finite outputs
        # mean all-finite reads. A tile that read one (rare) is redone exactly.
        if tl.sum(tl.where(tl.abs(out) < float("inf"), 0, 1)) > 0:
            out = _blur_tile_exact(SRC, s_h, s_w, TAPS, y0, x0, H, W, KS, ROWS, BW, CDT)
    return out


@triton.jit(noinline=True)
def _blur_tile_exact(SRC, s_h, s_w, TAPS, y0, x0, H, W, KS: tl.constexpr, ROWS: tl.constexpr, BW: tl.constexpr,
                     CDT: tl.constexpr):
    """Forward tile as the reference's shifted adds (taps in order, along W, then along H), every
    read at its reflected row and column: a NaN/inf reaches only the outputs whose window holds it,
    and +-inf stays inf unless the window mixes signs (or meets a zero tap). KS^2 gathers, for rare
    tiles only: runtime loops keep the code small, and noinline keeps its registers out of the
    all-finite path's allocation (inlined, the fused degrade kernel spilled more)."""
    R: tl.constexpr = KS // 2
    # rows / columns past the image are discarded by the caller: clamped, every read stays in-bounds
    y = tl.minimum(y0 + tl.arange(0, ROWS).to(tl.int64), H - 1)
    x = tl.minimum(x0 + tl.arange(0, BW).to(tl.int64), W - 1)
    out = tl.zeros((ROWS, BW), CDT)
    for i in range(KS):
        # out[y] += taps[i] * hrow(reflect(y + i - R)), hrow the row blurred along W
        row_ptr = SRC + _reflect(y + (i - R), H) * s_h
        hrow = tl.zeros((ROWS, BW), CDT)
        for j in range(KS):
            cols = _reflect(x + (j - R), W) * s_w
            hrow += tl.load(TAPS + j) * tl.load(row_ptr[:, None] + cols[None, :]).to(CDT)
        out += tl.load(TAPS + i) * hrow
    return out


@triton.jit
def _gaussian_blur_kernel(
    SRC, OUT, TAPS,
    C, H, W,
    s_b, s_c, s_h, s_w,  # SRC strides; OUT is contiguous (B, C, H, W)
    KS: tl.constexpr, ROWS: tl.constexpr, HALO: tl.constexpr, BW: tl.constexpr, BORDER: tl.constexpr,
    ADJOINT: tl.constexpr, CDT: tl.constexpr,
):
    # grid: (row tiles * column tiles, B * C); one program = one (ROWS, BW) tile of one plane
    tile = tl.program_id(0)
    plane = tl.program_id(1)
    n_cb = tl.cdiv(W, BW)
    y0 = (tile // n_cb) * ROWS
    x0 = (tile % n_cb) * BW
    b = plane // C
    c = plane % C
    src = SRC + b.to(tl.int64) * s_b + c.to(tl.int64) * s_c
    out = _blur_tile(src, s_h, s_w, src, 0, 0, TAPS, y0, x0, H, W,
                     KS, ROWS, HALO, BW, BORDER, ADJOINT, False, CDT)
    ys = y0 + tl.arange(0, ROWS)
    xs = x0 + tl.arange(0, BW)
    ok = (ys < H)[:, None] & (xs < W)[None, :]
    dst = (OUT + plane.to(tl.int64) * H * W + ys * W)[:, None] + xs[None, :]
    tl.store(dst, out, mask=ok)


# ----------------------------------------------------------------------------- launcher

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@functools.lru_cache(maxsize=64)
def _taps_cached(kernel_size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return reference.gaussian_kernel1d(kernel_size, sigma).to(device=device, dtype=dtype)


def gaussian_taps(kernel_size: int, sigma: float, device, dtype: torch.dtype) -> torch.Tensor:
    """reference.gaussian_kernel1d (normalized in fp32) in the compute dtype, cached per device."""
    return _taps_cached(int(kernel_size), float(sigma), torch.device(device), dtype)


def tile_sizes(height: int, width: int, kernel_size: int, device, rows: int | None = None,
               block_w: int | None = None) -> tuple[int, int, int, int]:
    """(ROWS, HALO, BW, BORDER); BORDER holds the 2R reflected columns. tl.dot wants sides >= 16. The interpreter pays per program, so
    it gets big tiles; a GPU gets 16-row tiles (many programs, short halo)."""
    interp = torch.device(device).type != "cuda"
    if rows is None:
        rows = max(16, min(64, triton.next_power_of_2(height))) if interp else 16
    if block_w is None:
        block_w = max(16, min(256 if interp else 128, triton.next_power_of_2(width)))
    halo = triton.next_power_of_2(rows + 2 * (kernel_size // 2))
    border = max(16, triton.next_power_of_2(2 * (kernel_size // 2)))
    return rows, halo, block_w, border


def blur_launch(x: torch.Tensor, kernel_size: int, sigma: float, adjoint: bool, out_dtype: torch.dtype,
                rows: int | None = None, block_w: int | None = None) -> torch.Tensor:
    """Blur (or its adjoint) of (B, C, H, W) ``x`` in compute dtype; result stored as ``out_dtype``."""
    B, C, H, W = x.shape
    cdt = reference.compute_dtype(x)
    out = torch.empty((B, C, H, W), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    taps = gaussian_taps(kernel_size, sigma, x.device, cdt)
    ROWS, HALO, BW, BORDER = tile_sizes(H, W, kernel_size, x.device, rows, block_w)
    grid = (triton.cdiv(H, ROWS) * triton.cdiv(W, BW), B * C)
    _gaussian_blur_kernel[grid](
        x, out, taps, C, H, W, *x.stride(),
        KS=kernel_size, ROWS=ROWS, HALO=HALO, BW=BW, BORDER=BORDER, ADJOINT=adjoint, CDT=_TL_DTYPE[cdt],
        num_warps=4, num_stages=1,
    )
    return out


# ----------------------------------------------------------------------------- autograd


class GaussianBlurFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, sigma, rows=None, block_w=None):
        ctx.params = (kernel_size, sigma, rows, block_w, x.dtype)
        return blur_launch(x, kernel_size, sigma, False, reference.compute_dtype(x), rows, block_w)

    @staticmethod
    def backward(ctx, grad):
        kernel_size, sigma, rows, block_w, dtype = ctx.params
        return blur_launch(grad, kernel_size, sigma, True, dtype, rows, block_w), None, None, None, None


def gaussian_blur(x: torch.Tensor, kernel_size: int = 9, sigma: float = 1.0, *, rows: int | None = None,
                  block_w: int | None = None) -> torch.Tensor:
    """(B, C, H, W) separable Gaussian blur, reflect padding; equals reference.gaussian_blur.

    ``rows`` / ``block_w`` override the tile size (tests use them to cross tile borders).
    """
    return GaussianBlurFunction.apply(x, int(kernel_size), float(sigma), rows, block_w)

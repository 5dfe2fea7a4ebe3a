"""sat_kernels.gaussian_blur: the Triton kernel (interpreter on CPU) against reference.py, against
diffusers' SAG ``gaussian_blur_2d`` (external oracle), and its backward (the reflect-border
adjoint) against gradcheck / autograd of the reference.
"""

import pytest
import torch
# the external oracle is part of the test extra: if diffusers moves it, fail loudly instead of skipping
from diffusers.pipelines.deprecated.stable_diffusion_sag import pipeline_stable_diffusion_sag as sag

import sat_kernels
from sat_kernels import reference
from sat_kernels.ops import blur as blur_op

# fp16/bf16 inputs are computed in fp32 by both paths, so the result tolerance stays fp32-tight
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
# gradients come back in the input dtype: one rounding step of that dtype
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=1e-4),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3)}


def make(shape, dtype=torch.float32, layout="contiguous", seed=0):
    """A (B, C, H, W) tensor in the given memory layout (values drawn in fp32, then cast)."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    if layout == "contiguous":
        return torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        return torch.randn(shape, generator=g).to(dtype).to(memory_format=torch.channels_last)
    if layout == "sliced":  # every other column of a wider tensor, offset by one row
        return torch.randn(b, c, h + 2, 2 * w, generator=g).to(dtype)[:, :, 1 : h + 1, ::2]
    if layout == "transposed":  # H and W swapped in memory
        return torch.randn(b, c, w, h, generator=g).to(dtype).transpose(-1, -2)
    raise ValueError(layout)


CASES = [  # shape, kernel_size, sigma, dtype, layout
    ((2, 4, 63, 65), 9, 1.0, torch.float32, "contiguous"),
    ((2, 4, 63, 65), 9, 1.0, torch.float16, "channels_last"),
    ((2, 4, 63, 65), 9, 1.0, torch.bfloat16, "sliced"),
    ((1, 1, 16, 16), 3, 0.5, torch.float32, "transposed"),
    ((1, 2, 20, 33), 15, 2.0, torch.float32, "sliced"),
    ((2, 3, 9, 12), 9, 2.0, torch.float16, "contiguous"),
    ((1, 1, 8, 5), 9, 1.0, torch.float32, "contiguous"),  # radius 4 = W - 1: deepest reflection
]


@pytest.mark.parametrize("shape,kernel_size,sigma,dtype,layout", CASES)
def test_blur_matches_reference(shape, kernel_size, sigma, dtype, layout):
    x = make(shape, dtype, layout)
    out = sat_kernels.gaussian_blur(x, kernel_size, sigma, backend="triton")
    ref = reference.gaussian_blur(x, kernel_size, sigma)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("rows,block_w", [(16, 16), (16, 32)])
def test_blur_across_tile_borders(rows, block_w):
    """Several row and column tiles: halos straddle tile borders and both image borders."""
    x = make((1, 2, 40, 50), layout="sliced", seed=1)
    out = blur_op.gaussian_blur(x, 9, 1.0, rows=rows, block_w=block_w)
    torch.testing.assert_close(out, reference.gaussian_blur(x, 9, 1.0), **TOL[torch.float32])


def test_blur_plane_groups(monkeypatch):
    """B * C planes split into groups of CP along grid axis 1 (4 on a GPU); forced here: groups of 2
    over 5 planes (a partial last group), forward and adjoint."""
    tile_sizes = blur_op.row_walk_tiles
    monkeypatch.setattr(blur_op, "row_walk_tiles", lambda *args, **kw: (*tile_sizes(*args, **kw)[:2], 2, 1))
    x = make((1, 5, 17, 19), seed=6)
    grad = make((1, 5, 17, 19), seed=7)
    torch.testing.assert_close(blur_op.gaussian_blur(x, 9, 1.0), reference.gaussian_blur(x, 9, 1.0),
                               **TOL[torch.float32])
    xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    reference.gaussian_blur(xr, 9, 1.0).backward(grad)
    blur_op.gaussian_blur(xt, 9, 1.0).backward(grad)
    torch.testing.assert_close(xt.grad, xr.grad, **GRAD_TOL[torch.float32])


def test_blur_float64_stays_float64():
    x = make((1, 2, 11, 13), torch.float64)
    out = sat_kernels.gaussian_blur(x, 5, 1.5, backend="triton")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.gaussian_blur(x, 5, 1.5), **TOL[torch.float64])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape,kernel_size,sigma", [((2, 4, 32, 32), 9, 1.0), ((1, 3, 17, 23), 5, 2.0)])
def test_blur_matches_diffusers_sag(backend, shape, kernel_size, sigma):
    """External oracle: SAG's own 81-tap grouped conv2d blur."""
    x = make(shape, seed=2)
    expected = sag.gaussian_blur_2d(x, kernel_size, sigma)
    out = sat_kernels.gaussian_blur(x, kernel_size, sigma, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("path", ["matrix", "shifted"])
def test_torch_blur_paths_match_diffusers_sag(path, monkeypatch):
    """The torch path blurs with two matrix products up to _MATMUL_BLUR_MAX_SIDE and with shifted
    multiply-adds beyond it: both equal SAG's conv2d, in float64 too (with its taps cast)."""
    x = make((1, 2, 13, 9), torch.float64, layout="transposed", seed=4)
    if path == "shifted":
        monkeypatch.setattr(reference, "_MATMUL_BLUR_MAX_SIDE", 12)
    torch.testing.assert_close(reference.gaussian_blur(x, 7, 1.5), sag.gaussian_blur_2d(x, 7, 1.5),
                               rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- backward


@pytest.mark.parametrize("kernel_size,sigma", [(1, 1.0), (3, 0.5), (9, 1.0), (15, 2.0)])
def test_gather_weights_are_the_blur_matrix_and_its_transpose(kernel_size, sigma):
    """The walk's weight tables (reference.blur_gather_weights), scattered back to the columns they
    read, rebuild the dense reflect-blur matrix (forward) and its transpose (adjoint): every
    length from the smallest reflect allows, so both borders' windows overlap."""
    radius = kernel_size // 2
    for n in range(radius + 1, radius + 12):
        cols = (torch.arange(n)[:, None] + torch.arange(-radius, radius + 1)).abs()
        cols = torch.where(cols > n - 1, 2 * (n - 1) - cols, cols)
        dense = reference.blur_matrix(n, kernel_size, sigma, torch.device("cpu"), torch.float64)
        for adjoint, expected in [(False, dense), (True, dense.T)]:
            weights = reference.blur_gather_weights(n, kernel_size, sigma, adjoint, torch.device("cpu"), torch.float64)
            rebuilt = torch.zeros(n, n, dtype=torch.float64).scatter_add_(1, cols, weights)
            torch.testing.assert_close(rebuilt, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("shape,kernel_size,fast", [
    ((1, 2, 6, 7), 5, True),  # reflect borders on every side, several taps folded twice
    ((1, 1, 5, 4), 7, False),  # radius 3 = W - 1: reflected taps reach the opposite border
])
def test_blur_gradcheck(shape, kernel_size, fast):
    x = make(shape, torch.float64, seed=3).requires_grad_()
    fn = lambda t: sat_kernels.gaussian_blur(t, kernel_size, 1.3, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=fast)


def test_blur_adjoint_across_tiles_matches_autograd():
    """Backward with several row/column tiles equals autograd of the reference (fp64)."""
    x = make((1, 2, 37, 41), torch.float64, "channels_last", seed=4)
    grad = make((1, 2, 37, 41), torch.float64, "transposed", seed=5)
    xr = x.clone().requires_grad_()
    reference.gaussian_blur(xr, 9, 1.0).backward(grad)
    xt = x.clone().requires_grad_()
    blur_op.gaussian_blur(xt, 9, 1.0, rows=16, block_w=16).backward(grad)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_blur_grad_in_input_dtype(dtype):
    x = make((1, 2, 19, 21), dtype, seed=6)
    grad = make((1, 2, 19, 21), torch.float32, seed=7)
    xr = x.clone().requires_grad_()
    reference.gaussian_blur(xr, 9, 1.0).backward(grad)
    xt = x.clone().requires_grad_()
    sat_kernels.gaussian_blur(xt, 9, 1.0, backend="triton").backward(grad)
    assert xt.grad.dtype == dtype
    torch.testing.assert_close(xt.grad, xr.grad, **GRAD_TOL[dtype])


def test_torch_blur_ignores_a_callers_autocast():
    """A bf16-autocast training step must not round the torch path's matrix products to bf16."""
    x = make((2, 4, 16, 24), seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reference.gaussian_blur(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.gaussian_blur(x), rtol=0, atol=0)



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 16, 24), (1, 2, 600, 12)], ids=["matrix", "shifted"])
def test_torch_blur_on_meta_tensors_gives_shape_and_dtype(shape, dtype):
    """Meta tensors (shape propagation, FakeTensor-style tracing) have no values: the reference and
    the public torch path return a meta tensor of x's shape in the compute dtype (float64 for
    float64, else float32), on both the matrix-product and the shifted-add path."""
    x = torch.empty(shape, dtype=dtype, device="meta")
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    for out in (reference.gaussian_blur(x, 9, 1.0), sat_kernels.gaussian_blur(x, backend="torch")):
        assert out.device.type == "meta" and out.shape == shape and out.dtype == expected
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's CPU autocast does not reach meta
        assert reference.gaussian_blur(x).dtype == expected

# ----------------------------------------------------------------------------- second derivatives


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_blur_gradgradcheck(backend):
    """The backward is itself differentiable (w.r.t. the incoming gradient) on both backends."""
    x = make((1, 2, 6, 7), torch.float64, seed=8).requires_grad_()
    fn = lambda t: sat_kernels.gaussian_blur(t, 5, 1.3, backend=backend)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_blur_double_backward_equals_torch_backend(dtype):
    """A loss holding a gradient (create_graph=True): its gradient has a term through the blur's
    backward that a graph-less Triton backward would silently drop. Written-out oracle: with
    L = sum(blur(x)^3) and v a fixed direction, d/dx (L + <dL/dx, v>) = 3 B^T(y^2) + 6 B^T(y * B v)
    for y = blur(x), B the blur; both backends must equal it."""
    x = make((1, 2, 9, 11), dtype, seed=9)
    v = make((1, 2, 9, 11), dtype, seed=10)
    y = reference.gaussian_blur(x.double(), 5, 1.3)
    blur_t = lambda t: reference.gaussian_blur(t, 5, 1.3)  # noqa: E731
    adjoint = lambda g: torch.autograd.functional.vjp(blur_t, torch.zeros_like(y), g)[1]  # noqa: E731
    expected = 3 * adjoint(y**2) + 6 * adjoint(y * blur_t(v.double()))
    for backend in ("torch", "triton"):
        xt = x.clone().requires_grad_()
        out = sat_kernels.gaussian_blur(xt, 5, 1.3, backend=backend)
        loss = (out**3).sum()
        (g,) = torch.autograd.grad(loss, xt, create_graph=True)
        (total,) = torch.autograd.grad(loss + (g * v).sum(), xt)
        assert total.dtype == dtype
        torch.testing.assert_close(total.double(), expected, **GRAD_TOL.get(dtype, TOL[torch.float64]),
                                   msg=lambda m, backend=backend: f"{backend}: {m}")

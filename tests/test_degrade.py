"""sat_kernels.degrade_latents: the one-launch Triton kernel (interpreter on CPU) against
reference.py, against diffusers' SAG ``sag_masking`` (external oracle, both backends), and its
backward against gradcheck / autograd of the reference.
"""

from types import SimpleNamespace

import pytest
import torch
# the external oracle is part of the test extra: if diffusers moves it, fail loudly instead of skipping
from diffusers.pipelines.deprecated.stable_diffusion_sag import pipeline_stable_diffusion_sag as sag

import sat_kernels
from sat_kernels import reference
from sat_kernels.ops import degrade as degrade_op

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=1e-4),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3), torch.float64: dict(rtol=1e-10, atol=1e-12)}
ALPHAS = torch.linspace(0.9999, 0.005, 1000)


def latents(shape, dtype=torch.float32, layout="contiguous", seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape
    if layout == "contiguous":
        return torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        return torch.randn(shape, generator=g).to(dtype).to(memory_format=torch.channels_last)
    if layout == "sliced":
        return torch.randn(b, c + 1, h + 1, 2 * w, generator=g).to(dtype)[:, 1:, :h, 1::2]
    raise ValueError(layout)


def saliency(batch, map_size, kind, threshold, heads=3, seed=0):
    """(saliency argument, heads argument, mass for the reference).

    kind: "mass" (B, h*w); "probs3" softmax probabilities (B*heads, N, N); "probs4" a
    non-contiguous (B, heads, N, N) view. Redrawn until no token's mass lies within 1e-3 of the
    threshold, so summation order cannot flip a mask pixel.
    """
    n = map_size[0] * map_size[1]
    for s in range(seed, seed + 50):
        g = torch.Generator().manual_seed(1000 + s)
        if kind == "mass":
            sal = 2 * torch.rand(batch, n, generator=g)
            mass, heads_arg = sal, None
        else:
            logits = 3 * torch.randn(batch * heads, n, n, generator=g)
            sal = torch.softmax(logits, dim=-1)
            if kind == "probs4":  # keys x queries stored transposed: a strided (B, heads, N, N) view
                sal = sal.transpose(-1, -2).contiguous().transpose(-1, -2).unflatten(0, (batch, heads))
            mass, heads_arg = reference.attention_mass(sal, heads), heads
        thr = reference.saliency_threshold(mass.float(), threshold)
        if (mass.float() - thr).abs().min() > 1e-3:
            return sal, heads_arg, mass
    raise AssertionError("no well-separated saliency drawn")


def timesteps(batch, seed=0):
    return torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(seed))


def run_both(x0, eps, sal, heads, mass, map_size, ts, threshold, kernel_size, sigma):
    out = sat_kernels.degrade_latents(x0, eps, sal, map_size, ALPHAS, ts, threshold, kernel_size, sigma,
                                      heads=heads, backend="triton")
    ref = reference.degrade_latents(x0, eps, mass, map_size, ALPHAS, ts, threshold, kernel_size, sigma)
    return out, ref


CASES = [  # shape, map_size, kernel_size, sigma, dtype, layout, saliency kind, threshold
    ((2, 4, 63, 65), (7, 9), 9, 1.0, torch.float32, "contiguous", "mass", 1.0),
    ((2, 4, 63, 65), (7, 9), 9, 1.0, torch.float32, "channels_last", "probs3", "mean"),
    ((2, 4, 63, 65), (7, 9), 15, 2.0, torch.float16, "sliced", "probs4", 1.0),
    ((2, 4, 32, 32), (8, 8), 9, 1.0, torch.bfloat16, "contiguous", "mass", "mean"),
    ((1, 1, 16, 16), (4, 4), 3, 0.5, torch.float32, "sliced", "probs4", "mean"),
    ((1, 3, 12, 20), (16, 16), 9, 2.0, torch.float16, "channels_last", "mass", 1.0),  # map larger than latents
    ((2, 4, 20, 30), (3, 5), 9, 1.0, torch.float64, "contiguous", "probs3", 1.0),
]


@pytest.mark.parametrize("shape,map_size,kernel_size,sigma,dtype,layout,kind,threshold", CASES)
def test_degrade_matches_reference(shape, map_size, kernel_size, sigma, dtype, layout, kind, threshold):
    x0 = latents(shape, dtype, layout, seed=1)
    eps = latents(shape, dtype, "contiguous", seed=2)
    sal, heads, mass = saliency(shape[0], map_size, kind, threshold)
    out, ref = run_both(x0, eps, sal, heads, mass, map_size, timesteps(shape[0]), threshold, kernel_size, sigma)
    assert out.dtype == reference.compute_dtype(x0) and out.shape == shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("kind,threshold,block_w", [("probs4", 1.0, 16), ("probs3", "mean", 32), ("mass", 1.0, 16)])
def test_degrade_across_tiles(kind, threshold, block_w):
    """Several row/column tiles: blur halos cross tile borders, and with probabilities each
    program reduces only the token rows its tile touches (the map does not divide the latents)."""
    shape, map_size = (2, 2, 45, 37), (7, 5)
    x0, eps = latents(shape, seed=3), latents(shape, layout="channels_last", seed=4)
    sal, heads, mass = saliency(2, map_size, kind, threshold, heads=2, seed=5)
    if sal.dim() == 3:
        sal = sal.unflatten(0, (2, 2))
    ts = timesteps(2, seed=6)
    out = degrade_op.degrade_latents(x0, eps, sal, heads, map_size, ALPHAS, ts, threshold, 9, 1.0,
                                     rows=16, block_w=block_w)
    ref = reference.degrade_latents(x0, eps, mass, map_size, ALPHAS, ts, threshold, 9, 1.0)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_degrade_channel_groups(monkeypatch):
    """A GPU program takes at most 4 channels, so more channels split into groups along grid axis 2,
    each reducing the saliency itself and only the first writing the mask. Forced here: 2-channel
    groups over 5 channels (a partial last group), forward, saved mask and both gradients."""
    tile_sizes = degrade_op.row_walk_tiles
    monkeypatch.setattr(degrade_op, "row_walk_tiles", lambda *args, **kw: (*tile_sizes(*args, **kw)[:2], 2, 1))
    shape, map_size = (2, 5, 19, 21), (4, 3)
    sal, heads, mass = saliency(2, map_size, "probs3", 1.0, seed=21)
    ts = timesteps(2, seed=22)
    x0, eps, grad = latents(shape, seed=23), latents(shape, seed=24), latents(shape, seed=25)
    out, mask = degrade_op.degrade_forward(x0, eps, sal, heads, map_size, ALPHAS, ts, 1.0, 9, 1.0, True)
    torch.testing.assert_close(out, reference.degrade_latents(x0, eps, mass, map_size, ALPHAS, ts), **TOL[torch.float32])
    assert torch.equal(mask.bool(), reference.saliency_mask(mass, map_size, 1.0, size=shape[-2:]))
    xr, er = x0.clone().requires_grad_(), eps.clone().requires_grad_()
    reference.degrade_latents(xr, er, mass, map_size, ALPHAS, ts).backward(grad)
    xt, et = x0.clone().requires_grad_(), eps.clone().requires_grad_()
    degrade_op.degrade_latents(xt, et, sal, heads, map_size, ALPHAS, ts).backward(grad)
    torch.testing.assert_close(xt.grad, xr.grad, **GRAD_TOL[torch.float32])
    torch.testing.assert_close(et.grad, er.grad, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("kind,threshold", [("probs4", 1.0), ("mass", "mean")])
def test_degrade_saved_mask_is_saliency_mask(kind, threshold):
    """The mask the forward launch writes for the backward equals the reference mask."""
    shape, map_size = (2, 1, 30, 22), (4, 3)
    sal, heads, mass = saliency(2, map_size, kind, threshold, seed=7)
    _, mask = degrade_op.degrade_forward(latents(shape), latents(shape, seed=1), sal, heads, map_size, ALPHAS,
                                         timesteps(2), threshold, 9, 1.0, True, rows=16, block_w=16)
    expected = reference.saliency_mask(mass, map_size, threshold, size=shape[-2:])
    assert torch.equal(mask.bool(), expected)
    assert 0 < expected.sum() < expected.numel()  # both branches of the blend are exercised


# ----------------------------------------------------------------------------- SAG oracle


def sag_self(heads):
    """A stand-in ``self`` for the unbound StableDiffusionSAGPipeline.sag_masking."""
    from diffusers import DDPMScheduler

    return SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(attention_head_dim=heads)),
                           scheduler=DDPMScheduler())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape,map_size,heads,t", [((2, 4, 32, 32), (4, 4), 8, 500), ((1, 4, 63, 65), (7, 9), 2, 37)])
def test_degrade_matches_diffusers_sag_masking(backend, shape, map_size, heads, t):
    self = sag_self(heads)
    x0, eps = latents(shape, seed=8), latents(shape, seed=9)
    probs, _, _ = saliency(shape[0], map_size, "probs3", 1.0, heads=heads, seed=10)
    t = torch.tensor(t)
    expected = sag.StableDiffusionSAGPipeline.sag_masking(self, x0, probs, map_size, t, eps)
    out = sat_kernels.degrade_latents(x0, eps, probs, map_size, self.scheduler.alphas_cumprod,
                                      t.expand(shape[0]), heads=heads, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)


# ----------------------------------------------------------------------------- backward


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind,threshold", [("mass", 1.0), ("probs4", "mean")])
def test_degrade_gradcheck(backend, kind, threshold):
    shape, map_size = (1, 2, 6, 7), (2, 3)
    x0 = latents(shape, torch.float64, seed=11).requires_grad_()
    eps = latents(shape, torch.float64, seed=12).requires_grad_()
    sal, heads, _ = saliency(1, map_size, kind, threshold, seed=13)
    ts = torch.tensor([321])
    fn = lambda a, e: sat_kernels.degrade_latents(  # noqa: E731
        a, e, sal, map_size, ALPHAS.double(), ts, threshold, 5, 1.0, heads=heads, backend=backend)
    assert torch.autograd.gradcheck(fn, (x0, eps), fast_mode=backend == "triton")


@pytest.mark.parametrize("dtype,layout,needs", [
    (torch.float64, "channels_last", (True, True)),
    (torch.float32, "sliced", (True, False)),
    (torch.float16, "contiguous", (False, True)),
    (torch.bfloat16, "channels_last", (True, True)),
])
def test_degrade_backward_matches_autograd(dtype, layout, needs):
    """d_x0 (blur adjoint with reflect borders over several tiles) and d_eps equal autograd of
    the reference; gradients come back in the inputs' dtype; only requested ones are computed."""
    shape, map_size = (2, 2, 21, 23), (5, 6)
    sal, heads, mass = saliency(2, map_size, "mass", 1.0, seed=14)
    ts = timesteps(2, seed=15)
    x0, eps = latents(shape, dtype, layout, seed=16), latents(shape, dtype, seed=17)
    grad = latents(shape, reference.compute_dtype(x0), "sliced", seed=18)
    xr, er = x0.clone().requires_grad_(needs[0]), eps.clone().requires_grad_(needs[1])
    reference.degrade_latents(xr, er, mass, map_size, ALPHAS, ts, 1.0, 9, 1.0).backward(grad)
    xt, et = x0.clone().requires_grad_(needs[0]), eps.clone().requires_grad_(needs[1])
    degrade_op.degrade_latents(xt, et, sal, heads, map_size, ALPHAS, ts, 1.0, 9, 1.0, rows=16, block_w=16).backward(grad)
    for t, r, need in ((xt, xr, needs[0]), (et, er, needs[1])):
        if need:
            assert t.grad.dtype == dtype
            torch.testing.assert_close(t.grad, r.grad, **GRAD_TOL[dtype])
        else:
            assert t.grad is None


# ----------------------------------------------------------------------------- second derivatives


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_degrade_gradgradcheck(backend, needs):
    """The backward is itself differentiable (w.r.t. the incoming gradient) on both backends, for
    each set of inputs that need a gradient."""
    shape, map_size = (1, 2, 6, 7), (2, 3)
    x0 = latents(shape, torch.float64, seed=26).requires_grad_(needs[0])
    eps = latents(shape, torch.float64, seed=27).requires_grad_(needs[1])
    sal, heads, _ = saliency(1, map_size, "probs4", 1.0, seed=28)
    ts = torch.tensor([321])

    def fn(*inputs):
        it = iter(inputs)
        a = next(it) if needs[0] else x0
        e = next(it) if needs[1] else eps
        return sat_kernels.degrade_latents(a, e, sal, map_size, ALPHAS.double(), ts, 1.0, 5, 1.0, heads=heads,
                                           backend=backend)

    inputs = tuple(t for t, need in zip((x0, eps), needs) if need)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_degrade_double_backward_equals_torch_backend(needs):
    """A loss holding the gradient (create_graph=True, as a gradient penalty does): its gradient
    goes through the backward of the backward. With out = D(x0, eps), L = sum(out^3) and fixed
    directions (v, u): d/d(x0, eps) (L + <dL/dx0, v> + <dL/deps, u>) = J^T(3 out^2 + 6 out * J(v, u))
    with J the (linear) Jacobian, written here with the reference's autograd; both backends equal it."""
    shape, map_size = (2, 2, 11, 13), (3, 4)
    sal, heads, mass = saliency(2, map_size, "mass", 1.0, seed=29)
    ts = timesteps(2, seed=30)
    x0, eps = latents(shape, torch.float64, seed=31), latents(shape, torch.float64, seed=32)
    v, u = latents(shape, torch.float64, seed=33), latents(shape, torch.float64, seed=34)
    v, u = (v if needs[0] else torch.zeros_like(v)), (u if needs[1] else torch.zeros_like(u))
    ref = lambda a, e: reference.degrade_latents(a, e, mass, map_size, ALPHAS.double(), ts, 1.0, 9, 1.0)  # noqa: E731
    out = ref(x0, eps)
    jv = torch.autograd.functional.jvp(ref, (x0, eps), (v, u))[1]
    expected = torch.autograd.functional.vjp(ref, (x0, eps), 3 * out**2 + 6 * out * jv)[1]
    for backend in ("torch", "triton"):
        xt, et = x0.clone().requires_grad_(needs[0]), eps.clone().requires_grad_(needs[1])
        inputs = tuple(t for t, need in zip((xt, et), needs) if need)
        out = sat_kernels.degrade_latents(xt, et, sal, map_size, ALPHAS.double(), ts, 1.0, 9, 1.0, heads=heads,
                                          backend=backend)
        loss = (out**3).sum()
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        directions = [d for d, need in zip((v, u), needs) if need]
        penalty = sum((g * d).sum() for g, d in zip(grads, directions))
        totals = torch.autograd.grad(loss + penalty, inputs)
        for total, want in zip(totals, [w for w, need in zip(expected, needs) if need]):
            torch.testing.assert_close(total, want, **GRAD_TOL[torch.float64],
                                       msg=lambda m, backend=backend: f"{backend}: {m}")

"""The compiled Triton kernels on a CUDA device against the torch reference on the same device.

Skipped without CUDA, and under TRITON_INTERPRET=1 (the interpreter is covered by the other
tests). Run on a GPU machine: ``TRITON_INTERPRET=0 python -m pytest tests/test_gpu.py``.
bf16 is checked here only: the interpreter's bf16 tl.dot is known wrong. The last test runs the
Triton ops (torch.ops.sat_kernels.*) inside inductor-compiled graphs.
"""

import os

import pytest
import torch

import sat_kernels

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA and compiled (not interpreted) Triton",
)

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}
DTYPES = list(TOL)


def both(fn, *args, **kwargs):
    return fn(*args, **kwargs, backend="triton"), fn(*args, **kwargs, backend="torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (8, 4, 64, 64), (3, 4, 63, 65), (64, 4, 128, 128)])
def test_degrade_latents_cuda(shape, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    b = shape[0]
    x0 = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    eps = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    probs = torch.softmax(3 * torch.randn(b * 8, 64, 64, device="cuda", generator=gen), -1).to(dtype)
    alphas = torch.linspace(0.9999, 0.005, 1000, device="cuda")
    t = torch.randint(0, 1000, (b,), device="cuda", generator=gen)
    for saliency, heads, threshold in [(probs, 8, 1.0), (sat_kernels.attention_mass(probs, 8), None, "mean")]:
        ours, ref = both(sat_kernels.degrade_latents, x0, eps, saliency, (8, 8), alphas, t, threshold, heads=heads)
        rtol, atol = TOL[dtype]
        # a mass within rounding of the threshold may flip one mask cell: compare where masks agree
        m_ours = sat_kernels.saliency_mask(saliency, (8, 8), threshold, size=shape[-2:], heads=heads, backend="triton")
        m_ref = sat_kernels.saliency_mask(saliency, (8, 8), threshold, size=shape[-2:], heads=heads, backend="torch")
        assert (m_ours != m_ref).float().mean() < 0.01
        same = (m_ours == m_ref)[:, None].expand_as(ours)
        torch.testing.assert_close(ours[same], ref[same], rtol=rtol, atol=atol)


def test_degrade_latents_backward_cuda():
    gen = torch.Generator(device="cuda").manual_seed(1)
    x0 = torch.randn(4, 4, 64, 64, device="cuda", generator=gen, requires_grad=True)
    eps = torch.randn(4, 4, 64, 64, device="cuda", generator=gen, requires_grad=True)
    mass = 2 * torch.rand(4, 64, device="cuda", generator=gen)
    alphas = torch.linspace(0.9999, 0.005, 1000, device="cuda")
    t = torch.tensor([1, 10, 500, 999], device="cuda")
    grad = torch.randn(4, 4, 64, 64, device="cuda", generator=gen)
    grads = []
    for backend in ("triton", "torch"):
        out = sat_kernels.degrade_latents(x0, eps, mass, (8, 8), alphas, t, backend=backend)
        grads.append(torch.autograd.grad(out, (x0, eps), grad))
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,head_dim", [(4096, 40), (64, 160), (1024, 80), (77, 40)])
def test_attention_mass_from_qk_cuda(tokens, head_dim, dtype):
    gen = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(2, 8, tokens, head_dim, device="cuda", generator=gen).to(dtype) for _ in range(3))
    lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[1][..., :tokens]
    rtol, atol = TOL[dtype]
    for given in (lse, None):
        ours, ref = both(sat_kernels.attention_mass_from_qk, q, k, given)
        torch.testing.assert_close(ours, ref, rtol=max(rtol, 1e-4), atol=max(atol, 1e-3) * tokens**0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_attention_probs_cuda(dtype):
    gen = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(2, 8, 4096, 40, device="cuda", generator=gen).to(dtype)
    k = torch.randn(2, 8, 77, 40, device="cuda", generator=gen).to(dtype)
    tokens = torch.tensor([[5, 6, 9, -1], [1, -1, -1, -1]], device="cuda")
    ours, ref = both(sat_kernels.token_attention_probs, q, k, tokens)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)


def test_attention_statistics_float64_cuda():
    """float64 inputs are computed in float64 by the compiled kernels: within 1e-12 (relative) of the
    float64 formula. Compiled, Triton passes a Python float argument as fp32 (the interpreter keeps
    float64), so this is where a scale or 1 / heads rounded to fp32 (~6e-8) would show."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = 2 * torch.randn(2, 3, 300, 40, dtype=torch.float64, device="cuda", generator=gen)
    k = torch.randn(2, 3, 200, 40, dtype=torch.float64, device="cuda", generator=gen)
    scale = 0.3
    scores = scale * q @ k.transpose(-1, -2)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    tokens = torch.tensor([[0, 7, -1], [199, 3, 3]], device="cuda")
    head_mean = probs.mean(dim=1)
    picked = torch.stack([head_mean[i][:, tokens[i].clamp(min=0)] for i in range(2)]) * (tokens >= 0)[:, None]
    cases = [
        (sat_kernels.attention_mass(probs, 3, backend="triton"), probs.sum(2).mean(1)),
        (sat_kernels.attention_mass_from_qk(q, k, None, scale, backend="triton"), probs.sum(2).mean(1)),
        (sat_kernels.attention_mass_from_qk(q, k, lse, scale, backend="triton"), probs.sum(2).mean(1)),
        (sat_kernels.token_attention_probs(q, k, tokens, None, scale, backend="triton"), picked),
    ]
    for got, want in cases:
        assert got.dtype == torch.float64
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_blur_and_mass_from_probs_cuda(dtype):
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(8, 4, 64, 64, device="cuda", generator=gen).to(dtype)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(*both(sat_kernels.gaussian_blur, x), rtol=rtol, atol=atol)
    probs = torch.softmax(torch.randn(16, 64, 64, device="cuda", generator=gen), -1).to(dtype)
    torch.testing.assert_close(*both(sat_kernels.attention_mass, probs, 8), rtol=rtol, atol=atol * 64)


def test_nonfinite_values_stay_in_their_window_cuda():
    """Compiled, a NaN/inf reaches exactly the outputs whose window holds it (see ops/blur.py)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    x0 = torch.randn(2, 4, 64, 64, device="cuda", generator=gen)
    x0[0, 1, 20, 20], x0[0, 2, 0, 1], x0[1, 3, 63, 40] = float("nan"), float("inf"), -float("inf")
    x0[1, 0, 15, 16] = 3e38  # huge but finite: stays on the fast path
    eps = torch.randn(2, 4, 64, 64, device="cuda", generator=gen)
    mass = 2 * torch.rand(2, 64, device="cuda", generator=gen)
    alphas = torch.linspace(0.9999, 0.005, 1000, device="cuda")
    t = torch.tensor([10, 900], device="cuda")
    blurs = both(sat_kernels.gaussian_blur, x0)
    for ours, ref in [blurs, both(sat_kernels.degrade_latents, x0, eps, mass, (8, 8), alphas, t)]:
        assert torch.equal(ours.isnan(), ref.isnan()) and torch.equal(ours.isinf(), ref.isinf())
        assert ours.isfinite().sum() > 0.9 * ours.numel()
        finite = ours.isfinite()
        torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-5, atol=1e-5)


def cuda_demo_step_inputs():
    """(components, the demo LoRA UNet on CUDA with SDPA, its step inputs at 32x32 latents on CUDA)."""
    from sat_train.guide.capture import stock_processor
    from train_helpers import lora_unet, step_inputs

    components = lora_unet()
    unet = components.unet.cuda()
    unet.set_attn_processor(stock_processor("sdpa"))
    s = step_inputs(components, size=32)
    for field in ("x0", "noise", "noisy", "timesteps", "cond", "target"):
        setattr(s, field, getattr(s, field).cuda())
    return components, unet, s


def sac_step(components, unet, s, saliency, kernels, recompute=False):
    """(loss, LoRA gradients) of one SAC step with ``saliency`` (make_saliency's, on ``unet``) and
    the ``kernels`` backend."""
    from sat_train.guide.settings import GuideSettings
    from sat_train.guide.guidance import SATGuide
    from train_helpers import lora_grads

    guide = SATGuide(saliency, components.noise_scheduler.alphas_cumprod,
                     GuideSettings(ratio=0.5, kernel_backend=kernels, recompute=recompute))
    loss = guide(unet, s).loss
    loss.backward()
    grads = lora_grads(unet)
    unet.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("recompute", [False, True])
def test_sac_step_cuda_matches_torch_kernels(recompute):
    """A whole SAC step on device (demo UNet, Triton kernels inside autograd, --guide_recompute's
    rerun in backward) against the same step with the torch kernels."""
    from sat_train.guide.guidance import make_saliency

    components, unet, s = cuda_demo_step_inputs()
    results = []
    for kernels in ("triton", "torch"):
        saliency = make_saliency(unet, "sac", kernels)
        results.append(sac_step(components, unet, s, saliency, kernels, recompute))
        saliency.remove_hooks()
    (loss, grads), (loss_ref, grads_ref) = results
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_double_backward_cuda():
    """create_graph=True through the compiled blur and degrade (their backwards are autograd
    Functions too) gives the torch backend's second-order gradients."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    x0 = torch.randn(2, 4, 32, 32, device="cuda", generator=gen)
    eps = torch.randn(2, 4, 32, 32, device="cuda", generator=gen)
    v, u = torch.randn(2, 2, 4, 32, 32, device="cuda", generator=gen)
    mass = 2 * torch.rand(2, 16, device="cuda", generator=gen)
    alphas = torch.linspace(0.9999, 0.005, 1000, device="cuda")
    t = torch.tensor([10, 900], device="cuda")
    results = []
    for backend in ("triton", "torch"):
        a, e = x0.clone().requires_grad_(), eps.clone().requires_grad_()
        out = sat_kernels.degrade_latents(a, e, mass, (4, 4), alphas, t, backend=backend)
        blurred = sat_kernels.gaussian_blur(a, backend=backend)
        loss = (out**3).sum() + (blurred**3).sum()
        ga, ge = torch.autograd.grad(loss, (a, e), create_graph=True)
        results.append(torch.autograd.grad(loss + (ga * v).sum() + (ge * u).sum(), (a, e)))
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_sac_step_with_triton_ops_in_an_inductor_compiled_unet_cuda():
    """The SAT step with backend triton in a UNet compiled by inductor (the capture's
    attention_mass_from_qk op inside the UNet graph, as --torch_compile runs it) and the degrade
    and blur ops compiled into one graph: equal to eager within fp32 noise, no graph break."""
    from torch._dynamo.utils import counters

    from sat_train.guide.guidance import make_saliency

    components, unet, s = cuda_demo_step_inputs()
    saliency = make_saliency(unet, "sac", "triton")  # hooks before compiling: the graphs include them
    loss_ref, grads_ref = sac_step(components, unet, s, saliency, "triton")
    torch._dynamo.reset()
    counters.clear()
    unet.compile(backend="inductor")
    for _ in range(2):  # the second step reuses the graphs
        loss, grads = sac_step(components, unet, s, saliency, "triton")
    assert counters["stats"]["unique_graphs"] <= 3  # armed, degraded, and the UNet's own pre-hook frame
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-6)
    for name, grad in grads_ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)

    x0 = s.x0.clone().requires_grad_()
    mass = 2 * torch.rand(x0.shape[0], 16, device="cuda", generator=torch.Generator(device="cuda").manual_seed(6))
    alphas = components.noise_scheduler.alphas_cumprod.cuda()

    def degrade_blur(x0, eps):
        out = sat_kernels.degrade_latents(x0, eps, mass, (4, 4), alphas, s.timesteps, backend="triton")
        return (sat_kernels.gaussian_blur(out, backend="triton") ** 2).sum()

    eager = degrade_blur(x0, s.noise)
    compiled = torch.compile(degrade_blur, backend="inductor", fullgraph=True)(x0, s.noise)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(compiled, x0), torch.autograd.grad(eager, x0), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

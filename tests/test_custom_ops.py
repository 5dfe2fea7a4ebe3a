"""The Triton kernels as torch.library ops (torch.ops.sat_kernels.*): torch.library.opcheck on each
(schema, fake implementation against the real one, autograd registration, AOT dispatch with dynamic
shapes), under the interpreter at tiny shapes; and the public functions on backend="triton" inside
``torch.compile(backend="aot_eager", fullgraph=True)``: no graph break, the ops as single graph
nodes, values and gradients equal to eager."""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.testing import CompileCounterWithBackend
from torch._functorch.aot_autograd import aot_module_simplified

import sat_kernels
from sat_kernels import reference
from sat_kernels.ops import attention_mass, blur, degrade, saliency_mask, token_probs

ALPHAS = torch.linspace(0.9999, 0.005, 1000)
TIMESTEPS = torch.tensor([10, 700])


def randn(*shape, seed=0, grad=False):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(grad)


def qk(heads=2, nq=8, nk=8, dim=16):
    return randn(2, heads, nq, dim, seed=1), randn(2, heads, nk, dim, seed=2)


def probs(heads=2, n=8):
    return torch.softmax(3 * randn(2, heads, n, n, seed=3), dim=-1)


def mass():
    return 2 * torch.rand(2, 8, generator=torch.Generator().manual_seed(4))  # a 2 x 4 map


def opcheck(op, args):
    torch.library.opcheck(op, args)  # raises on the first failed check


@pytest.mark.parametrize("op, args", [
    (attention_mass.attention_mass_op, lambda: (probs(), 2)),
    (attention_mass.attention_lse_op, lambda: (*qk(), 0.25)),
    (attention_mass.attention_mass_from_qk_op, lambda: (*qk(), None, 0.25)),
    (attention_mass.attention_mass_from_qk_op,
     lambda: (*qk(), reference.attention_lse(*qk(), 0.25), 0.25)),
    (token_probs.token_attention_probs_op, lambda: (*qk(nk=5), torch.tensor([[0, 3, -1], [4, 1, 2]]), None, 0.25)),
    (saliency_mask.saliency_mask_op, lambda: (mass(), 2, 4, 1.0, False, [5, 8])),
    (saliency_mask.saliency_mask_op, lambda: (mass(), 2, 4, 0.0, True, None)),
    # float64 in, float64 out: the fake implementations must say so too
    (attention_mass.attention_mass_op, lambda: (probs().double(), 2)),
    (attention_mass.attention_lse_op, lambda: (qk()[0].double(), qk()[1], 0.25)),
    (attention_mass.attention_mass_from_qk_op, lambda: (*(t.double() for t in qk()), None, 0.25)),
    (token_probs.token_attention_probs_op,
     lambda: (*(t.double() for t in qk(nk=5)), torch.tensor([[0, 3, -1], [4, 1, 2]]), None, 0.25)),
], ids=["mass", "lse", "mass_from_qk", "mass_from_qk_lse", "token_probs", "mask_upsampled", "mask_mean",
        "mass_fp64", "lse_fp64_q", "mass_from_qk_fp64", "token_probs_fp64"])
def test_statistics_ops_pass_opcheck(op, args):
    opcheck(op, args())


@pytest.mark.parametrize("adjoint", [False, True])
def test_blur_ops_pass_opcheck(adjoint):
    x = randn(1, 2, 6, 5, grad=True)
    args = (x, 5, 1.0, torch.float32, None, None) if adjoint else (x, 5, 1.0, None, None)
    opcheck(blur.gaussian_blur_adjoint_op if adjoint else blur.gaussian_blur_op, args)


@pytest.mark.parametrize("saliency, heads, threshold", [
    ("mass", None, (1.0, False)), ("probs", 2, (0.0, True))])
@pytest.mark.parametrize("x0_grad", [True, False])
def test_degrade_op_passes_opcheck(saliency, heads, threshold, x0_grad):
    sal = mass() if saliency == "mass" else probs()
    x0, eps = randn(2, 2, 4, 8, seed=5, grad=x0_grad), randn(2, 2, 4, 8, seed=6, grad=True)
    opcheck(degrade.degrade_latents_op,
            (x0, eps, sal, heads, 2, 4, ALPHAS, TIMESTEPS, *threshold, 5, 1.0, x0_grad, None, None))


@pytest.mark.parametrize("need_x0, need_eps", [(True, True), (True, False), (False, True)])
def test_degrade_backward_op_passes_opcheck(need_x0, need_eps):
    mask = (torch.rand(2, 4, 8, generator=torch.Generator().manual_seed(7)) > 0.5).to(torch.uint8)
    opcheck(degrade.degrade_backward_op, (randn(2, 2, 4, 8, grad=True), mask, ALPHAS, TIMESTEPS, 5, 1.0,
                                          need_x0, need_eps, torch.float32, torch.float32, None, None))


def sat_statistics_and_degrade(q, k, x0, eps, tokens):
    """Every public function on the Triton backend, as a trainer's step calls them."""
    kw = dict(backend="triton")
    mass_qk = sat_kernels.attention_mass_from_qk(q, k, None, 0.25, **kw)
    mass_p = sat_kernels.attention_mass(torch.softmax(0.25 * q @ k.transpose(-1, -2), -1), 2, **kw)
    token_p = sat_kernels.token_attention_probs(q, k, tokens, None, 0.25, **kw)
    mask = sat_kernels.saliency_mask(mass_qk, (2, 4), "mean", size=(4, 8), **kw)
    x_deg = sat_kernels.degrade_latents(x0, eps, mass_qk, (2, 4), ALPHAS, TIMESTEPS, "mean", 5, 1.0, **kw)
    blurred = sat_kernels.gaussian_blur(x0, 5, 1.0, **kw)
    loss = (x_deg ** 2).sum() + (blurred * eps).sum()
    return loss, mass_qk, mass_p, token_p, mask


def test_public_functions_compile_into_one_graph_equal_to_eager():
    q, k = qk()
    tokens = torch.tensor([[0, 3, -1], [4, 1, 2]])
    x0, eps = randn(2, 2, 4, 8, seed=5, grad=True), randn(2, 2, 4, 8, seed=6, grad=True)

    def run(fn):
        loss, *stats = fn(q, k, x0, eps, tokens)
        grads = torch.autograd.grad(loss, (x0, eps))
        return (loss, *stats, *grads)

    eager = run(sat_statistics_and_degrade)
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):  # the dynamo graph, before AOT splits it
        graphs.append(gm)
        return gm

    counter = CompileCounterWithBackend(record)
    compiled = run(torch.compile(sat_statistics_and_degrade, backend=counter, fullgraph=True))
    assert counter.frame_count == 1
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    ops = [t for t in targets if t.startswith("sat_kernels.")]
    assert sorted(ops) == sorted(f"sat_kernels.{n}.default" for n in (
        "attention_mass_from_qk", "attention_mass", "token_attention_probs", "saliency_mask", "degrade_latents",
        "gaussian_blur")), targets
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_gradients_go_through_the_registered_backward_ops():
    """aot_eager's joint graph holds the backward ops (not a trace of the launchers), and the
    compiled gradient equals autograd of the reference."""
    x0, eps = randn(2, 2, 4, 8, seed=5, grad=True), randn(2, 2, 4, 8, seed=6, grad=True)
    m = mass()

    def degrade_blur(x0, eps):
        x_deg = sat_kernels.degrade_latents(x0, eps, m, (2, 4), ALPHAS, TIMESTEPS, 1.0, 5, 1.0, backend="triton")
        return (sat_kernels.gaussian_blur(x_deg, 5, 1.0, backend="triton") ** 2).sum()

    torch._dynamo.reset()
    backward_targets = []

    def keep_backward(gm, example_inputs):
        backward_targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm)

    def backend(gm, example_inputs):  # aot_eager, keeping the backward graph's op names
        return aot_module_simplified(gm, example_inputs, fw_compiler=lambda g, _: make_boxed_func(g),
                                     bw_compiler=keep_backward)

    loss = torch.compile(degrade_blur, backend=backend, fullgraph=True)(x0, eps)
    grads = torch.autograd.grad(loss, (x0, eps))
    assert {"sat_kernels.degrade_latents_backward.default", "sat_kernels.gaussian_blur_adjoint.default"} <= set(
        backward_targets), backward_targets
    x0r, epsr = x0.detach().requires_grad_(), eps.detach().requires_grad_()
    ref = (reference.gaussian_blur(reference.degrade_latents(x0r, epsr, m, (2, 4), ALPHAS, TIMESTEPS, 1.0, 5, 1.0),
                                   5, 1.0) ** 2).sum()
    for got, want in zip(grads, torch.autograd.grad(ref, (x0r, epsr)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

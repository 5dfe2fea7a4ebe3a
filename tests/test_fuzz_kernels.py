"""Property-based fuzzing of the sat_kernels public API (hypothesis).

Random shapes, dtypes (fp32/fp16), memory layouts (contiguous, sliced, channels-last) and
parameters go through both backends. Every result must equal a float64 oracle written out here
independently (for the blur: diffusers' SAG ``gaussian_blur_2d``), so the torch backend, which
*is* ``sat_kernels.reference``, is checked against something else; Triton results must also
equal the reference.

Triton runs under the interpreter (~10 ms per program instance): its cases are small and few.
Examples are derandomized (the same cases every run, no flaky CI); raise FUZZ_EXAMPLES to search
longer locally, e.g. ``FUZZ_EXAMPLES=10 pytest tests/test_fuzz_kernels.py`` (multiplies counts).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
# the external oracle is part of the test extra: if diffusers moves it, fail loudly instead of skipping
from diffusers.pipelines.deprecated.stable_diffusion_sag import pipeline_stable_diffusion_sag as sag
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import sat_kernels
from sat_kernels import reference
from sat_kernels.ops import blur as blur_op
from sat_kernels.ops import degrade as degrade_op

SCALE = int(os.environ.get("FUZZ_EXAMPLES", "1"))
FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TORCH = settings(max_examples=40 * SCALE, **FUZZ)
TRITON = settings(max_examples=8 * SCALE, **FUZZ)
TOL = {torch.float32: dict(rtol=1e-5, atol=2e-5), torch.float16: dict(rtol=1e-5, atol=2e-5)}
ALPHAS = torch.linspace(0.9999, 0.005, 1000)
BACKENDS = ["torch", "triton"]


def limits(backend: str) -> dict:
    """Shape limits: the issue's full ranges for torch; small ones for the Triton interpreter."""
    if backend == "torch":
        return dict(batch=4, channels=8, side=97, map_side=16, heads=8, tokens=96)
    return dict(batch=2, channels=3, side=20, map_side=8, heads=3, tokens=24)


def make(shape, dtype, layout, gen) -> torch.Tensor:
    """A random tensor of ``shape``: contiguous, a strided slice of a bigger one, or channels-last."""
    if layout == "sliced" and len(shape) >= 2:
        big = torch.randn(*shape[:-1], 2 * shape[-1] + 1, generator=gen).to(dtype)
        return big[..., 1::2]
    if layout == "channels_last" and len(shape) == 4:
        return torch.randn(shape, generator=gen).to(dtype).to(memory_format=torch.channels_last)
    return torch.randn(shape, generator=gen).to(dtype)


@st.composite
def latent_case(draw, backend):
    lim = limits(backend)
    b, c = draw(st.integers(1, lim["batch"])), draw(st.integers(1, lim["channels"]))
    h, w = draw(st.integers(5, lim["side"])), draw(st.integers(5, lim["side"]))
    kernel = draw(st.sampled_from([k for k in range(3, 16, 2) if k // 2 < min(h, w)]))
    sigma = draw(st.floats(0.3, 3.0))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    layout = draw(st.sampled_from(["contiguous", "sliced", "channels_last"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(shape=(b, c, h, w), kernel=kernel, sigma=sigma, dtype=dtype, layout=layout, seed=seed)


def oracle_blur(x: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    return sag.gaussian_blur_2d(x.double(), kernel, sigma)


def separated_mass(gen, batch, tokens, threshold, margin=1e-2):
    """A (B, tokens) mass with no token within ``margin`` of its threshold (summation order and
    fp paths can then never flip a mask cell); for "mean" the mean is moved off every value."""
    mass = 2 * torch.rand(batch, tokens, generator=gen)
    thr = reference.saliency_threshold(mass, threshold)
    close = (mass - thr).abs() < margin
    return torch.where(close, thr + torch.where(mass >= thr, 1, -1) * margin * (2 + mass), mass) \
        if threshold != "mean" else mass


def well_separated(mass: torch.Tensor, threshold, margin=1e-4) -> bool:
    mass = mass.double()
    thr = mass.mean(dim=1, keepdim=True) if threshold == "mean" else torch.full_like(mass[:, :1], threshold)
    return bool(((mass - thr).abs() > margin).all())


# ----------------------------------------------------------------------------- gaussian_blur


@pytest.mark.parametrize("backend", BACKENDS)
def test_blur_matches_reference_and_sag(backend):
    @(TORCH if backend == "torch" else TRITON)
    @given(case=latent_case(backend))
    def check(case):
        gen = torch.Generator().manual_seed(case["seed"])
        x = make(case["shape"], case["dtype"], case["layout"], gen)
        got = sat_kernels.gaussian_blur(x, case["kernel"], case["sigma"], backend=backend)
        assert got.dtype == torch.float32 and got.shape == x.shape
        if backend == "triton":  # on the torch backend this is the reference itself
            torch.testing.assert_close(got, reference.gaussian_blur(x, case["kernel"], case["sigma"]),
                                       **TOL[case["dtype"]])
        torch.testing.assert_close(got.double(), oracle_blur(x, case["kernel"], case["sigma"]),
                                   **TOL[case["dtype"]])

    check()


# ----------------------------------------------------------------------------- saliency_mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_saliency_mask_matches_reference(backend):
    lim = limits(backend)

    @(TORCH if backend == "torch" else TRITON)
    @given(batch=st.integers(1, lim["batch"]), mh=st.integers(1, 16), mw=st.integers(1, 16),
           threshold=st.one_of(st.just("mean"), st.floats(0.2, 1.8)),
           size=st.one_of(st.none(), st.tuples(st.integers(1, lim["side"]), st.integers(1, lim["side"]))),
           dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**31 - 1))
    def check(batch, mh, mw, threshold, size, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        mass = separated_mass(gen, batch, mh * mw, threshold).to(dtype)
        assume(well_separated(mass, threshold))
        got = sat_kernels.saliency_mask(mass, (mh, mw), threshold, size, backend=backend)
        m64 = mass.double()
        thr = m64.mean(1, keepdim=True) if threshold == "mean" else threshold
        expected = (m64 > thr).view(batch, mh, mw)
        if size is not None:
            expected = F.interpolate(expected[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
        assert got.dtype == torch.bool and torch.equal(got, expected)
        if backend == "triton":  # on the torch backend this is the reference itself
            assert torch.equal(got, reference.saliency_mask(mass, (mh, mw), threshold, size))

    check()


# ----------------------------------------------------------------------------- degrade_latents


def oracle_degrade(x0, eps, mass, map_size, timesteps, threshold, kernel, sigma):
    m64 = mass.double()
    thr = m64.mean(1, keepdim=True) if threshold == "mean" else threshold
    # the spec's upsample is F.interpolate 'nearest' on a float32 mask (as SAG does): its source index
    # comes from a float32 scale, which differs from a float64 one at exact multiples (e.g. 94 / 2)
    mask = (m64 > thr).view(-1, 1, *map_size).float()
    mask = F.interpolate(mask, size=x0.shape[-2:], mode="nearest").double()
    x = x0.double()
    ab = ALPHAS.double()[timesteps].view(-1, 1, 1, 1)
    blended = mask * oracle_blur(x, kernel, sigma) + (1 - mask) * x
    return ab.sqrt() * blended + (1 - ab).sqrt() * eps.double()


@st.composite
def degrade_case(draw, backend):
    case = draw(latent_case(backend))
    lim = limits(backend)
    case["map"] = (draw(st.integers(1, lim["map_side"])), draw(st.integers(1, lim["map_side"])))
    case["threshold"] = draw(st.one_of(st.just("mean"), st.floats(0.2, 1.8)))
    case["heads"] = draw(st.one_of(st.none(), st.integers(1, lim["heads"])))  # None: saliency is a mass
    case["eps_layout"] = draw(st.sampled_from(["contiguous", "sliced"]))
    case["scalar_t"] = draw(st.booleans())
    return case


def degrade_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    b = case["shape"][0]
    x0 = make(case["shape"], case["dtype"], case["layout"], gen)
    eps = make(case["shape"], case["dtype"], case["eps_layout"], gen)
    n = case["map"][0] * case["map"][1]
    if case["heads"] is None:
        saliency = separated_mass(gen, b, n, case["threshold"]).to(case["dtype"])
        mass = saliency
    else:
        logits = 3 * torch.randn(b * case["heads"], n, n, generator=gen)
        saliency = torch.softmax(logits, dim=-1).to(case["dtype"])
        mass = saliency.double().view(b, case["heads"], n, n).sum(-2).mean(1)
    timesteps = (torch.randint(0, 1000, (), generator=gen) if case["scalar_t"]
                 else torch.randint(0, 1000, (b,), generator=gen))
    return x0, eps, saliency, mass, timesteps


@pytest.mark.parametrize("backend", BACKENDS)
def test_degrade_matches_reference_and_oracle(backend):
    @(TORCH if backend == "torch" else TRITON)
    @given(case=degrade_case(backend))
    def check(case):
        x0, eps, saliency, mass, timesteps = degrade_inputs(case)
        assume(well_separated(mass, case["threshold"]))
        args = (x0, eps, saliency, case["map"], ALPHAS, timesteps, case["threshold"], case["kernel"], case["sigma"])
        got = sat_kernels.degrade_latents(*args, heads=case["heads"], backend=backend)
        assert got.dtype == torch.float32 and got.shape == x0.shape
        if backend == "triton":  # on the torch backend this is the reference itself
            ref = sat_kernels.degrade_latents(*args, heads=case["heads"], backend="torch")
            torch.testing.assert_close(got, ref, **TOL[case["dtype"]])
        t = timesteps.reshape(-1).expand(x0.shape[0])
        expected = oracle_degrade(x0, eps, mass, case["map"], t, case["threshold"], case["kernel"], case["sigma"])
        torch.testing.assert_close(got.double(), expected, **TOL[case["dtype"]])

    check()


# ----------------------------------------------------------------------------- attention statistics


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_mass_from_probs(backend):
    lim = limits(backend)

    @(TORCH if backend == "torch" else TRITON)
    @given(batch=st.integers(1, lim["batch"]), heads=st.integers(1, lim["heads"]),
           nq=st.integers(1, lim["tokens"]), nk=st.integers(1, lim["tokens"]), four_d=st.booleans(),
           dtype=st.sampled_from([torch.float32, torch.float16]), layout=st.sampled_from(["contiguous", "sliced"]),
           seed=st.integers(0, 2**31 - 1))
    def check(batch, heads, nq, nk, four_d, dtype, layout, seed):
        gen = torch.Generator().manual_seed(seed)
        probs = torch.softmax(make((batch * heads, nq, nk), torch.float32, layout, gen) * 3, dim=-1).to(dtype)
        if layout == "sliced":  # keep it a strided view: softmax made it contiguous
            probs = torch.cat([probs, probs], dim=-1)[..., :nk]
        arg = probs.view(batch, heads, nq, nk) if four_d and layout == "contiguous" else probs
        got = sat_kernels.attention_mass(arg, heads, backend=backend)
        expected = probs.double().view(batch, heads, nq, nk).sum(-2).mean(1)
        assert got.dtype == torch.float32 and got.shape == (batch, nk)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        if backend == "triton":  # on the torch backend this is the reference itself
            torch.testing.assert_close(got, reference.attention_mass(probs, heads), rtol=1e-5, atol=1e-5)

    check()


@st.composite
def qk_case(draw, backend):
    lim = limits(backend)
    return dict(batch=draw(st.integers(1, lim["batch"])), heads=draw(st.integers(1, lim["heads"])),
                nq=draw(st.integers(1, lim["tokens"])), nk=draw(st.integers(1, lim["tokens"])),
                d=draw(st.integers(1, 40)), dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                layout=draw(st.sampled_from(["contiguous", "sliced"])), given_lse=draw(st.booleans()),
                scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))), seed=draw(st.integers(0, 2**31 - 1)))


def qk_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, d = case["batch"], case["heads"], case["d"]
    q = make((b, h, case["nq"], d), case["dtype"], case["layout"], gen)
    k = make((b, h, case["nk"], d), case["dtype"], case["layout"], gen)
    scale = d ** -0.5 if case["scale"] is None else case["scale"]
    scores = scale * q.double() @ k.double().transpose(-1, -2)
    lse = torch.logsumexp(scores, dim=-1)
    return q, k, scores, (lse.float() if case["given_lse"] else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_mass_from_qk(backend):
    @(TORCH if backend == "torch" else TRITON)
    @given(case=qk_case(backend))
    def check(case):
        q, k, scores, lse = qk_inputs(case)
        got = sat_kernels.attention_mass_from_qk(q, k, lse, case["scale"], backend=backend)
        expected = torch.softmax(scores, dim=-1).sum(-2).mean(1)
        assert got.dtype == torch.float32 and got.shape == (case["batch"], case["nk"])
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_attention_probs(backend):
    @(TORCH if backend == "torch" else TRITON)
    @given(case=qk_case(backend), s=st.integers(1, 5), data=st.data())
    def check(case, s, data):
        q, k, scores, lse = qk_inputs(case)
        tokens = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, case["nk"] - 1), min_size=s, max_size=s),
                                                 min_size=case["batch"], max_size=case["batch"])))
        got = sat_kernels.token_attention_probs(q, k, tokens, lse, case["scale"], backend=backend)
        probs = torch.softmax(scores, dim=-1).mean(1)  # (B, Nq, Nk)
        expected = torch.gather(probs, 2, tokens.clamp(min=0)[:, None, :].expand(-1, case["nq"], -1))
        expected = expected * (tokens >= 0)[:, None, :]
        assert got.dtype == torch.float32 and got.shape == (case["batch"], case["nq"], s)
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)

    check()


# ----------------------------------------------------------------------------- invalid arguments

INVALID = {  # name: (function of a valid (x0, eps, mass) → call, expected exception)
    "even kernel": (lambda x, e, m, b: sat_kernels.gaussian_blur(x, 4, 1.0, backend=b), ValueError),
    "kernel too big": (lambda x, e, m, b: sat_kernels.gaussian_blur(x, 2 * min(x.shape[-2:]) + 1, 1.0, backend=b),
                       ValueError),
    "sigma <= 0": (lambda x, e, m, b: sat_kernels.gaussian_blur(x, 3, 0.0, backend=b), ValueError),
    "integer latents": (lambda x, e, m, b: sat_kernels.gaussian_blur(x.long(), 3, 1.0, backend=b), TypeError),
    "3-d latents": (lambda x, e, m, b: sat_kernels.gaussian_blur(x[0], 3, 1.0, backend=b), ValueError),
    "map tokens": (lambda x, e, m, b: sat_kernels.degrade_latents(x, e, m, (m.shape[1] + 1, 1), ALPHAS, 5,
                                                                  kernel_size=3, backend=b), ValueError),
    "bad threshold": (lambda x, e, m, b: sat_kernels.saliency_mask(m, (m.shape[1], 1), "median", backend=b),
                      ValueError),
    "bool threshold": (lambda x, e, m, b: sat_kernels.saliency_mask(m, (m.shape[1], 1), True, backend=b),
                       TypeError),
    "eps shape": (lambda x, e, m, b: sat_kernels.degrade_latents(x, e[..., :-1], m, (m.shape[1], 1), ALPHAS, 5,
                                                                 kernel_size=3, backend=b), ValueError),
    "batch mismatch": (lambda x, e, m, b: sat_kernels.degrade_latents(x, e, torch.cat([m, m]), (m.shape[1], 1),
                                                                      ALPHAS, 5, kernel_size=3, backend=b),
                       ValueError),
    "timestep range": (lambda x, e, m, b: sat_kernels.degrade_latents(x, e, m, (m.shape[1], 1), ALPHAS, 1000,
                                                                      kernel_size=3, backend=b), ValueError),
    "float timesteps": (lambda x, e, m, b: sat_kernels.degrade_latents(
        x, e, m, (m.shape[1], 1), ALPHAS, torch.tensor(5.0), kernel_size=3, backend=b), TypeError),
    "heads with mass": (lambda x, e, m, b: sat_kernels.saliency_mask(m, (m.shape[1], 1), heads=2, backend=b),
                        ValueError),
    "heads not dividing": (lambda x, e, m, b: sat_kernels.attention_mass(torch.rand(5, 4, 4), 2, backend=b),
                           ValueError),
    "unknown backend": (lambda x, e, m, b: sat_kernels.gaussian_blur(x, 3, 1.0, backend="cuda"), ValueError),
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_arguments_raise_documented_errors(backend):
    @settings(max_examples=30 * SCALE, **FUZZ)
    @given(name=st.sampled_from(sorted(INVALID)), case=latent_case("triton"), tokens=st.integers(1, 6))
    def check(name, case, tokens):
        gen = torch.Generator().manual_seed(case["seed"])
        x0 = make(case["shape"], case["dtype"], case["layout"], gen)
        eps = torch.randn(case["shape"], generator=gen)
        mass = torch.rand(case["shape"][0], tokens, generator=gen)
        call, error = INVALID[name]
        with pytest.raises(error):
            call(x0, eps, mass, backend)

    check()


# ----------------------------------------------------------------------------- non-finite inputs


def poison(x: torch.Tensor, gen, value: float) -> torch.Tensor:
    x = x.clone()
    flat = x.view(-1) if x.is_contiguous() else None
    if flat is None:
        x = x.contiguous()
        flat = x.view(-1)
    flat[torch.randint(0, flat.numel(), (2,), generator=gen)] = value
    return x


@st.composite
def nonfinite_case(draw, backend):
    case = draw(degrade_case(backend))
    case["heads"] = None
    case["where"] = draw(st.sampled_from(["x0", "eps"]))
    case["value"] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return case


def nonfinite_outputs(case, backend):
    """(inputs, degrade on ``backend``, its float64 oracle (SAG's blur and the masking math written
    out: oracle_degrade), blur on ``backend``, SAG's float64 blur)."""
    x0, eps, saliency, mass, timesteps = degrade_inputs(case)
    assume(well_separated(mass, case["threshold"]))  # a float64 mean must not flip a mask cell
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    if case["where"] == "x0":
        x0 = poison(x0, gen, case["value"])
    else:
        eps = poison(eps, gen, case["value"])
    args = (x0, eps, saliency, case["map"], ALPHAS, timesteps, case["threshold"], case["kernel"], case["sigma"])
    got = sat_kernels.degrade_latents(*args, backend=backend)
    t = timesteps.reshape(-1).expand(x0.shape[0])
    ref = oracle_degrade(x0, eps, mass, case["map"], t, case["threshold"], case["kernel"], case["sigma"])
    blur_got = sat_kernels.gaussian_blur(x0, case["kernel"], case["sigma"], backend=backend)
    blur_ref = oracle_blur(x0, case["kernel"], case["sigma"])
    return (x0, eps, mass, t), got, ref, blur_got, blur_ref


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_inputs_are_never_masked(backend):
    """Every output the float64 oracle (SAG's blur, the masking math in this file) makes non-finite
    is non-finite on both backends (a NaN/inf in the latents can never silently vanish into a finite
    loss), with the oracle's exact NaN/inf masks; the Triton backend also has the reference's."""
    @(TORCH if backend == "torch" else TRITON)
    @given(case=nonfinite_case(backend))
    def check(case):
        (x0, eps, mass, t), got, ref, blur_got, blur_ref = nonfinite_outputs(case, backend)
        expectations = [ref]
        if backend == "triton":  # independent of the kernel: the torch path is another implementation
            expectations.append(reference.degrade_latents(x0, eps, mass, case["map"], ALPHAS, t, case["threshold"],
                                                          case["kernel"], case["sigma"]).double())
        for ref in expectations:
            assert (~torch.isfinite(ref)).any()
            assert (~torch.isfinite(got))[~torch.isfinite(ref)].all(), "a non-finite output became finite"
            finite = torch.isfinite(got) & torch.isfinite(ref)
            torch.testing.assert_close(got[finite].double(), ref[finite], **TOL[case["dtype"]])
            assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(torch.isinf(got), torch.isinf(ref))
        assert (~torch.isfinite(blur_got))[~torch.isfinite(blur_ref)].all(), "blur: non-finite became finite"
        assert torch.equal(torch.isnan(blur_got), torch.isnan(blur_ref)) and \
            torch.equal(torch.isinf(blur_got), torch.isinf(blur_ref))

    check()


INF, NAN = float("inf"), float("nan")
# (row, col, value) in plane 0 of a 37 x 41 latent; plane 1 stays finite
SPOTS = [
    (20, 20, NAN),  # interior
    (1, 0, INF),  # next to a corner: reflection reads it twice
    (36, 38, -INF),  # bottom-right border
    (8, 30, INF), (11, 33, -INF),  # overlapping windows: NaN where both reach, +-inf elsewhere
    (15, 15, INF),  # on the corner of 16-row chunks and 16-column strips: four programs read it
]


def poisoned(seed: int) -> torch.Tensor:
    x = torch.randn(1, 2, 37, 41, generator=torch.Generator().manual_seed(seed))
    for row, col, value in SPOTS:
        x[0, 0, row, col] = value
    return x


def assert_same_nonfinite(got: torch.Tensor, ref: torch.Tensor, **tol) -> None:
    """Same NaN mask, same infs (sign included), finite values within tolerance."""
    assert torch.equal(got.isnan(), ref.isnan()), "NaN masks differ"
    assert torch.equal(got.isinf(), ref.isinf()), "inf masks differ"
    assert torch.equal(got[got.isinf()], ref[ref.isinf()]), "inf signs differ"
    finite = got.isfinite()
    torch.testing.assert_close(got[finite], ref[finite], **tol)


# inf - inf and 0 * inf (zero taps) make NaN, in numpy (the interpreter) as in the reference
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("kernel,sigma,rows,block_w", [
    (9, 1.0, 16, 16),
    (9, 0.2, 16, 32),  # taps 3 and 4 off the centre are exactly 0: 0 * inf makes NaN there
    (5, 2.0, 32, 16),
])
def test_triton_blur_nonfinite_pattern_equals_reference(kernel, sigma, rows, block_w):
    """NaN and +-inf stay in their (reflected) kernel window, as in the reference and SAG's conv,
    across several row and column tiles; the finite plane and finite outputs are unchanged."""
    x = poisoned(seed=0)
    ref = reference.gaussian_blur(x, kernel, sigma)
    assert ref.isnan().any() and (ref == INF).any() and (ref == -INF).any() and ref.isfinite().any()
    got = blur_op.gaussian_blur(x, kernel, sigma, rows=rows, block_w=block_w)
    assert_same_nonfinite(got, ref, **TOL[torch.float32])
    assert_same_nonfinite(sat_kernels.gaussian_blur(x, kernel, sigma, backend="triton"), ref, **TOL[torch.float32])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("tiles", [None, (16, 16)])
def test_triton_degrade_nonfinite_pattern_equals_reference(tiles):
    """The fused degrade blends like SAG, m * blur + (1 - m) * x0: a non-finite blur also gives NaN
    where m = 0 (0 * NaN); a non-finite eps passes through. Public API (one tile) and 16 x 16 tiles."""
    x0 = poisoned(seed=1)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    eps[0, 1, 3, 4], eps[0, 1, 30, 2], eps[0, 0, 20, 22] = INF, -INF, NAN
    mass = torch.tensor([[0.5, 1.5, 1.5, 0.5]])  # m = 1 on the top-right and bottom-left quadrants
    ts = torch.tensor([500])
    ref = reference.degrade_latents(x0, eps, mass, (2, 2), ALPHAS, ts, 1.0, 9, 1.0)
    m = reference.saliency_mask(mass, (2, 2), 1.0, size=x0.shape[-2:])[:, None].expand_as(ref)
    assert ref.isnan()[m].any() and ref.isnan()[~m].any() and (ref == INF).any() and (ref == -INF).any()
    if tiles is None:
        got = sat_kernels.degrade_latents(x0, eps, mass, (2, 2), ALPHAS, ts, 1.0, 9, 1.0, backend="triton")
    else:
        got = degrade_op.degrade_latents(x0, eps, mass, None, (2, 2), ALPHAS, ts, 1.0, 9, 1.0,
                                         rows=tiles[0], block_w=tiles[1])
    assert_same_nonfinite(got, ref, **TOL[torch.float32])

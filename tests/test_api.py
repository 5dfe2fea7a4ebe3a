"""Argument checks (sat_kernels.checks) and backend dispatch of the public API (sat_kernels.functional).

Every bad input must raise a ValueError/TypeError naming the argument before any kernel runs,
on both backends.
"""

import pytest
import torch

import sat_kernels
from sat_kernels import checks, functional

BACKENDS = ["torch", "triton"]


def _degrade_args(**over):
    torch.manual_seed(0)
    b, c, h, w = 2, 4, 16, 16
    args = dict(
        x0=torch.randn(b, c, h, w),
        eps=torch.randn(b, c, h, w),
        saliency=torch.rand(b, 16),
        map_size=(4, 4),
        alphas_cumprod=torch.linspace(0.99, 0.01, 1000),
        timesteps=torch.tensor([10, 500]),
    )
    args.update(over)
    return args


BAD_DEGRADE = [
    ("x0 must be a torch.Tensor of shape", TypeError, dict(x0=[[1.0]])),
    ("x0 must have shape", ValueError, dict(x0=torch.randn(4, 16, 16))),
    ("x0 must be a floating tensor", TypeError, dict(x0=torch.ones(2, 4, 16, 16, dtype=torch.int64))),
    ("eps must have the shape of x0", ValueError, dict(eps=torch.randn(2, 4, 16, 15))),
    ("batch sizes must match", ValueError, dict(saliency=torch.rand(3, 16))),
    ("map_size .* has 12 tokens but the saliency has 16", ValueError, dict(map_size=(3, 4))),
    ("map_size must be a pair", ValueError, dict(map_size=(4,))),
    ("map_size must be a pair", ValueError, dict(map_size=(0, 16))),
    ("needs heads=", ValueError, dict(saliency=torch.rand(16, 16, 16))),
    ("not a multiple of heads=3", ValueError, dict(saliency=torch.rand(16, 16, 16), heads=3)),
    ("heads is only for", ValueError, dict(heads=8)),
    ("must be square", ValueError, dict(saliency=torch.rand(2, 8, 16, 9), heads=8)),
    ("saliency must be a floating", TypeError, dict(saliency=torch.ones(2, 16, dtype=torch.int32))),
    ("too small for kernel_size=9", ValueError, dict(x0=torch.randn(2, 4, 4, 16), eps=torch.randn(2, 4, 4, 16))),
    ("kernel_size must be an odd", ValueError, dict(kernel_size=4)),
    ("sigma must be a positive", ValueError, dict(sigma=0.0)),
    ('threshold must be a float or "mean"', ValueError, dict(threshold="median")),
    ('threshold must be a float or "mean"', TypeError, dict(threshold=None)),
    ("timesteps must lie in", ValueError, dict(timesteps=torch.tensor([10, 1000]))),
    ("timesteps must be an integer", TypeError, dict(timesteps=torch.tensor([0.5, 1.0]))),
    ("timesteps must have shape", ValueError, dict(timesteps=torch.tensor([1, 2, 3]))),
    ("alphas_cumprod must have shape", ValueError, dict(alphas_cumprod=torch.rand(10, 2))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("match,error,over", BAD_DEGRADE, ids=[m for m, _, _ in BAD_DEGRADE])
def test_degrade_latents_rejects_bad_input(match, error, over, backend):
    with pytest.raises(error, match=match):
        sat_kernels.degrade_latents(**_degrade_args(**over), backend=backend)


def _qk(b=2, h=2, nq=8, nk=6, d=4):
    return torch.randn(b, h, nq, d), torch.randn(b, h, nk, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_functions_reject_bad_input(backend):
    q, k = _qk()
    with pytest.raises(ValueError, match=r"q must have shape \(B, heads, Nq, head_dim\)"):
        sat_kernels.attention_mass_from_qk(q[0], k, backend=backend)
    with pytest.raises(ValueError, match="must agree on B, heads and head_dim"):
        sat_kernels.attention_mass_from_qk(q, k[:, :1], backend=backend)
    with pytest.raises(ValueError, match=r"lse must have shape \(B, heads, Nq\)"):
        sat_kernels.attention_mass_from_qk(q, k, lse=torch.zeros(2, 2, 7), backend=backend)
    with pytest.raises(TypeError, match="q must be a floating"):
        sat_kernels.attention_mass_from_qk(q.long(), k, backend=backend)
    with pytest.raises(TypeError, match="scale must be a float or None"):
        sat_kernels.attention_mass_from_qk(q, k, scale="0.5", backend=backend)
    with pytest.raises(ValueError, match=r"tokens must be in \[-1, 5\]"):
        sat_kernels.token_attention_probs(q, k, torch.tensor([[0, 6], [1, 2]]), backend=backend)
    with pytest.raises(TypeError, match="tokens must be an integer"):
        sat_kernels.token_attention_probs(q, k, torch.zeros(2, 2), backend=backend)
    with pytest.raises(ValueError, match="tokens has batch 1"):
        sat_kernels.token_attention_probs(q, k, torch.zeros(1, 2, dtype=torch.long), backend=backend)
    with pytest.raises(ValueError, match="probs has 6 rows, not a multiple of heads=4"):
        sat_kernels.attention_mass(torch.rand(6, 5, 5), heads=4, backend=backend)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        sat_kernels.attention_mass(torch.rand(6, 5, 5), heads=0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_blur_and_mask_reject_bad_input(backend):
    with pytest.raises(ValueError, match="x must have shape"):
        sat_kernels.gaussian_blur(torch.randn(16, 16), backend=backend)
    with pytest.raises(ValueError, match="use kernel_size <= 9"):
        sat_kernels.gaussian_blur(torch.randn(1, 1, 5, 30), kernel_size=11, backend=backend)
    with pytest.raises(ValueError, match="map_size .* has 9 tokens"):
        sat_kernels.saliency_mask(torch.rand(2, 16), (3, 3), backend=backend)



def _empty_dim_calls():
    """(id, expected message, call) for each attention input with an empty dimension the result
    depends on: a softmax over no keys, a head mean over no heads, a mass summed over no queries."""
    q, k = _qk()  # (2, 2, 8, 4), (2, 2, 6, 4)
    pad = torch.full((2, 1), -1)
    no_tokens = torch.zeros(2, 0, dtype=torch.long)
    return [
        ("mass_qk-no-keys", r"k must have at least one key \(Nk >= 1\), got shape \(2, 2, 0, 4\)",
         lambda be: sat_kernels.attention_mass_from_qk(q, k[:, :, :0], backend=be)),
        ("mass_qk-no-keys-with-lse", r"k must have at least one key \(Nk >= 1\), got shape \(2, 2, 0, 4\)",
         lambda be: sat_kernels.attention_mass_from_qk(q, k[:, :, :0], lse=torch.zeros(2, 2, 8), backend=be)),
        ("mass_qk-no-queries", r"q must have at least one query \(Nq >= 1\), got shape \(2, 2, 0, 4\)",
         lambda be: sat_kernels.attention_mass_from_qk(q[:, :, :0], k, backend=be)),
        ("mass-3d-no-queries", r"probs must have at least one query \(Nq >= 1\), got shape \(4, 0, 5\)",
         lambda be: sat_kernels.attention_mass(torch.rand(4, 0, 5), heads=2, backend=be)),
        ("mass-4d-no-queries", r"probs must have at least one query \(Nq >= 1\), got shape \(2, 2, 0, 5\)",
         lambda be: sat_kernels.attention_mass(torch.rand(2, 2, 0, 5), heads=2, backend=be)),
        ("mass-no-keys", r"probs must have at least one key \(Nk >= 1\), got shape \(2, 2, 5, 0\)",
         lambda be: sat_kernels.attention_mass(torch.rand(2, 2, 5, 0), heads=2, backend=be)),
        ("token_probs-no-keys", r"k must have at least one key \(Nk >= 1\), got shape \(2, 2, 0, 4\)",
         lambda be: sat_kernels.token_attention_probs(q, k[:, :, :0], pad, backend=be)),
        ("token_probs-no-keys-no-tokens", r"k must have at least one key \(Nk >= 1\), got shape \(2, 2, 0, 4\)",
         lambda be: sat_kernels.token_attention_probs(q, k[:, :, :0], no_tokens, backend=be)),
        ("mass_qk-no-heads", r"q must have at least one head \(heads >= 1\), got shape \(2, 0, 8, 4\)",
         lambda be: sat_kernels.attention_mass_from_qk(q[:, :0], k[:, :0], backend=be)),
        ("token_probs-no-heads", r"q must have at least one head \(heads >= 1\), got shape \(2, 0, 8, 4\)",
         lambda be: sat_kernels.token_attention_probs(q[:, :0], k[:, :0], pad, backend=be)),
        ("mass_qk-no-head-dim", r"q must have head_dim >= 1, got shape \(2, 2, 8, 0\)",
         lambda be: sat_kernels.attention_mass_from_qk(q[..., :0], k[..., :0], backend=be)),
        ("saliency_mask-empty-probs", r"saliency must have at least one query \(Nq >= 1\), got shape \(4, 0, 0\)",
         lambda be: sat_kernels.saliency_mask(torch.rand(4, 0, 0), (4, 4), heads=2, backend=be)),
        ("degrade-empty-probs", r"saliency must have at least one query \(Nq >= 1\), got shape \(4, 0, 0\)",
         lambda be: sat_kernels.degrade_latents(**_degrade_args(saliency=torch.rand(4, 0, 0)), heads=2,
                                                backend=be)),
    ]


EMPTY_DIM_CALLS = _empty_dim_calls()


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("case,match,call", EMPTY_DIM_CALLS, ids=[case for case, _, _ in EMPTY_DIM_CALLS])
def test_attention_inputs_with_empty_dims_are_rejected_before_any_backend(case, match, call, backend, monkeypatch):
    """No keys / no queries / no heads give no softmax, no mass or a NaN head mean: a ValueError from
    sat_kernels.checks naming the argument, raised before a backend is even chosen."""
    def chose_a_backend(*_):
        raise AssertionError("a backend was chosen before the empty dimension was rejected")

    monkeypatch.setattr(checks, "use_triton", chose_a_backend)
    with pytest.raises(ValueError, match=match):
        call(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_probs_of_no_queries_or_no_tokens_are_empty(backend):
    """Per-query results reduce over neither axis: Nq = 0 or S = 0 is an empty (B, Nq, S) result."""
    q, k = _qk()
    tokens = torch.tensor([[0, -1], [5, 2]])
    none = sat_kernels.token_attention_probs(q[:, :, :0], k, tokens, backend=backend)
    assert none.shape == (2, 0, 2) and none.dtype == torch.float32
    no_tokens = sat_kernels.token_attention_probs(q, k, tokens[:, :0], backend=backend)
    assert no_tokens.shape == (2, 8, 0) and no_tokens.dtype == torch.float32



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_torch_path_runs_on_meta_tensors(dtype):
    """Every public function's torch path propagates shapes on meta tensors (no values: value
    checks such as the token range are skipped) and returns float32 (bool for the mask) on meta."""
    meta = dict(device="meta", dtype=dtype)
    q, k = torch.empty(2, 3, 8, 4, **meta), torch.empty(2, 3, 6, 4, **meta)
    tokens = torch.empty(2, 5, dtype=torch.long, device="meta")
    x0, eps = torch.empty(2, 4, 16, 24, **meta), torch.empty(2, 4, 16, 24, **meta)
    probs = torch.empty(6, 8, 8, **meta)
    outputs = {
        "attention_mass": (sat_kernels.attention_mass(probs, 3, backend="torch"), (2, 8), torch.float32),
        "attention_mass_from_qk": (sat_kernels.attention_mass_from_qk(q, k, backend="torch"), (2, 6),
                                   torch.float32),
        "token_attention_probs": (sat_kernels.token_attention_probs(q, k, tokens, backend="torch"), (2, 8, 5),
                                  torch.float32),
        "gaussian_blur": (sat_kernels.gaussian_blur(x0, backend="torch"), (2, 4, 16, 24), torch.float32),
        "saliency_mask": (sat_kernels.saliency_mask(probs, (2, 4), size=(16, 24), heads=3, backend="torch"),
                          (2, 16, 24), torch.bool),
        "degrade_latents": (sat_kernels.degrade_latents(
            x0, eps, torch.empty(2, 12, **meta), (3, 4), torch.empty(1000, device="meta"),
            torch.empty(2, dtype=torch.long, device="meta"), backend="torch"), (2, 4, 16, 24), torch.float32),
    }
    for name, (out, shape, out_dtype) in outputs.items():
        assert (out.device.type, tuple(out.shape), out.dtype) == ("meta", shape, out_dtype), name

def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        sat_kernels.gaussian_blur(torch.randn(1, 1, 8, 8), backend="cuda")


def test_mismatched_devices_are_rejected():
    args = _degrade_args(eps=torch.randn(2, 4, 16, 16, device="meta"))
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        sat_kernels.degrade_latents(**args, backend="torch")


def test_auto_backend_runs_torch_path_on_cpu(monkeypatch):
    def fail(name):
        raise AssertionError(f"auto must not import the Triton op {name} for CPU tensors")

    monkeypatch.setattr(functional, "_op", fail)
    out = sat_kernels.degrade_latents(**_degrade_args())
    assert out.dtype == torch.float32 and out.shape == (2, 4, 16, 16)


def test_triton_on_cpu_without_interpreter_gives_clear_error(monkeypatch):
    monkeypatch.setattr(checks, "INTERPRETING", False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before importing sat_kernels"):
        sat_kernels.gaussian_blur(torch.randn(1, 1, 8, 8), backend="triton")


def test_scalar_timestep_broadcasts_over_batch():
    args = _degrade_args(timesteps=torch.tensor(321))
    per_sample = sat_kernels.degrade_latents(**_degrade_args(timesteps=torch.tensor([321, 321])), backend="torch")
    torch.testing.assert_close(sat_kernels.degrade_latents(**args, backend="torch"), per_sample, rtol=0, atol=0)
    args["timesteps"] = 321
    torch.testing.assert_close(sat_kernels.degrade_latents(**args, backend="torch"), per_sample, rtol=0, atol=0)


def test_torch_mass_from_qk_bounds_memory(monkeypatch):
    """The torch path works in query chunks: no score block above the cap is ever built."""
    from sat_kernels import reference

    monkeypatch.setattr(reference, "_MAX_BLOCK_ELEMENTS", 2 * 2 * 6 * 3)  # 3 query rows at a time
    seen = []
    real_matmul = torch.matmul

    def spy_matmul(a, b):
        out = real_matmul(a, b)
        seen.append(out.numel())
        return out

    monkeypatch.setattr(reference.torch, "matmul", spy_matmul)
    q, k = _qk(nq=8, nk=6)
    mass = sat_kernels.attention_mass_from_qk(q, k, backend="torch")
    monkeypatch.undo()
    probs = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    torch.testing.assert_close(mass, reference.attention_mass(probs, 2), rtol=1e-5, atol=1e-6)
    assert seen and max(seen) <= 2 * 2 * 6 * 3


@pytest.mark.parametrize("version,runs", [("3.2.0", False), ("3.4.1", False), ("3.5.0", True), ("3.10.0", True)])
def test_an_older_triton_runs_the_torch_path(version, runs, monkeypatch):
    """sat does not require triton: CUDA torch 2.6 (kohya-ss/sd-scripts') pins triton 3.2. An older one
    makes auto take the torch path on CUDA with a warning, and backend='triton' a one-line error."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=version))
    problem = checks.triton_problem()
    assert (problem is None) == runs
    if runs:
        return
    assert version in problem and "3.5" in problem
    monkeypatch.setattr(checks, "TRITON_PROBLEM", problem)
    with pytest.warns(UserWarning, match="torch path runs on CUDA"):
        assert checks.use_triton("auto", torch.device("cuda")) is False
    assert checks.use_triton("auto", torch.device("cpu")) is False
    with pytest.raises(RuntimeError, match=f"triton {version} is older than 3.5"):
        checks.use_triton("triton", torch.device("cuda"))

"""Every Triton kernel variant compiles for an H100 (sm_90), checked without a GPU.

The interpreter runs every kernel's math on CPU but never lowers it, so constructs the GPU
compiler rejects (layouts of ``tl.gather``, tuples carried through loops, dtypes a ``tl.dot``
does not take) would otherwise first fail on a lent GPU. ``benchmarks/compile_report.py``
compiles each kernel at the tiles the launchers pick on CUDA with Triton's bundled ptxas; it
needs no GPU, only a fresh process without TRITON_INTERPRET. Triton's cache keeps the cubins, so
only the first run after a kernel changes pays for the compiles.
"""

import importlib
import itertools
import json
import os
import pathlib
import pkgutil
import subprocess
import sys

import pytest
import triton

import sat_kernels.ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
DTYPES = ["fp32", "fp16", "bf16"]
ROW_WALKS = {"_gaussian_blur_kernel", "_degrade_fwd_kernel", "_degrade_bwd_kernel"}
SM90_SHARED_BYTES = 227 * 1024  # the most shared memory one block may ask for on sm_90


def flags(**choices):
    """Every combination of the given constexpr choices, as dicts."""
    names = list(choices)
    return [dict(zip(names, values)) for values in itertools.product(*choices.values())]


def half_dot(dtype):
    """The launchers' tl.dot choice on GPU: tensor cores for fp16/bf16 pairs, fp32 dots otherwise."""
    return {"DOT_F32": dtype not in ("fp16", "bf16")}


def stats(name, ptr):
    """The pointer types of a q.k^T kernel's statistics (LSE, and OUT but for the lse kernel): the
    compute dtype, whose element type the kernel computes in."""
    return {"LSE": ptr} if name == "_attention_lse_kernel" else {"LSE": ptr, "OUT": ptr}


def fp64_qk(name, k="*fp64"):
    """A float64 launch of a q.k^T kernel: kernel_q_and_scale's float64 q, k as given, LSE and OUT
    in fp64, exact ("ieee") fp64 dots."""
    precision = {} if name == "_token_probs_kernel" else {"PRECISION": "ieee"}  # token probs: always "ieee"
    return ("fp64", {"DOT_F32": True, **precision, "Q": "*fp64", "K": k, **stats(name, "*fp64")})


# kernel -> (dtype, constexpr branches) the launchers can pick on CUDA: each must be compiled
EXPECTED = {
    "_gaussian_blur_kernel": [(d, f) for d in DTYPES for f in flags(ADJOINT=[False, True])],
    "_degrade_fwd_kernel": [(d, f) for d in DTYPES
                            for f in flags(IS_PROBS=[False, True], MEAN_THRESHOLD=[False, True],
                                           WRITE_MASK=[False, True])],
    "_degrade_bwd_kernel": [(d, dict(NEED_X0=x, NEED_EPS=e)) for d in DTYPES
                            for x, e in [(True, True), (True, False), (False, True)]],
    # the attention statistics write fp32 for fp32/fp16/bf16 inputs and fp64 for float64 ones
    "_attention_mass_probs_kernel": [(d, {"ACC_2D": True, "OUT": "*fp32"}) for d in DTYPES]
    + [("fp64", {"ACC_2D": True, "OUT": "*fp64"})],
    "_saliency_mask_kernel": [(d, f) for d in DTYPES for f in flags(MEAN_THRESHOLD=[False, True])],
    # + a mixed fp16/fp32 pair, fp64 and a mixed fp64/fp32 pair
    **{name: [(d, {**half_dot(d), **stats(name, "*fp32")}) for d in DTYPES]
       + [("fp16", {"DOT_F32": True, "K": "*fp32", **stats(name, "*fp32")})] + [fp64_qk(name), fp64_qk(name, "*fp32")]
       for name in ("_attention_lse_kernel", "_attention_mass_qk_kernel", "_token_probs_kernel")},
}


def kernels_in_ops() -> set:
    """The names of every ``*_kernel`` function in the modules of sat_kernels.ops."""
    names = set()
    for info in pkgutil.iter_modules(sat_kernels.ops.__path__):
        module = importlib.import_module(f"sat_kernels.ops.{info.name}")
        names |= {name for name in vars(module) if name.endswith("_kernel") and hasattr(vars(module)[name], "fn")}
    return names


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = str(max(1, min(8, os.cpu_count() or 1)))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--arch", "90", "--json",
                          "--jobs", jobs], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    failed = [f"{row['label']}: {row['error'][:1500]}" for row in rows if "error" in row]
    assert not failed, "\n".join(failed)
    assert run.returncode == 0, run.stderr[-3000:]
    return rows


pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="this Triton build ships no NVIDIA ptxas")


def test_every_kernel_variant_compiles_for_sm90(report):
    # a branch names constexprs and pointer types (the element types the launcher passes)
    compiled = {(row["kernel"], row["dtype"], json.dumps({**row["constexprs"], **row["pointers"]}, sort_keys=True))
                for row in report}
    assert kernels_in_ops() == set(EXPECTED), "a kernel of sat_kernels.ops is not listed in EXPECTED (or vanished)"
    for kernel, cases in EXPECTED.items():
        for dtype, branch in cases:
            assert any(k == kernel and d == dtype and branch.items() <= json.loads(c).items()
                       for k, d, c in compiled), f"{kernel} {dtype} {branch} was not compiled"
    for row in report:
        assert row["shared_bytes"] <= SM90_SHARED_BYTES, f"{row['label']} asks for more shared memory than sm_90 has"


def test_row_walk_kernels_do_not_spill(report):
    """The blur and degrade keep their ring of rows in registers at the launcher's tile."""
    walks = [row for row in report if row["kernel"] in ROW_WALKS and row["dtype"] in DTYPES]
    assert len(walks) >= sum(len(EXPECTED[k]) for k in ROW_WALKS)
    for row in walks:
        assert (row["spill_stores"], row["spill_loads"]) == (0, 0), f"{row['label']} spills registers: {row}"

"""The C++ kernel of Clippy's sparse (row) step, against the NumPy reference and the eager path.

The kernel is built on first use (``mtl_clippy.optim._sparse_kernel``). Where no C++ compiler or
ninja exists the tests that need it are skipped, and those of the fallback still run: the
optimizer must then take the eager path, say why, and give the same numbers. Rows here are
wide enough (up to 129 values) for the kernel's vector lanes and its scalar tail, and tables
large enough for its multi-threaded passes; ``test_clippy_properties.py`` covers the small rows
and every id pattern on the default path (the kernel, where it builds).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from mtl_clippy.optim import ClippyAdagrad, _sparse_kernel
from test_clippy_properties import (
    INIT_ACC,
    NP_DTYPE,
    assert_close,
    make_opt,
    options,
    random_values,
    random_weights,
    ref_kw,
    ref_step,
)

HAS_TOOLS = shutil.which("c++") is not None and shutil.which("ninja") is not None


def kernel_or_skip():
    op = _sparse_kernel.sparse_step()
    if op is None:
        pytest.skip(f"the sparse kernel is not available here: {_sparse_kernel.failure()}")
    return op


def forget_the_kernel(monkeypatch) -> None:
    """As in a process that has not tried the kernel yet and has not loaded it (restored at
    the test's end). Loading it a second time in one process would abort it: after this,
    only paths that cannot load it (no compiler, a damaged build) may be exercised."""
    monkeypatch.setattr(_sparse_kernel, "_state", {"tried": False, "op": None, "failure": None})
    monkeypatch.setattr(_sparse_kernel, "_registered", lambda: None)


@pytest.mark.skipif(not HAS_TOOLS, reason="no C++ compiler or ninja on this machine")
def test_kernel_builds_where_a_compiler_exists():
    """With a compiler and ninja the kernel must build: a broken build is a failure here, not
    a silent fallback."""
    assert _sparse_kernel.sparse_step() is not None, _sparse_kernel.failure()


def draw_ids(rng, kind, rows, n):
    """Ids of one batch: uniform, heavy-headed (Zipf-like: many duplicates), distinct in any
    order, sorted distinct, one row repeated, or none."""
    if kind == "empty" or n == 0:
        return np.zeros(0, dtype=np.int64)
    if kind == "uniform":
        return rng.integers(0, rows, n)
    if kind == "zipf":
        return (rng.zipf(1.3, n) - 1) % rows
    if kind == "one":
        return np.full(n, rng.integers(0, rows))
    ids = rng.permutation(rows)[: min(n, rows)]
    return np.sort(ids) if kind == "sorted" else ids


@st.composite
def wide_case(draw):
    return dict(
        rows=draw(st.sampled_from([1, 3, 40, 700, 3000])),
        row_shape=draw(st.sampled_from([(1,), (7,), (8,), (16,), (17,), (33,), (64,), (2, 9),
                                        (129,)])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        opts=draw(options()),
        lr=draw(st.sampled_from([0.01, 0.3, 2.0])),
        kinds=draw(st.lists(st.sampled_from(["uniform", "zipf", "distinct", "sorted", "one",
                                             "empty"]), min_size=1, max_size=3)),
        coalesce=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )  # fmt: skip


@given(case=wide_case())
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_kernel_equals_reference_and_eager_path(case, monkeypatch):
    """Random tables, widths, options and id patterns over several steps: the kernel gives the
    NumPy reference's numbers and the eager sparse path's (run with the kernel disabled)."""
    kernel_or_skip()
    dtype, np_dtype = case["dtype"], NP_DTYPE[case["dtype"]]
    shape = (case["rows"], *case["row_shape"])
    rng = np.random.default_rng(case["seed"])
    w0 = random_weights(rng, shape, np_dtype)
    w_k, w_e = nn.Parameter(torch.tensor(w0)), nn.Parameter(torch.tensor(w0))
    opt_k = make_opt([w_k], case["opts"], case["lr"])
    opt_e = make_opt([w_e], case["opts"], case["lr"])
    ref_w, ref_a = w0.copy(), np.full(shape, INIT_ACC, dtype=np_dtype)
    touched = False
    for kind in case["kinds"]:
        ids = draw_ids(rng, kind, case["rows"], int(rng.integers(1, 2 * case["rows"] + 2)))
        vals = random_values(rng, (len(ids), *case["row_shape"]), np_dtype)
        grad = torch.sparse_coo_tensor(
            torch.tensor(ids, dtype=torch.long).reshape(1, -1),
            torch.tensor(vals),
            shape,
            check_invariants=False,
        )
        if case["coalesce"]:
            grad = grad.coalesce()
        w_k.grad, w_e.grad = grad, grad.clone()
        opt_k.step()
        with monkeypatch.context() as m:
            m.setenv("MTL_CLIPPY_DISABLE_SPARSE_KERNEL", "1")
            opt_e.step()
        dense_g = np.zeros(shape, dtype=np_dtype)
        np.add.at(dense_g, ids, vals)
        ref_w, ref_a, sigma = ref_step(ref_w, dense_g, ref_a, lr=case["lr"], **ref_kw(case["opts"]))
        what = f"{kind} ids, {len(ids)} of {case['rows']} rows"
        assert_close(w_k, ref_w, dtype, f"weights, {what}")
        assert_close(opt_k.state[w_k]["sum"], ref_a, dtype, f"accumulator, {what}")
        assert_close(opt_k.state[w_k]["clipping_factor"], sigma, dtype, f"sigma, {what}")
        assert_close(w_k, w_e.detach().double().numpy(), dtype, f"kernel vs eager, {what}")
        assert_close(opt_k.state[w_k]["sum"], opt_e.state[w_e]["sum"].double().numpy(), dtype, what)
        touched = touched or len(ids) > 0
    # nothing is recorded for steps that touch no row
    assert opt_k.implementation()["sparse_paths"] == (["kernel"] if touched else [])
    assert opt_e.implementation()["sparse_paths"] == (["eager"] if touched else [])


def table_case(rows=20_000, dim=64, n=12_000, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=gen, dtype=dtype) * 0.1
    ids = torch.randint(0, rows, (n,), generator=gen)
    ids[: n // 4] = ids[0]  # one heavy row, and ordinary duplicates
    vals = torch.randn(n, dim, generator=gen, dtype=dtype) * 0.01
    vals[5, 3] = 50.0  # an outlier: sigma well below 1
    return w, torch.sparse_coo_tensor(ids[None], vals, (rows, dim))


def step_table(w0, grad, threads, **kw):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = nn.Parameter(w0.clone())
        opt = ClippyAdagrad([w], lr=0.3, variable_relative_threshold=0.5, **kw)
        for _ in range(2):
            w.grad = grad
            opt.step()
        return w.detach(), opt.state[w]["sum"], opt.state[w]["clipping_factor"], opt
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threads_change_nothing(dtype):
    """A table large enough for the kernel's parallel passes: one thread and two give the same
    bits (rows are independent; sigma is a minimum), and sigma is below 1."""
    kernel_or_skip()
    w0, grad = table_case(dtype=dtype)
    one = step_table(w0, grad, 1)
    two = step_table(w0, grad, 2)
    for a, b in zip(one[:3], two[:3], strict=True):
        assert torch.equal(a, b)
    assert 0 < float(one[2]) < 1
    assert one[3].implementation()["sparse_paths"] == ["kernel"]


def test_two_tables_of_different_sizes_in_one_group(monkeypatch):
    """The tables of one param group share the kernel's row map; each gets its own numbers."""
    kernel_or_skip()
    results = []
    for disable in ("", "1"):
        monkeypatch.setenv("MTL_CLIPPY_DISABLE_SPARSE_KERNEL", disable)
        torch.manual_seed(0)
        big, small = nn.Embedding(5000, 24, sparse=True), nn.Embedding(30, 24, sparse=True)
        opt = ClippyAdagrad([*big.parameters(), *small.parameters()], lr=0.5)
        for _ in range(3):
            ids = torch.randint(0, 30, (200,))
            (big(ids * 150).sum() + small(ids).pow(2).sum()).backward()
            opt.step()
            opt.zero_grad()
        results.append((big.weight.detach().clone(), small.weight.detach().clone()))
    for k, e in zip(*results, strict=True):
        torch.testing.assert_close(k, e, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [-1, 50])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_row_index_outside_the_table(bad, wd):
    """A hand-built gradient with a row outside the table: one clear error, nothing written
    (weight decay included), and the next valid step is exact (the row map was restored)."""
    w = nn.Parameter(torch.randn(50, 20))
    opt = ClippyAdagrad([w], lr=0.1, weight_decay=wd)
    w0 = w.detach().clone()
    w.grad = torch.sparse_coo_tensor(torch.tensor([[3, bad, 7]]), torch.ones(3, 20), (50, 20))
    with pytest.raises(RuntimeError, match=f"row index {bad} is outside the parameter's 50 rows"):
        opt.step()
    assert torch.equal(w.detach(), w0)
    ws = opt._workspaces.get(0)
    slots = ws.buffers.get(("row_slots",)) if ws else None
    assert slots is None or bool((slots == -1).all())
    ref = nn.Parameter(w0.clone())
    ref_opt = ClippyAdagrad([ref], lr=0.1, weight_decay=wd, foreach=False, fused=False)
    good = torch.sparse_coo_tensor(torch.tensor([[3, 3, 7]]), torch.ones(3, 20), (50, 20))
    w.grad, ref.grad = good, good.to_dense()
    opt.step()
    ref_opt.step()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=2e-6, atol=1e-7)


def test_other_dtypes_and_layouts_take_the_eager_path():
    """bfloat16 tables and non-contiguous ones are the eager path's, without a fallback note."""
    for w in (
        nn.Parameter(torch.randn(10, 4, dtype=torch.bfloat16)),
        nn.Parameter(torch.randn(4, 10).t()),
    ):
        opt = ClippyAdagrad([w], lr=0.1)
        w.grad = torch.sparse_coo_tensor(
            torch.tensor([[1, 2, 2]]), torch.ones(3, 4, dtype=w.dtype), tuple(w.shape)
        )
        opt.step()
        used = opt.implementation()
        assert used["sparse_paths"] == ["eager"] and used["fallback"] is None


def kernel_and_fallback_run(monkeypatch, **env):
    w0, grad = table_case(rows=3000, dim=40, n=2000, seed=3)
    out = {}
    for name, setting in (("kernel", {}), ("fallback", env)):
        with monkeypatch.context() as m:
            for k, v in setting.items():
                m.setenv(k, v)
            out[name] = step_table(w0, grad, 2)
    return out


def test_no_compiler_falls_back_with_the_same_numbers(monkeypatch, tmp_path):
    """No C++ compiler (CXX names none) and no earlier build: one warning, the eager path, the
    reason recorded, and exactly the numbers the kernel gives (the same roundings)."""
    case = table_case(rows=3000, dim=40, n=2000, seed=3)
    with_kernel = step_table(*case, 2) if _sparse_kernel.sparse_step() is not None else None
    forget_the_kernel(monkeypatch)
    monkeypatch.setenv("CXX", "no-such-compiler-mtl-clippy")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="could not be built here .*no C\\+\\+ compiler"):
        w, acc, sigma, opt = step_table(*case, 2)
    used = opt.implementation()
    assert used["sparse_paths"] == ["eager"]
    assert used["fallback"].startswith("sparse kernel not built: RuntimeError: no C++ compiler")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once per process, not per step
        step_table(*table_case(rows=30, dim=4, n=20), 1)
    if with_kernel is not None:
        for got, want in zip((w, acc, sigma), with_kernel[:3], strict=True):
            assert torch.equal(got, want)


def _built_library() -> Path:
    from torch.utils import cpp_extension

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    found = sorted(root.glob("mtl_clippy_sparse_*/mtl_clippy_sparse_*.so"), key=os.path.getmtime)
    if not found:
        pytest.skip("no build of the sparse kernel on this machine")
    return found[-1]


def test_an_earlier_build_loads_without_a_compiler():
    """A node without a compiler loads the build made earlier (here: by the tests above), in a
    fresh process (this one has loaded it already), without a warning."""
    import subprocess
    import sys

    kernel_or_skip()
    code = (
        "import warnings; warnings.simplefilter('error', RuntimeWarning)\n"
        "from mtl_clippy.optim import _sparse_kernel as k\n"
        "assert k.sparse_step() is not None, k.failure()\n"
    )
    env = {**os.environ, "CXX": "no-such-compiler-mtl-clippy"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_truncated_build_is_never_loaded(monkeypatch, tmp_path):
    """A library cut short (a full disk, a killed build) does not match its recorded digest:
    it is removed, and without a compiler the eager path takes over with a warning; the
    process survives (loading it could kill it)."""
    kernel_or_skip()
    library = _built_library()
    copy = tmp_path / library.parent.name
    shutil.copytree(library.parent, copy)
    cut = copy / library.name
    cut.write_bytes(cut.read_bytes()[:5000])
    forget_the_kernel(monkeypatch)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-mtl-clippy")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert _sparse_kernel.sparse_step() is None
    assert not cut.exists()


def test_disabled_by_environment(monkeypatch):
    out = kernel_and_fallback_run(monkeypatch, MTL_CLIPPY_DISABLE_SPARSE_KERNEL="1")
    fb = out["fallback"][3].implementation()
    assert fb["sparse_paths"] == ["eager"]
    assert fb["fallback"] == "sparse kernel disabled by MTL_CLIPPY_DISABLE_SPARSE_KERNEL"
    if _sparse_kernel.sparse_step() is not None:
        assert out["kernel"][3].implementation()["sparse_paths"] == ["kernel"]
        for a, b in zip(out["kernel"][:3], out["fallback"][:3], strict=True):
            assert torch.equal(a, b)  # the same operations and roundings


# ----------------------------------------------------------------------------- CUDA (Triton)

TRITON_CHECK = r"""
import numpy as np, torch
from clippy_reference import reference_step
from mtl_clippy.optim import _sparse_triton as T

rng = np.random.default_rng(0)
for dtype, npd in ((torch.float32, np.float32), (torch.float64, np.float64)):
    for clip_acc, standard, acc_rel in ((False, False, 0.0), (True, False, 0.0), (False, True, 0.03)):
        for n, d in ((5, 1), (50, 7), (300, 130)):
            w0 = rng.normal(size=(n, d)).astype(npd)
            w0[rng.random((n, d)) < 0.2] = 0  # zero weights: zero bounds with abs = 0
            a0 = np.full((n, d), 0.1, npd)
            ids = np.unique(rng.integers(0, n, n // 2 + 1))
            g_rows = (rng.normal(size=(len(ids), d)) * 0.3).astype(npd)
            g_rows[0, 0] = 1e4  # an outlier: sigma far below 1
            w, acc = torch.tensor(w0), torch.tensor(a0)
            for abs_t in (1e-3, 0.0):
                hyper = torch.tensor([0.5, 1e-7, 0.1, acc_rel, abs_t, 1.0], dtype=dtype)
                w, acc = torch.tensor(w0), torch.tensor(a0)
                sigma = T.sparse_step(
                    w, acc, torch.tensor(ids), torch.tensor(g_rows),
                    torch.empty(g_rows.size, dtype=dtype), hyper,
                    has_acc_rel=acc_rel != 0, clip_acc=clip_acc, standard=standard,
                )
                g = np.zeros_like(w0)
                g[ids] = g_rows
                rw, ra, rs = reference_step(
                    w0, g, a0, lr=0.5, eps=1e-7, rel=0.1, acc_rel=acc_rel, abs_t=abs_t, wd=0.0,
                    clip_acc=clip_acc, standard=standard,
                )
                tol = 1e-12 if dtype == torch.float64 else 2e-5
                for got, want in ((w, rw), (acc, ra), (sigma, rs)):
                    np.testing.assert_allclose(
                        got.numpy(), want, rtol=tol, atol=tol * max(np.abs(want).max(), 1e-300)
                    )

# An infinite accumulator element: p = 0, delta = 0, nothing moves (no NaN from 0 * inf).
for dtype in (torch.float32, torch.float64):
    w = torch.tensor([[1.0, 2.0]], dtype=dtype)
    acc = torch.tensor([[float("inf"), 1.0]], dtype=dtype)
    hyper = torch.tensor([0.1, 1e-7, 0.1, 0.0, 1e-7, 1.0], dtype=dtype)
    T.sparse_step(
        w, acc, torch.tensor([0]), torch.tensor([[0.5, 0.5]], dtype=dtype),
        torch.empty(2, dtype=dtype), hyper, has_acc_rel=False, clip_acc=False, standard=False,
    )
    assert w[0, 0] == 1.0 and torch.isfinite(w).all(), w

# Rows outside the table are masked in the kernels: nothing outside it is written ...
big = torch.zeros(40, 4)
view = big[:10]
hyper = torch.tensor([0.1, 1e-7, 0.1, 0.0, 1e-2, 1.0])
T.sparse_step(
    view, torch.full((10, 4), 0.1), torch.tensor([1, 12]), torch.ones(2, 4), torch.empty(8),
    hyper, has_acc_rel=False, clip_acc=False, standard=False,
)
assert bool((big[10:] == 0).all()), "a row outside the table was written"
# ... and the optimizer's Triton step refuses them (on a GPU: a device-side assertion).
from mtl_clippy.optim import clippy as C
for bad in (12, -3):
    g = torch.sparse_coo_tensor(torch.tensor([[1, bad]]), torch.ones(2, 4), (10, 4))
    try:
        C._sparse_triton_step(
            torch.zeros(10, 4), g, torch.full((10, 4), 0.1), lr=0.1,
            hp=C._Hyper(1e-7, 0.1, 0.0, 1e-2, 0.0, False, False), workspace=C.ClippyWorkspace(),
        )
    except RuntimeError as exc:
        assert "row index" in str(exc), exc
    else:
        raise AssertionError(f"row {bad} outside a 10-row table was accepted")
print("triton kernels match the reference")
"""


def test_triton_kernels_match_the_reference_in_the_interpreter(tmp_path):
    """The CUDA kernels, run on CPU tensors by Triton's interpreter (where Triton is
    installed; the CUDA test below runs them compiled)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    tests = Path(__file__).resolve().parent
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "match the reference" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_sparse_step_equals_the_exact_cpu_step(dtype):
    """nn.Embedding(sparse=True) on the GPU (Triton kernels where Triton is installed, else the
    eager path) against the same embedding on the CPU in float64, over several steps."""
    torch.manual_seed(0)
    cpu = nn.Embedding(5000, 48, sparse=True, dtype=torch.float64)
    gpu = nn.Embedding(5000, 48, sparse=True, device="cuda", dtype=dtype)
    with torch.no_grad():
        gpu.weight.copy_(cpu.weight)
    kw = dict(lr=0.5, variable_relative_threshold=0.5, absolute_threshold=1e-2)
    opt_c, opt_g = ClippyAdagrad(cpu.parameters(), **kw), ClippyAdagrad(gpu.parameters(), **kw)
    for step in range(5):
        ids = torch.randint(0, 5000, (4096,))
        ids[:500] = 7  # a heavy row
        scale = 100.0 if step == 2 else 1.0
        (cpu(ids).sum() * scale).backward()
        (gpu(ids.cuda()).sum() * scale).backward()
        opt_c.step()
        opt_g.step()
        opt_c.zero_grad()
        opt_g.zero_grad()
    ref = cpu.weight.detach()
    got = gpu.weight.detach().double().cpu()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert float((got - ref).abs().max() / ref.abs().max()) < tol
    import importlib.util

    want = "triton" if importlib.util.find_spec("triton") else "eager"
    assert opt_g.implementation()["sparse_paths"] == [want]


def test_the_kernel_tells_autograd_it_wrote():
    """An in-place write, as autograd sees one: a graph that saved the weight before the step
    refuses to backpropagate through it afterwards (as with the eager path)."""
    kernel_or_skip()
    emb = nn.Embedding(10, 4, sparse=True)
    opt = ClippyAdagrad(emb.parameters(), lr=0.1)
    y = (emb.weight**2).sum()
    emb(torch.tensor([1, 2, 2])).sum().backward()
    before = emb.weight._version
    opt.step()
    assert opt.implementation()["sparse_paths"] == ["kernel"]
    assert emb.weight._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_the_functional_step_refuses_a_leaf_that_requires_grad():
    from mtl_clippy.optim import clippy_adagrad

    kernel_or_skip()
    w = nn.Parameter(torch.randn(10, 4))
    g = torch.sparse_coo_tensor(torch.tensor([[1, 2]]), torch.ones(2, 4), (10, 4))
    with pytest.raises(RuntimeError, match="in-place operation"):
        clippy_adagrad([w], [g], [torch.full((10, 4), 0.1)], lr=0.1)
    with torch.no_grad():
        clippy_adagrad([w], [g], [torch.full((10, 4), 0.1)], lr=0.1)


def test_a_dirty_row_map_changes_nothing():
    """The kernel's row map holds stale entries only after misuse (a crash mid-step, threads
    sharing a workspace); a slot counts only where it points back at its id, so garbage in
    it changes no number."""
    kernel_or_skip()
    w0, grad = table_case(rows=3000, dim=40, n=2000, seed=5)
    clean = step_table(w0, grad, 2)
    w = nn.Parameter(w0.clone())
    opt = ClippyAdagrad([w], lr=0.3, variable_relative_threshold=0.5)
    for _ in range(2):
        w.grad = grad
        if opt._workspaces:
            slots = opt._workspaces[0].row_slots(3000)
            slots.copy_(torch.randint(-5, 2000, slots.shape, dtype=torch.int32))
        opt.step()
    assert torch.equal(w.detach(), clean[0]) and torch.equal(opt.state[w]["sum"], clean[1])


def test_scratch_follows_the_batches_not_the_table():
    """One unusual step touching a whole table twice; the next, ordinary steps do not keep a
    scratch of the table's size."""
    kernel_or_skip()
    rows, dim = 20_000, 16
    w = nn.Parameter(torch.randn(rows, dim))
    opt = ClippyAdagrad([w], lr=0.1)
    everything = torch.arange(rows).repeat(2)
    w.grad = torch.sparse_coo_tensor(everything[None], torch.ones(2 * rows, dim), (rows, dim))
    opt.step()
    small = torch.tensor([3, 3, 9])
    w.grad = torch.sparse_coo_tensor(small[None], torch.ones(3, dim), (rows, dim))
    opt.step()
    scratch = opt._workspaces[0].buffers[("sparse_sums", torch.float32)]
    assert scratch.numel() <= 4 * 3 * dim + 2**16


def test_an_older_record_without_sparse_paths_still_works():
    """clippy_adagrad's record as documented before sparse_paths existed."""
    from mtl_clippy.optim import clippy_adagrad

    w = torch.randn(10, 4)
    g = torch.sparse_coo_tensor(torch.tensor([[1, 2]]), torch.ones(2, 4), (10, 4))
    record = {"dense": set(), "sparse": False, "fallback": None}
    clippy_adagrad([w], [g], [torch.full((10, 4), 0.1)], lr=0.1, record=record)
    assert record["sparse"] is True and record["sparse_paths"]


def test_a_refused_step_leaves_the_whole_group_unchanged():
    """A bad row in the second table of a group: the first table, both accumulators and the
    step counters are as before the step."""
    a, b = nn.Parameter(torch.randn(10, 4)), nn.Parameter(torch.randn(5, 4))
    opt = ClippyAdagrad([a, b], lr=0.1)
    before = [t.detach().clone() for t in (a, b)]
    a.grad = torch.sparse_coo_tensor(torch.tensor([[1, 2]]), torch.ones(2, 4), (10, 4))
    b.grad = torch.sparse_coo_tensor(torch.tensor([[7]]), torch.ones(1, 4), (5, 4))
    with pytest.raises(RuntimeError, match="row index 7 is outside the parameter's 5 rows"):
        opt.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    for t in (a, b):
        assert float(opt.state[t]["step"]) == 0.0
        assert bool((opt.state[t]["sum"] == opt.defaults["initial_accumulator_value"]).all())


@pytest.mark.parametrize("shape", [(0, 4), (10, 0)])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_rows_outside_an_empty_table_are_refused(shape, wd):
    w = nn.Parameter(torch.randn(*shape))
    opt = ClippyAdagrad([w], lr=0.1, weight_decay=wd)
    w.grad = torch.sparse_coo_tensor(torch.tensor([[50]]), torch.ones(1, shape[1]), shape)
    with pytest.raises(RuntimeError, match="outside the parameter's"):
        opt.step()


def test_signed_zeros_as_the_dense_step():
    """-0.0 weights with zero gradients keep their sign, as in the dense step (vector lanes
    and the scalar tail alike)."""
    kernel_or_skip()
    for width in (3, 16, 35):
        w0 = torch.full((6, width), -0.0)
        grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.zeros(2, width), (6, width))
        sparse, dense = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
        dense_path = {"foreach": False, "fused": False}
        for p, g, kw in ((sparse, grad, {}), (dense, grad.to_dense(), dense_path)):
            opt = ClippyAdagrad([p], lr=0.1, **kw)
            p.grad = g
            opt.step()
        assert torch.equal(torch.signbit(sparse.detach()), torch.signbit(dense.detach()))

"""Property-based tests of ClippyAdagrad (hypothesis) against an independent NumPy reference.

The reference below is written from ``shared/docs/clippy.md`` alone (elementwise NumPy, no code
shared with the optimizer). Every implementation is checked against it on randomly drawn
cases: the sparse (row) path for random id multisets, sorted or not, with or without
duplicates, one row, every row or none; the three dense paths (per-tensor, multi-tensor,
compiled) for random shapes, options, learning rates and gradients, including a huge outlier
element (sigma far below 1), all-zero gradients and zero bounds (absolute threshold 0 on zero
weights).
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from clippy_reference import reference_step
from mtl_clippy.optim import ClippyAdagrad, _sparse_kernel
from mtl_clippy.optim import clippy as impl

EPS = 1e-7
INIT_ACC = 0.1
# float64: to 1e-12 of each tensor's scale. float32: the same operations rounded to 24 bits,
# in a different order where duplicate rows are summed; a few ulps of the scale.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
NP_DTYPE = {torch.float64: np.float64, torch.float32: np.float32}


# ----------------------------------------------------------------------------- reference


def ref_step(w, g, acc, **options):
    """One Clippy step of one tensor (the shared NumPy reference), with this file's epsilon."""
    return reference_step(w, g, acc, eps=EPS, **options)


def assert_close(got, want, dtype, what):
    got = got.detach().double().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    want = np.asarray(want, dtype=np.float64)
    scale = max(float(np.abs(want).max()) if want.size else 0.0, 1e-300)
    tol = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


# ----------------------------------------------------------------------------- strategies

MODES = [(False, False), (True, False), (False, True)]  # (clip_acc, standard); not both


@st.composite
def options(draw):
    clip_acc, standard = draw(st.sampled_from(MODES))
    return dict(
        clip_acc=clip_acc,
        standard=standard,
        acc_rel=draw(st.sampled_from([0.0, 0.03])),
        wd=draw(st.sampled_from([0.0, 0.02])),
        abs_t=draw(st.sampled_from([0.0, 1e-7, 1e-2])),
        rel=draw(st.sampled_from([0.0, 0.1, 0.5])),
    )


def make_opt(params, opts, lr, **path):
    return ClippyAdagrad(
        params,
        lr=lr,
        initial_accumulator_value=INIT_ACC,
        variable_relative_threshold=opts["rel"],
        accumulator_relative_threshold=opts["acc_rel"],
        absolute_threshold=opts["abs_t"],
        epsilon=EPS,
        clip_accumulator_update=opts["clip_acc"],
        use_standard_accumulator_update=opts["standard"],
        weight_decay=opts["wd"],
        **path,
    )


def ref_kw(opts):
    return {k: opts[k] for k in ("rel", "acc_rel", "abs_t", "wd", "clip_acc", "standard")}


def random_values(rng, shape, np_dtype):
    """Gradient-like values at a random scale; sometimes one huge outlier (sigma << 1), some
    exact zeros, or all zeros."""
    kind = rng.integers(0, 6)
    if kind == 0:
        return np.zeros(shape, dtype=np_dtype)
    v = rng.normal(size=shape) * 10 ** rng.uniform(-3, 1)
    if v.size and kind == 1:
        v.flat[rng.integers(0, v.size)] = 1e6 * rng.choice([-1, 1])
    if v.size and kind == 2:
        v[rng.random(shape) < 0.3] = 0
    return v.astype(np_dtype)


def random_weights(rng, shape, np_dtype):
    w = rng.normal(size=shape)
    if w.size and rng.random() < 0.3:  # zero weights: with absolute_threshold 0, a zero bound
        w[rng.random(shape) < 0.5] = 0
    return w.astype(np_dtype)


@st.composite
def id_multiset(draw, rows):
    """Row ids of one batch: any multiset, or distinct (sorted or not), one row, every row, none."""
    kind = draw(st.sampled_from(["any", "distinct", "sorted", "one", "all", "empty"]))
    if kind == "empty":
        return []
    if kind == "one":
        return [draw(st.integers(0, rows - 1))] * draw(st.integers(1, 3))
    if kind == "all":
        return draw(st.permutations(range(rows)))
    if kind == "any":
        return draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=2 * rows))
    ids = draw(st.lists(st.integers(0, rows - 1), min_size=1, max_size=rows, unique=True))
    return sorted(ids) if kind == "sorted" else ids


# ----------------------------------------------------------------------------- sparse


@st.composite
def sparse_case(draw):
    rows = draw(st.integers(1, 7))
    row_shape = draw(st.sampled_from([(), (1,), (3,), (2, 3), (3, 1, 2)]))
    return dict(
        rows=rows,
        row_shape=row_shape,
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        opts=draw(options()),
        lr=draw(st.sampled_from([0.01, 0.3, 1.0, 5.0])),
        batches=draw(st.lists(id_multiset(rows), min_size=1, max_size=3)),
        coalesce=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@given(sparse_case())
def test_sparse_coo_gradients_equal_dense_and_reference(case):
    """Sparse COO gradients built directly (rows of any rank, coalesced or not) give the
    reference's numbers, and the dense path's, for random id multisets over several steps."""
    dtype, np_dtype = case["dtype"], NP_DTYPE[case["dtype"]]
    shape = (case["rows"], *case["row_shape"])
    rng = np.random.default_rng(case["seed"])
    w0 = random_weights(rng, shape, np_dtype)
    w_sparse = nn.Parameter(torch.tensor(w0))
    w_dense = nn.Parameter(torch.tensor(w0))
    opt_sparse = make_opt([w_sparse], case["opts"], case["lr"])
    opt_dense = make_opt([w_dense], case["opts"], case["lr"], foreach=False, fused=False)
    ref_w, ref_a = w0.copy(), np.full(shape, INIT_ACC, dtype=np_dtype)
    for ids in case["batches"]:
        vals = random_values(rng, (len(ids), *case["row_shape"]), np_dtype)
        grad = torch.sparse_coo_tensor(
            torch.tensor([ids], dtype=torch.long).reshape(1, len(ids)),
            torch.tensor(vals).reshape(len(ids), *case["row_shape"]),
            shape,
            check_invariants=True,
        )
        if case["coalesce"]:
            grad = grad.coalesce()
        w_sparse.grad = grad
        w_dense.grad = grad.to_dense()
        dense_g = np.zeros(shape, dtype=np_dtype)
        np.add.at(dense_g, np.asarray(ids, dtype=np.int64), vals)
        opt_sparse.step()
        opt_dense.step()
        ref_w, ref_a, sigma = ref_step(ref_w, dense_g, ref_a, lr=case["lr"], **ref_kw(case["opts"]))
        assert_close(w_sparse, ref_w, dtype, f"weights, ids {ids}")
        assert_close(opt_sparse.state[w_sparse]["sum"], ref_a, dtype, f"accumulator, ids {ids}")
        assert_close(opt_sparse.state[w_sparse]["clipping_factor"], sigma, dtype, "sigma")
        assert_close(w_sparse, w_dense.detach().double().numpy(), dtype, "sparse vs dense")
        assert_close(
            opt_sparse.state[w_sparse]["sum"],
            opt_dense.state[w_dense]["sum"].double().numpy(),
            dtype,
            "sparse vs dense accumulator",
        )
    assert opt_sparse.implementation()["sparse"] is True


@st.composite
def embedding_case(draw):
    rows = draw(st.integers(1, 9))
    return dict(
        rows=rows,
        dim=draw(st.integers(1, 4)),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        opts=draw(options()),
        lr=draw(st.sampled_from([0.05, 0.5, 2.0])),
        batches=draw(st.lists(id_multiset(rows), min_size=1, max_size=3)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@given(embedding_case())
def test_sparse_embedding_equals_dense_embedding(case):
    """nn.Embedding(sparse=True) and the same dense embedding, one Clippy each, step for step
    (the uncoalesced gradients autograd makes), against the reference too."""
    dtype, np_dtype = case["dtype"], NP_DTYPE[case["dtype"]]
    rng = np.random.default_rng(case["seed"])
    w0 = random_weights(rng, (case["rows"], case["dim"]), np_dtype)
    embs, opts = [], []
    for sparse in (True, False):
        emb = nn.Embedding(case["rows"], case["dim"], sparse=sparse, dtype=dtype)
        with torch.no_grad():
            emb.weight.copy_(torch.tensor(w0))
        path = {} if sparse else {"foreach": False, "fused": False}
        embs.append(emb)
        opts.append(make_opt(emb.parameters(), case["opts"], case["lr"], **path))
    ref_w, ref_a = w0.copy(), np.full(w0.shape, INIT_ACC, dtype=np_dtype)
    for ids in case["batches"]:
        coef = random_values(rng, (len(ids), case["dim"]), np_dtype)
        for emb, opt in zip(embs, opts):
            opt.zero_grad()
            (emb(torch.tensor(ids, dtype=torch.long)) * torch.tensor(coef)).sum().backward()
            opt.step()
        dense_g = np.zeros(w0.shape, dtype=np_dtype)
        np.add.at(dense_g, np.asarray(ids, dtype=np.int64), coef)
        ref_w, ref_a, _ = ref_step(ref_w, dense_g, ref_a, lr=case["lr"], **ref_kw(case["opts"]))
        sparse_w, dense_w = embs[0].weight, embs[1].weight
        assert_close(sparse_w, dense_w.detach().double().numpy(), dtype, f"ids {ids}")
        assert_close(sparse_w, ref_w, dtype, f"reference, ids {ids}")
        assert_close(opts[0].state[sparse_w]["sum"], ref_a, dtype, f"accumulator, ids {ids}")


def test_sparse_distinct_unsorted_ids_regression():
    """The review's case: ids [3, 1] (distinct, unsorted) moved the wrong rows by 0.27."""
    torch.manual_seed(0)
    a = nn.Embedding(5, 2, sparse=True)
    b = nn.Embedding(5, 2)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = ClippyAdagrad(a.parameters(), lr=1.0), ClippyAdagrad(b.parameters(), lr=1.0)
    coef = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    for emb, opt in ((a, opt_a), (b, opt_b)):
        (emb(torch.tensor([3, 1])) * coef).sum().backward()
        opt.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- dense


@st.composite
def dense_case(draw, dtypes=(torch.float64, torch.float32), max_side=6):
    shapes = draw(
        st.lists(
            st.lists(st.integers(1, max_side), min_size=1, max_size=3).map(tuple),
            min_size=1,
            max_size=4,
        )
    )
    if draw(st.booleans()):
        shapes.append((1,))  # a one-element tensor, as a last layer's bias
    steps = draw(st.integers(1, 3))
    return dict(
        shapes=shapes,
        dtype=draw(st.sampled_from(list(dtypes))),
        opts=draw(options()),
        lrs=[draw(st.sampled_from([1e-3, 0.1, 0.7, 3.0])) for _ in range(steps)],
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def check_dense_path(case, path):
    dtype, np_dtype = case["dtype"], NP_DTYPE[case["dtype"]]
    rng = np.random.default_rng(case["seed"])
    ws = [random_weights(rng, s, np_dtype) for s in case["shapes"]]
    params = [nn.Parameter(torch.tensor(w)) for w in ws]
    opt = make_opt(params, case["opts"], case["lrs"][0], **path)
    accs = [np.full(w.shape, INIT_ACC, dtype=np_dtype) for w in ws]
    for lr in case["lrs"]:
        opt.param_groups[0]["lr"] = lr  # as a scheduler does
        grads = [random_values(rng, w.shape, np_dtype) for w in ws]
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        opt.step()
        for i, g in enumerate(grads):
            ws[i], accs[i], sigma = ref_step(ws[i], g, accs[i], lr=lr, **ref_kw(case["opts"]))
            state = opt.state[params[i]]
            assert_close(params[i], ws[i], dtype, f"weights of {case['shapes'][i]}")
            assert_close(state["sum"], accs[i], dtype, f"accumulator of {case['shapes'][i]}")
            assert_close(state["clipping_factor"], sigma, dtype, "sigma")
    return opt


@pytest.mark.parametrize(
    "path", [{"foreach": False, "fused": False}, {"foreach": True}], ids=["single", "foreach"]
)
@given(case=dense_case())
def test_eager_dense_paths_match_reference(path, case):
    opt = check_dense_path(case, path)
    assert opt.implementation()["dense"] == [
        "single" if path.get("foreach") is False else "foreach"
    ]


@given(case=dense_case())
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_foreach_without_foreach_max_matches_reference(case, monkeypatch_foreach):
    """torch < 2.4 has no torch._foreach_max (nor, before 2.5, _foreach_rsqrt_): the loop that
    replaces them gives the same numbers."""
    check_dense_path(case, {"foreach": True})


@pytest.fixture
def monkeypatch_foreach():
    """Remove the foreach kernels that older torch versions lack, for one test."""
    mp = pytest.MonkeyPatch()
    for name in ("_foreach_max", "_foreach_rsqrt_", "_foreach_copy_"):
        mp.delattr(torch, name, raising=False)
    assert not hasattr(torch, "_foreach_max")
    yield
    mp.undo()


@pytest.fixture
def fused_enabled(monkeypatch):
    """The compiled path, even where the suite switches it off by default (conftest)."""
    pytest.importorskip("torch._inductor")
    if not impl._fused_available(torch.device("cpu")) and not _has_cxx():
        pytest.skip("no C++ compiler for torch.compile on CPU")
    monkeypatch.setenv("MTL_CLIPPY_DISABLE_FUSED", "0")


def _has_cxx() -> bool:
    import shutil

    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


@given(case=dense_case(max_side=40))
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fused_dense_path_matches_reference(case, fused_enabled):
    """The compiled path; sides up to 40 so that some tensors take the multi-threaded kernel."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn: fail instead
        opt = check_dense_path(case, {"fused": True})
    assert opt.implementation() == {
        "dense": ["fused"],
        "sparse": False,
        "sparse_paths": [],
        "fallback": None,
        "groups": [{"dense": ["fused"], "sparse": False, "sparse_paths": [], "fallback": None}],
    }


# ----------------------------------------------------------------------------- compiled path


def _many_scenarios(n: int) -> None:
    """``n`` scenarios (random shapes, dtypes, the four options, learning rates) through one
    process: every one runs the compiled step, none falls back, and each signature compiles
    exactly once (the recompile limit, 8 per code object by default, is never approached)."""
    from torch._dynamo.utils import counters

    rng = random.Random(11)
    graphs_before = counters["stats"]["unique_graphs"]
    signatures = set()
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for k in range(n):
            shapes = [
                tuple(rng.randint(1, 50) for _ in range(rng.randint(1, 3)))
                for _ in range(rng.randint(1, 10))
            ]
            dtype = (torch.float32, torch.float64)[k % 2]
            clip_acc, standard = MODES[k % 3]
            params = [nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
            opt = ClippyAdagrad(
                params,
                lr=rng.choice([0.01, 0.1, 1.0]),
                clip_accumulator_update=clip_acc,
                use_standard_accumulator_update=standard,
                accumulator_relative_threshold=(0.0, 0.01)[k // 3 % 2],
                weight_decay=(0.0, 0.01)[k // 6 % 2],
                fused=None,  # the default choice
            )
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.step()
            used = opt.implementation()
            assert used["dense"] == ["fused"] and used["fallback"] is None, (k, shapes, used)
            failures += [w.compile_failures for w in opt._workspaces.values() if w.compile_failures]
            flags = (k // 3 % 2 == 1, k // 6 % 2 == 1, clip_acc, standard)
            signatures.add((dtype, flags, tuple(shapes)))
    # one compilation per signature, none for the later steps of a scenario
    assert counters["stats"]["unique_graphs"] - graphs_before == len(signatures)
    assert not failures


@pytest.mark.slow
def test_more_signatures_than_the_recompile_limit_never_fall_back(fused_enabled):
    _many_scenarios(10)


@pytest.mark.slow
def test_many_shapes_and_option_sets_in_one_process_never_fall_back(fused_enabled):
    _many_scenarios(36)


def _changing_subsets_run(subsets, shapes, seed=3):
    """One optimizer (fused=True, float64) whose tensors with a gradient are ``subsets[k]`` at
    step k; checks every step against the reference. Returns the optimizer and the warnings."""
    rng = np.random.default_rng(seed)
    ws = [random_weights(rng, s, np.float64) for s in shapes]
    accs = [np.full(w.shape, INIT_ACC) for w in ws]
    params = [nn.Parameter(torch.tensor(w)) for w in ws]
    opts = dict(clip_acc=False, standard=False, acc_rel=0.0, wd=0.0, abs_t=1e-7, rel=0.1)
    opt = make_opt(params, opts, 0.3, fused=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for sub in subsets:
            grads = {i: random_values(rng, ws[i].shape, np.float64) for i in sub}
            for i, p in enumerate(params):
                p.grad = torch.tensor(grads[i]) if i in grads else None
            opt.step()
            for i, g in grads.items():
                ws[i], accs[i], sigma = ref_step(ws[i], g, accs[i], lr=0.3, **ref_kw(opts))
                assert_close(opt.state[params[i]]["clipping_factor"], sigma, torch.float64, "sigma")
            for i, p in enumerate(params):  # the others do not move
                assert_close(p, ws[i], torch.float64, f"weights of {shapes[i]} after {sub}")
                if i in grads:
                    assert_close(opt.state[p]["sum"], accs[i], torch.float64, "accumulator")
    return opt, [w for w in caught if w.category is RuntimeWarning]


def test_a_changing_set_of_tensors_with_gradients_never_falls_back(fused_enabled):
    """Within one optimizer, the tensors that have a gradient change from step to step (a task
    absent from a batch, a branch not taken): more distinct sets than torch.compile's
    recompile limit (8). Each set compiles once, every step runs compiled, none falls back,
    and the numbers are the reference's."""
    import itertools

    subsets = list(itertools.combinations(range(4), 2)) + [(0, 1, 2), (1, 2, 3), (0, 1, 2, 3)]
    subsets += [(0, 3), (1, 2)]  # seen before: their compiled steps are reused
    assert len(set(subsets)) > 8
    opt, warned = _changing_subsets_run(subsets, [(6, 4), (4,), (3, 3), (2, 2, 2)])
    assert not warned, [str(w.message) for w in warned]
    assert opt.implementation()["dense"] == ["fused"]
    assert opt.implementation()["fallback"] is None
    workspace = opt._workspaces[0]
    assert len(workspace.compiled) == len(set(subsets)) and not workspace.compile_failures


def test_beyond_max_compiled_signatures_only_new_ones_take_the_eager_path(monkeypatch):
    """Past ``ClippyWorkspace.MAX_COMPILED`` signatures a new one runs eagerly (one warning,
    recorded as the fallback) while the known ones keep their compiled step. The compiled
    function is replaced by the plain math here (the bookkeeping is what is tested)."""
    made = []

    def plain():
        made.append(1)
        return impl._clippy_math

    monkeypatch.setattr(impl, "_compile_step", plain)
    monkeypatch.setattr(impl.ClippyWorkspace, "MAX_COMPILED", 2)
    subsets = [(0,), (1,), (2,), (0,), (2,)]
    opt, warned = _changing_subsets_run(subsets, [(3, 2), (4,), (2, 2)])
    assert len(made) == 2 and len(opt._workspaces[0].compiled) == 2
    assert len(warned) == 2 and all("more than 2" in str(w.message) for w in warned)
    used = opt.implementation()
    assert used["dense"] == ["fused", "single"] and "more than 2" in used["fallback"]


def test_a_compile_failure_falls_back_once_with_a_warning_and_is_recorded(monkeypatch):
    """A genuine compilation failure (the backend raising) is caught: one RuntimeWarning, the
    eager path gives the same numbers, and implementation() names the fallback and why."""
    from torch._dynamo.exc import BackendCompilerFailed

    def broken():
        def fn(*args):
            raise BackendCompilerFailed(lambda *a: None, RuntimeError("no C++ compiler"), None)

        return fn

    monkeypatch.setattr(impl, "_compile_step", broken)
    torch.manual_seed(0)
    ws = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    grads = [torch.randn_like(w) for w in ws]
    results = []
    for path in ({"fused": True}, {"foreach": False, "fused": False}):
        params = [nn.Parameter(w.clone()) for w in ws]
        opt = ClippyAdagrad(params, lr=0.5, **path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                opt.step()
        results.append((params, opt, [w for w in caught if w.category is RuntimeWarning]))
    (fused_params, fused_opt, warned), (eager_params, _, _) = results
    assert len(warned) == 1 and "could not be compiled" in str(warned[0].message)
    for a, b in zip(fused_params, eager_params):
        assert torch.equal(a, b)
    used = fused_opt.implementation()
    assert used["dense"] == ["single"]
    assert "BackendCompilerFailed" in used["fallback"] and "no C++ compiler" in used["fallback"]


def test_an_error_in_the_step_itself_is_raised_not_hidden(fused_enabled, monkeypatch):
    """Only compilation failures fall back: an error of the step's own math (here a size
    mismatch, which dynamo finds while tracing) propagates, with no warning and no fallback."""

    def buggy_step(params, grads, accs, scalars, *flags):
        return [torch.amin(w + torch.ones(w.shape[0] + 1, dtype=w.dtype)) for w in params]

    monkeypatch.setattr(impl, "_clippy_math", buggy_step)
    p = nn.Parameter(torch.randn(3, 2))
    opt = ClippyAdagrad([p], lr=0.1, fused=True)
    p.grad = torch.randn(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(RuntimeError, match="size"):
            opt.step()
    assert not opt._workspaces[0].compile_failures and opt.implementation()["fallback"] is None


def test_implementation_reports_paths_per_group():
    dense = nn.Linear(2, 2)
    emb = nn.Embedding(6, 2, sparse=True)
    opt = ClippyAdagrad(
        [
            {"params": dense.parameters(), "foreach": True},
            {"params": emb.parameters(), "foreach": False, "fused": False},
        ],
        lr=0.1,
    )
    assert opt.implementation()["dense"] == []
    (dense(emb(torch.tensor([4, 1]))).sum()).backward()
    opt.step()
    used = opt.implementation()
    # the sparse kernel where it can be built here; else the eager path, and the reason
    kernel = _sparse_kernel.sparse_step() is not None
    why = None if kernel else _sparse_kernel.failure()
    assert used["dense"] == ["foreach"] and used["sparse"] is True and used["fallback"] == why
    assert used["groups"][0] == {
        "dense": ["foreach"],
        "sparse": False,
        "sparse_paths": [],
        "fallback": None,
    }
    assert used["groups"][1] == {
        "dense": [],
        "sparse": True,
        "sparse_paths": ["kernel" if kernel else "eager"],
        "fallback": why,
    }


# ----------------------------------------------------------------------------- a sweep


@pytest.mark.slow
def test_nine_job_sweep_in_one_process_never_falls_back(tmp_path):
    """`python train.py -m model=sb,ncf,lr optim=clippy,adam,adagrad` with the compiled path
    allowed: every Clippy job's metrics.json says its dense steps ran the compiled path, with
    no fallback (the jobs of a sweep share one process)."""
    import json
    import os
    import subprocess
    import sys

    from app_helpers import ROOT

    env = {**os.environ, "MTL_CLIPPY_DISABLE_FUSED": "0", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            "model=sb,ncf,lr",
            "optim=clippy,adam,adagrad",
            "data.train_rows=2000",
            "data.test_rows=1000",
            "data.batch_size=256",
            "trainer.max_epochs=1",
            f"paths.data_dir={tmp_path}/data",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = [
        json.loads(p.read_text()) for p in tmp_path.glob("outputs/multirun/*/*/metrics.json")
    ]
    assert len(metrics) == 9
    clippy = [m for m in metrics if m["optim"] == "clippy"]
    assert {m["model"] for m in clippy} == {"sb", "ncf", "lr"}
    for m in clippy:
        path = m["optimizer_path"]
        assert m["status"] == "completed", m["error"]
        assert "fused" in path["dense"] and path["fallback"] is None, (m["model"], path)
        assert set(path["dense"]) == {"fused"}, (m["model"], path)
    assert all(m["optimizer_path"] is None for m in metrics if m["optim"] != "clippy")

"""ClippyAdagrad against an independent NumPy implementation of the reference algorithm.

The NumPy reference below is written from ``shared/docs/clippy.md`` (TFRS ClippyAdagrad
semantics), elementwise and with no shared code with the optimizer.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from clippy_reference import reference_step
from mtl_clippy.optim import ClippyAdagrad, clippy_adagrad
from mtl_clippy.optim import clippy as impl

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,)]


# ----------------------------------------------------------------------------- reference


OPTION_GRID = [
    dict(clip_acc=c, standard=s, acc_rel=ar, wd=wd, abs_t=ab, rel=rl)
    for (c, s), ar, wd, ab, rl in itertools.product(
        [(False, False), (True, False), (False, True)],
        [0.0, 0.05],
        [0.0, 0.01],
        [1e-7, 1e-2],
        [0.1, 0.5],
    )
]


def make_tensors(dtype, seed=0):
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=s).astype(dtype) for s in SHAPES]
    grads = [
        [(rng.normal(size=s) * 10 ** rng.uniform(-3, 1)).astype(dtype) for s in SHAPES]
        for _ in range(6)
    ]
    for gs in grads:  # some exact zeros, as ReLU layers produce
        gs[0][0, :] = 0
    return ws, grads


def run_both(opts, dtype, torch_dtype, path_kw, lrs=None, init_acc=0.1):
    ws, grads = make_tensors(dtype)
    params = [nn.Parameter(torch.tensor(w, dtype=torch_dtype)) for w in ws]
    opt = ClippyAdagrad(
        params,
        lr=0.3,
        initial_accumulator_value=init_acc,
        variable_relative_threshold=opts["rel"],
        accumulator_relative_threshold=opts["acc_rel"],
        absolute_threshold=opts["abs_t"],
        epsilon=1e-7,
        clip_accumulator_update=opts["clip_acc"],
        use_standard_accumulator_update=opts["standard"],
        weight_decay=opts["wd"],
        **path_kw,
    )
    ref_w = [w.copy() for w in ws]
    ref_a = [np.full_like(w, init_acc) for w in ws]
    for step, gs in enumerate(grads):
        lr = 0.3 if lrs is None else lrs[step]
        for g_param, pg in zip(opt.param_groups, [lr]):
            g_param["lr"] = pg
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g, dtype=torch_dtype)
        opt.step()
        for i, g in enumerate(gs):
            ref_w[i], ref_a[i], sigma = reference_step(
                ref_w[i], g, ref_a[i], lr=lr, eps=1e-7, rel=opts["rel"], acc_rel=opts["acc_rel"],
                abs_t=opts["abs_t"], wd=opts["wd"], clip_acc=opts["clip_acc"], standard=opts["standard"],
            )  # fmt: skip
            got_sigma = opt.state[params[i]]["clipping_factor"]
            assert got_sigma.dim() == 0 and got_sigma.dtype == torch_dtype
            np.testing.assert_allclose(got_sigma.double().item(), sigma, rtol=RTOL[dtype], atol=0)
    return params, opt, ref_w, ref_a


RTOL = {np.float64: 1e-12, np.float32: 1e-6}


def assert_matches(params, opt, ref_w, ref_a, dtype):
    """Relative tolerance per element, plus an absolute one at the tensor's scale (an element
    that nearly cancels to 0 carries its neighbours' rounding error, a few ulps of ~1)."""
    for p, rw, ra in zip(params, ref_w, ref_a):
        tol = RTOL[dtype]
        np.testing.assert_allclose(p.detach().numpy(), rw, rtol=tol, atol=tol * np.abs(rw).max())
        np.testing.assert_allclose(opt.state[p]["sum"].numpy(), ra, rtol=tol, atol=tol * ra.max())


PATHS = {
    "single": dict(foreach=False, fused=False),
    "foreach": dict(foreach=True),
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize(
    "opts", OPTION_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_float64_matches_reference_all_options(opts, path):
    params, opt, rw, ra = run_both(opts, np.float64, torch.float64, PATHS[path])
    assert_matches(params, opt, rw, ra, np.float64)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize(
    "opts", OPTION_GRID[::5], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_float32_matches_reference(opts, path):
    params, opt, rw, ra = run_both(opts, np.float32, torch.float32, PATHS[path])
    assert_matches(params, opt, rw, ra, np.float32)


def test_clipping_is_active_in_the_grid():
    """The grid must exercise both clipped (sigma < 1) and unclipped steps, or it tests little."""
    sigmas = []
    for opts in OPTION_GRID[:8]:
        params, opt, *_ = run_both(opts, np.float64, torch.float64, PATHS["single"])
        sigmas += [opt.state[p]["clipping_factor"].item() for p in params]
    assert min(sigmas) < 0.5
    assert max(sigmas) == 1.0


def test_lr_schedule_and_param_groups_match_reference():
    ws, grads = make_tensors(np.float64, seed=3)
    group_lrs = [0.5, 0.05]
    params = [nn.Parameter(torch.tensor(w)) for w in ws]
    opt = ClippyAdagrad(
        [{"params": params[:2], "lr": group_lrs[0]}, {"params": params[2:], "lr": group_lrs[1]}],
        variable_relative_threshold=0.2,
        absolute_threshold=1e-3,
        foreach=False,
        fused=False,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.7**s)
    ref_w = [w.copy() for w in ws]
    ref_a = [np.full_like(w, 0.1) for w in ws]
    for step, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g)
        opt.step()
        for i, g in enumerate(gs):
            lr = group_lrs[0 if i < 2 else 1] * 0.7**step
            ref_w[i], ref_a[i], _ = reference_step(
                ref_w[i], g, ref_a[i], lr=lr, eps=1e-7, rel=0.2, acc_rel=0.0, abs_t=1e-3,
                wd=0.0, clip_acc=False, standard=False,
            )  # fmt: skip
        sched.step()
    assert_matches(params, opt, ref_w, ref_a, np.float64)


def test_every_option_is_per_param_group():
    """Param groups with different options (as per-role groups set them: no clipping for the
    embeddings, other thresholds and paths elsewhere) step exactly as separate optimizers."""
    options = [
        dict(
            lr=0.5,
            variable_relative_threshold=math.inf,
            absolute_threshold=math.inf,
            clip_accumulator_update=True,
            foreach=False,
            fused=False,
        ),
        dict(
            lr=0.2,
            initial_accumulator_value=0.3,
            variable_relative_threshold=0.05,
            accumulator_relative_threshold=0.05,
            absolute_threshold=1e-3,
            epsilon=1e-5,
            use_standard_accumulator_update=True,
            weight_decay=0.01,
            foreach=True,
        ),
    ]
    ws, grads = make_tensors(np.float64, seed=5)
    together = [nn.Parameter(torch.tensor(w)) for w in ws]
    apart = [nn.Parameter(torch.tensor(w)) for w in ws]
    opt = ClippyAdagrad(
        [{"params": together[:2], **options[0]}, {"params": together[2:], **options[1]}]
    )
    opts = [ClippyAdagrad(apart[:2], **options[0]), ClippyAdagrad(apart[2:], **options[1])]
    sigmas = []
    for gs in grads:
        for a, b, g in zip(together, apart, gs):
            a.grad, b.grad = torch.tensor(g), torch.tensor(g)
        opt.step()
        for o in opts:
            o.step()
        sigmas.append([opt.state[p]["clipping_factor"].item() for p in together])
    for i, (a, b) in enumerate(zip(together, apart)):
        other = opts[0 if i < 2 else 1]
        assert torch.equal(a, b)
        for key in ("sum", "clipping_factor", "step"):
            assert torch.equal(opt.state[a][key], other.state[b][key])
    assert opt.implementation()["groups"][0]["dense"] == ["single"]
    assert opt.implementation()["groups"][1]["dense"] == ["foreach"]
    assert all(s[:2] == [1.0, 1.0] for s in sigmas), "infinite thresholds never clip"
    assert min(min(s[2:]) for s in sigmas) < 1, "the other group must clip"


# ----------------------------------------------------------------------------- paths agree


def _train(path_kw, dtype=torch.float32, steps=5, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3), nn.Linear(3, 0)).to(dtype)
    extra = nn.Parameter(torch.zeros(4, 0, dtype=dtype))  # empty, has a grad
    opts = {"lr": 0.2, "variable_relative_threshold": 0.3, **kw}
    opt = ClippyAdagrad([*model.parameters(), extra], **opts, **path_kw)
    x = torch.randn(32, 20, dtype=dtype)
    for _ in range(steps):
        opt.zero_grad()
        out = model[:3](x)
        (out.pow(2).mean() + model[3](out).sum() + extra.sum()).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.filterwarnings(
    "ignore:Initializing zero-element tensors is a no-op:UserWarning"
)  # the parameter set includes an empty layer on purpose (empty tensors must step)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kw", [{}, {"clip_accumulator_update": True, "weight_decay": 0.01}])
def test_foreach_equals_per_tensor(dtype, kw):
    a, oa = _train(PATHS["single"], dtype, **kw)
    b, ob = _train(PATHS["foreach"], dtype, **kw)
    # bfloat16: both paths compute in bfloat16, but foreach kernels round compound operations
    # once where eager rounds each; they agree to a few bfloat16 ulps (1 ulp = 0.8 %).
    tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 3e-2}[dtype]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * 1e-2)
    sa = [oa.state[p]["clipping_factor"] for p in oa.param_groups[0]["params"]]
    sb = [ob.state[p]["clipping_factor"] for p in ob.param_groups[0]["params"]]
    torch.testing.assert_close(torch.stack(sa), torch.stack(sb), rtol=tol, atol=0)


@pytest.mark.filterwarnings(
    "ignore:Initializing zero-element tensors is a no-op:UserWarning"
)  # the parameter set includes an empty layer on purpose (empty tensors must step)
def test_fused_equals_per_tensor():
    """The torch.compile'd path (compiles once, some seconds)."""
    pytest.importorskip("torch._inductor")
    kw = {"lr": 1.0, "variable_relative_threshold": 0.05, "accumulator_relative_threshold": 1e-4}
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        a, _ = _train(PATHS["single"], dtype, steps=4, **kw)
        b, ob = _train({"fused": True}, dtype, steps=4, **kw)
        for x, y in zip(a, b):
            torch.testing.assert_close(
                x, y, rtol=tol, atol=tol * float(x.abs().amax(dim=None) if x.numel() else 0)
            )
        sig = [ob.state[p]["clipping_factor"] for p in ob.param_groups[0]["params"]]
        assert all(s.dim() == 0 for s in sig) and min(s.item() for s in sig) < 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "opts", OPTION_GRID[::3], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
)
def test_fused_matches_reference_all_options(opts, monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 64)
    params, opt, rw, ra = run_both(opts, np.float64, torch.float64, {"fused": True})
    assert_matches(params, opt, rw, ra, np.float64)


# ----------------------------------------------------------------------------- sparse


@pytest.mark.parametrize("module", ["embedding", "embedding_bag"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"clip_accumulator_update": True, "accumulator_relative_threshold": 0.01},
        {"use_standard_accumulator_update": True, "weight_decay": 0.01},
    ],
)
def test_sparse_equals_dense(module, kw):
    torch.manual_seed(0)
    results = {}
    for sparse in (True, False):
        torch.manual_seed(1)
        if module == "embedding":
            emb = nn.Embedding(50, 6, sparse=sparse, dtype=torch.float64)
        else:
            emb = nn.EmbeddingBag(50, 6, mode="sum", sparse=sparse, dtype=torch.float64)
        opt = ClippyAdagrad(
            emb.parameters(), lr=0.5, variable_relative_threshold=0.2, **kw, **PATHS["single"]
        )
        gen = torch.Generator().manual_seed(2)
        sigmas = []
        for _ in range(5):
            ids = torch.randint(0, 12, (8, 4), generator=gen)  # rows 12..49 never touched
            ids[0, :] = 3  # duplicates
            opt.zero_grad()
            out = emb(ids)
            (out.sin().sum() * 3).backward()
            if sparse:
                assert emb.weight.grad.is_sparse and not emb.weight.grad.is_coalesced()
            opt.step()
            sigmas.append(opt.state[emb.weight]["clipping_factor"].item())
        results[sparse] = (
            emb.weight.detach().clone(),
            opt.state[emb.weight]["sum"].clone(),
            sigmas,
        )
    (ws, as_, ss), (wd, ad, sd) = results[True], results[False]
    assert min(ss) < 1, "the test must exercise clipping"
    torch.testing.assert_close(ws, wd, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(as_, ad, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(ss, sd, rtol=1e-13)
    if "weight_decay" not in kw:
        assert torch.all(as_[12:] == 0.1), "untouched accumulator rows must not change"


def test_sparse_coalesced_gradient_and_empty():
    w = nn.Parameter(torch.randn(10, 3, dtype=torch.float64))
    w_dense = nn.Parameter(w.detach().clone())
    opt = ClippyAdagrad([w], lr=1.0)
    opt_d = ClippyAdagrad([w_dense], lr=1.0, **PATHS["single"])
    g = torch.sparse_coo_tensor(
        [[1, 4]], torch.randn(2, 3, dtype=torch.float64), (10, 3)
    ).coalesce()
    w.grad, w_dense.grad = g, g.to_dense()
    opt.step()
    opt_d.step()
    torch.testing.assert_close(w.detach(), w_dense.detach(), rtol=1e-14, atol=0)
    # an empty sparse gradient moves nothing and leaves sigma = 1
    before = w.detach().clone()
    w.grad = torch.sparse_coo_tensor(
        torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.float64), (10, 3)
    )
    opt.step()
    assert torch.equal(w.detach(), before)
    assert opt.state[w]["clipping_factor"].item() == 1.0


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("path", sorted(PATHS))
def test_checkpoint_resume_is_identical(path, tmp_path):
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Embedding(30, 4, sparse=True), nn.Linear(4, 2))
        return m, ClippyAdagrad(m.parameters(), lr=0.3, clip_accumulator_update=True, **PATHS[path])

    def batch(i):
        gen = torch.Generator().manual_seed(100 + i)
        return torch.randint(0, 30, (16,), generator=gen)

    def train(m, opt, steps):
        for i in steps:
            opt.zero_grad()
            m(batch(i)).pow(2).sum().backward()
            opt.step()

    m1, o1 = make()
    train(m1, o1, range(8))
    m2, o2 = make()
    train(m2, o2, range(4))
    torch.save({"model": m2.state_dict(), "optim": o2.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    m3, o3 = make()
    m3.load_state_dict(ck["model"])
    o3.load_state_dict(ck["optim"])
    train(m3, o3, range(4, 8))
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(o1.state[a]["sum"], o3.state[b]["sum"])
        assert o3.state[b]["step"].item() == 8


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("path", sorted(PATHS))
def test_zero_gradient_moves_nothing(path):
    w = nn.Parameter(torch.randn(5, 3))
    before = w.detach().clone()
    opt = ClippyAdagrad([w], lr=1.0, **PATHS[path])
    w.grad = torch.zeros_like(w)
    opt.step()
    assert torch.equal(w.detach(), before)
    assert opt.state[w]["clipping_factor"].item() == 1.0
    assert torch.all(opt.state[w]["sum"] == 0.1)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_zero_weights_without_absolute_threshold_freeze_without_nan(path):
    w = nn.Parameter(torch.zeros(4, 4))
    opt = ClippyAdagrad([w], lr=1.0, absolute_threshold=0.0, **PATHS[path])
    w.grad = torch.randn(4, 4)
    w.grad[0, 0] = 0.0  # a zero update with a zero bound: s = 1, not NaN
    opt.step()
    assert opt.state[w]["clipping_factor"].item() == 0.0
    assert torch.all(w.detach() == 0) and torch.isfinite(opt.state[w]["sum"]).all()


@pytest.mark.parametrize("path", sorted(PATHS))
def test_empty_tensor_and_params_without_grad(path):
    empty = nn.Parameter(torch.zeros(0, 5))
    frozen = nn.Parameter(torch.ones(3))
    live = nn.Parameter(torch.ones(3))
    opt = ClippyAdagrad([empty, frozen, live], lr=0.1, **PATHS[path])
    empty.grad = torch.zeros(0, 5)
    live.grad = torch.ones(3)
    opt.step()
    assert opt.state[empty]["clipping_factor"].item() == 1.0
    assert torch.equal(frozen.detach(), torch.ones(3))
    # State is created on a parameter's first step: the frozen one has none (no step counted,
    # no accumulator), as torch.optim's lazily initialised optimizers.
    assert frozen not in opt.state
    assert not torch.equal(live.detach(), torch.ones(3))


def test_clipping_bound_holds_and_direction_is_kept():
    """sigma is the largest scale keeping every element inside its bound."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(200, dtype=torch.float64))
    opt = ClippyAdagrad(
        [w], lr=1.0, variable_relative_threshold=0.1, absolute_threshold=1e-3, **PATHS["single"]
    )
    w0 = w.detach().clone()
    w.grad = torch.randn(200, dtype=torch.float64)
    opt.step()
    move = (w.detach() - w0).abs()
    bound = 1e-3 + 0.1 * w0.abs()
    assert torch.all(move <= bound * (1 + 1e-12))
    assert torch.isclose(move / bound, torch.ones((), dtype=torch.float64)).any(), (
        "not the largest scale"
    )
    unclipped = 1.0 * w.grad / math.sqrt(0.1 + 1e-7)
    cos = torch.nn.functional.cosine_similarity(w0 - w.detach(), unclipped, dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-12)


def test_step_runs_on_meta_tensors_so_it_never_reads_values_on_the_host():
    """A step that called .item() or branched on a tensor value would fail on 'meta' tensors."""
    for path in PATHS.values():
        w = nn.Parameter(torch.empty(64, 8, device="meta"))
        b = nn.Parameter(torch.empty(8, device="meta"))
        opt = ClippyAdagrad(
            [w, b], lr=0.1, accumulator_relative_threshold=0.1, clip_accumulator_update=True, **path
        )
        w.grad = torch.empty(64, 8, device="meta")
        b.grad = torch.empty(8, device="meta")
        opt.step()
        assert opt.state[w]["clipping_factor"].device.type == "meta"


def test_functional_form_matches_class():
    ws, grads = make_tensors(np.float64)
    a = [torch.tensor(w) for w in ws]
    acc = [torch.full_like(t, 0.1) for t in a]
    sig = clippy_adagrad(a, [torch.tensor(g) for g in grads[0]], acc, lr=0.3)
    for t, w, g, s in zip(a, ws, grads[0], sig):
        rw, _, rs = reference_step(
            w,
            g,
            np.full_like(w, 0.1),
            lr=0.3,
            eps=1e-7,
            rel=0.1,
            acc_rel=0.0,
            abs_t=1e-7,
            wd=0.0,
            clip_acc=False,
            standard=False,
        )
        np.testing.assert_allclose(t.numpy(), rw, rtol=1e-12)
        assert s.item() == pytest.approx(rs, rel=1e-12)


# ----------------------------------------------------------------------------- arguments


def test_functional_default_without_workspace_compiles_nothing(monkeypatch):
    """``clippy_adagrad`` with its defaults and no workspace takes the eager path (a compiled
    step would be thrown away after the call): nothing is compiled, even where the compiled
    path is available; it equals the class on the per-tensor path bit for bit."""

    def no_compiling():
        raise AssertionError("compiled although no workspace keeps the code")

    monkeypatch.setenv("MTL_CLIPPY_DISABLE_FUSED", "0")
    monkeypatch.setattr(impl, "_FUSED_STATUS", {"cpu": True})  # as with a C++ compiler
    monkeypatch.setattr(impl, "_compile_step", no_compiling)
    ws, grads = make_tensors(np.float64)
    a = [torch.tensor(w) for w in ws]
    acc = [torch.full_like(t, 0.1) for t in a]
    params = [nn.Parameter(torch.tensor(w)) for w in ws]
    opt = ClippyAdagrad(params, lr=0.3, foreach=False, fused=False)
    record = impl._new_record()
    for g in grads[:2]:
        clippy_adagrad(a, [torch.tensor(x) for x in g], acc, lr=0.3, record=record)
        for p, x in zip(params, g):
            p.grad = torch.tensor(x)
        opt.step()
    assert record["dense"] == {"single"}
    for t, p in zip(a, params):
        assert torch.equal(t, p.detach())


def test_deprecated_clippy_step_is_the_per_tensor_functional_form():
    """The earlier public ``clippy_step`` still works, with a DeprecationWarning, and gives
    the numbers of ``clippy_adagrad(..., foreach=False, fused=False)``."""
    from mtl_clippy.optim import clippy_step

    ws, grads = make_tensors(np.float32)
    kw = dict(lr=0.5, variable_relative_threshold=0.05, weight_decay=0.01)
    a, b = ([torch.tensor(w) for w in ws] for _ in range(2))
    acc_a, acc_b = ([torch.full_like(t, 0.1) for t in a] for _ in range(2))
    for g in grads[:2]:
        with pytest.warns(DeprecationWarning, match="clippy_adagrad"):
            sa = clippy_step(a, [torch.tensor(x) for x in g], acc_a, **kw)
        sb = clippy_adagrad(
            b, [torch.tensor(x) for x in g], acc_b, foreach=False, fused=False, **kw
        )
        for x, y in zip(a + acc_a + sa, b + acc_b + sb):
            assert torch.equal(x, y)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"lr": -0.1}, "lr must be >= 0"),
        ({"variable_relative_threshold": -1}, "variable_relative_threshold"),
        ({"accumulator_relative_threshold": -1e-3}, "accumulator_relative_threshold"),
        ({"absolute_threshold": -1e-7}, "absolute_threshold"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"initial_accumulator_value": -0.1}, "initial_accumulator_value"),
        ({"weight_decay": float("nan")}, "weight_decay"),
        ({"lr": "fast"}, "lr must be a number"),
        (
            {"clip_accumulator_update": True, "use_standard_accumulator_update": True},
            "cannot be combined",
        ),
        ({"fused": True, "foreach": True}, "exclusive"),
    ],
)
def test_invalid_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        ClippyAdagrad([nn.Parameter(torch.ones(2))], **kw)


def test_invalid_param_group_added_later():
    opt = ClippyAdagrad([nn.Parameter(torch.ones(2))])
    with pytest.raises(ValueError, match="absolute_threshold"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "absolute_threshold": -1})


def test_path_selection(monkeypatch):
    from mtl_clippy.optim import clippy as impl

    def choose(group, device, dtype):
        return impl._choose_path(group["foreach"], group["fused"], device, dtype)

    cpu = torch.device("cpu")
    g = {"fused": None, "foreach": None}
    monkeypatch.setitem(impl._FUSED_STATUS, "cpu", True)
    monkeypatch.delenv("MTL_CLIPPY_DISABLE_FUSED", raising=False)
    assert choose(g, cpu, torch.float32) == "fused"
    assert choose(g, cpu, torch.bfloat16) == "single"  # compiled bf16 would not round per op
    assert choose({"fused": None, "foreach": False}, cpu, torch.float32) == "single"
    assert choose({"fused": None, "foreach": True}, cpu, torch.float32) == "foreach"
    assert choose({"fused": True, "foreach": None}, cpu, torch.bfloat16) == "foreach"
    monkeypatch.setenv("MTL_CLIPPY_DISABLE_FUSED", "1")
    assert choose(g, cpu, torch.float32) == "single"
    assert choose(g, torch.device("cuda"), torch.float32) == "foreach"


def test_grouping_by_device_and_dtype():
    """Pins what the optimizer relies on in torch's private
    ``Optimizer._group_tensors_by_device_and_dtype`` (used once, in ``_group_by_device_and_dtype``):
    parallel lists are split by the first list's device and dtype, every group keeps its
    tensors (the same objects, not copies) in input order, with their positions in the input,
    and each position is in exactly one group."""
    from mtl_clippy.optim import clippy as impl

    a, b, d = torch.zeros(2), torch.zeros(3, dtype=torch.float64), torch.ones(5)
    c = torch.zeros(4, device="meta")
    params, grads = [a, b, c, d], [a + 1, b + 1, torch.zeros(4, device="meta"), d + 1]
    groups = impl._group_by_device_and_dtype([params, grads])
    found = {}
    for (ps, gs), where in groups:
        assert len(ps) == len(gs) == len(where) and where == sorted(where)
        assert all(p is params[i] and g is grads[i] for p, g, i in zip(ps, gs, where))
        assert len({(p.device, p.dtype) for p in ps}) == 1
        found[(ps[0].device, ps[0].dtype)] = where
    assert found == {
        (torch.device("cpu"), torch.float32): [0, 3],
        (torch.device("cpu"), torch.float64): [1],
        (torch.device("meta"), torch.float32): [2],
    }
    # The raw helper's own contract: keys (device, dtype), values (lists, indices).
    raw = torch.optim.Optimizer._group_tensors_by_device_and_dtype([params], with_indices=True)
    assert raw[(torch.device("cpu"), torch.float32)] == ([[a, d]], [0, 3])


@pytest.mark.parametrize("path", sorted(PATHS))
def test_infinite_thresholds_switch_clipping_off(path):
    """optim=clippy_noclip: sigma is 1 everywhere, even for zero weights (inf * 0 is NaN)."""
    w = nn.Parameter(torch.tensor([[0.0, 1.0, -2.0], [3.0, 0.0, 1e-9]], dtype=torch.float64))
    w0 = w.detach().clone()
    opt = ClippyAdagrad(
        [w],
        lr=10.0,
        variable_relative_threshold=math.inf,
        absolute_threshold=math.inf,
        **PATHS[path],
    )
    w.grad = torch.tensor([[1.0, -1.0, 2.0], [0.0, 5.0, -3.0]], dtype=torch.float64)
    opt.step()
    assert opt.state[w]["clipping_factor"].item() == 1.0
    expected = w0 - 10.0 * w.grad / torch.sqrt(torch.tensor(0.1 + 1e-7, dtype=torch.float64))
    torch.testing.assert_close(w.detach(), expected, rtol=1e-14, atol=0)

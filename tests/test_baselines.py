"""The paper's baselines (issue 14, item 2), each against its definition on small cases:
adaptive gradient clipping (``grad_clip=agc``), LAMB (``optim=lamb``) and gradient-norm
clipping (``grad_clip=norm``); their bad inputs; and a tiny run of ``python train.py`` with
each new optimizer / clipping choice.

The references are written from the definitions (docs/optimizers.md), in NumPy with plain
loops over units and steps, not from the code they check.
"""

from __future__ import annotations

import copy
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hydra
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf
from torch import nn

import mtl_clippy.train  # registers the config resolvers too
from app_helpers import ROOT, TINY, only_run, read_metrics, run_train
from mtl_clippy import build as builder
from mtl_clippy import run_checks
from mtl_clippy.callbacks import AdaptiveGradientClipping
from mtl_clippy.callbacks.agc import adaptive_clip_, tower_heads
from mtl_clippy.config_checks import RULES, check_config, problem
from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.errors import ConfigError
from mtl_clippy.models import ESMM, LogisticRegression, MMoE, SharedBottom

CONFIGS = ROOT / "configs"
META = DatasetMetadata(vocab_sizes=(4,) * 16)
SMALL = ["model.embed_dim=4", "model.bottom_dims=[8]", "model.tower_dims=[4]"]
#: A few steps of a small model on a few hundred generated rows (seconds per run).
SHORT = ["data.train_rows=600", "data.test_rows=300", "data.batch_size=64",
         "trainer.max_epochs=1", "trainer.limit_train_batches=3",
         "trainer.enable_model_summary=false", *SMALL]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One data cache for the short runs (the generated rows are made once)."""
    return tmp_path_factory.mktemp("data")


def _compose(overrides: list[str]):
    """The composed config of ``overrides`` (composed once per list: ~0.3 s each)."""
    return _composed(tuple(overrides)).copy()


@functools.cache
def _composed(overrides: tuple[str, ...]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# ----------------------------------------------------------------------------- AGC


def agc_reference(w: np.ndarray, g: np.ndarray, clipping: float, eps: float) -> np.ndarray:
    """AGC from its definition, one unit at a time: a unit is a slice ``w[i]`` for two or
    more dimensions, the whole tensor otherwise; a unit whose ``||g_i|| / max(||W_i||, eps)``
    exceeds ``clipping`` is rescaled to ``clipping * max(||W_i||, eps) / ||g_i|| * g_i``."""
    w, out = np.asarray(w, dtype=np.float64), np.array(g, dtype=np.float64)
    units = [...] if w.ndim <= 1 else list(range(w.shape[0]))
    for i in units:
        w_norm = math.sqrt(float(np.sum(w[i] ** 2)))
        g_norm = math.sqrt(float(np.sum(out[i] ** 2)))
        floor = max(w_norm, eps)
        if g_norm / floor > clipping:
            out[i] = out[i] * (clipping * floor / g_norm)
    return out


SHAPES = st.sampled_from([(), (1,), (7,), (1, 1), (3, 5), (6, 2), (10, 4), (2, 3, 4)])


@st.composite
def clipping_cases(draw):
    """A weight and a gradient of one shape, each at its own scale (1e-4 .. 1e4), some of
    their units zero, with a threshold and a weight-norm floor."""
    shape = draw(SHAPES)
    n = int(np.prod(shape)) if shape else 1
    elements = st.integers(-1000, 1000).map(lambda k: k / 1000)  # no subnormal products
    w = np.array(draw(st.lists(elements, min_size=n, max_size=n))).reshape(shape)
    g = np.array(draw(st.lists(elements, min_size=n, max_size=n))).reshape(shape)
    w *= 10.0 ** draw(st.integers(-4, 4))
    g *= 10.0 ** draw(st.integers(-4, 4))
    if len(shape) >= 2:  # zero rows: untouched embedding rows, a zero-initialised unit
        for row in range(shape[0]):
            if draw(st.booleans()) and draw(st.booleans()):
                w[row] = 0.0
            if draw(st.booleans()) and draw(st.booleans()):
                g[row] = 0.0
    elif draw(st.integers(0, 5)) == 0:
        w = np.zeros_like(w)
    elif draw(st.integers(0, 5)) == 0:
        g = np.zeros_like(g)
    clipping = 10.0 ** draw(st.floats(-3, 0.5))
    eps = 10.0 ** draw(st.floats(-6, -1))
    return w, g, clipping, eps


def _param(w: np.ndarray, g: np.ndarray) -> nn.Parameter:
    p = nn.Parameter(torch.tensor(w, dtype=torch.float64))
    p.grad = torch.tensor(g, dtype=torch.float64)
    return p


@given(clipping_cases())
def test_agc_matches_its_definition(case):
    """Every shape (scalar, vector, matrix, embedding-like rows with zero rows, 3-D), weight
    and gradient scales over 8 orders of magnitude, thresholds and floors: the clipped
    gradient is the definition's, the weights unchanged."""
    w, g, clipping, eps = case
    p = _param(w, g)
    adaptive_clip_([p], clipping, eps)
    expected = agc_reference(w, g, clipping, eps)
    np.testing.assert_allclose(p.grad.numpy(), expected, rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(p.detach().numpy(), w)


@given(clipping_cases())
def test_agc_leaves_units_within_the_bound_unchanged(case):
    """A unit within the bound (zero gradients included) keeps its gradient bit for bit;
    a clipped unit ends exactly at the bound, in the same direction."""
    w, g, clipping, eps = case
    p = _param(w, g)
    adaptive_clip_([p], clipping, eps)
    out = p.grad.numpy()
    units = [...] if w.ndim <= 1 else list(range(w.shape[0]))
    for i in units:
        floor = max(float(np.linalg.norm(w[i])), eps)
        g_norm = float(np.linalg.norm(g[i]))
        if g_norm <= clipping * floor * (1 - 1e-9):
            np.testing.assert_array_equal(out[i], g[i])
        elif g_norm > clipping * floor * (1 + 1e-9):
            assert np.linalg.norm(out[i]) == pytest.approx(clipping * floor, rel=1e-12)
            np.testing.assert_allclose(out[i] * g_norm, g[i] * np.linalg.norm(out[i]), rtol=1e-9)


def test_agc_agrees_with_pytorch_optimizer():
    """The library's own AGC function (pytorch_optimizer's ``agc``, which returns a new
    tensor) gives the same gradients as ours (in place, batched) for vectors and matrices."""
    from pytorch_optimizer.optimizer.agc import agc

    gen = torch.Generator().manual_seed(0)
    for shape in [(5,), (8, 3), (20, 4)]:
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.05
        if len(shape) == 2:
            w[0] = 0.0
            g[1] = 0.0
        p = nn.Parameter(w.clone())
        p.grad = g.clone()
        adaptive_clip_([p], 0.02, 1e-3)
        expected = agc(w, g, agc_eps=1e-3, agc_clip_val=0.02, eps=1e-12)
        torch.testing.assert_close(p.grad, expected, rtol=1e-12, atol=0)


def test_agc_batches_many_tensors_and_skips_missing_gradients():
    """Vectors, matrices and a parameter without a gradient together: each as alone."""
    gen = torch.Generator().manual_seed(1)
    params, expected = [], []
    for shape in [(4,), (3, 2), (), (6,), (5, 5)]:
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        params.append(_param(w.numpy(), g.numpy()))
        expected.append(agc_reference(w.numpy(), g.numpy(), 0.1, 1e-3))
    idle = nn.Parameter(torch.ones(3, dtype=torch.float64))
    adaptive_clip_([*params, idle], 0.1, 1e-3)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.grad.numpy(), e, rtol=1e-12)
    assert idle.grad is None


def test_agc_clips_sparse_embedding_gradients_exactly():
    """``nn.Embedding(sparse=True)``, a batch with repeated ids: the sparse gradient is
    coalesced and each touched row clipped against its row of the table, the same numbers
    as AGC of the dense gradient (untouched rows stay zero)."""
    torch.manual_seed(0)
    table = nn.Embedding(12, 3, sparse=True).double()
    with torch.no_grad():
        table.weight[2] = 0.0  # a zero row: the floor eps applies
    ids = torch.tensor([[1, 2, 2, 5], [5, 5, 9, 1]])
    (table(ids) ** 2 * torch.linspace(1, 40, 3, dtype=torch.float64)).sum().backward()
    assert table.weight.grad.is_sparse and not table.weight.grad.is_coalesced()
    dense = table.weight.grad.to_dense().numpy()
    adaptive_clip_([table.weight], 0.05, 1e-3)
    grad = table.weight.grad
    assert grad.is_sparse and grad.is_coalesced()
    expected = agc_reference(table.weight.detach().numpy(), dense, 0.05, 1e-3)
    np.testing.assert_allclose(grad.to_dense().numpy(), expected, rtol=1e-12)
    assert not np.allclose(expected, dense)  # some rows were clipped


def test_agc_treats_a_vector_with_a_sparse_gradient_as_one_unit():
    """A vector is one unit whether its gradient is dense or sparse (uncoalesced, a
    repeated index): the same numbers as AGC of the dense gradient."""
    w = np.array([0.5, -1.0, 0.0, 2.0, 0.1])
    grad = torch.sparse_coo_tensor([[0, 3, 0]], [3.0, -4.0, 1.0], (5,), dtype=torch.float64)
    p = nn.Parameter(torch.tensor(w))
    p.grad = grad
    adaptive_clip_([p], 0.1, 1e-3)
    expected = agc_reference(w, grad.to_dense().numpy(), 0.1, 1e-3)
    np.testing.assert_allclose(p.grad.to_dense().numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_agc_scales_an_exploding_finite_gradient_to_the_bound(dtype):
    """A finite gradient whose sum of squares overflows its own dtype (elements ~1e25 in 32
    or 16 bits): each unit ends at the bound clipping * ||W_i||, not at 0 (an overflowed
    norm reads as inf, and bound / inf would zero the unit's step)."""
    rng = np.random.default_rng(3)
    for shape in [(3, 4), (5,)]:
        w = rng.normal(size=shape)
        g = rng.normal(size=shape) * 1e25
        p = nn.Parameter(torch.tensor(w, dtype=dtype))
        p.grad = torch.tensor(g, dtype=dtype)
        adaptive_clip_([p], 0.01, 1e-3)
        out = p.grad.double().numpy()
        assert np.isfinite(out).all()
        expected = agc_reference(p.detach().double().numpy(), g, 0.01, 1e-3)
        np.testing.assert_allclose(out, expected, rtol=2e-2, atol=0)


def test_agc_keeps_a_zero_half_precision_gradient_zero():
    """float16 weights and gradients of zero, with a bound clipping * eps below float16's
    smallest number (1e-9): the gradient stays 0, never 0 / 0 = NaN; and a factor below
    float16's range (1e-10) still scales a float16 gradient to the bound, not to 0."""
    for shape in [(2, 3), (3,)]:
        p = nn.Parameter(torch.zeros(shape, dtype=torch.float16))
        p.grad = torch.zeros(shape, dtype=torch.float16)
        adaptive_clip_([p], 1e-3, 1e-6)
        assert torch.equal(p.grad, torch.zeros(shape, dtype=torch.float16))
    # a large gradient on zero weights: scaled by 1e-10 to ~6e-6, which float16 holds
    p = nn.Parameter(torch.zeros(3, dtype=torch.float16))
    p.grad = torch.full((3,), 6e4, dtype=torch.float16)
    adaptive_clip_([p], 0.01, 1e-3)
    expected = agc_reference(np.zeros(3), np.full(3, 6e4), 0.01, 1e-3)
    np.testing.assert_allclose(p.grad.double().numpy(), expected, rtol=2e-2)


def test_agc_options_are_checked():
    for bad in (0, -0.1, float("inf"), float("nan"), "abc", True):
        with pytest.raises(ValueError, match="clipping must be a finite number > 0"):
            AdaptiveGradientClipping(clipping=bad)
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            AdaptiveGradientClipping(eps=bad)
    with pytest.raises(ValueError, match="skip_heads must be true or false"):
        AdaptiveGradientClipping(skip_heads="yes")


# ----------------------------------------------------------------------------- AGC's heads


def test_tower_heads_are_the_output_layer_of_each_task_tower():
    """Found by structure: each tower MLP's head Linear (not every Linear with one output:
    a hidden tower layer of width 1 is not a head); ESMM's two networks end in their heads;
    MMoE's gates are not heads; logistic regression has none."""
    sb = SharedBottom(META, embed_dim=4, bottom_dims=[8], tower_dims=[1], dropout=0.0)
    heads = tower_heads(sb)
    assert [id(h) for h in heads] == [id(t[-1]) for t in sb.towers]
    assert all(isinstance(t[0], nn.Linear) and t[0].out_features == 1 for t in sb.towers)
    esmm = ESMM(META, embed_dim=4, bottom_dims=[8], tower_dims=[4])
    assert [id(h) for h in tower_heads(esmm)] == [id(esmm.ctr[-1]), id(esmm.cvr[-1])]
    mmoe = MMoE(META, embed_dim=4, n_experts=2, expert_dims=[8], tower_dims=[4])
    assert [id(h) for h in tower_heads(mmoe)] == [id(t[-1]) for t in mmoe.towers]
    assert tower_heads(LogisticRegression(META)) == []


def _loud_gradients(module: nn.Module) -> dict[str, torch.Tensor]:
    """Give every parameter a gradient far above AGC's bound; returns a copy of them."""
    gen = torch.Generator().manual_seed(2)
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 100
    return {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("skip_heads", [True, False])
def test_agc_callback_skips_the_tower_heads_by_default(skip_heads):
    """With skip_heads (the default) every gradient but the tower heads' is clipped; without
    it, the heads' too."""
    model = SharedBottom(META, embed_dim=4, bottom_dims=[8], tower_dims=[4], dropout=0.0)
    before = _loud_gradients(model)
    callback = AdaptiveGradientClipping(clipping=0.01, skip_heads=skip_heads)
    callback.on_before_optimizer_step(None, model, None)
    heads = {id(p) for tower in model.towers for p in tower[-1].parameters()}
    head_names = {n for n, p in model.named_parameters() if id(p) in heads}
    assert len(head_names) == 4  # a weight and a bias per task
    for name, p in model.named_parameters():
        unchanged = torch.equal(p.grad, before[name])
        assert unchanged == (skip_heads and name in head_names), name


# ----------------------------------------------------------------------------- LAMB


def lamb_reference(
    weights: list[np.ndarray],
    grad_fn,
    steps: int,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
    phi=lambda x: min(x, 10.0),
    bias_correction: bool = True,
) -> list[np.ndarray]:
    """LAMB from its definition, per tensor: Adam's moments, ``r = m_hat / (sqrt(v_hat) +
    eps) + weight_decay * W``, ``W <- W - lr * phi(||W||) / ||r|| * r``. ``bias_correction
    =False`` leaves ``m`` and ``v`` uncorrected inside r (the library's form, docs)."""
    b1, b2 = betas
    ws = [np.array(w, dtype=np.float64) for w in weights]
    ms = [np.zeros_like(w) for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    for t in range(1, steps + 1):
        grads = grad_fn(ws)
        for k, (w, g) in enumerate(zip(ws, grads)):
            ms[k] = b1 * ms[k] + (1 - b1) * g
            vs[k] = b2 * vs[k] + (1 - b2) * g * g
            m_hat = ms[k] / (1 - b1**t) if bias_correction else ms[k]
            v_hat = vs[k] / (1 - b2**t) if bias_correction else vs[k]
            r = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * w
            ws[k] = w - lr * phi(float(np.linalg.norm(w))) / float(np.linalg.norm(r)) * r
    return ws


def _lamb_problem():
    """Two tensors (a matrix and a vector, one with a norm above the library's cap of 10)
    and the gradient of a quadratic loss in both."""
    rng = np.random.default_rng(0)
    w0 = [rng.normal(size=(4, 3)) * 6, rng.normal(size=3)]
    a = rng.normal(size=(5, 4))
    target = rng.normal(size=(5, 3))

    def grad_fn(ws):  # loss = 0.5 * ||a @ (W + b) - target||^2
        residual = a @ (ws[0] + ws[1]) - target
        g = a.T @ residual
        return [g, g.sum(axis=0)]

    return w0, grad_fn


def _lamb_from_config(params: list[nn.Parameter], **overrides):
    """optim=lamb as the module builds it: Hydra instantiates the config's partial."""
    cfg = OmegaConf.load(CONFIGS / "optim" / "lamb.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    factory = hydra.utils.instantiate(cfg, _partial_=True, _convert_="all")
    return cfg, factory(params)


def _run_lamb(steps: int, **overrides) -> tuple[list[np.ndarray], object]:
    w0, grad_fn = _lamb_problem()
    params = [nn.Parameter(torch.tensor(w, dtype=torch.float64)) for w in w0]
    cfg, opt = _lamb_from_config(params, **overrides)
    for _ in range(steps):
        grads = grad_fn([p.detach().numpy() for p in params])
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy() for p in params], cfg


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_lamb_matches_its_definition(steps):
    """optim=lamb as shipped, 1 and several steps, against the definition with bias
    correction (weight_decay 0: the trust ratio cancels the correction's scale, so they
    differ only by where eps sits, a relative 1e-5 of the step); phi is the library's
    min(||W||, 10), which the matrix (norm ~ 14) meets."""
    w0, grad_fn = _lamb_problem()
    assert np.linalg.norm(w0[0]) > 10 > np.linalg.norm(w0[1])
    ours, cfg = _run_lamb(steps)
    expected = lamb_reference(
        w0, grad_fn, steps, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=0.0
    )
    for w, e, start in zip(ours, expected, w0):
        np.testing.assert_allclose(w - start, e - start, rtol=1e-4, atol=1e-12)
        # each step has the length lr x min(||W||, 10): the trust ratio's promise
    if steps == 1:
        for w, start in zip(ours, w0):
            length = np.linalg.norm(w - start)
            assert length == pytest.approx(cfg.lr * min(np.linalg.norm(start), 10), rel=1e-5)


def test_lamb_weight_decay_is_the_l2_term_inside_r():
    """With weight_decay > 0 the library's r is the definition's without bias correction
    (the documented difference): it matches that form, and differs from the corrected one
    in the early steps."""
    w0, grad_fn = _lamb_problem()
    ours, cfg = _run_lamb(3, weight_decay=0.1)
    settings = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": 0.1}
    plain = lamb_reference(w0, grad_fn, 3, bias_correction=False, **settings)
    corrected = lamb_reference(w0, grad_fn, 3, bias_correction=True, **settings)
    for w, e, c, start in zip(ours, plain, corrected, w0):
        np.testing.assert_allclose(w - start, e - start, rtol=1e-6, atol=1e-12)
        assert not np.allclose(w - start, c - start, rtol=1e-3, atol=0)


def test_lamb_resumes_exactly_from_its_state_dict():
    """3 steps, the optimizer's state saved and loaded into a fresh one (the step count
    lives in the param groups), 4 more: the weights of 7 uninterrupted steps, bit for bit."""
    w0, grad_fn = _lamb_problem()

    def steps(params, opt, n):
        for _ in range(n):
            grads = grad_fn([p.detach().numpy() for p in params])
            for p, g in zip(params, grads):
                p.grad = torch.tensor(g)
            opt.step()

    whole = [nn.Parameter(torch.tensor(w)) for w in w0]
    _, opt = _lamb_from_config(whole)
    steps(whole, opt, 7)
    first = [nn.Parameter(torch.tensor(w)) for w in w0]
    _, opt = _lamb_from_config(first)
    steps(first, opt, 3)
    saved = copy.deepcopy(opt.state_dict())
    resumed = [nn.Parameter(p.detach().clone()) for p in first]
    _, opt = _lamb_from_config(resumed)
    opt.load_state_dict(saved)
    steps(resumed, opt, 4)
    for a, b in zip(whole, resumed):
        assert torch.equal(a, b)


def test_lamb_runs_in_the_module_and_the_summary():
    """optim=lamb builds through the module (param groups included) and reports no
    ClippyAdagrad implementation (optimizer_path null)."""
    cfg = _compose(["optim=lamb", *SMALL, "param_groups=embedding_lr"])
    module = builder.build_module(cfg, META)
    opt = module.build_optimizer()
    assert type(opt).__name__ == "Lamb" and len(opt.param_groups) >= 2
    assert getattr(opt, "implementation", lambda: None)() is None


# ----------------------------------------------------------------------------- GC


def test_grad_clip_choices_compose():
    """grad_clip=norm sets Lightning's clipping (threshold 1.0, overridable); grad_clip=agc
    adds the callback, first, so that what later callbacks (the telemetry) see and what the
    optimizer steps on are the clipped gradients; grad_clip=none sets neither."""
    none = _compose([])
    assert none.trainer.gradient_clip_val is None and "agc" not in none.callbacks
    norm = _compose(["grad_clip=norm"])
    assert norm.trainer.gradient_clip_val == 1.0
    assert norm.trainer.gradient_clip_algorithm == "norm"
    assert (
        _compose(["grad_clip=norm", "trainer.gradient_clip_val=0.5"]).trainer.gradient_clip_val
        == 0.5
    )
    assert _compose(["grad_clip=norm", "trainer=cpu"]).trainer.gradient_clip_val == 1.0
    agc = _compose(["grad_clip=agc", "optim=clippy", "callbacks.agc.clipping=0.05"])
    assert next(iter(agc.callbacks)) == "agc"  # built first: build.instantiate_callbacks
    callback = builder.instantiate_config(agc.callbacks.agc, "callbacks.agc")
    assert isinstance(callback, AdaptiveGradientClipping) and callback.clipping == 0.05
    assert agc.trainer.gradient_clip_val is None
    assert "agc" in _compose(["grad_clip=agc", "callbacks=none"]).callbacks


def test_every_grad_clip_and_lamb_key_has_a_rule():
    keys = set()
    for choice in ("norm", "agc"):
        node = OmegaConf.to_container(OmegaConf.load(CONFIGS / "grad_clip" / f"{choice}.yaml"))
        for group, values in node.items():
            for name, value in values.items():
                if isinstance(value, dict):
                    keys |= {f"{group}.{name}.{k}" for k in value if k != "_target_"}
                else:
                    keys.add(f"{group}.{name}")
    keys |= {f"optim.{k}" for k in OmegaConf.load(CONFIGS / "optim" / "lamb.yaml")}
    keys -= {"optim._target_", "optim._partial_"}
    assert keys - set(RULES) == set()
    for choice in ("none", "norm", "agc"):
        cfg = _compose([f"grad_clip={choice}", "optim=lamb"])
        check_config(cfg)


class _Norms(pl.Callback):
    """The total gradient norm before Lightning's clipping (``on_before_optimizer_step``,
    which Lightning calls before it clips) and after the optimizer step
    (``on_train_batch_end``: the gradients the step used, AdaGrad leaves them as they are)."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.after: list[float] = []

    @staticmethod
    def _norm(module: nn.Module) -> float:
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(self._norm(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(self._norm(pl_module))


def test_gradient_norm_clipping_bounds_what_the_optimizer_uses(tmp_path, data_dir):
    """grad_clip=norm with a threshold below the gradients' norms, 3 steps: every gradient
    the optimizer stepped on has a total norm at the threshold (clipping acted each step)."""
    threshold = 0.01
    cfg = _compose(
        [
            "grad_clip=norm",
            f"trainer.gradient_clip_val={threshold}",
            "optim=adagrad",
            *SHORT,
        ]
    )
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(data_dir), force_add=True)
    datamodule, module = builder.build(cfg)
    norms = _Norms()
    trainer = builder.build_trainer(cfg, [norms], [], "32-true", [])
    trainer.fit(module, datamodule=datamodule)
    assert trainer.gradient_clip_val == threshold and len(norms.after) == 3
    assert min(norms.before) > threshold  # there was something to clip
    for after in norms.after:
        assert after == pytest.approx(threshold, rel=1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("callbacks.agc.clipping", 0, "callbacks.agc.clipping: expected a finite number > 0, got 0"),
        ("callbacks.agc.clipping", "abc", "callbacks.agc.clipping: expected a finite number > 0"),
        ("callbacks.agc.eps", -1.0, "callbacks.agc.eps: expected a finite number > 0, got -1.0"),
        ("callbacks.agc.skip_heads", "abc", "callbacks.agc.skip_heads: expected true or false"),
        ("trainer.gradient_clip_algorithm", "l2", "trainer.gradient_clip_algorithm: expected 'norm' or 'value', or null, got 'l2'"),
        ("trainer.gradient_clip_val", -1, "trainer.gradient_clip_val: expected a finite number >= 0"),
        ("optim.adam_debias", "abc", "optim.adam_debias: expected true or false"),
        ("optim.weight_decouple", 2, "optim.weight_decouple: expected true or false"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line(key, value, expected):
    cfg = _compose(["grad_clip=agc", "optim=lamb"])
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    message = str(info.value)
    assert "\n" not in message and message.startswith(expected), message
    assert message == problem(key, value)


def test_sparse_embeddings_with_lamb_or_norm_clipping_are_refused_in_one_line():
    """LAMB and Lightning's clipping take dense gradients only: refused before training, in
    one line naming the keys. AGC takes sparse ones (test above): accepted."""
    lamb = _compose(["optim=lamb", "model.sparse_embeddings=true", *SMALL])
    with pytest.raises(ConfigError) as info:
        builder.build_module(lamb, META)
    message = str(info.value)
    assert "\n" not in message and "sparse_embeddings=true" in message and "Lamb" in message

    norm = _compose(["grad_clip=norm", "optim=adagrad", "model.sparse_embeddings=true", *SMALL])
    module = builder.build_module(norm, META)
    with pytest.raises(ConfigError) as info:
        run_checks.check_gradient_clipping(norm, module)
    message = str(info.value)
    assert "\n" not in message and message.startswith("trainer.gradient_clip_val=1.0:")

    agc = _compose(["grad_clip=agc", "optim=adagrad", "model.sparse_embeddings=true", *SMALL])
    run_checks.check_gradient_clipping(agc, builder.build_module(agc, META))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["method=clippy", "optim=adam"], "method=clippy: it sets optim=clippy, but this run has optim=adam"),
        (["method=adagrad_agc", "grad_clip=norm"], "method=adagrad_agc: it sets grad_clip=agc, but this run has grad_clip=norm"),
        (["experiment=seed_study", "method=lamb"], "method=lamb: it sets optim=lamb, but this run has optim=clippy_seed"),
        (["method=adagrad_gc", "optim.lr=0.5", "trainer.gradient_clip_val=0.2"], None),
        (["method=clippy", "optim=clippy"], None),
        (["optim=adam"], None),
        # the clipping keys set without the group: the kind of clipping the method names
        # may not change (its threshold may)
        (["method=adagrad", "trainer.gradient_clip_val=1.0"], "method=adagrad: it names grad_clip=none (trainer.gradient_clip_val=null and no callbacks.agc), but this run's settings clip by norm"),
        (["method=clippy", "trainer.gradient_clip_val=0.5", "+trainer.gradient_clip_algorithm=value"], "method=clippy: it names grad_clip=none (trainer.gradient_clip_val=null and no callbacks.agc), but this run's settings clip by value"),
        (["method=adagrad_gc", "trainer.gradient_clip_val=null"], "method=adagrad_gc: it names grad_clip=norm (trainer.gradient_clip_val (a threshold > 0, algorithm norm)), but this run's settings clip by none"),
        (["method=adagrad_agc", "callbacks.agc=null"], "method=adagrad_agc: it names grad_clip=agc (callbacks.agc), but this run's settings clip by none"),
        (["method=adagrad_agc", "trainer.gradient_clip_val=1.0"], "method=adagrad_agc: it names grad_clip=agc (callbacks.agc), but this run's settings clip by norm+agc"),
        (["method=adagrad_agc", "callbacks.agc.clipping=0.05"], None),
        (["method=adagrad", "+callbacks.clip2={_target_:mtl_clippy.callbacks.AdaptiveGradientClipping}"], "method=adagrad: it names grad_clip=none (trainer.gradient_clip_val=null and no callbacks.agc), but this run's settings clip by agc"),
        (["trainer.gradient_clip_val=1.0"], None),  # no method named: Lightning's key as ever
    ],
)  # fmt: skip
def test_a_method_replaced_by_another_choice_is_refused_in_one_line(overrides, expected, tmp_path):
    """method=<name> sets optim and grad_clip; a later choice of either (the command line's,
    an experiment's) would replace it silently and the run would train something else than
    its name: refused in one line. Its options (optim.lr, the clipping threshold) are free."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        job = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    OmegaConf.update(job, "hydra.runtime.output_dir", str(tmp_path), force_add=True)
    cfg = _compose(overrides)
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(job)  # as in a run: the job's choices
    try:
        if expected is None:
            check_config(cfg)
            return
        with pytest.raises(ConfigError) as info:
            check_config(cfg)
    finally:
        HydraConfig.instance().cfg = saved
    message = str(info.value)
    assert "\n" not in message and message.startswith(expected), message


# ----------------------------------------------------------------------------- end to end


@pytest.mark.filterwarnings(
    "ignore:The number of training batches .* is smaller than the logging interval:UserWarning"
)  # 3 batches are enough to show the run completes; the logging interval does not matter here
@pytest.mark.parametrize("choice", [["optim=lamb"], ["grad_clip=agc", "optim=adagrad"]])
def test_a_run_with_lamb_or_agc_completes(choice, tmp_path, data_dir):
    """The app's task (``train``, in this process: no start-up cost) on tiny data with each
    new choice and the default callbacks: completed, test metrics, no ClippyAdagrad
    implementation recorded, the optimizer telemetry logged (gradient norms, no clipping
    factors: neither has Clippy's)."""
    cfg = _compose(
        [*choice, *SHORT, "logger=csv", "callbacks.progress_bar.refresh_rate=0",
         "callbacks.optimizer_telemetry.log_every_n_steps=1"]
    )  # fmt: skip
    run = tmp_path / "run"
    OmegaConf.update(cfg, "paths.output_dir", str(run), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(data_dir), force_add=True)
    summary = mtl_clippy.train.train(cfg)
    assert summary["status"] == "completed", summary.get("error")
    assert summary["steps"] == 3 and summary["test"]["auc_click"] is not None
    assert summary["optimizer_path"] is None
    logged = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "telemetry/grad_norm/towers" in logged and "telemetry/update_ratio/bottom" in logged
    assert not any(name.startswith("telemetry/clip_") for name in logged)


@pytest.mark.slow
def test_train_py_runs_lamb_and_agc(tmp_path):
    """`python train.py optim=lamb` and `python train.py grad_clip=agc optim=adagrad`, tiny,
    side by side: both complete, with test metrics (about 25 s on 2 free cores)."""
    common = [*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=4", "logger=none",
              "callbacks.progress_bar.refresh_rate=0", f"paths.data_dir={tmp_path}/data"]  # fmt: skip
    cases = {"lamb": ["optim=lamb"], "agc": ["grad_clip=agc", "optim=adagrad"]}

    def run(name: str):
        root = tmp_path / name
        root.mkdir()
        args = [*cases[name], *common, f"paths.log_dir={root}/outputs"]
        return name, run_train(args, cwd=root, timeout=300), root

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, cases))
    for name, res, root in results:
        assert res.returncode == 0, res.stderr[-3000:]
        summary = read_metrics(only_run(root))
        assert summary["status"] == "completed", (name, summary.get("error"))
        assert summary["test"]["auc_click"] is not None
        assert summary["optim"] == ("lamb" if name == "lamb" else "adagrad")

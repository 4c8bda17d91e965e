"""The seed study's exact settings: ``optim=clippy_seed``, ``optim=adam_seed`` and the two
experiments over them, ``experiment=seed_study`` (the seed's protocol: one epoch, no
validation split) and ``experiment=seed_study_ours`` (this project's protocol).

``clippy_seed`` differs from ``optim=clippy`` in the accumulator's start (0), epsilon
(1e-10) and the accumulator update (standard, not delayed); its steps are checked against
the independent NumPy statement of Clippy (tests/clippy_reference.py).
"""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import OmegaConf

from clippy_reference import reference_step
from mtl_clippy import build as builder
from mtl_clippy.config_checks import check_config, has_validation

CONFIGS = Path(__file__).parents[1] / "configs"
GRID = {"model": "sb,ncf,lr", "optim": "clippy_seed,adam_seed", "seed": "1,2,3"}


def _compose(*overrides: str, hydra_config: bool = False):
    from hydra import compose, initialize_config_dir

    import mtl_clippy.train as app

    app.register_resolvers()  # the resolvers of the run folder's name
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            config_name="train", overrides=list(overrides), return_hydra_config=hydra_config
        )


def _optim(name: str) -> dict:
    return OmegaConf.to_container(_compose(f"optim={name}").optim)


@pytest.fixture(scope="module")
def optims() -> dict[str, dict]:
    return {name: _optim(name) for name in ("clippy", "clippy_seed", "adam", "adam_seed")}


# ----------------------------------------------------------------------------- optimizers


def test_clippy_seed_is_clippy_with_the_seeds_accumulator(optims):
    seed, ours = optims["clippy_seed"], optims["clippy"]
    changed = {
        "initial_accumulator_value": 0.0,
        "epsilon": 1e-10,
        "use_standard_accumulator_update": True,
    }
    assert {k: seed[k] for k in changed} == changed
    assert {k: v for k, v in seed.items() if k not in changed} == {
        k: v for k, v in ours.items() if k not in changed
    }
    # the three values the seed shares with optim=clippy
    assert (seed["lr"], seed["variable_relative_threshold"], seed["absolute_threshold"]) == (
        0.1,
        0.5,
        0.01,
    )
    assert ours["initial_accumulator_value"] == 0.1
    assert ours["use_standard_accumulator_update"] is False


def test_adam_seed_is_adam_at_lr_0_1(optims):
    assert optims["adam_seed"] == {**optims["adam"], "lr": 0.1}
    assert optims["adam"]["lr"] == 0.001


def test_adam_is_fused_and_steps_as_torchs_default_adam(optims):
    """optim=adam is torch's fused Adam (one kernel per step, not ten passes), whose update is
    the default implementation's to within float32 rounding."""
    assert optims["adam"]["fused"] is True
    torch.manual_seed(0)
    start = [torch.randn(64, 16), torch.randn(16)]
    ours = [p.clone().requires_grad_() for p in start]
    default = [p.clone().requires_grad_() for p in start]
    make = hydra.utils.instantiate(optims["adam"], _convert_="all")
    opt_ours = make(ours)
    opt_default = torch.optim.Adam(default, lr=optims["adam"]["lr"])
    assert opt_ours.defaults["fused"] is True
    for _ in range(20):
        grads = [torch.randn_like(p) for p in start]
        for p, q, g in zip(ours, default, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_default.step()
    for p, q in zip(ours, default, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("optim", ["clippy_seed", "adam_seed"])
def test_the_config_check_and_the_optimizer_accept_the_seed_settings(optim):
    """An accumulator starting at 0 is a valid setting: the check before every run passes,
    with and without Clippy on the dense parameters only."""
    check_config(_compose(f"optim={optim}"))
    check_config(_compose("model=lr", f"optim={optim}"))
    if optim == "clippy_seed":
        check_config(_compose(f"optim={optim}", "param_groups=clip_dense_only"))


_grads = st.lists(
    st.one_of(
        st.just(0.0),  # a ReLU's exact zero: no step, however small the accumulator
        st.floats(1e-8, 1e-3),  # tiny: where epsilon matters
        st.floats(-10, 10, allow_nan=False),
    ),
    min_size=1,
    max_size=6,
)


@given(
    st.lists(st.floats(-2, 2, allow_nan=False), min_size=6, max_size=6),
    st.lists(_grads, min_size=3, max_size=3),
)
def test_clippy_seed_steps_match_the_reference(weights, steps):
    """Three steps of ClippyAdagrad built from optim=clippy_seed, from an accumulator of 0,
    equal the reference statement step for step (float64), always finite."""
    options = _optim_options()
    w0 = np.array(weights, dtype=np.float64)
    param = torch.nn.Parameter(torch.tensor(w0))
    optimizer = hydra.utils.instantiate(options["config"])([param])
    ref_w, ref_acc = w0.copy(), np.zeros_like(w0)
    for drawn in steps:
        g = np.resize(np.array(drawn, dtype=np.float64), w0.shape)
        param.grad = torch.tensor(g)
        optimizer.step()
        ref_w, ref_acc, sigma = reference_step(ref_w, g, ref_acc, **options["reference"])
        assert np.isfinite(param.detach().numpy()).all()
        np.testing.assert_allclose(param.detach().numpy(), ref_w, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(optimizer.state[param]["sum"].numpy(), ref_acc, rtol=1e-12)
        assert optimizer.state[param]["clipping_factor"].item() == pytest.approx(sigma, rel=1e-12)


_OPTIONS: dict = {}


def _optim_options() -> dict:
    """optim=clippy_seed's config and the same options in the reference's names (cached:
    composing takes a fraction of a second, and hypothesis calls the test many times)."""
    if not _OPTIONS:
        cfg = _optim("clippy_seed")
        _OPTIONS["config"] = {**cfg, "foreach": False, "fused": False}  # the plain path
        _OPTIONS["reference"] = {
            "lr": cfg["lr"],
            "eps": cfg["epsilon"],
            "rel": cfg["variable_relative_threshold"],
            "acc_rel": cfg["accumulator_relative_threshold"],
            "abs_t": cfg["absolute_threshold"],
            "wd": cfg["weight_decay"],
            "clip_acc": cfg["clip_accumulator_update"],
            "standard": cfg["use_standard_accumulator_update"],
        }
    return _OPTIONS


def test_clippy_seeds_first_steps_are_far_larger_than_clippys(optims):
    """Unclipped (infinite thresholds), the first step of an element with gradient g is
    lr * g / sqrt(g^2 + 1e-10) under clippy_seed (about lr, whatever g's size) and
    lr * g / sqrt(0.1 + 1e-7) under optim=clippy (about 3 g lr): for the small gradients of
    a network's weights, far smaller."""
    g = torch.tensor([1e-3, -1e-2, 0.05, 0.0], dtype=torch.float64)
    first = {}
    for name in ("clippy_seed", "clippy"):
        cfg = {**optims[name], "variable_relative_threshold": float("inf")}
        param = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        optimizer = hydra.utils.instantiate({**cfg, "absolute_threshold": float("inf")})([param])
        param.grad = g.clone()
        optimizer.step()
        first[name] = -param.detach()
    torch.testing.assert_close(first["clippy_seed"], 0.1 * g / torch.sqrt(g**2 + 1e-10))
    torch.testing.assert_close(first["clippy"], 0.1 * g / np.sqrt(0.1 + 1e-7))
    assert (first["clippy_seed"][:3].abs() > 0.099).all() and first["clippy_seed"][3] == 0
    assert (first["clippy_seed"][:3].abs() > 5 * first["clippy"][:3].abs()).all()


# ----------------------------------------------------------------------------- experiments


@pytest.fixture(scope="module")
def studies() -> dict:
    return {
        name: _compose(f"experiment={name}", hydra_config=True)
        for name in ("seed_study", "seed_study_ours")
    }


def test_both_studies_sweep_the_seeds_grid_on_the_same_data(studies):
    for cfg in studies.values():
        assert OmegaConf.to_container(cfg.hydra.sweeper.params) == GRID
        assert (cfg.data.train_rows, cfg.data.test_rows) == (100_000, 100_000)
        assert cfg.optim._target_ == "mtl_clippy.optim.ClippyAdagrad"  # clippy_seed before -m
        assert cfg.optim.initial_accumulator_value == 0.0
    ours, theirs = (
        OmegaConf.to_container(studies[n].data) for n in ("seed_study_ours", "seed_study")
    )
    assert {k: v for k, v in ours.items() if k != "val_fraction"} == {
        k: v for k, v in theirs.items() if k != "val_fraction"
    }


def _callbacks(experiment: str, tmp_path):
    """The callbacks the app builds for a run of the experiment, after the config check."""
    run = _compose(f"experiment={experiment}")
    OmegaConf.update(run, "paths.output_dir", str(tmp_path), force_add=True)
    check_config(run)
    return builder.build_callbacks(run, [], {}, has_loggers=False)


def test_the_seeds_protocol_is_one_epoch_without_validation(studies, tmp_path):
    """seed_study: one epoch, no validation split; so no early stopping, and the
    checkpoint that is tested is the last epoch's (no metric chooses it)."""
    cfg = studies["seed_study"]
    assert cfg.trainer.max_epochs == 1 and cfg.data.val_fraction == 0
    assert not has_validation(cfg)
    callbacks, stopping = _callbacks("seed_study", tmp_path)
    assert stopping == "off (no validation rows)"
    assert not any(isinstance(c, EarlyStopping) for c in callbacks)
    best = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.filename == "best"]
    assert len(best) == 1 and best[0].monitor is None


def test_our_protocol_validates_keeps_the_best_epoch_and_stops_early(studies, tmp_path):
    cfg = studies["seed_study_ours"]
    assert cfg.trainer.max_epochs == 200 and cfg.data.val_fraction == 0.1
    assert has_validation(cfg) and cfg.test
    callbacks, stopping = _callbacks("seed_study_ours", tmp_path)
    assert stopping == "val/auc_mean"
    (early,) = [c for c in callbacks if isinstance(c, EarlyStopping)]
    assert (early.monitor, early.mode, early.patience) == ("val/auc_mean", "max", 2)
    (best,) = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.filename == "best"]
    assert (best.monitor, best.mode) == ("val/auc_mean", "max")

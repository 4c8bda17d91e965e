"""Model size as an axis: the size configs and ``model.norm=none`` on every deep model config.

``sb_small``, ``sb_large``, ``mmoe_large`` and ``ple_large`` inherit their base config
(``defaults: [sb]`` etc.) and state only the sizes that differ. Each one composes, builds
and takes a training step; the dense (non-embedding) parameters grow by the factors their
comments state, counted by the backbone's parameter roles; and ``model.norm=none`` leaves no
normalisation layer in any deep backbone. Structure and counts are checked on the meta
device (no memory, no initialisation), so that the large models cost nothing here.
"""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import DictConfig, OmegaConf
from torch import nn

import mtl_clippy.models as models
from mtl_clippy.config_checks import check_config
from mtl_clippy.data.schema import DatasetMetadata

CONFIGS = Path(__file__).parents[1] / "configs"
MODEL_CONFIGS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
#: Every model config with hidden layers to normalise (lr has none: it takes only norm=none).
DEEP_CONFIGS = [name for name in MODEL_CONFIGS if name != "lr"]
#: Each size config and the config it is a variant of.
SIZE_CONFIGS = {"sb_small": "sb", "sb_large": "sb", "mmoe_large": "mmoe", "ple_large": "ple"}
META = DatasetMetadata(vocab_sizes=(6,) * 16)
#: Every normalisation layer torch has: none of them may be left with norm=none.
NORM_TYPES = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def _compose(*overrides: str, many: list[list[str]] | None = None):
    """The config of ``python train.py <overrides>`` (or a list of them, for ``many``)."""
    from hydra import compose, initialize_config_dir

    import mtl_clippy.train as app

    app.register_resolvers()  # the resolvers of the run folder's name
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        if many is not None:
            return [compose(config_name="train", overrides=o) for o in many]
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture(scope="module")
def runs() -> dict[str, DictConfig]:
    """The whole config of ``python train.py model=<name>`` for every model config."""
    cfgs = _compose(many=[[f"model={name}"] for name in MODEL_CONFIGS])
    return dict(zip(MODEL_CONFIGS, cfgs, strict=True))


@pytest.fixture(scope="module")
def composed(runs) -> dict[str, dict]:
    """The ``model`` of every model config, composed, as plain dicts."""
    return {name: OmegaConf.to_container(cfg.model) for name, cfg in runs.items()}


def _build(model_cfg: dict, **overrides) -> models.Backbone:
    """The backbone of a model config on the meta device (its shapes only)."""
    with torch.device("meta"):
        return hydra.utils.instantiate({**model_cfg, **overrides}, metadata=META)


def dense_parameters(backbone: models.Backbone) -> int:
    """The number of parameters outside the embedding tables, by the backbone's roles."""
    roles = backbone.parameter_roles()
    return sum(p.numel() for role, named in roles.items() if role != "embeddings" for _, p in named)


# ----------------------------------------------------------------------------- the size configs


@pytest.mark.parametrize("name", sorted(SIZE_CONFIGS))
def test_a_size_config_states_only_what_differs_from_its_base(name, composed):
    """The file names its base in its defaults; composed, it has the base's target and keys,
    and its only values that differ from the base's are the ones the file itself sets."""
    base = SIZE_CONFIGS[name]
    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / "model" / f"{name}.yaml"))
    assert raw.pop("defaults") == [base]  # then this file's values over the base's
    assert "_target_" not in raw  # inherited
    ours, theirs = composed[name], composed[base]
    assert ours.keys() == theirs.keys()
    assert ours["_target_"] == theirs["_target_"]
    differs = {k for k in ours if ours[k] != theirs[k]}
    assert differs and differs <= raw.keys(), (differs, raw.keys())
    assert all(ours[k] == v for k, v in raw.items())


def test_the_run_is_named_by_the_size_config():
    """metrics.json's ``model`` and the run folder read Hydra's choice (``sb_large``), not
    the backbone's class (SharedBottom for sb, sb_small and sb_large alike)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=sb_large"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.model == "sb_large"
    assert "${hydra:runtime.choices.model}" in OmegaConf.to_container(cfg.hydra.run)["dir"]


@pytest.mark.parametrize(
    "name",
    [
        "sb_small",
        "sb_large",
        pytest.param("mmoe_large", marks=pytest.mark.slow),  # about 3 s to initialise
        pytest.param("ple_large", marks=pytest.mark.slow),  # about 6 s
    ],
)
def test_a_size_config_builds_and_trains_a_step(name, composed):
    """The real model: forward in training mode on a tiny batch, a finite gradient for
    every parameter, one step of the default optimizer (optim=clippy) through the app."""
    from mtl_clippy import build as builder

    torch.manual_seed(0)
    cfg = _compose(f"model={name}")
    module = builder.build_module(cfg, META).train()
    assert type(module.backbone).__name__ == composed[name]["_target_"].rsplit(".", 1)[-1]
    cat = torch.randint(0, 6, (4, 16))
    num, labels = torch.rand(4, 63), torch.randint(0, 2, (4, 2)).float()
    logits = module(cat, num)
    assert logits.shape == (4, 2) and torch.isfinite(logits).all()
    F.binary_cross_entropy_with_logits(logits, labels).backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    before = [p.detach().clone() for p in module.parameters()]
    module.build_optimizer().step()
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))


def test_sharedbottom_sizes_step_by_over_10x_dense_parameters(composed):
    """sb_small -> sb -> sb_large: each 4x wider, so the dense (non-embedding) parameters
    grow by over 10x at each step (about 16x: the widths multiply in each Linear)."""
    dense = {
        name: dense_parameters(_build(composed[name])) for name in ("sb_small", "sb", "sb_large")
    }
    assert dense["sb"] >= 10 * dense["sb_small"], dense
    assert dense["sb_large"] >= 10 * dense["sb"], dense
    # the figures the configs' comments give
    assert dense["sb_small"] == pytest.approx(85e3, rel=0.05)
    assert dense["sb"] == pytest.approx(1.34e6, rel=0.05)
    assert dense["sb_large"] == pytest.approx(21.3e6, rel=0.05)


@pytest.mark.parametrize(
    ("name", "millions", "factor"), [("mmoe_large", 44.5, 4.4), ("ple_large", 69.6, 4.6)]
)
def test_moe_large_configs_have_the_stated_size(name, millions, factor, composed):
    """mmoe_large and ple_large: more and wider experts, the dense parameters their comments
    state, and the role that grows is the experts' (bottom)."""
    large, base = _build(composed[name]), _build(composed[SIZE_CONFIGS[name]])
    assert dense_parameters(large) == pytest.approx(millions * 1e6, rel=0.02)
    assert dense_parameters(large) / dense_parameters(base) == pytest.approx(factor, rel=0.05)
    count = {
        m: {r: sum(p.numel() for _, p in ps) for r, ps in b.parameter_roles().items()}
        for m, b in (("large", large), ("base", base))
    }
    assert count["large"]["bottom"] > 4 * count["base"]["bottom"]
    assert count["large"]["embeddings"] == count["base"]["embeddings"]  # same field vectors


# ----------------------------------------------------------------------------- norm=none


def _norm_layers(module: nn.Module) -> list[str]:
    return [type(m).__name__ for m in module.modules() if isinstance(m, NORM_TYPES)]


@pytest.mark.parametrize("name", DEEP_CONFIGS)
def test_norm_none_leaves_no_normalisation_in_any_deep_model_config(name, composed):
    """Every deep model config has ``norm`` (default batch: BatchNorm in its blocks), and
    ``model.norm=none`` builds the same network with no normalisation layer at all and no
    other change (the same Linear layers)."""
    cfg = composed[name]
    assert cfg["norm"] == "batch", name
    normed, plain = _build(cfg), _build(cfg, norm="none")
    assert _norm_layers(normed), name  # the check can see a normalisation layer
    assert _norm_layers(plain) == [], name
    shapes = [tuple(m.weight.shape) for m in normed.modules() if isinstance(m, nn.Linear)]
    assert shapes == [tuple(m.weight.shape) for m in plain.modules() if isinstance(m, nn.Linear)]


def test_the_config_check_accepts_every_deep_model_with_and_without_norm(runs):
    """``check_config`` (run before every run) accepts each deep model config as it is and
    with ``model.norm=none``, the size configs included."""
    for name in DEEP_CONFIGS:
        check_config(runs[name])
        plain = runs[name].copy()
        OmegaConf.update(plain, "model.norm", "none")
        check_config(plain)


#: Each deep backbone's size arguments, drawn: hidden widths 1-3 layers, experts 1-3.
_widths = st.lists(st.integers(1, 9), min_size=1, max_size=3)
_SIZES = {
    "SharedBottom": {"bottom_dims": _widths},
    "SingleTask": {"bottom_dims": _widths},
    "ESMM": {"bottom_dims": _widths},
    "AITM": {"bottom_dims": _widths},
    "NCF": {"mlp_dims": _widths},
    "MMoE": {"expert_dims": _widths, "n_experts": st.integers(1, 3)},
    "OMoE": {"expert_dims": _widths, "n_experts": st.integers(1, 3)},
    "MetaHeac": {
        "expert_dims": _widths,
        "n_experts": st.integers(1, 3),
        "n_critics": st.integers(1, 3),
    },
    "PLE": {
        "expert_dims": _widths,
        "n_shared_experts": st.integers(1, 3),
        "n_task_experts": st.integers(1, 3),
    },
}


@st.composite
def _backbones(draw):
    name = draw(st.sampled_from(sorted(_SIZES)))
    sizes = {k: draw(s) for k, s in _SIZES[name].items()}
    sizes["tower_dims"] = draw(st.lists(st.integers(1, 9), max_size=2))
    sizes["embed_dim"] = draw(st.integers(1, 6))
    return name, sizes


@given(_backbones(), st.sampled_from(["batch", "layer", "none"]))
def test_norm_puts_one_layer_per_hidden_block_or_none(drawn, norm):
    """Over every deep backbone and drawn sizes: a normalisation layer after each hidden
    block's Linear (counted independently: the Linears followed by a ReLU in the module
    order) with norm=batch or layer, and none anywhere with norm=none."""
    name, sizes = drawn
    with torch.device("meta"):
        backbone = getattr(models, name)(META, norm=norm, **sizes)
    layers = list(backbone.modules())
    mlps = [m for m in layers if isinstance(m, models.MLP)]
    hidden = sum(
        isinstance(a, nn.Linear) and isinstance(b, (nn.ReLU, *NORM_TYPES))
        for mlp in mlps
        for a, b in zip(list(mlp), list(mlp)[1:], strict=False)
    )
    found = _norm_layers(backbone)
    if norm == "none":
        assert found == []
    else:
        assert len(found) == hidden
        kind = "BatchNorm1d" if norm == "batch" else "LayerNorm"
        assert set(found) == {kind}

"""The ``param_groups`` choices, composed with the optimizer configs that use them.

``param_groups=clip_dense_only`` with ``optim=clippy`` or ``optim=clippy_seed`` gives the
embedding tables infinite Clippy thresholds (never clipped) and leaves every other option
of theirs, and every option of the other parameters, the optimizer config's;
``param_groups=embedding_lr`` changes the embedding tables' lr and nothing else. Checked on
the optimizer the app builds from the composed config (``build.build_module``), against the
optimizer config's own values: the tests of the mechanism with hand-written options are in
tests/test_backbone_roles.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mtl_clippy import build as builder
from mtl_clippy.config_checks import check_config
from mtl_clippy.data.schema import DatasetMetadata

CONFIGS = Path(__file__).parents[1] / "configs"
META = DatasetMetadata(vocab_sizes=(6,) * 16)
#: A small model, so that building is instant; MMoE has every role but none of its own.
TINY = ["model.embed_dim=4", "model.expert_dims=[8]", "model.n_experts=2", "model.tower_dims=[4]"]
THRESHOLDS = ("variable_relative_threshold", "absolute_threshold")


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    import mtl_clippy.train as app

    app.register_resolvers()  # the resolvers of the run folder's name
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=["model=mmoe", *TINY, *overrides])


def _groups(*overrides: str):
    """The composed config, the app's module and its optimizer's groups by name."""
    cfg = _compose(*overrides)
    check_config(cfg)
    module = builder.build_module(cfg, META)
    optimizer = module.build_optimizer()
    return cfg, module, optimizer, {g["name"]: g for g in optimizer.param_groups}


def _options(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "name")}


@pytest.mark.parametrize("optim", ["clippy", "clippy_seed"])
def test_clip_dense_only_leaves_the_embeddings_unclipped(optim):
    cfg, module, _, groups = _groups(f"optim={optim}", "param_groups=clip_dense_only")
    assert list(groups) == ["default", "embeddings"]
    emb, default = groups["embeddings"], groups["default"]
    roles = module.backbone.parameter_roles()
    assert [id(p) for p in emb["params"]] == [id(p) for _, p in roles["embeddings"]]
    others = {id(p) for role, named in roles.items() if role != "embeddings" for _, p in named}
    assert {id(p) for p in default["params"]} == others
    for key in THRESHOLDS:
        assert emb[key] == math.inf
        assert default[key] == cfg.optim[key] and math.isfinite(default[key])
    # every other option of both groups is the optimizer config's (clippy_seed's own
    # accumulator start, epsilon and update order included)
    stated = {k: v for k, v in OmegaConf.to_container(cfg.optim).items() if not k.startswith("_")}
    for group in (emb, default):
        for key, value in stated.items():
            if key not in THRESHOLDS or group is default:
                assert group[key] == (tuple(value) if isinstance(value, list) else value), key


@pytest.mark.parametrize("optim", ["clippy", "clippy_seed"])
def test_clip_dense_only_clips_the_dense_parameters_only(optim):
    """Under thresholds so tight that every tensor would be clipped, a step leaves the
    embedding table unclipped (clipping factor 1) and clips every dense tensor."""
    _, module, optimizer, groups = _groups(
        f"optim={optim}", "param_groups=clip_dense_only",
        "optim.variable_relative_threshold=1e-6", "optim.absolute_threshold=1e-9", "optim.lr=1",
    )  # fmt: skip
    torch.manual_seed(0)
    module.train()
    cat, num = torch.randint(0, 6, (8, 16)), torch.rand(8, 63)
    F.binary_cross_entropy_with_logits(module(cat, num), torch.ones(8, 2)).backward()
    optimizer.step()
    factor = {id(p): optimizer.state[p]["clipping_factor"].item() for p in module.parameters()}
    assert all(factor[id(p)] == 1.0 for p in groups["embeddings"]["params"])
    # (a bias right before a BatchNorm has a gradient of rounding error only: left out)
    moved = [p for p in groups["default"]["params"] if p.grad.abs().max() > 1e-4]
    assert len(moved) > len(groups["default"]["params"]) / 2
    assert all(factor[id(p)] < 1.0 for p in moved)


@pytest.mark.parametrize(
    ("optim", "extra"),
    [("clippy", []), ("clippy_seed", []), ("adam_seed", ["param_groups.embeddings.lr=0.05"])],
)
def test_embedding_lr_sets_the_embedding_lr_only(optim, extra):
    cfg, module, _, groups = _groups(f"optim={optim}", "param_groups=embedding_lr", *extra)
    assert list(groups) == ["default", "embeddings"]
    emb, default = _options(groups["embeddings"]), _options(groups["default"])
    assert emb["lr"] == cfg.param_groups.embeddings.lr != cfg.optim.lr == default["lr"]
    assert {k: v for k, v in emb.items() if k != "lr"} == {
        k: v for k, v in default.items() if k != "lr"
    }
    table = module.backbone.embedding.table.weight
    assert [id(p) for p in groups["embeddings"]["params"]] == [id(table)]


def test_embedding_lr_is_twice_clippys_lr():
    """What configs/param_groups/embedding_lr.yaml's comment says of its value."""
    cfg = _compose("param_groups=embedding_lr")
    assert cfg.param_groups.embeddings.lr == 2 * cfg.optim.lr

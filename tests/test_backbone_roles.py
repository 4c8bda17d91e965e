"""Backbone roles: every parameter in one role, telemetry groups, parameter groups by role.

The roles come from the modules a backbone declares (``Backbone.declare``), not from the
parameters' names; the optimizer's ``param_groups`` option builds groups from them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mtl_clippy.models as models
from model_fixtures import BACKBONES, backbone_config, make_planted
from mtl_clippy.callbacks import DivergenceMonitor, OptimizerTelemetry
from mtl_clippy.config_checks import check_config
from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.errors import ConfigError
from mtl_clippy.models import ROLES, Backbone, MultiTaskModule
from mtl_clippy.models.backbones import backbone_of

CONFIGS = Path(__file__).parents[1] / "configs"
META = DatasetMetadata(vocab_sizes=tuple(range(5, 21)))

#: The roles each backbone has at its default structure.
EXPECTED = {
    "SharedBottom": {"embeddings", "numerical", "bottom", "towers"},
    "NCF": {"embeddings", "numerical", "bottom", "towers"},
    "LogisticRegression": {"embeddings", "numerical"},
    "MMoE": {"embeddings", "numerical", "bottom", "gates", "towers"},
    "OMoE": {"embeddings", "numerical", "bottom", "gates", "towers"},
    "PLE": {"embeddings", "numerical", "bottom", "gates", "towers"},
    "SingleTask": {"embeddings", "numerical", "bottom", "towers"},
    "AITM": {"embeddings", "numerical", "bottom", "towers"},
    "ESMM": {"embeddings", "numerical", "bottom", "towers"},
    "MetaHeac": {"embeddings", "numerical", "bottom", "gates", "towers"},
}

CLIPPY = {
    "_target_": "mtl_clippy.optim.ClippyAdagrad",
    "_partial_": True,
    "lr": 0.1,
    "variable_relative_threshold": 0.5,
    "absolute_threshold": 1e-2,
}


def build(name: str, meta: DatasetMetadata = META, **overrides) -> Backbone:
    cfg = backbone_config(name, **overrides)
    return getattr(models, cfg.pop("_target_").rsplit(".", 1)[-1])(metadata=meta, **cfg)


def choice(name: str) -> dict:
    """configs/param_groups/<name>.yaml as a plain dict."""
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / "param_groups" / f"{name}.yaml"))


def module(name: str = "SharedBottom", param_groups=None, optimizer=None, **backbone_kw):
    return MultiTaskModule(
        backbone=backbone_config(name, **backbone_kw),
        metadata=META,
        optimizer=CLIPPY if optimizer is None else optimizer,
        param_groups=param_groups,
    )


# ----------------------------------------------------------------------------- roles


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
@pytest.mark.parametrize("name", BACKBONES)
def test_roles_cover_every_parameter_once(name, norm):
    model = build(name, **({} if name == "LogisticRegression" else {"norm": norm}))
    roles = model.parameter_roles()
    assert set(roles) == EXPECTED[name]
    assert list(roles) == [r for r in ROLES if r in roles]  # in ROLES order
    named = [(n, p) for pairs in roles.values() for n, p in pairs]
    assert sorted(n for n, _ in named) == sorted(n for n, _ in model.named_parameters())
    assert len({id(p) for _, p in named}) == len(list(model.parameters())) == len(named)
    # the tables are the embeddings, the numerical projections their own role
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    assert [p for _, p in roles["embeddings"]] == tables
    projections = [p for m in model.modules() if isinstance(m, models.FeatureEmbedding)
                   for p in m.numerical.parameters()]  # fmt: skip
    assert [p for _, p in roles["numerical"]] == projections


@pytest.mark.parametrize("name", ["ESMM", "SingleTask"])
def test_one_network_per_task_has_its_tower_dims_as_towers(name):
    """ESMM's and SingleTask's task MLPs are bottom_dims + tower_dims -> 1: the tower_dims
    blocks and the head are towers, the rest bottom (they had no towers group before)."""
    model = build(name, bottom_dims=[32, 16], tower_dims=[8, 4], norm="batch")
    roles = {n: r for r, pairs in model.parameter_roles().items() for n, _ in pairs}
    mlps = [model.ctr, model.cvr] if name == "ESMM" else [n.mlp for n in model.networks]
    for mlp in mlps:
        linears = [m for m in mlp if isinstance(m, nn.Linear)]
        assert [m.out_features for m in linears] == [32, 16, 8, 4, 1]
        for m in mlp:
            for p in m.parameters():
                want = "bottom" if m in mlp.split(2)[0] else "towers"
                assert roles[_name_of(model, p)] == want
    assert sum(p.numel() for _, p in model.parameter_roles()["towers"]) == 2 * (
        (16 * 8 + 8 + 2 * 8) + (8 * 4 + 4 + 2 * 4) + (4 + 1)
    )


def _name_of(model: nn.Module, param: torch.Tensor) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


def test_gates_and_experts_of_the_mixtures():
    roles = build("PLE").parameter_roles()
    gates = {n for n, _ in roles["gates"]}
    assert gates and all(".task_gates." in n or ".shared_gate." in n for n in gates)
    assert all("_experts." in n for n, _ in roles["bottom"])
    roles = build("MMoE").parameter_roles()
    assert {n.split(".")[0] for n, _ in roles["gates"]} == {"gates"}
    assert {n.split(".")[0] for n, _ in roles["bottom"]} == {"experts"}


def test_an_undeclared_module_is_an_error_naming_the_parameter():
    class Undeclared(Backbone):
        def __init__(self, metadata, **options):
            super().__init__(metadata, **options)
            self.extra = nn.Linear(self.embedding.output_dim, 4)  # no role declared
            self.add_towers(4)

        def tower_inputs(self, fields):
            return self.extra(fields.flatten(1))

    model = Undeclared(META, embed_dim=4, tower_dims=[4])
    assert model(torch.zeros(3, 16, dtype=torch.long), torch.zeros(3, 63)).shape == (3, 2)
    with pytest.raises(ValueError, match=r"parameter 'extra.weight' has no role"):
        model.parameter_roles()
    with pytest.raises(ValueError, match=r"unknown role 'experts'"):
        model.declare("experts", model.extra)


def test_a_new_backbone_is_one_small_class():
    class Linear(Backbone):
        def __init__(self, metadata, **options):
            super().__init__(metadata, **options)
            self.add_towers(self.embedding.output_dim)

        def tower_inputs(self, fields):
            return fields.flatten(1)

    model = Linear(META, embed_dim=4, tower_dims=[], norm="none")
    assert set(model.parameter_roles()) == {"embeddings", "numerical", "towers"}
    assert model(torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 63)).shape == (2, 2)


def test_shared_arguments_keep_their_names_and_messages():
    import inspect

    params = inspect.signature(models.SharedBottom).parameters
    assert list(params) == ["metadata", "bottom_dims", "embed_dim", "tower_dims", "dropout",
                            "sparse_embeddings", "norm"]  # fmt: skip
    with pytest.raises(TypeError, match=r"^SharedBottom.__init__\(\) got an unexpected keyword"):
        models.SharedBottom(META, foo=1)
    with pytest.raises(TypeError):  # a size is never taken by position
        models.SharedBottom(META, 64)
    with pytest.raises(TypeError, match="embed_dim"):  # the linear baseline has no width
        models.LogisticRegression(META, embed_dim=4)


# ----------------------------------------------------------------------------- telemetry


@pytest.mark.parametrize("name", BACKBONES)
def test_telemetry_groups_are_the_roles(name):
    model = module(name)
    tel = OptimizerTelemetry()
    tel.on_fit_start(SimpleNamespace(), model)
    assert set(tel._groups) == EXPECTED[name]


def test_divergence_monitor_finds_the_backbone_by_type():
    """The logit hook sits on the first Backbone inside the module, whatever its name."""

    class Other(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = build("SharedBottom")

        def forward(self, cat, num):
            return self.net(cat, num) * 0  # the module's own output is not the logits

    lm = Other()
    assert backbone_of(lm) is lm.net and backbone_of(nn.Linear(1, 1)) is None
    monitor = DivergenceMonitor(warmup_steps=0)
    monitor.on_fit_start(SimpleNamespace(), lm)
    cat, num = torch.zeros(4, 16, dtype=torch.long), torch.randn(4, 63)
    lm.train()
    torch.manual_seed(0)  # the same dropout masks in both calls
    logits = lm.net(cat, num)
    torch.manual_seed(0)
    lm(cat, num)
    assert monitor._max_logit is not None
    assert monitor._max_logit.item() == pytest.approx(logits.abs().max().item(), rel=1e-5)


# ----------------------------------------------------------------------------- param groups


def test_no_param_groups_is_one_group_as_before():
    for spec in (None, {}, choice("none")):
        model = module(param_groups=spec)
        opt = model.build_optimizer()
        assert len(opt.param_groups) == 1 and "name" not in opt.param_groups[0]
        assert opt.param_groups[0]["params"] == list(model.parameters())
        assert model.hparams["param_groups"] is None


@pytest.mark.parametrize("name", BACKBONES)
def test_clip_dense_only_groups(name):
    model = module(name, param_groups=choice("clip_dense_only"))
    opt = model.build_optimizer()
    assert [g["name"] for g in opt.param_groups] == ["default", "embeddings"]
    default, emb = opt.param_groups
    roles = model.backbone.parameter_roles()
    assert emb["params"] == [p for _, p in roles["embeddings"]]
    assert emb["variable_relative_threshold"] == math.inf == emb["absolute_threshold"]
    assert emb["lr"] == 0.1  # the options the entry does not name are the optimizer's
    assert default["variable_relative_threshold"] == 0.5 and default["absolute_threshold"] == 0.01
    taken = {id(p) for g in opt.param_groups for p in g["params"]}
    assert len(taken) == sum(len(g["params"]) for g in opt.param_groups)
    assert taken == {id(p) for p in model.parameters()}


def test_embedding_lr_and_several_roles():
    model = module("MMoE", param_groups={**choice("embedding_lr"), "gates": {"lr": 0.01}})
    opt = model.build_optimizer()
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [
        ("default", 0.1),
        ("embeddings", 0.2),
        ("gates", 0.01),
    ]
    # a role the backbone lacks is skipped: one choice fits every backbone
    opt = module("SharedBottom", param_groups={"gates": {"lr": 0.01}}).build_optimizer()
    assert [g["name"] for g in opt.param_groups] == ["default"]


def test_bad_role_is_one_line_naming_the_key():
    with pytest.raises(ValueError) as info:
        module(param_groups={"embedding": {"lr": 0.1}})
    assert str(info.value) == (
        "param_groups.embedding: 'embedding' is not a parameter role; choose from "
        "embeddings, numerical, bottom, gates, towers"
    )
    with pytest.raises(ValueError, match=r"^param_groups.towers: expected a mapping"):
        module(param_groups={"towers": 0.1})


def test_bad_option_is_one_line_naming_the_key():
    model = module(param_groups={"embeddings": {"lrr": 0.1}})
    with pytest.raises(ValueError) as info:
        model.build_optimizer()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "param_groups.embeddings.lrr: 'lrr' is not an option of ClippyAdagrad"
    )
    adam = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
    model = module(param_groups=choice("clip_dense_only"), optimizer=adam)
    with pytest.raises(ValueError, match=r"^param_groups.embeddings.\w+_threshold: .* of Adam"):
        model.build_optimizer()


def _composed(*overrides: str):
    from hydra import compose, initialize_config_dir

    import mtl_clippy.train as app

    app.register_resolvers()  # the configs' own resolvers (the run folder's)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_one_config_key_selects_the_groups():
    assert _composed().param_groups == {}
    cfg = _composed("param_groups=clip_dense_only")
    assert cfg.param_groups.embeddings.variable_relative_threshold == math.inf
    check_config(cfg)
    cfg = _composed("param_groups=embedding_lr", "param_groups.embeddings.lr=0.3")
    assert cfg.param_groups.embeddings.lr == 0.3
    check_config(cfg)


def _options(target: str) -> str:
    """The option names of an optimizer class, as the message lists them."""
    import inspect

    import hydra.utils

    params = inspect.signature(hydra.utils.get_object(target)).parameters.values()
    return ", ".join(sorted(p.name for p in params if p.name != "params"))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["+param_groups.embedding.lr=0.1"],
         "param_groups.embedding: 'embedding' is not a parameter role; choose from embeddings, "
         "numerical, bottom, gates, towers"),
        (["+param_groups.towers.lrr=0.1"],
         "param_groups.towers.lrr: 'lrr' is not an option of ClippyAdagrad; choose from "
         + _options("mtl_clippy.optim.ClippyAdagrad")),
        (["param_groups=clip_dense_only", "optim=adam"],
         "param_groups.embeddings.variable_relative_threshold: 'variable_relative_threshold' "
         "is not an option of Adam; choose from " + _options("torch.optim.Adam")),
        (["param_groups=embedding_lr", "param_groups.embeddings.lr=-1"],
         "param_groups.embeddings.lr: expected a finite number >= 0, got -1"),
        (["param_groups=clip_dense_only", "param_groups.embeddings.absolute_threshold=-1"],
         "param_groups.embeddings.absolute_threshold: expected a number >= 0, got -1"),
        (["+param_groups.towers=3"],
         "param_groups.towers: expected a mapping of optimizer options (e.g. lr: 0.01), got 3"),
    ],
)  # fmt: skip
def test_bad_param_groups_stop_the_config_check_in_one_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        check_config(_composed(*overrides))
    assert str(info.value) == expected


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def data():
    return make_planted(n_train=512, n_val=128)


def _loader(data) -> DataLoader:
    return DataLoader(TensorDataset(*data.train), batch_size=256)  # 2 steps an epoch


def _trainer(root: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=root,
        **kwargs,
    )


def _module(data, spec) -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(
        backbone=backbone_config("SharedBottom", sparse_embeddings=True, dropout=0.0),
        metadata=data.metadata,
        optimizer={**CLIPPY, "variable_relative_threshold": 0.01, "absolute_threshold": 1e-4},
        param_groups=spec,
    )


def test_sparse_embeddings_with_clippy_clip_only_the_dense_groups(data):
    model = _module(data, choice("clip_dense_only"))
    opt = model.build_optimizer()
    table = model.backbone.embedding.table.weight
    cat, num, labels = data.train
    for _ in range(3):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(cat[:64], num[:64]), labels[:64]).backward()
        assert table.grad.is_sparse
        opt.step()
        assert opt.state[table]["clipping_factor"].item() == 1.0  # never clipped
    dense = [opt.state[p]["clipping_factor"].item() for p in opt.param_groups[0]["params"]]
    assert min(dense) < 1.0  # tight thresholds: the dense parameters are clipped


@pytest.mark.filterwarnings(
    "ignore:You defined a `validation_step` but have no `val_dataloader`:UserWarning"
)  # these fits train without validation on purpose
def test_a_resumed_fit_with_groups_continues_exactly(data, tmp_path):
    """Two epochs in one fit equal one epoch, a checkpoint, and one more from it: the
    optimizer state of both groups (Clippy's accumulators) round-trips."""
    spec = choice("clip_dense_only")
    whole = _module(data, spec)
    _trainer(tmp_path / "a", max_epochs=2).fit(whole, _loader(data))
    first = _module(data, spec)
    trainer = _trainer(tmp_path / "b", max_epochs=1)
    trainer.fit(first, _loader(data))
    ckpt = tmp_path / "one.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    groups = saved["optimizer_states"][0]["param_groups"]
    assert [g["name"] for g in groups] == ["default", "embeddings"]
    assert saved["hyper_parameters"]["param_groups"] == spec
    resumed = MultiTaskModule.load_from_checkpoint(ckpt)
    again = _trainer(tmp_path / "c", max_epochs=2)
    again.fit(resumed, _loader(data), ckpt_path=ckpt)
    assert again.global_step == 4
    ours, theirs = resumed.state_dict(), whole.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0, msg=k)


def test_the_app_builds_the_module_with_the_config_groups():
    """``python train.py param_groups=clip_dense_only`` reaches the optimizer: the app's
    ``build_module`` passes the config's ``param_groups`` to the module."""
    from mtl_clippy import build as builder

    cfg = _composed("param_groups=clip_dense_only", *[f"model.{k}={v}" for k, v in
                    {"embed_dim": 4, "bottom_dims": "[8]", "tower_dims": "[4]"}.items()])  # fmt: skip
    module = builder.build_module(cfg, META)
    assert module.hparams["param_groups"] == choice("clip_dense_only")
    assert [g["name"] for g in module.build_optimizer().param_groups] == ["default", "embeddings"]


# ----------------------------------------------------------------------------- review fixes

_KW = {"embed_dim": 4, "bottom_dims": [8], "tower_dims": [4]}


class _Ensemble(nn.Module):
    """A plain module averaging two backbones (two outermost Backbones)."""

    def __init__(self, metadata, **kw) -> None:
        super().__init__()
        self.a = models.SharedBottom(metadata, **kw)
        self.b = models.SharedBottom(metadata, **kw)

    def forward(self, cat, num):
        return (self.a(cat, num) + self.b(cat, num)) / 2


class _Outer(Backbone):
    """A Backbone wrapping a Backbone whose modules are all declared."""

    shared_input = False

    def __init__(self, metadata, **kw) -> None:
        super().__init__(metadata)
        self.inner = models.SharedBottom(metadata, **kw)

    def forward(self, cat, num):
        return self.inner(cat, num)


def _custom(target: type, param_groups=None, optimizer=None) -> MultiTaskModule:
    return MultiTaskModule(
        backbone={"_target_": f"{__name__}.{target.__name__}", **_KW},
        metadata=META,
        optimizer=CLIPPY if optimizer is None else optimizer,
        param_groups=param_groups,
    )


def test_param_groups_and_telemetry_cover_every_backbone_of_an_ensemble():
    """Two backbones side by side: both tables are ``embeddings`` for the optimizer's groups
    and for the telemetry, from one function (module_parameter_roles)."""
    from mtl_clippy.models.backbones.base import module_parameter_roles, outermost_backbones

    model = _custom(_Ensemble, param_groups=choice("clip_dense_only"))
    ens = model.backbone
    assert outermost_backbones(model) == [ens.a, ens.b] and backbone_of(model) is ens.a
    groups = {g["name"]: g["params"] for g in model.build_optimizer().param_groups}
    tables = [ens.a.embedding.table.weight, ens.b.embedding.table.weight]
    assert groups["embeddings"] == tables
    roles = module_parameter_roles(model)
    assert [n for n, _ in roles["embeddings"]] == [
        "backbone.a.embedding.table.weight",
        "backbone.b.embedding.table.weight",
    ]
    tel = OptimizerTelemetry()
    tel.on_fit_start(SimpleNamespace(), model)
    index = {id(p): tel._gidx[i].item() for i, p in enumerate(tel._params)}
    assert all(ROLES[index[id(p)]] == "embeddings" for p in tables)
    for role, named in roles.items():
        assert {ROLES[index[id(p)]] for _, p in named if p.requires_grad} == {role}


def test_a_backbone_inside_a_backbone_keeps_its_roles():
    inner = build("SharedBottom", embed_dim=4)
    outer = _Outer(META, **_KW)
    assert outer.parameter_roles().keys() == inner.parameter_roles().keys()
    assert [n for n, _ in outer.parameter_roles()["embeddings"]] == ["inner.embedding.table.weight"]
    model = _custom(_Outer, param_groups=choice("clip_dense_only"))
    groups = {g["name"]: g["params"] for g in model.build_optimizer().param_groups}
    assert groups["embeddings"] == [model.backbone.inner.embedding.table.weight]

    class Regrouped(_Outer):  # the outer backbone's declaration of the same module wins
        def __init__(self, metadata, **kw) -> None:
            super().__init__(metadata, **kw)
            self.declare("bottom", self.inner.towers)

    roles = Regrouped(META, **_KW).parameter_roles()
    assert "towers" not in roles and any(n.startswith("inner.towers.") for n, _ in roles["bottom"])


def test_divergence_monitor_hooks_every_outermost_backbone():
    model = _custom(_Ensemble)
    monitor = DivergenceMonitor(warmup_steps=0)
    monitor.on_fit_start(SimpleNamespace(), model)
    assert len(monitor._hook.handles) == 2
    cat, num = torch.zeros(4, 16, dtype=torch.long), torch.randn(4, 63)
    model.train()
    torch.manual_seed(0)
    largest = max(model.backbone.a(cat, num).abs().max(), model.backbone.b(cat, num).abs().max())
    monitor._max_logit = None
    torch.manual_seed(0)
    model(cat, num)
    assert monitor._max_logit.item() == pytest.approx(largest.item(), rel=1e-5)
    monitor.teardown(SimpleNamespace(), model, "fit")
    assert monitor._hook is None
    monitor._max_logit = None
    model(cat, num)
    assert monitor._max_logit is None  # the hooks are gone
    outer = _custom(_Outer)  # a nested backbone is not hooked apart from its outer one
    monitor.on_fit_start(SimpleNamespace(), outer)
    assert len(monitor._hook.handles) == 1


ADAGRAD = {"_target_": "torch.optim.Adagrad", "_partial_": True, "lr": 0.1}
ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}


@pytest.mark.parametrize(
    ("optimizer", "spec", "expected"),
    [
        (ADAGRAD, {"embeddings": {"lr_decay": "abc"}},
         "param_groups.embeddings.lr_decay: expected a number (an option of Adagrad), got 'abc'"),
        (ADAM, {"towers": {"maximize": "abc"}},
         "param_groups.towers.maximize: expected true or false (an option of Adam), got 'abc'"),
        (ADAGRAD, {"embeddings": {"lr_decay": -1.0}},
         "param_groups.embeddings.lr_decay: Adagrad refuses -1.0: Invalid lr_decay value: -1.0"),
        ({**CLIPPY, "use_standard_accumulator_update": True},
         {"embeddings": {"clip_accumulator_update": True}},
         "param_groups.embeddings.clip_accumulator_update: ClippyAdagrad refuses True: "
         "ClippyAdagrad: clip_accumulator_update=True and use_standard_accumulator_update=True "
         "cannot be combined"),
        (CLIPPY, {"gates": {"clip_accumulator_update": True,
                            "use_standard_accumulator_update": True}},
         "param_groups.gates: ClippyAdagrad refuses these options together: ClippyAdagrad: "
         "clip_accumulator_update=True and use_standard_accumulator_update=True"),
    ],
)  # fmt: skip
def test_group_option_values_are_checked_by_the_optimizer(optimizer, spec, expected):
    """torch validates an optimizer's constructor arguments, never a group's: each role's
    options go through the optimizer's own constructor (on a dummy parameter) at build."""
    model = module("MMoE", param_groups=spec, optimizer=optimizer)
    with pytest.raises(ValueError) as info:
        model.build_optimizer()
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_group_option_values_stop_the_config_check_and_the_build_in_one_line():
    from mtl_clippy import build as builder

    cfg = _composed("optim=adagrad", "+param_groups.embeddings.lr_decay=abc")
    expected = "param_groups.embeddings.lr_decay: expected a number (an option of Adagrad)"
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}"):
        check_config(cfg)
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}"):
        builder.build_module(cfg, META)
    check_config(_composed("optim=adagrad", "+param_groups.embeddings.lr_decay=0.01"))


class _Undeclared(Backbone):
    """A backbone that forgets to declare its middle layer."""

    def __init__(self, metadata, *, bottom_dims=(8,), **options) -> None:
        super().__init__(metadata, **options)
        self.extra = nn.Linear(self.embedding.output_dim, bottom_dims[-1])
        self.add_towers(bottom_dims[-1])

    def tower_inputs(self, fields):
        return self.extra(fields.flatten(1))


def test_an_undeclared_module_is_a_config_error_when_the_module_is_built():
    from mtl_clippy import build as builder

    cfg = _composed(f"model._target_={__name__}._Undeclared", "model.embed_dim=4")
    with pytest.raises(ConfigError) as info:
        builder.build_module(cfg, META)
    assert str(info.value).startswith(
        "model: _Undeclared: parameter 'extra.weight' has no role; declare its module"
    )


def _checkpoint(tmp_path: Path, data, name: str, spec) -> Path:
    torch.manual_seed(0)
    model = MultiTaskModule(
        backbone=backbone_config("OMoE"), metadata=data.metadata, optimizer=CLIPPY,
        param_groups=spec,
    )  # fmt: skip
    trainer = _trainer(tmp_path / name, max_steps=1)
    trainer.fit(model, _loader(data))
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.filterwarnings(
    "ignore:You defined a `validation_step` but have no `val_dataloader`:UserWarning"
)  # these fits train without validation on purpose
def test_a_checkpoint_with_other_param_groups_is_refused_before_it_loads(data, tmp_path):
    """Other groups cannot take a checkpoint's optimizer state (it loads by position): a
    different number of groups, or the same sizes under other roles (OMoE's numerical
    projection and its gate have two tensors each), is one line naming param_groups."""
    from mtl_clippy.run_checks import check_checkpoint_param_groups

    numerical = _checkpoint(tmp_path, data, "numerical", {"numerical": {"lr": 0.2}})

    def ours(spec):
        return MultiTaskModule(
            backbone=backbone_config("OMoE"), metadata=data.metadata, optimizer=CLIPPY,
            param_groups=spec,
        )  # fmt: skip

    check_checkpoint_param_groups(str(numerical), ours({"numerical": {"lr": 0.3}}))  # same groups
    check_checkpoint_param_groups(None, ours(None))
    with pytest.raises(ConfigError) as info:
        check_checkpoint_param_groups(str(numerical), ours({"gates": {"lr": 0.2}}))
    message = str(info.value)
    assert message.startswith(f"param_groups: the checkpoint {numerical} was trained with ")
    assert "numerical (2 tensors)" in message and "gates (2 tensors)" in message
    assert message.endswith(
        "resume with the same param_groups (param_groups={'numerical': {'lr': 0.2}})"
    )
    with pytest.raises(ConfigError, match=r"this run has default \(\d+ tensors\); .*"):
        check_checkpoint_param_groups(str(numerical), ours(None))
    plain = _checkpoint(tmp_path, data, "plain", None)
    with pytest.raises(ConfigError, match=r"\(param_groups=none\)$"):
        check_checkpoint_param_groups(str(plain), ours({"gates": {"lr": 0.2}}))
    check_checkpoint_param_groups(str(plain), ours(None))


def test_a_refused_resume_keeps_the_folder_metrics(tmp_path):
    from mtl_clippy.run_checks import keeps_previous_metrics
    from mtl_clippy.summary import RunSummary

    summary = RunSummary(error="ConfigError: param_groups: ...")
    fitting = SimpleNamespace(state=SimpleNamespace(fn="fit"))
    built = SimpleNamespace(state=SimpleNamespace(fn=None))
    assert not keeps_previous_metrics(summary, "last.ckpt", None, tmp_path)  # no metrics.json
    (tmp_path / "metrics.json").write_text("{}")
    assert keeps_previous_metrics(summary, "last.ckpt", None, tmp_path)
    assert keeps_previous_metrics(summary, "last.ckpt", built, tmp_path)
    assert not keeps_previous_metrics(summary, "last.ckpt", fitting, tmp_path)  # it fitted
    assert not keeps_previous_metrics(summary, None, None, tmp_path)  # not a resumed run
    other = RunSummary(error="RuntimeError: boom")
    assert not keeps_previous_metrics(other, "last.ckpt", None, tmp_path)


@pytest.mark.parametrize("name", ["MMoE", "OMoE"])
def test_a_positional_size_names_the_public_class(name):
    import inspect

    with pytest.raises(TypeError, match=rf"^{name}.__init__\(\) takes 2 positional arguments"):
        getattr(models, name)(META, 8, 2)
    params = inspect.signature(getattr(models, name)).parameters.values()
    assert [p.kind for p in params][1:] == [inspect.Parameter.KEYWORD_ONLY] * (len(params) - 1)

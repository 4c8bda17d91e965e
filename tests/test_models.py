"""Backbones and layers: shapes, gradients, sparse embeddings, learning a planted signal."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mtl_clippy.models as models
from model_fixtures import (
    BACKBONES,
    adagrad_partial,
    adam_partial,
    auc,
    backbone_config,
    clippy_partial,
    make_planted,
)
from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.models import FeatureEmbedding, product_logit
from mtl_clippy.models.layers import NORMS, has_sparse_embeddings


@pytest.fixture(scope="module")
def data():
    return make_planted()


def build(name: str, metadata: DatasetMetadata, **overrides) -> torch.nn.Module:
    cfg = backbone_config(name, **overrides)
    cls = getattr(models, cfg.pop("_target_").rsplit(".", 1)[-1])
    return cls(metadata=metadata, **cfg)


def batch(data, n: int = 64):
    cat, num, labels = data.train
    return cat[:n], num[:n], labels[:n]


def table_of(model: torch.nn.Module) -> torch.nn.Embedding:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))


# --------------------------------------------------------------------------------------------
# Input layer
# --------------------------------------------------------------------------------------------


def test_feature_embedding_offsets_and_numerical_field():
    meta = DatasetMetadata(vocab_sizes=(3, 5, 2), n_numerical=4, user_fields=(0,), item_fields=(1, 2),
                           user_numerical=(0, 1), item_numerical=(2, 3))  # fmt: skip
    emb = FeatureEmbedding(meta, embed_dim=6)
    assert emb.table.weight.shape == (10, 6)
    cat = torch.tensor([[2, 4, 1], [0, 0, 0]])  # the last index of each field is its OOV slot
    num = torch.rand(2, 4)
    out = emb(cat, num)
    assert out.shape == (2, 4, 6)
    w = emb.table.weight
    torch.testing.assert_close(out[0, :3], w[[2, 3 + 4, 8 + 1]])
    torch.testing.assert_close(out[1, :3], w[[0, 3, 8]])
    torch.testing.assert_close(out[:, 3], emb.numerical[0](num))
    bound = (6.0 / (10 + 6)) ** 0.5  # Xavier-uniform bound
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound


def test_feature_embedding_numerical_groups():
    meta = DatasetMetadata(vocab_sizes=(3,) * 16)
    emb = FeatureEmbedding(meta, 4, numerical_groups=[meta.user_numerical, meta.item_numerical])
    assert [p.in_features for p in emb.numerical] == [23, 40]
    num = torch.rand(5, 63)
    out = emb(torch.zeros(5, 16, dtype=torch.long), num)
    assert out.shape == (5, 18, 4)
    torch.testing.assert_close(out[:, 17], emb.numerical[1](num[:, 23:]))


def test_metadata_dict_form_accepted(data):
    model = build("SharedBottom", data.metadata.to_dict())
    assert model(*batch(data)[:2]).shape == (64, 2)


def test_esmm_needs_two_tasks():
    meta = DatasetMetadata(vocab_sizes=(3,) * 16, tasks=("click", "conversion", "favourite"))
    with pytest.raises(ValueError, match="two funnel tasks"):
        models.ESMM(meta)


# --------------------------------------------------------------------------------------------
# Every backbone
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
def test_output_shape_and_logits(name, data):
    model = build(name, data.metadata).eval()
    cat, num, _ = batch(data, 37)
    logits = model(cat, num)
    assert logits.shape == (37, data.metadata.n_tasks)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # Three tasks where the backbone allows it: n_tasks comes from the metadata.
    if name != "ESMM":
        meta3 = DatasetMetadata(vocab_sizes=data.metadata.vocab_sizes, tasks=("a", "b", "c"))
        assert build(name, meta3).eval()(cat, num).shape == (37, 3)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("name", BACKBONES)
def test_every_parameter_gets_a_finite_gradient(name, sparse, data):
    torch.manual_seed(0)
    model = build(name, data.metadata, sparse_embeddings=sparse).train()
    cat, num, labels = batch(data)
    F.binary_cross_entropy_with_logits(model(cat, num), labels).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} has no gradient"
        g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
        assert torch.isfinite(g).all(), f"{name}: {pname} has a non-finite gradient"
        assert g.abs().sum() > 0, f"{name}: {pname} has an all-zero gradient"
    assert table_of(model).weight.grad.is_sparse == sparse
    assert has_sparse_embeddings(model) == sparse


def _fit_and_score(model, optimizer_factory, data, epochs: int = 4) -> tuple[float, float]:
    """Plain torch training loop; returns validation AUC (click, conversion)."""
    optimizer = optimizer_factory(model.parameters())
    loader = data.loader("train", batch_size=128, shuffle=True)
    model.train()
    for _ in range(epochs):
        for cat, num, labels in loader:
            optimizer.zero_grad()
            F.binary_cross_entropy_with_logits(model(cat, num), labels).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        cat, num, labels = data.val
        scores = model(cat, num).numpy()
    assert np.isfinite(scores).all()
    return auc(scores[:, 0], labels[:, 0].numpy()), auc(scores[:, 1], labels[:, 1].numpy())


@pytest.mark.parametrize("optimizer", ["adam", "clippy"])
@pytest.mark.parametrize("name", BACKBONES)
def test_learns_planted_signal(name, optimizer, data):
    factory = adam_partial() if optimizer == "adam" else clippy_partial()
    torch.manual_seed(0)
    model = build(name, data.metadata)
    auc_click, auc_conversion = _fit_and_score(model, factory, data)
    assert auc_click > 0.7, (name, optimizer, auc_click)
    assert auc_conversion > 0.65, (name, optimizer, auc_conversion)


@pytest.mark.parametrize("optimizer", ["adagrad", "clippy"])
@pytest.mark.parametrize("name", ["SharedBottom", "LogisticRegression", "PLE"])
def test_sparse_embeddings_train_with_adagrad_family(name, optimizer, data):
    factory = adagrad_partial() if optimizer == "adagrad" else clippy_partial()
    torch.manual_seed(0)
    model = build(name, data.metadata, sparse_embeddings=True)
    table = table_of(model)
    seen: list[bool] = []
    table.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.is_sparse))
    before = table.weight.detach().clone()
    auc_click, _ = _fit_and_score(model, factory, data, epochs=3)
    assert seen and all(seen), "the optimizer must receive sparse gradients for the table"
    assert not torch.equal(before, table.weight.detach())
    assert auc_click > 0.7, (name, optimizer, auc_click)


def test_sparse_gradient_touches_only_batch_rows(data):
    model = build("LogisticRegression", data.metadata, sparse_embeddings=True)
    cat, num, labels = batch(data, 8)
    F.binary_cross_entropy_with_logits(model(cat, num), labels).backward()
    grad = table_of(model).weight.grad.coalesce()
    rows = set(grad.indices()[0].tolist())
    expected = set((cat + model.weights.offsets).flatten().tolist())
    assert rows == expected


# --------------------------------------------------------------------------------------------
# ESMM's product logit
# --------------------------------------------------------------------------------------------


def test_product_logit_matches_naive_and_stays_finite():
    a = torch.linspace(-8, 8, 33, dtype=torch.float64)
    a, b = torch.meshgrid(a, a, indexing="ij")
    p = torch.sigmoid(a) * torch.sigmoid(b)
    torch.testing.assert_close(product_logit(a, b), torch.log(p) - torch.log1p(-p))
    extreme = torch.tensor([-200.0, -50.0, 0.0, 50.0, 200.0], requires_grad=True)
    other = torch.tensor([200.0, -50.0, 0.0, 50.0, 200.0], requires_grad=True)
    out = product_logit(extreme, other)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(extreme.grad).all()
    assert out[4] > 100  # p rounds to 1 in float32, the logit stays large and finite
    torch.testing.assert_close(out[0], torch.tensor(-200.0))


def test_esmm_conversion_is_ctr_times_cvr(data):
    model = build("ESMM", data.metadata).eval()
    cat, num, _ = batch(data)
    with torch.no_grad():
        probs = torch.sigmoid(model(cat, num))
        cvr = torch.sigmoid(model.cvr_logit(cat, num))[:, 0]
    torch.testing.assert_close(probs[:, 1], probs[:, 0] * cvr)
    assert (probs[:, 1] <= probs[:, 0] + 1e-7).all()


def test_logistic_regression_is_linear_in_one_hot(data):
    model = build("LogisticRegression", data.metadata)
    cat, num, _ = batch(data, 16)
    table = model.weights.table.weight
    lin = model.weights.numerical[0]
    expected = table[cat + model.weights.offsets].sum(dim=1) + lin(num)
    torch.testing.assert_close(model(cat, num), expected)
    assert sum(p.numel() for p in model.parameters()) == (
        sum(data.metadata.vocab_sizes) * 2 + 63 * 2 + 2
    )


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("SharedBottom", 1_748_482),
        ("NCF", 1_846_914),
        ("LogisticRegression", 6_528),
        ("MMoE", 10_515_730),
        ("OMoE", 10_498_314),
        ("PLE", 15_540_014),
        ("SingleTask", 3_413_762),
        ("AITM", 3_259_138),
        ("ESMM", 2_995_970),
        ("MetaHeac", 10_609_298),
    ],
)
def test_published_sizes_parameter_count(name, count):
    """Default sizes are the published ones (16 fields of 200 rows): a regression guard."""
    meta = DatasetMetadata(vocab_sizes=(200,) * 16)
    model = getattr(models, name)(metadata=meta)
    assert sum(p.numel() for p in model.parameters()) == count


def test_shared_bottom_published_structure():
    meta = DatasetMetadata(vocab_sizes=(200,) * 16)
    model = models.SharedBottom(meta)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    shapes = [(m.in_features, m.out_features) for m in linears]
    assert shapes[:3] == [(63, 128), (17 * 128, 512), (512, 256)]
    assert shapes[3:6] == [(256, 128), (128, 64), (64, 1)]
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    assert (
        functools.reduce(lambda n, m: n + isinstance(m, torch.nn.Dropout), model.modules(), 0) == 6
    )


def test_norm_none_removes_batchnorm_and_still_trains():
    from mtl_clippy.models import NCF, SharedBottom

    meta = DatasetMetadata(vocab_sizes=(5,) * 16)
    cat = torch.randint(0, 5, (32, 16))
    num = torch.rand(32, 63)
    for cls in (SharedBottom, NCF):
        plain = cls(metadata=meta, embed_dim=4, tower_dims=(8,), norm="none")
        assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.modules())
        assert any(
            isinstance(m, torch.nn.BatchNorm1d) for m in cls(metadata=meta, embed_dim=4).modules()
        )
        plain(cat, num).sum().backward()
        assert all(p.grad is not None for p in plain.parameters())
    with pytest.raises(ValueError, match="norm must be one of"):
        SharedBottom(metadata=meta, norm="group")


NORM_BACKBONES = [name for name in BACKBONES if name != "LogisticRegression"]
NORM_LAYERS = {"batch": torch.nn.BatchNorm1d, "layer": torch.nn.LayerNorm}


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", NORM_BACKBONES)
def test_norm_option_of_every_backbone(name, norm, data):
    """``norm`` builds, trains (forward and backward) and puts its layer after every hidden
    Linear of every MLP block: BatchNorm present iff norm=batch, LayerNorm iff norm=layer."""
    torch.manual_seed(0)
    model = build(name, data.metadata, norm=norm).train()
    kinds = [type(m) for m in model.modules()]
    for kind, layer in NORM_LAYERS.items():
        assert (layer in kinds) == (norm == kind), (name, norm, kind)
    for mlp in (m for m in model.modules() if isinstance(m, models.MLP)):
        blocks = sum(isinstance(m, torch.nn.ReLU) for m in mlp)  # one ReLU per hidden block
        normed = [m for m in mlp if isinstance(m, tuple(NORM_LAYERS.values()))]
        assert len(normed) == (0 if norm == "none" else blocks), (name, norm)
        for i, m in enumerate(mlp):  # right after its Linear, with the Linear's width
            if isinstance(m, tuple(NORM_LAYERS.values())):
                assert isinstance(mlp[i - 1], torch.nn.Linear)
                assert m.weight.shape == (mlp[i - 1].out_features,)
    cat, num, labels = batch(data)
    logits = model(cat, num)
    assert logits.shape == (64, data.metadata.n_tasks) and torch.isfinite(logits).all()
    F.binary_cross_entropy_with_logits(logits, labels).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), (name, norm, pname)


@pytest.mark.parametrize("name", NORM_BACKBONES)
def test_norm_parameter_count_and_default(name):
    """Each norm adds exactly 2 parameters per hidden unit (weight and bias), none adds none;
    the default is batch, as before the option existed (the published sizes' counts hold)."""
    meta = DatasetMetadata(vocab_sizes=(7,) * 16)
    cls = getattr(models, name)
    sizes = {k: v for k, v in backbone_config(name).items() if k != "_target_"}

    def count(**kw):
        torch.manual_seed(0)
        model = cls(metadata=meta, **sizes, **kw)
        return model, sum(p.numel() for p in model.parameters())

    plain, n_none = count(norm="none")
    hidden = sum(
        m.out_features
        for mlp in plain.modules()
        if isinstance(mlp, models.MLP)
        for i, m in enumerate(mlp)
        if isinstance(m, torch.nn.Linear) and i + 1 < len(mlp)  # not a tower's -> 1 head
    )
    assert hidden > 0
    assert count(norm="batch")[1] == count(norm="layer")[1] == n_none + 2 * hidden
    default, n_default = count()
    assert n_default == n_none + 2 * hidden
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in default.modules())


def test_logistic_regression_rejects_a_norm():
    meta = DatasetMetadata(vocab_sizes=(3,) * 16)
    models.LogisticRegression(meta, norm="none")
    for norm in ("batch", "layer"):
        with pytest.raises(ValueError, match=r"^norm: logistic regression has no hidden layer"):
            models.LogisticRegression(meta, norm=norm)


def test_model_configs_carry_the_constructor_default_norm():
    """configs/model/*.yaml name ``norm`` with the value the backbone defaults to (so the
    config changes no result), and its values are the ones the MLP accepts. Each config is
    composed (a size variant such as sb_large takes its ``_target_`` from its base)."""
    import inspect
    from pathlib import Path

    import hydra
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    configs = Path(__file__).parents[1] / "configs"
    models_dir = configs / "model"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        composed = {
            p.name: compose(config_name="train", overrides=[f"model={p.stem}"]).model
            for p in models_dir.glob("*.yaml")
        }
    for name, cfg in sorted(composed.items()):
        assert "norm" in OmegaConf.load(models_dir / name), name  # stated in the file itself
        default = inspect.signature(hydra.utils.get_class(cfg._target_)).parameters["norm"].default
        assert cfg.norm == default, name
        assert cfg.norm in NORMS

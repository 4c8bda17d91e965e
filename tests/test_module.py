"""MultiTaskModule: loss, metrics, optimizer/scheduler configs, sparse checks, checkpoints."""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from model_fixtures import (
    adagrad_partial,
    adam_partial,
    auc,
    backbone_config,
    clippy_class,
    clippy_partial,
    make_planted,
)
from mtl_clippy.models import MultiTaskModule, SharedBottom, split_metrics


@pytest.fixture(scope="module")
def data():
    return make_planted(n_train=2000, n_val=1000)


def trainer(root: Path, **kwargs) -> pl.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def module(data, name: str = "SharedBottom", optimizer=None, **kwargs) -> MultiTaskModule:
    return MultiTaskModule(
        backbone=backbone_config(name, **kwargs.pop("backbone_kw", {})),
        metadata=data.metadata,
        optimizer=adam_partial() if optimizer is None else optimizer,
        **kwargs,
    )


def predict(model: MultiTaskModule, tensors) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.predict_step(tensors, 0)


@pytest.fixture(scope="module")
def fitted(data, tmp_path_factory):
    """One real fit (ClippyAdagrad from a Hydra config, 3 epochs); its trainer and checkpoint."""
    root = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    model = MultiTaskModule(
        backbone=OmegaConf.create(backbone_config("SharedBottom")),
        metadata=data.metadata,
        optimizer=OmegaConf.create(
            {
                "_target_": "mtl_clippy.optim.ClippyAdagrad",
                "_partial_": True,
                "lr": 0.1,
                "variable_relative_threshold": 0.5,
                "absolute_threshold": 1e-2,
            }
        ),
    )
    clippy_class()  # skip while the optimizer is missing
    tr = trainer(root, max_epochs=3, num_sanity_val_steps=2)
    tr.fit(model, data.loader("train", 256, shuffle=True), data.loader("val", 300))
    ckpt = tr.checkpoint_callback.best_model_path
    assert ckpt and Path(ckpt).is_file()
    return tr, model, ckpt


# --------------------------------------------------------------------------------------------
# Training with a real Trainer
# --------------------------------------------------------------------------------------------


def test_fit_logs_every_metric_and_learns(fitted):
    tr, _, _ = fitted
    metrics = tr.callback_metrics
    expected = {"train/loss", "train/loss_click", "train/loss_conversion", "val/auc_mean"}
    expected |= {"val/auc_mean_best"}
    expected |= {
        f"val/{m}_{t}" for m in ("auc", "logloss", "calibration") for t in ("click", "conversion")
    }
    assert expected <= set(metrics)
    assert metrics["val/auc_click"] > 0.7
    assert metrics["val/auc_conversion"] > 0.65
    assert metrics["val/auc_mean_best"] >= metrics["val/auc_mean"]
    assert 0.5 < metrics["val/calibration_click"] < 2.0
    assert torch.isfinite(metrics["train/loss"])


def test_validation_metrics_are_exact_over_the_epoch(fitted, data):
    """Metrics accumulated over 4 batches equal the ones computed once on the whole split."""
    tr, model, _ = fitted
    (result,) = tr.validate(model, data.loader("val", 250), verbose=False)
    probs = predict(model, data.val).double().numpy()
    labels = data.val[2].double().numpy()
    for i, task in enumerate(("click", "conversion")):
        p, y = probs[:, i], labels[:, i]
        logloss = -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))
        assert result[f"val/auc_{task}"] == pytest.approx(auc(p, y), abs=1e-6)
        assert result[f"val/logloss_{task}"] == pytest.approx(logloss, rel=1e-5)
        assert result[f"val/calibration_{task}"] == pytest.approx(p.sum() / y.sum(), rel=1e-5)
    mean = (result["val/auc_click"] + result["val/auc_conversion"]) / 2
    assert result["val/auc_mean"] == pytest.approx(mean, abs=1e-7)


def test_checkpoint_reloads_without_data_to_identical_predictions(fitted, data):
    _, model, ckpt = fitted
    # The checkpoint holds only plain containers: the strict loader of torch >= 2.6 reads it.
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    hparams = raw["hyper_parameters"]
    yaml.safe_dump(hparams)  # YAML-able, no Python objects
    assert hparams["metadata"]["vocab_sizes"] == list(data.metadata.vocab_sizes)
    assert hparams["optimizer"]["_target_"] == "mtl_clippy.optim.ClippyAdagrad"

    reloaded = MultiTaskModule.load_from_checkpoint(ckpt, weights_only=True)
    assert isinstance(reloaded.backbone, SharedBottom)
    assert reloaded.metadata == data.metadata
    cat, num, _ = data.val
    expected = predict(model, (cat, num))
    got = predict(reloaded, (cat, num))
    assert torch.equal(got, expected)
    # Default loader arguments work as well.
    assert torch.equal(predict(MultiTaskModule.load_from_checkpoint(ckpt), (cat, num)), expected)


def test_sanity_check_does_not_set_best(data, tmp_path):
    model = module(data)
    tr = trainer(tmp_path, max_epochs=0, num_sanity_val_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.fit(model, data.loader("train", 256), data.loader("val", 300))
    assert model.val_auc_best.update_count == 0


def test_on_train_start_resets_best(data):
    model = module(data)
    model.val_auc_best.update(torch.tensor(0.99))
    model.on_train_start()
    model.val_auc_best.update(torch.tensor(0.6))
    assert model.val_auc_best.compute() == pytest.approx(0.6)


def test_sparse_embeddings_train_with_clippy_in_trainer(data, tmp_path):
    clippy = clippy_class()
    model = module(data, optimizer=clippy_partial(), backbone_kw={"sparse_embeddings": True})
    table = model.backbone.embedding.table
    seen: list[bool] = []
    table.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.is_sparse))
    before = table.weight.detach().clone()
    tr = trainer(tmp_path, max_epochs=3, num_sanity_val_steps=0, enable_checkpointing=False)
    tr.fit(model, data.loader("train", 128, shuffle=True), data.loader("val", 500))
    assert isinstance(tr.optimizers[0], clippy)
    assert seen and all(seen)
    assert not torch.equal(before, table.weight.detach())
    assert tr.callback_metrics["val/auc_click"] > 0.7


def test_step_scheduler_from_config(data, tmp_path):
    model = module(
        data,
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        scheduler_interval="step",
    )
    tr = trainer(tmp_path, max_steps=3, limit_val_batches=0, enable_checkpointing=False)
    # a validation loader that limit_val_batches=0 leaves unused: no validation, and no
    # warning from Lightning that validation_step has no loader
    tr.fit(model, data.loader("train", 256), data.loader("val", 500))
    assert tr.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert model.hparams["scheduler"] == {
        "_target_": "torch.optim.lr_scheduler.StepLR",
        "_partial_": True,
        "step_size": 1,
        "gamma": 0.5,
    }


# --------------------------------------------------------------------------------------------
# Without a Trainer
# --------------------------------------------------------------------------------------------


def test_loss_is_weighted_sum_of_task_bce(data):
    model = module(data, task_weights=[2.0, 0.5]).eval()
    cat, num, labels = (t[:128] for t in data.train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = model.training_step((cat, num, labels), 0)
    logits = model(cat, num)
    expected = 2.0 * F.binary_cross_entropy_with_logits(logits[:, 0], labels[:, 0])
    expected += 0.5 * F.binary_cross_entropy_with_logits(logits[:, 1], labels[:, 1])
    torch.testing.assert_close(loss, expected)


def test_task_weights_must_match_tasks(data):
    with pytest.raises(ValueError, match="task_weights has 3 entries"):
        module(data, task_weights=[1.0, 1.0, 1.0])


def test_predict_step_returns_probabilities(data):
    model = module(data)
    cat, num, labels = (t[:50] for t in data.val)
    probs = predict(model, (cat, num, labels))
    assert probs.shape == (50, 2)
    assert ((probs > 0) & (probs < 1)).all()
    torch.testing.assert_close(probs, torch.sigmoid(model(cat, num)))


@pytest.mark.parametrize(
    "spec",
    [
        {"_target_": "torch.optim.Adagrad", "_partial_": True, "lr": 0.05},
        OmegaConf.create({"_target_": "torch.optim.Adagrad", "lr": 0.05}),
        functools.partial(torch.optim.Adagrad, lr=0.05),
    ],
    ids=["dict", "dictconfig", "partial"],
)
def test_optimizer_specs_normalize_to_one_plain_config(data, spec):
    model = module(data, optimizer=spec)
    assert model.hparams["optimizer"] == {
        "_target_": "torch.optim.adagrad.Adagrad"
        if isinstance(spec, functools.partial)
        else "torch.optim.Adagrad",
        "_partial_": True,
        "lr": 0.05,
    }
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.Adagrad)
    assert opt.param_groups[0]["lr"] == 0.05
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_unstorable_optimizer_is_rejected(data):
    with pytest.raises(ValueError, match="importable"):
        module(data, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))


def test_nested_callable_kwargs_round_trip(data):
    """A scheduler partial whose argument is a function is stored as a Hydra config of it."""
    model = module(
        data,
        scheduler=functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=math.sqrt),
    )
    yaml.safe_dump(dict(model.hparams))
    cfg = model.configure_optimizers()
    scheduler = cfg["lr_scheduler"]["scheduler"]
    assert scheduler.lr_lambdas[0] is math.sqrt
    assert cfg["lr_scheduler"]["interval"] == "epoch"


@pytest.mark.parametrize("sparse_optimizer", ["adagrad", "clippy"])
def test_sparse_embeddings_accept_sparse_capable_optimizers(data, sparse_optimizer):
    factory = adagrad_partial() if sparse_optimizer == "adagrad" else clippy_partial()
    model = module(data, optimizer=factory, backbone_kw={"sparse_embeddings": True})
    opt = model.configure_optimizers()
    cat, num, labels = (t[:64] for t in data.train)
    loss = F.binary_cross_entropy_with_logits(model(cat, num), labels)
    loss.backward()
    assert model.backbone.embedding.table.weight.grad.is_sparse
    opt.step()


def test_sparse_embeddings_with_adam_is_a_clear_error(data):
    model = module(data, optimizer=adam_partial(), backbone_kw={"sparse_embeddings": True})
    with pytest.raises(ValueError) as err:
        model.configure_optimizers()
    message = str(err.value)
    for word in ("sparse_embeddings", "Adam", "ClippyAdagrad", "Adagrad"):
        assert word in message


def test_sparse_embeddings_with_adam_fails_before_training(data, tmp_path):
    model = module(data, optimizer=adam_partial(), backbone_kw={"sparse_embeddings": True})
    before = [p.detach().clone() for p in model.parameters()]
    tr = trainer(tmp_path, max_steps=2, limit_val_batches=0, enable_checkpointing=False)
    with pytest.raises(ValueError, match="sparse_embeddings"):
        tr.fit(model, data.loader("train", 256), data.loader("val", 500))  # val unused
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_task_metrics_single_class_logs_nan_with_warning():
    metrics = split_metrics(["conversion"], "val/")
    logits = torch.randn(40, 1)
    metrics.update(logits[:20], torch.zeros(20, 1))
    metrics.update(logits[20:], torch.zeros(20, 1))
    with pytest.warns(UserWarning, match="AUC is undefined"):
        values = metrics.compute()
    assert math.isnan(values["val/auc_conversion"]) and math.isnan(
        values["val/calibration_conversion"]
    )
    expected = F.binary_cross_entropy_with_logits(logits[:, 0], torch.zeros(40))
    torch.testing.assert_close(values["val/logloss_conversion"], expected)


def test_validation_epoch_with_a_single_class_does_not_crash(data, tmp_path):
    cat, num, labels = (t[:400] for t in data.val)
    labels = labels.clone()
    labels[:, 1] = 0.0  # no conversion at all in this epoch
    loader = DataLoader(TensorDataset(cat, num, labels), batch_size=100)
    model = module(data)
    tr = trainer(tmp_path)
    with pytest.warns(UserWarning, match="AUC is undefined"):
        # pytest.warns records every warning and shows again those that do not match, past
        # pyproject.toml's filters: Lightning's LeafSpec deprecation is kept out here too
        warnings.filterwarnings(
            "ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning
        )
        (result,) = tr.validate(model, loader, verbose=False)
    assert math.isnan(result["val/auc_conversion"])
    assert math.isnan(result["val/auc_mean"])
    assert 0.0 <= result["val/auc_click"] <= 1.0
    assert result["val/logloss_conversion"] > 0


def test_test_split_metrics(fitted, data):
    tr, model, _ = fitted
    (result,) = tr.test(model, data.loader("val", 500), verbose=False)
    assert {
        f"test/{m}_{t}" for m in ("auc", "logloss", "calibration") for t in ("click", "conversion")
    } <= set(result)
    assert result["test/auc_click"] > 0.7
    assert "test/auc_mean" in result


@pytest.mark.parametrize("clip", [None, 1.0])
def test_fused_adam_trains_with_and_without_gradient_clipping(data, tmp_path, clip):
    """optim=adam is torch's fused Adam, which Lightning cannot clip: with
    trainer.gradient_clip_val set (grad_clip=norm) the run takes the unfused kernel, says so
    once, and trains; without clipping it keeps the fused one."""
    fused = OmegaConf.create(
        {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3, "fused": True}
    )
    model = module(data, optimizer=fused)
    loader = DataLoader(TensorDataset(*data.train), batch_size=256)
    t = trainer(tmp_path, max_steps=3, gradient_clip_val=clip, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        t.fit(model, loader)
    opt = t.optimizers[0]
    assert opt.defaults["fused"] is (clip is None)
    said = [w for w in seen if "cannot be combined with gradient clipping" in str(w.message)]
    assert len(said) == (0 if clip is None else 1)
    assert t.global_step == 3

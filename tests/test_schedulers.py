"""Learning-rate schedules from configs/scheduler/: each one, in a real short fit, changes the
learning rate when and how its config says (per step or per epoch; on a plateau after a
non-improving epoch), compared with the schedule written out independently here."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from app_helpers import TINY
from mtl_clippy.errors import ConfigError
from mtl_clippy.models import WarmupCosineLR
from mtl_clippy.train import build, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
LR = 0.1
EPOCHS = 3
#: TINY: 3,000 rows, 10 % for validation, batches of 256, the last partial one dropped.
STEPS_PER_EPOCH = 2700 // 256


def _compose(tmp_path: Path, data_dir: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(data_dir), force_add=True)
    return cfg


# The fixed part of every fit here: a tiny SharedBottom with AdaGrad, float32, the learning rate
# of every step logged to a CSV file, no other callbacks, no test pass.
FIT = [
    *TINY,
    "optim=adagrad",
    f"optim.lr={LR}",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks=none",
    "+callbacks.lr={_target_:lightning.pytorch.callbacks.LearningRateMonitor,"
    "logging_interval:step}",
    "model.embed_dim=4",
    "model.bottom_dims=[8]",
    "model.tower_dims=[4]",
    "test=false",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sched_data")


def _fit(
    tmp_path: Path, data_dir: Path, overrides: list[str], epochs: int = EPOCHS, val_every: int = 1
):
    """Fit a small SharedBottom with AdaGrad; the learning rate of every optimizer step (as
    Lightning's LearningRateMonitor logged it, before the step) and val/auc_mean per epoch."""
    cfg = _compose(
        tmp_path,
        data_dir,
        [
            *overrides,
            *FIT,
            f"trainer.max_epochs={epochs}",
            f"trainer.check_val_every_n_epoch={val_every}",
        ],
    )
    summary = train(cfg)
    assert summary["status"] == "completed", summary.get("error")
    assert summary["steps"] == epochs * STEPS_PER_EPOCH
    df = pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")
    lr_col = next(c for c in df.columns if c.startswith("lr-"))
    lrs = df.dropna(subset=[lr_col]).sort_values("step")
    assert lrs["step"].tolist() == list(range(epochs * STEPS_PER_EPOCH))
    val = df.dropna(subset=["val/auc_mean"]).sort_values("step")["val/auc_mean"].to_numpy()
    assert len(val) == epochs // val_every
    return lrs[lr_col].to_numpy(), val


def _per_epoch(lrs: np.ndarray) -> np.ndarray:
    return lrs.reshape(-1, STEPS_PER_EPOCH)


def test_no_scheduler_keeps_the_learning_rate(tmp_path, data_dir):
    lrs, _ = _fit(tmp_path, data_dir, ["scheduler=none"], epochs=1)
    np.testing.assert_allclose(lrs, LR, rtol=0, atol=1e-12)


def test_cosine_steps_once_per_epoch(tmp_path, data_dir):
    lrs, _ = _fit(tmp_path, data_dir, ["scheduler=cosine"])
    epochs = _per_epoch(lrs)
    # constant inside each epoch, the cosine of the epoch index between epochs
    np.testing.assert_allclose(epochs, epochs[:, :1].repeat(STEPS_PER_EPOCH, 1), atol=1e-12)
    expected = [LR * (1 + math.cos(math.pi * e / EPOCHS)) / 2 for e in range(EPOCHS)]
    np.testing.assert_allclose(epochs[:, 0], expected, rtol=1e-9)


def test_warmup_cosine_steps_every_step_over_the_whole_run(tmp_path, data_dir):
    lrs, _ = _fit(tmp_path, data_dir, ["scheduler=warmup_cosine", "scheduler.warmup_fraction=0.2"])
    total = EPOCHS * STEPS_PER_EPOCH  # the trainer's estimate fills total_steps: null
    warm = round(0.2 * total)
    expected = []
    for s in range(total):  # written out: linear warm-up to LR, then half a cosine to 0
        if s < warm:
            expected.append(LR * (s + 1) / (warm + 1))
        else:
            expected.append(LR * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    np.testing.assert_allclose(lrs, expected, rtol=1e-9, atol=1e-15)
    assert len(set(np.round(lrs[:STEPS_PER_EPOCH], 12))) == STEPS_PER_EPOCH  # every step


def test_plateau_reduces_after_a_non_improving_epoch(tmp_path, data_dir):
    # A relative threshold of 1 makes every epoch after the first "not better" (an AUC would
    # have to double); patience 0 reduces after the first such epoch.
    lrs, val = _fit(
        tmp_path,
        data_dir,
        ["scheduler=plateau", "scheduler.patience=0", "scheduler.threshold=1.0"],
        epochs=4,
    )
    epochs = _per_epoch(lrs)
    np.testing.assert_allclose(epochs, epochs[:, :1].repeat(STEPS_PER_EPOCH, 1), atol=1e-12)
    # ReduceLROnPlateau's rule written out on the observed val/auc_mean (mode max)
    best, bad, lr, expected = -math.inf, 0, LR, []
    for auc in val[:-1]:
        expected.append(lr)
        if auc > best * (1 + 1.0):  # mode max, threshold_mode rel, threshold 1
            best, bad = auc, 0
        else:
            bad += 1
        if bad > 0:
            lr, bad = lr * 0.5, 0
    expected.append(lr)
    np.testing.assert_allclose(epochs[:, 0], expected, rtol=1e-12)
    np.testing.assert_allclose(epochs[:, 0], [LR, LR, LR / 2, LR / 4], rtol=1e-12)


def test_plateau_on_an_improving_metric_keeps_the_learning_rate(tmp_path, data_dir):
    # The monitor is really val/auc_mean in mode max: with an absolute threshold of -1 every
    # epoch improves, so the rate never drops (it would with mode or monitor ignored).
    lrs, _ = _fit(
        tmp_path,
        data_dir,
        [
            "scheduler=plateau",
            "scheduler.patience=0",
            "scheduler.threshold_mode=abs",
            "scheduler.threshold=-1.0",
        ],
    )
    np.testing.assert_allclose(lrs, LR, atol=1e-12)


def test_scheduler_keys_reach_the_module_not_the_scheduler(tmp_path, data_dir):
    cfg = _compose(
        tmp_path,
        data_dir,
        ["scheduler=plateau", "scheduler.monitor=val/logloss_click", "scheduler.mode=min", *TINY],
    )
    _, module = build(cfg)
    assert module.hparams["scheduler_interval"] == "epoch"
    assert module.hparams["scheduler_monitor"] == "val/logloss_click"
    assert not {"interval", "monitor"} & set(module.hparams["scheduler"])
    cfg = _compose(tmp_path, data_dir, ["scheduler=warmup_cosine", *TINY])
    _, module = build(cfg)
    assert module.hparams["scheduler_interval"] == "step"
    assert module.hparams["scheduler"]["total_steps"] is None  # filled at fit time


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["scheduler=cosine", "scheduler.interval=hourly"], "scheduler.interval: expected"),
        (["scheduler=plateau", "scheduler.monitor=val/nope"], "scheduler.monitor: 'val/nope'"),
        (["scheduler=plateau", "scheduler.mode=min"], "scheduler.mode: min is the wrong"),
        (["scheduler=plateau", "scheduler.interval=step"], "scheduler.monitor: val/auc_mean"),
        (["scheduler=plateau", "scheduler.factor=2"], "scheduler: Factor should be < 1.0"),
        (
            ["scheduler=warmup_cosine", "scheduler.warmup_fraction=1.5"],
            "scheduler.warmup_fraction must be in [0, 1)",
        ),
        # train/ metrics are logged per step: per epoch the plateau would judge one batch
        (
            ["scheduler=plateau", "scheduler.monitor=train/loss", "scheduler.mode=min"],
            "scheduler.monitor: train/loss is logged per step only",
        ),
        # no validation rows: Lightning would stop after epoch 0 without val/auc_mean
        (
            ["scheduler=plateau", "data.val_fraction=0"],
            "scheduler.monitor: val/auc_mean is computed on the validation rows, but "
            "data.val_fraction=0",
        ),
        # values the scheduler only uses when it steps (a traceback after the first step)
        (["scheduler=cosine", "scheduler.eta_min=abc"], "scheduler.eta_min: expected a number"),
        (["scheduler=cosine", "scheduler.T_max=0"], "scheduler.T_max must be a whole number"),
        (
            ["scheduler=cosine", "scheduler.eta_min=[0.1]"],
            "scheduler: CosineAnnealingLR fails on its first step (TypeError",
        ),
        (["scheduler=cosine", "scheduler.T_max=abc"], "scheduler.T_max must be a whole number"),
        (
            ["scheduler=cosine", "+scheduler.monitor=val/nothing"],
            "scheduler.monitor: only a ReduceLROnPlateau scheduler watches a metric",
        ),
        (
            ["scheduler=plateau", "scheduler.monitor=val/calibration_click", "scheduler.mode=max"],
            "scheduler.monitor: val/calibration_click (predicted over observed positives",
        ),
        (
            ["scheduler=plateau", "scheduler.monitor=val/calibration_click", "scheduler.mode=min"],
            "scheduler.monitor: val/calibration_click (predicted over observed positives",
        ),
    ],
)
def test_bad_scheduler_settings_are_one_clear_line(overrides, message, tmp_path, data_dir):
    cfg = _compose(tmp_path, data_dir, [*overrides, *TINY])
    with pytest.raises(ConfigError) as err:
        build(cfg)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


@settings(max_examples=30)
@given(
    total=st.integers(1, 500),
    fraction=st.floats(0.0, 0.99),
    floor=st.floats(0.0, 1.0),
    resume_at=st.integers(0, 600),
)
def test_warmup_cosine_shape_and_resume(total, fraction, floor, resume_at):
    """Rises to the base rate, then falls monotonically to floor x base; a scheduler restored
    from a state_dict continues with the same rates."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2.0)
    sched = WarmupCosineLR(opt, total_steps=total, warmup_fraction=fraction, min_lr_ratio=floor)
    lrs, states = [], {}
    for s in range(total + 5):
        states[s] = sched.state_dict()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs = np.array(lrs)
    w = sched.warmup_steps
    assert w == min(round(fraction * total), total - 1)
    assert np.all(np.diff(lrs[: w + 1]) > 0)
    assert lrs[w] == pytest.approx(2.0)
    assert np.all(np.diff(lrs[w:]) <= 1e-12)
    assert lrs[total:] == pytest.approx(2.0 * floor)
    assert lrs[w:].min() >= 2.0 * floor - 1e-12 and lrs.max() <= 2.0 + 1e-12
    at = min(resume_at, total + 4)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    again = WarmupCosineLR(opt2, total_steps=total, warmup_fraction=fraction, min_lr_ratio=floor)
    again.load_state_dict(states[at])
    assert again.get_last_lr()[0] == pytest.approx(lrs[at])
    opt2.step()
    again.step()
    if at + 1 < len(lrs):
        assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[at + 1])


def test_plateau_waits_for_the_epochs_that_validate(tmp_path, data_dir):
    # Validation every 2nd epoch: the scheduler is stepped only after it (Lightning would
    # stop the run after epoch 0, whose val/auc_mean does not exist).
    lrs, _ = _fit(tmp_path, data_dir, ["scheduler=plateau"], epochs=2, val_every=2)
    np.testing.assert_allclose(lrs, LR, atol=1e-12)


def _cosine(step: float, length: float) -> float:
    return LR * 0.5 * (1 + math.cos(math.pi * step / length))


@pytest.mark.parametrize(
    "scheduler, interval",
    # (cosine per epoch and warmup_cosine per step, their defaults, are checked above)
    [("warmup_cosine", "epoch"), ("cosine", "step")],
)
def test_the_length_is_filled_in_the_unit_of_interval(scheduler, interval, tmp_path, data_dir):
    # 2 epochs of 10 steps: the schedule is 2 long per epoch, 20 long per step (warmup 0)
    extra = ["scheduler.warmup_fraction=0"] if scheduler == "warmup_cosine" else []
    lrs, _ = _fit(
        tmp_path,
        data_dir,
        [f"scheduler={scheduler}", f"scheduler.interval={interval}", *extra],
        epochs=2,
    )
    if interval == "epoch":
        expected = np.repeat([_cosine(e, 2) for e in range(2)], STEPS_PER_EPOCH)
    else:
        expected = [_cosine(s, 2 * STEPS_PER_EPOCH) for s in range(2 * STEPS_PER_EPOCH)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6, atol=1e-12)


def _resumed_lrs(tmp_path: Path, data_dir: Path, name: str, epochs: int, ckpt: Path | None):
    """Steps and learning rates of a warmup_cosine fit (resumed from ``ckpt``), saving a
    checkpoint after every epoch in <name>/run/ep."""
    out = tmp_path / name
    overrides = [
        "scheduler=warmup_cosine",
        "scheduler.warmup_fraction=0.2",
        *FIT,
        f"trainer.max_epochs={epochs}",
        "+callbacks.ep={_target_:lightning.pytorch.callbacks.ModelCheckpoint,"
        f"dirpath:'{out / 'run' / 'ep'}',save_top_k:-1,monitor:null}}",
    ]
    if ckpt is not None:
        overrides.append(f"ckpt_path='{ckpt}'")
    summary = train(_compose(out, data_dir, overrides))
    assert summary["status"] == "completed", summary.get("error")
    df = pd.read_csv(out / "run" / "csv" / "metrics.csv")
    col = next(c for c in df.columns if c.startswith("lr-"))
    lrs = df.dropna(subset=[col]).sort_values("step")
    return lrs["step"].to_numpy(), lrs[col].to_numpy()


def _warmup_cosine(total: int, fraction: float) -> np.ndarray:
    warm = round(fraction * total)
    return np.array(
        [LR * (s + 1) / (warm + 1) if s < warm else _cosine(s - warm, total - warm)
         for s in range(total)]
    )  # fmt: skip


@pytest.mark.slow
def test_warmup_cosine_resumed_follows_the_resumed_runs_length(tmp_path, data_dir):
    steps, whole = _resumed_lrs(tmp_path, data_dir, "whole", 2, None)
    assert steps.tolist() == list(range(20))
    np.testing.assert_allclose(whole, _warmup_cosine(20, 0.2), rtol=1e-9)
    (ckpt,) = (tmp_path / "whole" / "run" / "ep").glob("epoch=0-*.ckpt")  # after 10 steps
    # the same config: the same rates as the uninterrupted run
    steps, same = _resumed_lrs(tmp_path, data_dir, "same", 2, ckpt)
    assert steps.tolist() == list(range(10, 20))
    np.testing.assert_allclose(same, whole[10:], rtol=1e-12)
    # twice as long: steps 10-39 follow the 40-step schedule (not the checkpoint's 20 steps,
    # which would leave steps 20-39 at a rate of 0)
    with pytest.warns(UserWarning, match="schedule was 20 steps long, this run's is 40"):
        steps, longer = _resumed_lrs(tmp_path, data_dir, "longer", 4, ckpt)
    assert steps.tolist() == list(range(10, 40))
    np.testing.assert_allclose(longer, _warmup_cosine(40, 0.2)[10:], rtol=1e-9)


def test_warmup_cosine_state_keeps_a_filled_length():
    """A state_dict of a 20-step schedule loaded into one whose length was filled from the
    trainer (40 steps) keeps 40 and sets the optimizer's rate to step 10's of the 40-step
    schedule; a given length takes the checkpoint's, as torch's schedulers do."""

    def make(total: int, filled: bool) -> WarmupCosineLR:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        sched = WarmupCosineLR(opt, total_steps=total, warmup_fraction=0.2)
        sched.length_from_trainer = filled
        return sched

    old = make(20, True)
    for _ in range(10):
        old.optimizer.step()
        old.step()
    state = old.state_dict()
    new = make(40, True)
    with pytest.warns(UserWarning, match="was 20 steps long, this run's is 40"):
        new.load_state_dict(state)
    assert new.total_steps == 40 and new.warmup_steps == 8 and new.last_epoch == 10
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(_warmup_cosine(40, 0.2)[10])
    given = make(40, False)
    given.load_state_dict(state)
    assert given.total_steps == 20
    assert given.optimizer.param_groups[0]["lr"] == pytest.approx(_warmup_cosine(20, 0.2)[10])

"""Training stability: divergence is a result (status "diverged"), not a crash; optimizer
telemetry per parameter group reaches the loggers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from app_helpers import TINY, run_train
from mtl_clippy.callbacks import DivergenceMonitor, OptimizerTelemetry, TrainingDiverged
from mtl_clippy.callbacks.telemetry import group_of
from mtl_clippy.summary import collapsed_tasks

ROOT = Path(__file__).resolve().parents[1]
DIVERGING = ["optim=adagrad", "optim.lr=1e6"]  # the loss explodes within a dozen steps


# ----------------------------------------------------------------------------- the rule


def _feed(monitor: DivergenceMonitor, losses: list[float]) -> int | None:
    for step, loss in enumerate(losses, start=1):
        if monitor.observe(step, loss):
            return step
    return None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_diverges_at_that_step_even_in_warmup(bad):
    m = DivergenceMonitor(warmup_steps=10)
    assert _feed(m, [0.7, 0.6, bad, 0.5]) == 3
    s = m.summary()
    assert s["step"] == 3 and s["last_finite_loss"] == pytest.approx(0.6)
    assert "non-finite" in s["reason"]


def test_a_loss_that_stays_above_k_x_the_median_diverges_at_its_first_step():
    # persist_steps=16: settled at the 9th high loss (more than half of 16), dated at the first
    m = DivergenceMonitor(warmup_steps=5, spike_factor=10, window=50, persist_steps=16)
    losses = [1.0] * 20 + [10.5] * 30
    assert _feed(m, losses) == 29
    s = m.summary()
    assert s["verdict"] == "diverged" and s["step"] == 21 and s["detected_step"] == 29
    assert s["last_finite_loss"] == 10.5 and m.reason.startswith("loss rise")
    assert s["spikes"] == 0
    # exactly k x the median is not above it
    m2 = DivergenceMonitor(warmup_steps=5, spike_factor=10)
    assert _feed(m2, [1.0] * 20 + [10.0] * 30) is None and m2.finish() is False
    assert m2.summary()["verdict"] == "stable"


def test_persist_steps_1_is_the_single_step_rule():
    m = DivergenceMonitor(warmup_steps=5, spike_factor=10, window=50, persist_steps=1)
    assert _feed(m, [1.0] * 20 + [10.5]) == 21
    assert m.summary()["last_finite_loss"] == 10.5 and m.detected_step == 21
    m2 = DivergenceMonitor(warmup_steps=5, spike_factor=10, persist_steps=1)
    assert _feed(m2, [1.0] * 20 + [10.0]) is None


def test_spike_during_warmup_is_ignored():
    m = DivergenceMonitor(warmup_steps=10, spike_factor=10)
    assert _feed(m, [1.0, 1.0, 1.0, 50.0, 1.0, *[1.0] * 20]) is None
    m.finish()
    assert m.spikes == 0 and m.diverged_step is None and m.verdict == "stable"
    # the same jump after the warm-up opens a rise: one loss back to normal, a spike
    m2 = DivergenceMonitor(warmup_steps=2, spike_factor=10)
    assert _feed(m2, [1.0, 1.0, 1.0, 50.0, *[1.0] * 20]) is None
    assert m2.spikes == 1 and m2.spike_steps == [4] and m2.spike_peaks == [50.0]
    # and with the single-step rule it ends the run
    m3 = DivergenceMonitor(warmup_steps=2, spike_factor=10, persist_steps=1)
    assert _feed(m3, [1.0, 1.0, 1.0, 50.0]) == 4


def test_spikes_are_counted_and_the_run_goes_on():
    # three rises above 10 x the median (one of two steps), each back to 1.0 at once
    m = DivergenceMonitor(warmup_steps=3, spike_factor=10, persist_steps=16)
    losses = [1.0] * 10 + [60.0] + [1.0] * 10 + [90.0, 80.0] + [1.0] * 10 + [40.0] + [1.0] * 20
    assert _feed(m, losses) is None and not m.finish()
    s = m.summary()
    assert s["verdict"] == "spiked" and s["step"] is None and s["detected_step"] is None
    assert s["spikes"] == 3 and s["spike_steps"] == [11, 22, 34]
    assert s["spike_peaks"] == [60.0, 90.0, 40.0] and s["open_rise_step"] is None
    # losses between 5 and 10 x the median (the old rule's "small spikes") are noise now
    m2 = DivergenceMonitor(warmup_steps=3, spike_factor=10)
    assert _feed(m2, [1.0] * 10 + [6.0] + [1.0] * 5 + [9.0] + [1.0] * 3) is None
    assert not m2.finish() and m2.spikes == 0
    # at most max_recorded_spikes are kept, all are counted
    m3 = DivergenceMonitor(warmup_steps=3, spike_factor=10, max_recorded_spikes=2)
    assert _feed(m3, losses) is None and m3.spikes == 3 and m3.spike_steps == [11, 22]


def test_max_loss_applies_during_warmup():
    m = DivergenceMonitor(warmup_steps=10, max_loss=100)
    assert _feed(m, [1.0, 1e4]) == 2 and "max_loss" in m.reason
    assert _feed(DivergenceMonitor(warmup_steps=10), [1.0, 1e4, 1.0]) is None


def test_device_losses_are_read_every_n_steps_and_the_step_is_exact():
    m = DivergenceMonitor(warmup_steps=0, check_every_n_steps=4)
    m._every = 4
    trainer = SimpleNamespace(should_stop=False, global_step=0)
    losses = [1.0, 1.0, float("nan"), 1.0, 1.0]
    with pytest.raises(TrainingDiverged) as info:
        for step, v in enumerate(losses, start=1):
            trainer.global_step = step
            m.on_train_batch_end(trainer, None, {"loss": torch.tensor(v)}, None, step - 1)
            if step < 4:
                assert m._pending and m.diverged_step is None  # not read yet: no sync
    assert info.value.step == 3 and m.diverged_step == 3
    assert trainer.should_stop and trainer.global_step == 4


def test_monitor_config_is_validated():
    with pytest.raises(ValueError, match="spike_factor"):
        DivergenceMonitor(spike_factor=1.0)
    with pytest.raises(ValueError, match="persist_steps"):
        DivergenceMonitor(persist_steps=0)
    with pytest.raises(TypeError, match="small_spike_factor"):  # removed with the old rule
        DivergenceMonitor(spike_factor=10, small_spike_factor=20)
    with pytest.raises(ValueError, match="check_every_n_steps"):
        DivergenceMonitor(check_every_n_steps=0)


def test_collapsed_tasks_are_the_ones_near_chance():
    test = {"auc_click": 0.505, "auc_conversion": 0.489, "auc_mean": 0.5, "logloss_click": 0.5}
    assert collapsed_tasks(test) == ["click"]
    assert collapsed_tasks({"auc_click": 0.7, "auc_conversion": float("nan")}) == []
    assert collapsed_tasks(None) == []


def test_parameter_groups():
    assert group_of("backbone.embedding.table.weight") == "embeddings"
    assert group_of("backbone.weights.table.weight", nn.Embedding(3, 2)) == "embeddings"
    assert group_of("backbone.towers.0.net.0.weight") == "towers"
    assert group_of("backbone.gates.1.weight") == "gates"
    assert group_of("backbone.experts.0.net.0.weight") == "bottom"
    assert group_of("backbone.bottom.net.0.bias") == "bottom"


# ----------------------------------------------------------------------------- telemetry


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4, sparse=True)
        self.tower = nn.Linear(4, 1)

    def forward(self, x):
        return self.tower(self.embedding(x)).sum()


class _Logger:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def test_telemetry_values_match_a_direct_computation():
    from mtl_clippy.optim import ClippyAdagrad

    torch.manual_seed(0)
    model = _Model()
    module = SimpleNamespace(
        named_modules=model.named_modules, parameters=model.parameters, device=torch.device("cpu")
    )
    opt = ClippyAdagrad(model.parameters(), lr=0.5)
    logger = _Logger()
    trainer = SimpleNamespace(global_step=0, optimizers=[opt], loggers=[logger])
    tel = OptimizerTelemetry(log_every_n_steps=2)
    tel.on_fit_start(trainer, module)
    grad_norms, sigmas = [], []
    for step in range(2):
        opt.zero_grad()
        model(torch.tensor([1, 2, 2, 7])).backward()
        grad_norms.append(
            (
                model.embedding.weight.grad.coalesce()._values().norm().item(),
                torch.cat([model.tower.weight.grad.flatten(), model.tower.bias.grad]).norm().item(),
            )
        )
        before = [p.detach().clone() for p in model.parameters()]
        tel.on_before_optimizer_step(trainer, module, opt)
        opt.step()
        trainer.global_step += 1
        tel.on_train_batch_end(trainer, module, None, None, step)
        sigmas.append([opt.state[p]["clipping_factor"].item() for p in model.parameters()])
    assert len(logger.logged) == 1
    step, m = logger.logged[0]
    assert step == 2
    assert m["telemetry/grad_norm/embeddings"] == pytest.approx(
        (grad_norms[0][0] + grad_norms[1][0]) / 2, rel=1e-5
    )
    assert m["telemetry/grad_norm/towers"] == pytest.approx(
        (grad_norms[0][1] + grad_norms[1][1]) / 2, rel=1e-5
    )
    after = list(model.parameters())
    ratio_tower = math.sqrt(
        sum(((a - b).norm() ** 2).item() for a, b in zip(after[1:], before[1:]))
    ) / math.sqrt(sum((b.norm() ** 2).item() for b in before[1:]))
    assert m["telemetry/update_ratio/towers"] == pytest.approx(ratio_tower, rel=1e-4)
    tower_sigmas = [s for row in sigmas for s in row[1:]]
    assert m["telemetry/clip_min/towers"] == pytest.approx(min(tower_sigmas), rel=1e-6)
    assert m["telemetry/clip_mean/towers"] == pytest.approx(
        sum(tower_sigmas) / len(tower_sigmas), rel=1e-6
    )
    expected_fraction = sum(any(s < 1 for s in row[1:]) for row in sigmas) / 2
    assert m["telemetry/clip_fraction/towers"] == pytest.approx(expected_fraction)
    assert not any("gates" in k or "bottom" in k for k in m)  # absent groups are not logged


def test_telemetry_reports_a_tensor_whose_first_gradient_comes_late():
    """The optimizer creates a tensor's state on its first step: a tower without a gradient on
    the first step (its task absent from the batch) joins the clipping telemetry once it has
    one, instead of being left out for the whole fit."""
    from mtl_clippy.optim import ClippyAdagrad

    torch.manual_seed(0)
    model = _Model()
    module = SimpleNamespace(
        named_modules=model.named_modules, parameters=model.parameters, device=torch.device("cpu")
    )
    opt = ClippyAdagrad(model.parameters(), lr=1.0, variable_relative_threshold=0.01)
    logger = _Logger()
    trainer = SimpleNamespace(global_step=0, optimizers=[opt], loggers=[logger])
    tel = OptimizerTelemetry(log_every_n_steps=2)
    tel.on_fit_start(trainer, module)
    tower_sigmas = []
    for step in range(4):
        opt.zero_grad(set_to_none=True)
        x = torch.tensor([1, 2, 2, 7])
        loss = model.embedding(x).sum() if step == 0 else model(x) * 100
        loss.backward()
        tel.on_before_optimizer_step(trainer, module, opt)
        opt.step()
        trainer.global_step += 1
        tel.on_train_batch_end(trainer, module, None, None, step)
        if step > 0:
            tower_sigmas.append(
                [opt.state[p]["clipping_factor"].item() for p in model.tower.parameters()]
            )
    assert step == 3 and len(logger.logged) == 2
    first, second = logger.logged[0][1], logger.logged[1][1]
    assert "telemetry/clip_min/towers" in first  # joined at the second step
    assert first["telemetry/clip_min/towers"] == pytest.approx(min(tower_sigmas[0]), rel=1e-6)
    late = [s for row in tower_sigmas[1:] for s in row]
    assert second["telemetry/clip_min/towers"] == pytest.approx(min(late), rel=1e-6)
    assert second["telemetry/clip_mean/towers"] == pytest.approx(sum(late) / len(late), rel=1e-6)
    assert min(late) < 1  # the tower is clipped: what the telemetry must not hide
    assert "telemetry/clip_min/embeddings" in first and "telemetry/clip_min/embeddings" in second


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("stability") / "data"


def _only_run(tmp_path: Path) -> Path:
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


def test_a_diverging_run_is_a_result_not_a_crash(tmp_path, data_dir):
    # max_loss makes it diverge at once, in the first epoch: no checkpoint may exist at all
    res = run_train(
        [
            *TINY,
            *DIVERGING,
            "trainer.max_epochs=2",
            "callbacks.divergence_monitor.max_loss=100",
            f"paths.data_dir={data_dir}",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = _only_run(tmp_path)
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "diverged" and m["test"] is None and m["error"] is None
    div = m["divergence"]
    assert div["step"] is not None and 1 <= div["step"] <= 3 and "max_loss" in div["reason"]
    assert m["steps"] == div["step"]  # no optimizer step after the divergent one
    assert m["best"]["checkpoint"] is None and not list(run.rglob("*.ckpt"))
    assert m["max_abs_logit"] is not None and m["max_abs_logit"] > 1.0
    assert f"run diverged at step {div['step']}" in res.stdout
    assert "Traceback" not in res.stderr


def test_spike_rule_after_warmup_catches_the_spike_and_skips_the_test(tmp_path, data_dir):
    res = run_train(
        [
            *TINY,
            *DIVERGING,
            "trainer.max_epochs=3",
            "logger=none",
            "callbacks.divergence_monitor.max_loss=null",  # the relative rule alone
            # The loss jumps from about 1.3 to about 1e10 at step 2 (the exact trajectory
            # depends on dropout's random draws): a one-step warm-up puts that jump after it.
            "callbacks.divergence_monitor.warmup_steps=1",
            f"paths.data_dir={data_dir}",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((_only_run(tmp_path) / "metrics.json").read_text())
    assert m["status"] == "diverged" and m["stability"] == "diverged" and m["test"] is None
    div = m["divergence"]
    assert div["verdict"] == "diverged" and div["step"] > 1  # after the warm-up
    # the loss stays above 10 x the median (a rise), or becomes NaN inside that rise: dated at
    # the rise's first step either way
    assert div["reason"].startswith("loss rise") or "inside a rise" in div["reason"], div
    assert div["last_finite_loss"] is not None
    assert m["steps"] == div["detected_step"] >= div["step"]  # no step after the settling one
    assert "diverged at step" in res.stdout


def test_sweep_records_the_diverged_job_and_runs_the_other(tmp_path, data_dir):
    res = run_train(
        [
            "-m",
            "optim=adagrad",
            "optim.lr=1e6,0.1",
            *TINY,
            "trainer.max_epochs=2",
            "logger=none",
            f"paths.data_dir={data_dir}",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sweep = next((tmp_path / "outputs" / "multirun").iterdir())
    df = pd.read_csv(sweep / "results.csv").set_index("lr")
    assert len(df) == 2
    assert df.loc[1e6, "status"] == "diverged" and df.loc[1e6, "diverged_at_step"] > 0
    assert pd.isna(df.loc[1e6, "test_auc_click"])
    assert df.loc[0.1, "status"] == "completed" and 0 < df.loc[0.1, "test_auc_click"] < 1
    assert pd.isna(df.loc[0.1, "diverged_at_step"])
    assert {"spikes", "collapsed", "max_abs_logit"} <= set(df.columns)
    assert "1 not completed" in res.stdout


def test_telemetry_tags_reach_tensorboard(tmp_path, data_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = run_train(
        [
            *TINY,
            "model=mmoe",
            "optim=clippy",
            "trainer.max_epochs=1",
            "callbacks.optimizer_telemetry.log_every_n_steps=3",
            f"paths.data_dir={data_dir}",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = _only_run(tmp_path)
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and m["divergence"]["step"] is None
    assert m["max_abs_logit"] > 0 and isinstance(m["collapsed"], list)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for group in ("embeddings", "towers", "gates", "bottom"):
        for q in ("grad_norm", "update_ratio", "clip_min", "clip_mean", "clip_fraction"):
            assert f"telemetry/{q}/{group}" in tags
    steps = [e.step for e in acc.Scalars("telemetry/grad_norm/bottom")]
    assert steps and all(s % 3 == 0 for s in steps)
    for e in acc.Scalars("telemetry/clip_min/towers"):
        assert 0.0 <= e.value <= 1.0
    for e in acc.Scalars("telemetry/update_ratio/embeddings"):
        assert 0.0 < e.value < 1.0

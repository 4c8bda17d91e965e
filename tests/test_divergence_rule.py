"""The divergence rule on synthetic loss traces (``DivergenceMonitor.observe`` / ``finish``).

A trace is a decaying training-loss curve with log-normal batch noise. Batch noise of the
kind small batches with rare positives give (isolated batches 15-30x the median, or two or
three of them in a row) must never end a run; a real blow-up (the loss jumps and stays high,
ramps up over a few steps, or becomes NaN) must, dated at the step it happened. The rule is
also compared with an independent reference (a look-ahead over each rise's losses) on random
traces, and a checkpoint's state taken anywhere, in the middle of a rise too, must resume to
the same verdicts as an uninterrupted replay.
"""

from __future__ import annotations

import json
import math
import statistics

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mtl_clippy.callbacks import DivergenceMonitor, StepCheckpoint, TrainingDiverged

K = 10.0  # spike_factor
P = 16  # persist_steps
SETTINGS = settings(max_examples=60, deadline=None)


def _curve(n: int, seed: int, sigma: float = 0.3) -> list[float]:
    """A falling loss (1.4 down to about 0.1) times log-normal noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    base = 0.1 + 1.3 * np.exp(-t / 20)
    return [float(v) for v in base * np.exp(rng.normal(0.0, sigma, n))]


def _base(step: int) -> float:
    return 0.1 + 1.3 * math.exp(-(step - 1) / 20)


def _replay(losses: list[float], **kwargs) -> DivergenceMonitor:
    m = DivergenceMonitor(**{"spike_factor": K, "persist_steps": P, **kwargs})
    for step, loss in enumerate(losses, start=1):
        if m.observe(step, loss):
            break
    m.finish()
    return m


# ----------------------------------------------------------------------------- (a) noise


@st.composite
def noisy_traces(draw):
    """A trace with bursts (1-3 batches 15-30x the curve) at least 20 steps apart, after the
    curve has flattened (step 100 on); the steps where the bursts start."""
    n = draw(st.integers(150, 500))
    losses = _curve(n, draw(st.integers(0, 2**32 - 1)))
    starts, step = [], 100 + draw(st.integers(0, 20))
    while step + 3 < n:
        if draw(st.booleans()):
            length = draw(st.integers(1, 3))
            for j in range(length):
                losses[step - 1 + j] = draw(st.floats(15, 30)) * _base(step + j)
            starts.append(step)
        step += draw(st.integers(20, 60))
    return losses, starts


@SETTINGS
@given(noisy_traces())
def test_batch_noise_and_rare_large_batches_never_diverge(trace):
    losses, bursts = trace
    m = _replay(losses)
    s = m.summary()
    assert s["step"] is None and s["detected_step"] is None and s["reason"] is None
    assert s["verdict"] == ("spiked" if bursts else "stable")
    assert s["spikes"] == len(bursts) and s["spike_steps"] == bursts
    assert all(K < r for r in s["spike_peaks"])


def test_the_old_rule_ended_such_a_trace():
    """The measured case: one batch of several rare positives (0.56 against a median of
    0.045) ended a stable run under the single-step rule; it is a spike now."""
    losses = [0.045 * f for f in _curve(300, 7, sigma=0.2)]
    losses = [v / _base(i + 1) for i, v in enumerate(losses)]  # flat around 0.045
    losses[200] = 0.56
    assert _replay(losses, persist_steps=1).summary()["step"] == 201
    s = _replay(losses).summary()
    assert s["verdict"] == "spiked" and s["spike_steps"] == [201] and s["step"] is None


# ----------------------------------------------------------------------------- (b) blow-ups


@st.composite
def blowups(draw):
    """A noisy trace (maybe a burst, at least 30 steps before s) that blows up at step s,
    once the curve is flat: a jump that stays 40-10^4 x up (each of its losses above 10 x
    the median, noise included), a ramp (a few steps 1.5-5 x up before s, so s is the first
    above 10 x), a NaN, or a jump that becomes NaN a few steps later."""
    n = draw(st.integers(200, 400))
    s = draw(st.integers(100, n - P))
    losses = _curve(n, draw(st.integers(0, 2**32 - 1)))
    if s > 130 and draw(st.booleans()):
        b = draw(st.integers(100, s - 30))
        losses[b - 1] = 20 * _base(b)
    kind = draw(st.sampled_from(["jump", "ramp", "nan", "jump_then_nan"]))
    level = draw(st.floats(40, 1e4))
    if kind == "ramp":
        before = sorted(draw(st.lists(st.floats(1.5, 5), min_size=1, max_size=5)))
        for j, f in enumerate(before):
            losses[s - 1 - len(before) + j] *= f
    for i in range(s - 1, n):
        losses[i] *= level
    if kind == "nan":
        losses[s - 1] = math.nan
    if kind == "jump_then_nan":
        losses[s - 1 + draw(st.integers(1, P // 2))] = math.nan
    return losses, s, kind


@SETTINGS
@given(blowups())
def test_a_real_blow_up_diverges_at_the_step_it_happened(trace):
    losses, s, kind = trace
    m = _replay(losses)
    d = m.summary()
    assert d["verdict"] == "diverged" and d["step"] == s, (kind, d)
    if kind == "nan":
        assert d["detected_step"] == s and "non-finite" in d["reason"]
    elif kind == "jump_then_nan":
        assert s < d["detected_step"] <= s + P // 2 and "inside a rise" in d["reason"]
    else:  # settled at the (P // 2 + 1)-th high loss
        assert d["detected_step"] == s + P // 2 and d["reason"].startswith("loss rise")


# ----------------------------------------------------------------------------- (c) and (d)


@given(p=st.integers(1, 30), start=st.integers(60, 100), tail=st.integers(0, 40))
@settings(max_examples=40, deadline=None)
def test_a_rise_shorter_than_half_of_persist_steps_is_a_spike_and_longer_diverges(p, start, tail):
    flat = [1.0] * (start - 1)
    high = p // 2  # high losses in a row: at most half of p, a spike (when the loss comes back)
    m = _replay([*flat, *[50.0] * high, *[1.0] * (p + tail)], persist_steps=p)
    if high == 0:
        assert m.summary()["verdict"] == "stable"
    else:
        d = m.summary()
        assert d["verdict"] == "spiked" and d["spike_steps"] == [start] and d["spikes"] == 1
        assert d["spike_peaks"] == [50.0] and d["open_rise_step"] is None
    # one more high loss: more than half of p, diverged at the rise's first step
    m = _replay([*flat, *[50.0] * (high + 1), *[1.0] * (p + tail)], persist_steps=p)
    d = m.summary()
    assert d["verdict"] == "diverged" and d["step"] == start
    assert d["detected_step"] == start + high and d["spikes"] == 0


@given(p=st.integers(2, 30), seen=st.integers(1, 30), data=st.data())
@settings(max_examples=40, deadline=None)
def test_a_rise_open_at_the_end_of_the_trace_is_a_spike(p, seen, data):
    """finish(): the rise has at most half of p high losses (more would have settled it as a
    divergence before the end), so no divergence is established: a spike, marked open."""
    seen = min(seen, p - 1)
    pattern = data.draw(st.lists(st.booleans(), min_size=seen - 1, max_size=seen - 1))
    rise = [50.0] + [50.0 if h else 1.0 for h in pattern]
    losses = [1.0] * 60 + rise
    m = DivergenceMonitor(spike_factor=K, persist_steps=p)
    diverged = any(m.observe(step, v) for step, v in enumerate(losses, start=1))
    highs = 1 + sum(pattern)
    if highs > p / 2:  # settled before the end
        assert diverged and m.summary()["step"] == 61
        return
    lows = seen - highs
    if lows >= (p + 1) // 2:  # came back: settled as a spike before the end
        assert m.summary()["spikes"] == 1 and m.summary()["open_rise_step"] is None
        return
    assert not diverged and m.summary()["verdict"] == "stable"  # open: not yet counted
    assert m.finish() is False
    d = m.summary()
    assert d["verdict"] == "spiked" and d["spike_steps"] == [61] and d["open_rise_step"] == 61
    assert m.finish() is False and m.summary()["spikes"] == 1  # settled once


# ----------------------------------------------------------------------------- a reference


def _reference(losses, warmup, k, window, p, max_loss):
    """The rule written as a look-ahead over each rise: its verdict, divergence and detection
    steps, spike steps and the step of a rise left open (1-based steps)."""
    history, spikes = [], []
    i, n = 0, len(losses)

    def bad(x):
        return not math.isfinite(x) or (max_loss is not None and x > max_loss)

    while i < n:
        x = losses[i]
        if bad(x):
            return "diverged", i + 1, i + 1, spikes, None
        ref = statistics.median(history[-window:]) if history else 0.0
        if i < warmup or ref <= 0 or x <= k * ref:
            history.append(x)
            i += 1
            continue
        high = low = 0
        for j in range(i, n):
            y = losses[j]
            if bad(y):
                return "diverged", (i + 1 if high > low else j + 1), j + 1, spikes, None
            history.append(y)
            high, low = high + (y > k * ref), low + (y <= k * ref)
            if high >= p // 2 + 1:
                return "diverged", i + 1, j + 1, spikes, None
            if low >= (p + 1) // 2:
                break
        else:
            return ("spiked", None, None, [*spikes, i + 1], i + 1)
        spikes.append(i + 1)
        i = j + 1
    return ("spiked" if spikes else "stable"), None, None, spikes, None


@st.composite
def any_trace(draw):
    n = draw(st.integers(1, 160))
    losses = _curve(n, draw(st.integers(0, 2**32 - 1)), sigma=draw(st.floats(0.0, 1.0)))
    for _ in range(draw(st.integers(0, 6))):  # bursts, plateaus, NaNs, huge values
        at, length = draw(st.integers(0, n - 1)), draw(st.integers(1, 20))
        value = draw(
            st.one_of(st.floats(0.1, 1e4), st.sampled_from([math.nan, math.inf, 0.0, 1e300]))
        )
        for i in range(at, min(n, at + length)):
            losses[i] = value if not math.isfinite(value) or value == 0 else losses[i] * value
    params = {
        "warmup_steps": draw(st.integers(0, 20)),
        "spike_factor": draw(st.sampled_from([2.0, 3.0, 10.0])),
        "window": draw(st.integers(1, 60)),
        "persist_steps": draw(st.integers(1, 20)),
        "max_loss": draw(st.sampled_from([None, 100.0])),
    }
    return losses, params


@settings(max_examples=200, deadline=None)
@given(any_trace())
def test_the_rule_matches_the_reference(trace):
    losses, params = trace
    m = _replay(losses, **params)
    got = m.summary()
    verdict, step, detected, spike_steps, open_step = _reference(
        losses,
        params["warmup_steps"],
        params["spike_factor"],
        params["window"],
        params["persist_steps"],
        params["max_loss"],
    )
    assert (got["verdict"], got["step"], got["detected_step"]) == (verdict, step, detected)
    assert got["spike_steps"] == spike_steps and got["spikes"] == len(spike_steps)
    assert got["open_rise_step"] == open_step


# ----------------------------------------------------------------------------- (e) resume


@settings(max_examples=100, deadline=None)
@given(any_trace(), st.data())
def test_a_checkpointed_state_resumes_to_the_same_verdicts(trace, data):
    """Cut the replay anywhere (an open rise included), write the monitor's state as a
    checkpoint would (through JSON: plain values only), load it into a new monitor and go on:
    the same summary as without the cut."""
    losses, params = trace
    cut = data.draw(st.integers(0, len(losses)), label="cut")
    whole = _replay(losses, **params).summary()

    first = DivergenceMonitor(**{"spike_factor": K, "persist_steps": P, **params})
    done = any(first.observe(step, v) for step, v in enumerate(losses[:cut], start=1))
    if done:  # no checkpoint is written after a divergence
        assert first.summary() == whole
        return
    state = json.loads(json.dumps(first.state_dict()))
    second = DivergenceMonitor(**{"spike_factor": K, "persist_steps": P, **params})
    second.load_state_dict(state)
    for step, v in enumerate(losses[cut:], start=cut + 1):
        if second.observe(step, v):
            break
    second.finish()
    assert second.summary() == whole


def test_the_state_of_an_open_rise_is_in_the_checkpoint():
    m = DivergenceMonitor(warmup_steps=0, spike_factor=K, persist_steps=P)
    for step, v in enumerate([1.0] * 20 + [50.0, 50.0], start=1):
        m.observe(step, v)
    state = m.state_dict()
    assert state["rise"] == [21, 1.0, 2, 2, 50.0]
    resumed = DivergenceMonitor(warmup_steps=0, spike_factor=K, persist_steps=P)
    resumed.load_state_dict(state)
    assert not any(resumed.observe(step, 50.0) for step in range(23, 29))
    assert resumed.observe(29, 50.0)  # the 9th high loss of 16
    assert resumed.summary()["step"] == 21 and resumed.summary()["detected_step"] == 29


def test_a_checkpoint_of_the_older_monitor_loads():
    """A state written before rises existed (no ``rise``, ``spike_peaks``) resumes."""
    old = {"recent": [1.0] * 5, "pending": [], "seen": 5, "max_logit": None,
           "last_finite_loss": 1.0, "spikes": 2, "spike_steps": [3, 4]}  # fmt: skip
    m = DivergenceMonitor(warmup_steps=0)
    m.load_state_dict(old)
    assert not m.observe(6, 1.0)
    assert m.summary()["spikes"] == 2 and m.summary()["spike_peaks"] == []


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_outside_a_rise_is_dated_at_its_own_step(bad):
    losses = [1.0] * 30 + [50.0] + [1.0] * 3 + [bad]  # a spike's rise, mostly low, then NaN
    d = _replay(losses, warmup_steps=0).summary()
    assert d["step"] == d["detected_step"] == 35 and "inside a rise" not in d["reason"]


# ----------------------------------------------------------------------------- in a fit


class _Scripted(pl.LightningModule):
    """A module whose training loss at optimizer step s (1-based) is ``losses[s - 1]``."""

    def __init__(self, losses: list[float]) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.losses = losses

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return self.layer(x).sum() * 0 + self.losses[self.global_step]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(tmp_path, losses, *callbacks, epochs=1):
    x = torch.randn(4 * len(losses) // epochs, 3, generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks), accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(_Scripted(losses), DataLoader(TensorDataset(x, x), batch_size=4))
    return trainer


def test_a_rise_open_at_the_last_batch_is_settled_before_the_last_checkpoint(tmp_path):
    monitor = DivergenceMonitor(warmup_steps=0, persist_steps=8, check_every_n_steps=100)
    last = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", monitor=None)
    trainer = _fit(tmp_path, [1.0] * 10 + [50.0, 50.0], monitor, last)
    assert trainer.global_step == 12
    d = monitor.summary()
    assert d["verdict"] == "spiked" and d["spike_steps"] == [11] and d["open_rise_step"] == 11
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("DivergenceMonitor"))
    assert saved["rise"] is None and saved["spikes"] == 1 and saved["open_rise_step"] == 11


def test_no_checkpoint_after_a_settled_divergence(tmp_path):
    """Loss high from step 5: settled at step 7 (3 of 4 high), dated at step 5. The step
    checkpoint of step 6 is written while the rise is open (documented); step 8's is not."""
    monitor = DivergenceMonitor(warmup_steps=0, persist_steps=4, check_every_n_steps=100)
    steps = StepCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2)
    with pytest.raises(TrainingDiverged) as info:
        _fit(tmp_path, [1.0] * 4 + [50.0] * 8, monitor, steps)
    assert info.value.step == 5 and monitor.detected_step == 7
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step-0000006.ckpt"]  # the newest kept; none after step 7


def test_gradient_accumulation_gives_one_loss_per_optimizer_step(tmp_path):
    """accumulate_grad_batches=2: the rule sees the loss of each optimizer step (the mean of
    its two micro-batches), numbered 1, 2, ...; a blow-up at step 11 is dated there and settled
    at the 3rd high loss of 4 (step 13), not counted in micro-batches."""
    monitor = DivergenceMonitor(warmup_steps=0, persist_steps=4)
    x = torch.randn(4 * 2 * 20, 3, generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[monitor],
        accelerator="cpu", devices=1, accumulate_grad_batches=2,
    )  # fmt: skip
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit(_Scripted([1.0] * 10 + [50.0] * 10), DataLoader(TensorDataset(x, x), 4))
    assert info.value.step == 11 and monitor.detected_step == 13
    assert monitor.last_finite_loss == 50.0  # the step's loss, not a micro-batch's half


def _fit_accumulated(tmp_path, losses, monitor, batches=10, accumulate=3, epochs=2):
    x = torch.randn(4 * batches, 3, generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=[monitor],
        accelerator="cpu", devices=1, accumulate_grad_batches=accumulate,
    )  # fmt: skip
    trainer.fit(_Scripted(losses), DataLoader(TensorDataset(x, x), 4))
    return trainer


@pytest.mark.parametrize("accumulate", [3, 4, 6])
def test_an_epochs_last_shorter_accumulation_group_reads_its_own_mean(tmp_path, accumulate):
    """10 batches an epoch: groups of `accumulate` micro-batches and a shorter last one, which
    Lightning still divides by accumulate_grad_batches. The step's loss is the mean over its
    own micro-batches: a 200 on that last step ends the run above max_loss=100 (read as
    200 x size / accumulate before), and a 2.0 against a median of 0.1, followed by a low
    loss, is a spike (read below 10 x the median before)."""
    per_epoch = -(-10 // accumulate)
    last = per_epoch  # 1-based step of the first epoch's shorter group
    losses = [0.1] * (2 * per_epoch)
    losses[last - 1] = 200.0
    monitor = DivergenceMonitor(warmup_steps=0, persist_steps=1, max_loss=100.0)
    with pytest.raises(TrainingDiverged) as info:
        _fit_accumulated(tmp_path / "a", losses, monitor, accumulate=accumulate)
    assert info.value.step == last and monitor.last_finite_loss == pytest.approx(0.1)
    losses[last - 1] = 2.0
    monitor = DivergenceMonitor(warmup_steps=0, persist_steps=2, max_loss=100.0)
    _fit_accumulated(tmp_path / "b", losses, monitor, accumulate=accumulate)
    d = monitor.summary()
    assert d["verdict"] == "spiked" and d["spike_steps"] == [last]
    assert d["spike_peaks"] == [pytest.approx(20.0)]  # the peak over the median


def test_the_printed_summary_names_the_stability_once():
    from mtl_clippy.summary import RunSummary, format_summary

    base = {"model": "sb", "optim": "clippy", "lr": 0.1, "seed": 1}
    diverged = RunSummary.from_json({**base, "status": "diverged", "stability": "diverged"})
    assert "diverged, " in format_summary(diverged).splitlines()[0]
    assert "(diverged)" not in format_summary(diverged)
    spiked = RunSummary.from_json({**base, "status": "completed", "stability": "spiked"})
    assert "completed (spiked), " in format_summary(spiked).splitlines()[0]


@st.composite
def boundary_traces(draw):
    """Losses at exactly k x the median and just around it, zeros (a median of 0 is no
    reference), -inf, NaN and huge values: the edges of the rule."""
    n = draw(st.integers(1, 120))
    level = draw(st.floats(0.01, 2.0))
    factors = [1.0, 1.0, 1.0, 0.5, 2.0, 9.99, 10.0, 10.01, 15.0, 50.0, 1e3, 0.0]
    specials = [math.nan, math.inf, -math.inf]
    values = draw(st.lists(st.sampled_from(factors + specials), min_size=n, max_size=n))
    losses = [level * v if math.isfinite(v) else v for v in values]
    params = {
        "warmup_steps": draw(st.integers(0, 12)),
        "spike_factor": 10.0,
        "window": draw(st.integers(1, 20)),
        "persist_steps": draw(st.integers(1, 17)),
        "max_loss": draw(st.sampled_from([None, 100.0])),
    }
    return losses, params


@settings(max_examples=300, deadline=None)
@given(boundary_traces())
def test_the_rule_matches_the_reference_at_its_edges(trace):
    losses, params = trace
    got = _replay(losses, **params).summary()
    verdict, step, detected, spike_steps, open_step = _reference(
        losses, *(params[k] for k in ("warmup_steps", "spike_factor", "window")),
        params["persist_steps"], params["max_loss"],
    )  # fmt: skip
    assert (got["verdict"], got["step"], got["detected_step"]) == (verdict, step, detected)
    assert got["spike_steps"] == spike_steps and got["open_rise_step"] == open_step

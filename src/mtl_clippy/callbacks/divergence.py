"""Divergence is a result, not a crash: tell a run that diverged from one with noisy batches.

``DivergenceMonitor`` reads the training loss of every step and gives the run one of three
verdicts (``divergence.verdict`` in ``metrics.json``): ``stable``, ``spiked`` (the loss jumped
and came back: counted, the run goes on) or ``diverged`` (the run is ended there).

**The rule.**

* A non-finite loss (NaN or +-inf), or a loss above ``max_loss`` (an absolute bound, warm-up
  included), diverges at once.
* After ``warmup_steps`` losses, a loss above ``spike_factor`` (k) times the *reference*, the
  median of the previous ``window`` finite losses, opens a **rise** at that step. While the
  rise is open the reference stays frozen (the high losses do not pull it up).
* The rise is judged on its first ``persist_steps`` (p) losses, its own included: if more
  than half of them are above k x the reference (the rise's median stays above it), the run
  **diverged**; otherwise the loss came back and the rise was a **spike**. The verdict is
  taken at the first step that settles it: a divergence at the (p // 2 + 1)-th high loss, a
  spike as soon as enough losses were back below the threshold that the rest cannot change
  it. A spike is counted (``spikes``), its first step is kept (``spike_steps``, the first
  ``max_recorded_spikes``) with its peak over the reference (``spike_peaks``), and the next
  loss above k x the running median opens a new rise.
* A divergence is dated at the rise's first step (``step``: where the loss left its level;
  for a blow-up that ramps up over a few steps, the first step above k x the reference), and
  the step that settled it is ``detected_step``: p // 2 steps later for a loss that stays
  high, at most p - 1 steps later.
* A non-finite loss or one above ``max_loss`` inside an open rise diverges at once, dated at
  the rise's first step when most of the rise's losses so far were high (the loss left its
  level there), otherwise at its own step.
* With ``persist_steps: 1`` the rule is the single-step one: any loss above k x the median
  diverges. Losses fall fast at first and are no baseline: during the warm-up only the
  non-finite and ``max_loss`` rules apply, but warm-up losses fill the median's window. Every
  finite loss, a rise's included, enters the window.
* A median of 0 or below (a loss that reached exactly 0, or one that can be negative) is no
  reference: while it lasts no rise opens, and only the non-finite and ``max_loss`` rules
  apply.

Why: with small batches and rare positives, a batch that holds several positives has a loss
10-20 times the median, two or three such batches can follow each other, and the loss falls
back at the next batch. A blow-up stays high (or becomes NaN). The rule asks for the loss to
stay high for most of ``persist_steps`` steps before it calls a divergence.

**The end of training.** A rise still open when training ends is settled by ``finish``
with the losses seen so far: it did not yet have more than p / 2 high losses (else it would
have been settled), so no divergence is established, and it is counted as a spike; its first
step is also recorded as ``open_rise_step``, so that a reader sees a rise that training cut
short. The monitor calls ``finish`` after the last training batch (by ``max_steps`` or
``max_epochs``), before the last validation, the last checkpoints and the monitor's own
checkpoint state; when training ends for another reason (early stopping, ``max_time``), at
the end of training.

**How the loss is read, and what it costs.** The loss of each step (a 0-dim tensor on the
model's device) is kept by reference, without reading it; every ``check_every_n_steps``
steps, and before any validation, checkpoint or end of training, the kept losses are stacked
and copied to the host in one transfer (one host-device synchronisation per check) and the rule
is applied to each of them in order, so the steps recorded are exact whatever the check
interval. With gradient accumulation (``accumulate_grad_batches`` > 1) the rule sees one loss
per optimizer step, the mean over its micro-batches. Under DDP every rank applies the rule to
the same numbers, the mean loss over the ranks. On a CPU reading a value costs nothing, so
``check_every_n_steps: null`` (auto) checks every step there; on an accelerator it checks
every 16 steps (one sync per 16 steps).

**Checkpoints and a divergence.** ``StepCheckpoint`` calls :func:`check_pending_losses`
before it saves, and the monitor's own checkpoint state (``state_dict``, written with every
full checkpoint of a run it watches) checks the kept losses first: a divergence settled by
one of them raises before anything is written, so no checkpoint ever holds weights from after
a settled divergence. A checkpoint written while a rise is open (the open rise is part of the
monitor's state, and a resume from it settles the rise exactly as an uninterrupted run would)
can hold weights from up to ``persist_steps - 1`` steps after the rise's first step, and so,
if the rise is then settled as a divergence, weights from after the step the divergence is
dated at; that run is recorded ``diverged`` and none of its checkpoints is tested. Losses kept
in a checkpoint written outside a run (or by an older version) are restored on the module's
device, where the next check stacks them with the new ones.

**How the run ends.** On divergence the monitor sets ``trainer.should_stop`` and raises
:class:`TrainingDiverged`, which ``mtl_clippy.train`` catches and records as status
``diverged``. ``should_stop`` alone is not enough: Lightning keeps training until
``min_epochs`` is met, and a stop it accepts runs a validation pass first, after which
``ModelCheckpoint`` would save the broken model (as "best" when no earlier epoch was). The
exception ends ``fit`` at once: no further optimizer step, validation or checkpoint. With a
check interval above 1, up to ``check_every_n_steps - 1`` optimizer steps may follow the
settling step before it is seen (never across a validation or a checkpoint, which force a
check); the steps recorded are still exact.

**Without Lightning.** ``observe(step, loss)`` applies the rule to one loss (pure Python,
``True`` once diverged), ``finish()`` settles an open rise at the end of a trace and
``summary()`` is the ``divergence`` entry of ``metrics.json``: ``benchmarks/divergence_rule.py``
replays recorded traces through them.

The monitor also tracks the largest absolute logit of training (``max_abs_logit``) with a
forward hook on the backbone: a running maximum kept on the device (one small reduction per
step, no sync), read once when asked.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from mtl_clippy.models.backbones.base import outermost_backbones

__all__ = ["DivergenceMonitor", "TrainingDiverged", "check_pending_losses"]


class TrainingDiverged(Exception):
    """Raised by :class:`DivergenceMonitor` to end ``Trainer.fit`` at a divergent step."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"training diverged at step {step}: {reason}")
        self.step = step
        self.reason = reason


class _Hooks:
    """The forward hooks on several modules, removed together (like one hook's handle)."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Rise:
    """An open rise: its first step, the frozen reference median, how many of its losses
    were seen and how many of them were high (above k x the reference), its largest loss."""

    __slots__ = ("high", "n", "peak", "reference", "start")

    def __init__(self, start: int, reference: float, n: int = 0, high: int = 0, peak: float = 0.0):
        self.start, self.reference = int(start), float(reference)
        self.n, self.high, self.peak = int(n), int(high), float(peak)

    def to_state(self) -> list[float]:
        return [self.start, self.reference, self.n, self.high, self.peak]


class DivergenceMonitor(pl.Callback):
    """End a training run whose loss became non-finite or rose and stayed high; count the
    rises that came back (spikes). The rule is described in the module's documentation.

    Args:
        warmup_steps: the first losses, during which only a non-finite loss (or one above
            ``max_loss``) counts; they do fill the median's window.
        spike_factor: k: after the warm-up, a loss above k x the running median opens a rise.
        window: how many recent finite losses the running median is taken over.
        persist_steps: p: a rise diverges when more than half of its first p losses are above
            k x the reference median (1: any loss above it diverges).
        check_every_n_steps: read the kept losses every n steps (one host sync per read);
            ``None`` = 1 on a CPU (free there), 16 on an accelerator.
        max_recorded_spikes: at most this many spikes are kept in ``spike_steps`` and
            ``spike_peaks`` (all are counted in ``spikes``).
        max_loss: optional absolute bound: a loss above it at any step diverges.
        track_logits: keep the largest absolute training logit (forward hook on the
            module's outermost :class:`~mtl_clippy.models.Backbone`: the one inside it, each
            of several side by side (their largest logit), never one nested in another; or
            the module itself if it has none).
    """

    def __init__(
        self,
        warmup_steps: int = 10,
        spike_factor: float = 10.0,
        window: int = 50,
        persist_steps: int = 16,
        check_every_n_steps: int | None = None,
        max_recorded_spikes: int = 100,
        max_loss: float | None = None,
        track_logits: bool = True,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not spike_factor > 1:
            raise ValueError(f"spike_factor must be > 1, got {spike_factor}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if persist_steps < 1:
            raise ValueError(f"persist_steps must be >= 1, got {persist_steps}")
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1 or null, got {check_every_n_steps}")
        if max_recorded_spikes < 0:
            raise ValueError(f"max_recorded_spikes must be >= 0, got {max_recorded_spikes}")
        self.warmup_steps = int(warmup_steps)
        self.spike_factor = float(spike_factor)
        self.window = int(window)
        self.persist_steps = int(persist_steps)
        self.check_every_n_steps = check_every_n_steps
        self.max_recorded_spikes = int(max_recorded_spikes)
        self.max_loss = None if max_loss is None else float(max_loss)
        self.track_logits = track_logits
        self.reset()

    # -- state -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything observed (a new run)."""
        self._recent: deque[float] = deque(maxlen=self.window)
        self._pending: list[tuple[int, Tensor]] = []
        # accumulate_grad_batches > 1: the losses of the micro-batches of the optimizer step
        # not yet taken, and the step count at the last recorded loss (None: not known)
        self._micro: list[Tensor] = []
        self._last_global_step: int | None = None
        self._seen = 0  # losses examined
        self._rise: _Rise | None = None
        self._every = self.check_every_n_steps or 1
        self._max_logit: Tensor | None = None
        self._hook: Any = None
        self._trainer: pl.Trainer | None = None  # the run being watched (on_fit_start..teardown)
        self.last_finite_loss: float | None = None
        self.spikes = 0
        self.spike_steps: list[int] = []
        self.spike_peaks: list[float] = []
        self.open_rise_step: int | None = None
        self.diverged_step: int | None = None
        self.detected_step: int | None = None
        self.reason: str | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_step is not None

    @property
    def verdict(self) -> str:
        """``diverged``, ``spiked`` (spikes only, all recovered) or ``stable`` (none); a rise
        still open counts as neither until it is settled."""
        if self.diverged:
            return "diverged"
        return "spiked" if self.spikes else "stable"

    def summary(self) -> dict[str, Any]:
        """The ``divergence`` entry of ``metrics.json``."""
        self._apply_loaded()
        return {
            "verdict": self.verdict,
            "step": self.diverged_step,
            "detected_step": self.detected_step,
            "last_finite_loss": self.last_finite_loss,
            "spikes": self.spikes,
            "spike_steps": list(self.spike_steps),
            "spike_peaks": list(self.spike_peaks),
            "open_rise_step": self.open_rise_step,
            "reason": self.reason,
        }

    @property
    def max_abs_logit(self) -> float | None:
        """The largest finite absolute logit seen in training (one host read), or ``None``."""
        if self._max_logit is None:
            return None
        v = float(self._max_logit.item())
        return v if math.isfinite(v) else None

    # -- the rule ----------------------------------------------------------------------------

    def observe(self, step: int, loss: float) -> bool:
        """Apply the rule to the loss of training step ``step``; ``True`` once diverged.

        Pure Python, no tensors: the callback hooks feed it; the benchmark and unit tests
        call it directly. After a divergence further losses are ignored.
        """
        self._apply_loaded()  # a state loaded outside a fit (tests, replays): take it over now
        if self.diverged:
            return True
        loss = float(loss)
        self._seen += 1
        if not math.isfinite(loss):
            return self._diverge_at_once(step, f"non-finite loss ({loss})")
        if self.max_loss is not None and loss > self.max_loss:
            return self._diverge_at_once(step, f"loss {loss:.4g} above max_loss {self.max_loss:g}")
        rise = self._rise
        if rise is None and self._seen > self.warmup_steps and self._recent:
            median = statistics.median(self._recent)
            if median > 0 and loss > self.spike_factor * median:
                rise = self._rise = _Rise(step, median)
        self._recent.append(loss)
        self.last_finite_loss = loss
        if rise is None:
            return False
        rise.n += 1
        rise.high += loss > self.spike_factor * rise.reference
        rise.peak = max(rise.peak, loss)
        half = self.persist_steps / 2
        if rise.high > half:  # more than half of the rise's p losses are high, whatever follows
            self._rise = None
            self.diverged_step, self.detected_step = rise.start, step
            self.reason = (
                f"loss rise: above {self.spike_factor:g} x running median {rise.reference:.4g} "
                f"for {rise.high} of {rise.n} steps from step {rise.start} "
                f"(peak {rise.peak:.4g}, {rise.peak / rise.reference:.3g} x)"
            )
            return True
        if rise.high + (self.persist_steps - rise.n) <= half:  # it can no longer diverge
            self._close_as_spike()
        return False

    def finish(self) -> bool:
        """Settle a rise still open at the end of training (or of a trace); whether the run
        diverged. The open rise has at most half of ``persist_steps`` high losses (more would
        have settled it), so no divergence is established: it is counted as a spike, and its
        first step is also kept as ``open_rise_step``."""
        self._apply_loaded()
        if self._rise is not None and not self.diverged:
            self.open_rise_step = self._rise.start
            self._close_as_spike()
        return self.diverged

    def _close_as_spike(self) -> None:
        rise, self._rise = self._rise, None
        assert rise is not None
        self.spikes += 1
        if len(self.spike_steps) < self.max_recorded_spikes:
            self.spike_steps.append(rise.start)
            self.spike_peaks.append(round(rise.peak / rise.reference, 3))

    def _diverge_at_once(self, step: int, reason: str) -> bool:
        """A non-finite loss or one above max_loss: dated at the open rise's first step when
        most of that rise's losses were high (the loss had left its level there)."""
        rise, self._rise = self._rise, None
        self.detected_step = step
        if rise is not None and 2 * rise.high > rise.n:
            self.diverged_step = rise.start
            reason += (
                f", inside a rise above {self.spike_factor:g} x running median "
                f"{rise.reference:.4g} from step {rise.start}"
            )
        else:
            self.diverged_step = step
        self.reason = reason
        return True

    def check(self, trainer: pl.Trainer | None = None) -> None:
        """Read the kept losses (one host sync) and apply the rule; raises on divergence."""
        if not self._pending:
            return
        steps = [s for s, _ in self._pending]
        values = torch.stack([v.float() for _, v in self._pending])
        if trainer is not None and getattr(trainer, "world_size", 1) > 1:
            # Every rank applies the rule to the same numbers (the mean loss over ranks), so
            # all of them stop together: a rank stopping alone would hang the others.
            values = trainer.strategy.reduce(values, reduce_op="mean")
        values = values.cpu().tolist()
        self._pending.clear()
        for step, value in zip(steps, values):
            if self.observe(step, value):
                self._stop(trainer)

    def _stop(self, trainer: pl.Trainer | None) -> None:
        """End the fit after a divergence (see the module: ``should_stop`` and the raise)."""
        if trainer is not None:
            trainer.should_stop = True
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        assert self.diverged_step is not None
        raise TrainingDiverged(self.diverged_step, self.reason or "")

    def _finish(self, trainer: pl.Trainer) -> None:
        """The end of training: check the kept losses, then settle an open rise."""
        self.check(trainer)
        if self.finish():
            self._stop(trainer)

    # -- checkpoint state (an exact resume needs the recent losses, the open rise, the counts) -

    def state_dict(self) -> dict[str, Any]:
        # Lightning asks for this state while it writes a full checkpoint: check the kept losses
        # first, so that a divergence among them raises before the checkpoint is written.
        if self._trainer is not None and self._pending and not self.diverged:
            self.check(self._trainer)
        return {
            "recent": list(self._recent),
            "pending": [(s, float(v.float().item())) for s, v in self._pending],
            "seen": self._seen,
            "max_logit": self.max_abs_logit,
            "last_finite_loss": self.last_finite_loss,
            "spikes": self.spikes,
            "spike_steps": list(self.spike_steps),
            "spike_peaks": list(self.spike_peaks),
            "rise": None if self._rise is None else self._rise.to_state(),
            "open_rise_step": self.open_rise_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)

    def _apply_loaded(self, device: torch.device | str = "cpu") -> None:
        """Take over the state of ``load_state_dict``; its tensors go on ``device`` (the
        module's), where the losses of the coming steps are and will be stacked with them."""
        state, self._loaded = getattr(self, "_loaded", None), None
        if not state:
            return
        self._recent.extend(state["recent"])
        self._pending = [
            (int(s), torch.tensor(float(v), device=device)) for s, v in state["pending"]
        ]
        self._seen = int(state["seen"])
        if state.get("max_logit") is not None:
            self._max_logit = torch.tensor(float(state["max_logit"]), device=device)
        self.last_finite_loss = state["last_finite_loss"]
        self.spikes = int(state["spikes"])
        self.spike_steps = list(state["spike_steps"])
        # absent from a checkpoint of an older version (whose rule had no rises)
        self.spike_peaks = list(state.get("spike_peaks") or [])
        rise = state.get("rise")
        self._rise = None if rise is None else _Rise(*rise)
        self.open_rise_step = state.get("open_rise_step")

    # -- Lightning hooks ---------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.reset()
        self._trainer = trainer
        if self.check_every_n_steps is None:
            self._every = 1 if pl_module.device.type == "cpu" else 16
        if self.track_logits:
            # the backbone's output is the logits (the module's own forward may add to it);
            # with several side by side (an ensemble), the largest of all of theirs
            targets = outermost_backbones(pl_module) or [pl_module]
            self._hook = _Hooks([t.register_forward_hook(self._logit_hook) for t in targets])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in on_fit_start: every strategy has restored the checkpoint by now (some
        # restore it after on_fit_start), and the module is on its device.
        self._apply_loaded(pl_module.device)
        self._last_global_step = int(trainer.global_step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed fit with nothing left to train (stopped during testing) calls no
        # on_train_start: its summary is still the checkpoint's.
        self._apply_loaded(pl_module.device)

    def _logit_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not module.training or not isinstance(output, Tensor) or output.numel() == 0:
            return
        with torch.no_grad():
            a = output.detach().float().abs()
            m = torch.where(torch.isfinite(a), a, torch.zeros_like(a)).amax()
            self._max_logit = m if self._max_logit is None else torch.maximum(self._max_logit, m)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor):
            return
        # step: the number of optimizer steps taken so far, this one included (1-based)
        step = int(trainer.global_step)
        self._micro.append(loss.detach())
        if getattr(trainer, "accumulate_grad_batches", 1) > 1 and step == self._last_global_step:
            return  # a micro-batch of gradient accumulation: its optimizer step is not taken yet
        self._last_global_step = step
        # Under accumulation Lightning hands each micro-batch's loss divided by
        # accumulate_grad_batches, also in an epoch's last, shorter group: the sum, scaled by
        # accumulate_grad_batches / the group's size, is the loss of the optimizer step (the
        # mean over its micro-batches).
        micro, self._micro = self._micro, []
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        if accumulate == 1:  # no accumulation: the micro-batch is the step
            step_loss = micro[0]
        else:
            step_loss = torch.stack(micro).sum() * (accumulate / len(micro))
        self._pending.append((step, step_loss))
        if _last_training_batch(trainer, batch_idx):  # before the last validation/checkpoint
            self._finish(trainer)
        elif len(self._pending) >= self._every:
            self.check(trainer)

    # Losses not yet read are read before anything that could keep the model: a validation
    # pass (which ModelCheckpoint follows), the end of an epoch, the end of training.
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # training ended otherwise than by its limits (early stopping, max_time): settle here
        self._finish(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if stage == "fit":
            self._trainer = None


def _last_training_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether the batch that just ended is the last of the fit by the trainer's limits:
    ``max_steps`` reached, or the last batch of the epoch ``max_epochs`` ends with. (A stop
    for another reason, such as early stopping, is only known later: at ``on_train_end``.)"""
    max_steps = getattr(trainer, "max_steps", None)
    if isinstance(max_steps, int) and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    batches = getattr(trainer, "num_training_batches", math.inf)
    max_epochs = getattr(trainer, "max_epochs", None)
    return (
        isinstance(max_epochs, int)
        and max_epochs >= 0
        and batch_idx + 1 >= batches
        and trainer.current_epoch + 1 >= max_epochs
    )


def check_pending_losses(trainer: pl.Trainer) -> None:
    """Check the losses every :class:`DivergenceMonitor` of ``trainer`` has kept but not read.

    Call it before saving a checkpoint: it raises :class:`TrainingDiverged` (and the
    checkpoint must not be written) if one of those steps diverged. A collective under DDP:
    every rank calls it at the same step.
    """
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, DivergenceMonitor):
            callback.check(trainer)

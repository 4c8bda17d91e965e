"""Divergence is a result, not a crash: watch the training loss and end a run that diverged.

``DivergenceMonitor`` reads the training loss of every step and applies one rule:

* a non-finite loss (NaN or +-inf) at any step: the run diverged at that step;
* optionally (``max_loss``, off by default), a loss above an absolute bound at any step,
  warm-up included (a run that explodes within its warm-up leaves no sane median);
* after ``warmup_steps`` steps, a loss above ``spike_factor`` (k, default 10) times the
  running median of the last ``window`` finite losses: the run diverged at that step;
* after the warm-up, a loss above ``small_spike_factor`` (default k / 2) times the running
  median, but not above k: a *spike*, counted (``spikes``) and its step recorded
  (``spike_steps``, the first ``max_recorded_spikes``); the run goes on.

During the warm-up only the non-finite rule applies (early losses fall fast and are no
baseline); warm-up losses do fill the median's window. Every finite loss, spikes included,
enters the window (the median is robust to them).

**How the loss is read, and what it costs.** The loss of each step (a 0-dim tensor on the
model's device) is kept by reference, without reading it; every ``check_every_n_steps``
steps, and before any validation, checkpoint or end of training, the kept losses are stacked
and copied to the host in one transfer (one host-device synchronisation per check) and the rule
is applied to each of them in order, so the step recorded is exact whatever the check interval.
On a CPU reading a value costs nothing, so ``check_every_n_steps: null`` (auto) checks every
step there; on an accelerator it checks every 16 steps (one sync per 16 steps).

**Checkpoints hold only checked steps.** ``StepCheckpoint`` calls :func:`check_pending_losses`
before it saves, and the monitor's own checkpoint state (``state_dict``, written with every
full checkpoint of a run it watches) checks the kept losses first: a divergent step among them
raises before anything is written, so no checkpoint ever holds weights from after a
divergence. Losses kept in a checkpoint written outside a run (or by an older version) are
restored on the module's device, where the next check stacks them with the new ones.

**How the run ends.** On divergence the monitor sets ``trainer.should_stop`` and raises
:class:`TrainingDiverged`, which ``mtl_clippy.train`` catches and records as status
``diverged``. ``should_stop`` alone is not enough: Lightning keeps training until
``min_epochs`` is met, and a stop it accepts runs a validation pass first, after which
``ModelCheckpoint`` would save the broken model (as "best" when no earlier epoch was). The
exception ends ``fit`` at once: no further optimizer step, validation or checkpoint. With a
check interval above 1, up to ``check_every_n_steps - 1`` optimizer steps may follow the
divergent one before it is seen (never across a validation or a checkpoint, which force a
check); the recorded step is still the divergent one.

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


class DivergenceMonitor(pl.Callback):
    """End a training run whose loss became non-finite or spiked; count smaller spikes.

    Args:
        warmup_steps: steps during which only a non-finite loss counts.
        spike_factor: k: after the warm-up, a loss above k x the running median diverges.
        small_spike_factor: a loss above this x the running median (and not above k) is a
            counted spike; ``None`` = k / 2.
        window: how many recent finite losses the running median is taken over.
        check_every_n_steps: read the kept losses every n steps (one host sync per read);
            ``None`` = 1 on a CPU (free there), 16 on an accelerator.
        max_recorded_spikes: at most this many spike steps are kept in ``spike_steps``.
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
        small_spike_factor: float | None = None,
        window: int = 50,
        check_every_n_steps: int | None = None,
        max_recorded_spikes: int = 100,
        max_loss: float | None = None,
        track_logits: bool = True,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not spike_factor > 1:
            raise ValueError(f"spike_factor must be > 1, got {spike_factor}")
        small = spike_factor / 2 if small_spike_factor is None else float(small_spike_factor)
        if not 1 < small <= spike_factor:
            raise ValueError(
                f"small_spike_factor must be in (1, spike_factor={spike_factor}], got {small}"
            )
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1 or null, got {check_every_n_steps}")
        self.warmup_steps = int(warmup_steps)
        self.spike_factor = float(spike_factor)
        self.small_spike_factor = small
        self.window = int(window)
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
        self._seen = 0  # losses examined
        self._every = self.check_every_n_steps or 1
        self._max_logit: Tensor | None = None
        self._hook: Any = None
        self._trainer: pl.Trainer | None = None  # the run being watched (on_fit_start..teardown)
        self.last_finite_loss: float | None = None
        self.spikes = 0
        self.spike_steps: list[int] = []
        self.diverged_step: int | None = None
        self.reason: str | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_step is not None

    def summary(self) -> dict[str, Any]:
        """The ``divergence`` entry of ``metrics.json``."""
        return {
            "step": self.diverged_step,
            "last_finite_loss": self.last_finite_loss,
            "spikes": self.spikes,
            "spike_steps": list(self.spike_steps),
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
        """Apply the rule to the loss of training step ``step``; ``True`` if it diverged.

        Pure Python, no tensors: the callback hooks feed it; unit tests call it directly.
        After a divergence further losses are ignored.
        """
        if self.diverged:
            return True
        loss = float(loss)
        self._seen += 1
        if not math.isfinite(loss):
            self.diverged_step = step
            self.reason = f"non-finite loss ({loss})"
            return True
        if self.max_loss is not None and loss > self.max_loss:
            self.diverged_step = step
            self.reason = f"loss {loss:.4g} above max_loss {self.max_loss:g}"
            return True
        if self._seen > self.warmup_steps and self._recent:
            median = statistics.median(self._recent)
            if median > 0 and loss > self.spike_factor * median:
                self.diverged_step = step
                self.reason = (
                    f"loss spike: {loss:.4g} > {self.spike_factor:g} x running median {median:.4g}"
                )
                return True
            if median > 0 and loss > self.small_spike_factor * median:
                self.spikes += 1
                if len(self.spike_steps) < self.max_recorded_spikes:
                    self.spike_steps.append(step)
        self._recent.append(loss)
        self.last_finite_loss = loss
        return False

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
                if trainer is not None:
                    trainer.should_stop = True
                if self._hook is not None:
                    self._hook.remove()
                    self._hook = None
                raise TrainingDiverged(step, self.reason or "")

    # -- checkpoint state (an exact resume needs the recent losses and the counts) -----------

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
        self._pending.append((int(trainer.global_step), loss.detach()))
        if len(self._pending) >= self._every:
            self.check(trainer)

    # Losses not yet read are read before anything that could keep the model: a validation
    # pass (which ModelCheckpoint follows), the end of an epoch, the end of training.
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if stage == "fit":
            self._trainer = None


def check_pending_losses(trainer: pl.Trainer) -> None:
    """Check the losses every :class:`DivergenceMonitor` of ``trainer`` has kept but not read.

    Call it before saving a checkpoint: it raises :class:`TrainingDiverged` (and the
    checkpoint must not be written) if one of those steps diverged. A collective under DDP:
    every rank calls it at the same step.
    """
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, DivergenceMonitor):
            callback.check(trainer)

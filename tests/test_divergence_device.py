"""The divergence monitor on a device other than the CPU, and checkpoints vs unread losses.

* Losses kept unread in a checkpoint are restored on the module's device, where the next check
  stacks them with the losses of the coming steps (on a GPU the monitor reads every 16 steps:
  CPU tensors restored beside CUDA ones made a resumed run crash).
* No checkpoint is written for a step whose loss has not been checked: a divergence at (or
  shortly before) the step of a scheduled step checkpoint leaves no checkpoint for that step.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mtl_clippy.callbacks import DivergenceMonitor, StepCheckpoint, TrainingDiverged

STATE = {
    "recent": [1.0, 0.9],
    "pending": [(3, 0.8), (4, 0.7)],
    "seen": 2,
    "max_logit": 2.5,
    "last_finite_loss": 0.9,
    "spikes": 0,
    "spike_steps": [],
}


# ----------------------------------------------------------------------------- restoring


def test_restored_losses_and_max_logit_are_on_the_module_device():
    monitor = DivergenceMonitor(warmup_steps=0, check_every_n_steps=16, track_logits=False)
    monitor.load_state_dict(dict(STATE))
    module = SimpleNamespace(device=torch.device("meta"))  # a device other than the CPU
    trainer = SimpleNamespace(callbacks=[monitor], should_stop=False, global_step=4)
    monitor.on_fit_start(trainer, module)
    monitor.on_train_start(trainer, module)
    assert [s for s, _ in monitor._pending] == [3, 4]
    assert {v.device.type for _, v in monitor._pending} == {"meta"}
    assert monitor._max_logit is not None and monitor._max_logit.device.type == "meta"
    # the next step's loss lives on the module's device: the check stacks them together
    monitor.on_train_batch_end(trainer, module, torch.tensor(0.6, device="meta"), None, 4)
    assert torch.stack([v.float() for _, v in monitor._pending]).device.type == "meta"
    assert monitor._seen == 2 and len(monitor._pending) == 3  # restored, not yet re-read


def test_restored_losses_are_checked_in_order_with_the_new_ones():
    monitor = DivergenceMonitor(warmup_steps=0, check_every_n_steps=3, track_logits=False)
    monitor.load_state_dict({**STATE, "pending": [(3, 0.8), (4, float("nan"))]})
    module = SimpleNamespace(device=torch.device("cpu"))
    trainer = SimpleNamespace(callbacks=[monitor], should_stop=False, global_step=5)
    monitor.on_fit_start(trainer, module)
    monitor.on_train_start(trainer, module)
    with pytest.raises(TrainingDiverged) as info:
        monitor.on_train_batch_end(trainer, module, torch.tensor(0.6), None, 4)
    assert info.value.step == 4 and monitor.last_finite_loss == pytest.approx(0.8)


# ----------------------------------------------------------------------------- a real fit


class _Tiny(pl.LightningModule):
    """A linear regression whose loss is NaN at optimizer step ``nan_step`` (1-based)."""

    def __init__(self, nan_step: int | None = None) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.nan_step = nan_step

    def forward(self, x):
        return self.layer(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        if self.nan_step is not None and self.global_step + 1 == self.nan_step:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(batches: int = 12) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * batches, 3, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=4)


def _trainer(tmp: Path, *callbacks: pl.Callback, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp,
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **{"accelerator": "cpu", "devices": 1, **kwargs},
    )


@pytest.mark.parametrize("nan_step", [4, 3])
def test_a_divergence_before_a_step_checkpoint_leaves_no_checkpoint_for_that_step(
    tmp_path, nan_step
):
    # checkpoints every 2 steps; the monitor reads only every 100 steps (as on a GPU, where it
    # reads every 16): the loss of step 3 or 4 is NaN, so step 4's checkpoint must not exist
    monitor = DivergenceMonitor(warmup_steps=0, check_every_n_steps=100)
    steps = StepCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2)
    with pytest.raises(TrainingDiverged):
        _trainer(tmp_path, monitor, steps).fit(_Tiny(nan_step), _loader())
    assert monitor.diverged_step == nan_step
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-0000002.ckpt"]
    saved = torch.load(tmp_path / "ckpt" / "step-0000002.ckpt", weights_only=False)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_step_checkpoints_hold_no_unread_losses(tmp_path):
    monitor = DivergenceMonitor(warmup_steps=0, check_every_n_steps=100)
    steps = StepCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=5)
    _trainer(tmp_path, monitor, steps).fit(_Tiny(), _loader())
    saved = torch.load(tmp_path / "ckpt" / "step-0000010.ckpt", weights_only=True)
    state = saved["callbacks"]["DivergenceMonitor"]
    assert state["pending"] == [] and state["seen"] == 10


class _SaveAt(pl.Callback):
    """Writes a checkpoint by hand (trainer.save_checkpoint) after optimizer step ``step``."""

    def __init__(self, path: Path, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_any_full_checkpoint_checks_the_unread_losses_before_it_is_written(tmp_path):
    monitor = DivergenceMonitor(warmup_steps=0, check_every_n_steps=100)
    path = tmp_path / "manual.ckpt"
    with pytest.raises(TrainingDiverged):
        _trainer(tmp_path, monitor, _SaveAt(path, 5)).fit(_Tiny(nan_step=4), _loader())
    assert monitor.diverged_step == 4 and not path.exists()


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_resuming_on_a_gpu_with_unread_losses_in_the_checkpoint(tmp_path):
    # A checkpoint that holds unread losses (written by an older version, or outside a run):
    # train on the CPU, then plant two unread losses in the monitor's state.
    ckpt = tmp_path / "cpu.ckpt"
    saver = _SaveAt(ckpt, 4)
    _trainer(tmp_path, DivergenceMonitor(warmup_steps=0), saver, max_steps=6).fit(
        _Tiny(), _loader()
    )
    saved = torch.load(ckpt, weights_only=False)
    seen = saved["callbacks"]["DivergenceMonitor"]["seen"]
    saved["callbacks"]["DivergenceMonitor"]["pending"] = [(3, 0.5), (4, 0.4)]
    torch.save(saved, ckpt)

    monitor = DivergenceMonitor(warmup_steps=0, check_every_n_steps=4)
    trainer = _trainer(
        tmp_path, monitor, accelerator="gpu", max_steps=10, enable_checkpointing=False
    )
    trainer.fit(_Tiny(), _loader(), ckpt_path=ckpt)
    assert trainer.global_step == 10 and not monitor.diverged
    assert monitor._seen == seen + 2 + 6 and not monitor._pending
    assert monitor.max_abs_logit is not None

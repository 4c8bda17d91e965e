"""Lightning callbacks of the experiment app."""

from mtl_clippy.callbacks.agc import AdaptiveGradientClipping
from mtl_clippy.callbacks.checkpointing import (
    KEEP_CHECKPOINTS,
    AtomicCheckpointIO,
    ResumeState,
    RunCheckpoint,
    StepCheckpoint,
    prune_finished_run,
)
from mtl_clippy.callbacks.divergence import DivergenceMonitor, TrainingDiverged
from mtl_clippy.callbacks.lr_monitor import LearningRateMonitor
from mtl_clippy.callbacks.telemetry import OptimizerTelemetry
from mtl_clippy.callbacks.throughput import ThroughputMeter

__all__ = [
    "KEEP_CHECKPOINTS",
    "AdaptiveGradientClipping",
    "AtomicCheckpointIO",
    "DivergenceMonitor",
    "LearningRateMonitor",
    "OptimizerTelemetry",
    "ResumeState",
    "RunCheckpoint",
    "StepCheckpoint",
    "ThroughputMeter",
    "TrainingDiverged",
    "prune_finished_run",
]

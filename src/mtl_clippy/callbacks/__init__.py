"""Lightning callbacks of the experiment app."""

from mtl_clippy.callbacks.agc import AdaptiveGradientClipping
from mtl_clippy.callbacks.checkpointing import (
    AtomicCheckpointIO,
    ResumeState,
    RunCheckpoint,
    StepCheckpoint,
)
from mtl_clippy.callbacks.divergence import DivergenceMonitor, TrainingDiverged
from mtl_clippy.callbacks.telemetry import OptimizerTelemetry
from mtl_clippy.callbacks.throughput import ThroughputMeter

__all__ = [
    "AdaptiveGradientClipping",
    "AtomicCheckpointIO",
    "DivergenceMonitor",
    "OptimizerTelemetry",
    "ResumeState",
    "RunCheckpoint",
    "StepCheckpoint",
    "ThroughputMeter",
    "TrainingDiverged",
]

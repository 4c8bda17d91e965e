"""Lightning callbacks of the experiment app."""

from mtl_clippy.callbacks.throughput import ThroughputMeter

__all__ = ["ThroughputMeter"]

"""Aggregation of run folders into tables (and, later, plots and reports)."""

from mtl_clippy.report.sweep import collect_results, write_results

__all__ = ["collect_results", "write_results"]

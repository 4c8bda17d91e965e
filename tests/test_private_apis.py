"""The few private APIs of our libraries that the code relies on, each pinned here.

Everything else goes through public APIs. Each pin fails loudly when a library release renames
or reshapes what we use, instead of our code silently falling back or doing nothing:

* Lightning's CSV writer (``mtl_clippy.loggers.AtomicExperimentWriter``): the header-rewrite
  hook, the new-keys helper and the file-system handle, for atomic CSV writes on a full disk;
* Hydra's error printer ``run_and_report`` (``mtl_clippy.full_disk_cli``), wrapped so that a
  full disk while Hydra writes its own files is one line;
* Hydra's command-line parser ``get_args_parser`` (``mtl_clippy.cli._hydra_arguments``; its
  behaviour is pinned in tests/test_cli.py);
* Lightning's ``LearningRateMonitor`` name finders and stats hook
  (``mtl_clippy.callbacks.LearningRateMonitor``), which name its tags ``lr``, ``lr/<group>``
  for every optimizer;
* torch's ``Optimizer._group_tensors_by_device_and_dtype`` (``mtl_clippy.optim.clippy``; its
  contract is pinned in tests/test_clippy.py).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mtl_clippy"

#: file (relative to src/mtl_clippy) -> the private names it may use
ALLOWED = {
    "cli.py": {"hydra._internal.utils.get_args_parser"},
    "full_disk_cli.py": {"hydra._internal.utils.run_and_report"},
}


def test_hydra_internal_is_imported_only_where_pinned() -> None:
    users = {
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if re.search(r"^\s*(from|import) hydra\._internal", p.read_text(), re.MULTILINE)
    }
    assert users == set(ALLOWED)


def test_lightning_csv_writer_hooks_exist_with_the_shape_we_override(tmp_path: Path) -> None:
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    from mtl_clippy.loggers import AtomicExperimentWriter

    base = inspect.signature(ExperimentWriter._rewrite_with_new_header)
    assert list(base.parameters) == ["self", "fieldnames"]
    assert callable(ExperimentWriter._record_new_keys)
    writer = AtomicExperimentWriter(str(tmp_path))
    assert hasattr(writer, "_fs") and isinstance(writer.metrics_keys, list)
    # the hook is reached: a new column after rows were saved rewrites the header (ours)
    writer.log_metrics({"a": 1.0}, step=0)
    writer.save()
    writer.log_metrics({"a": 2.0, "b": 3.0}, step=1)
    writer.save()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == ["a", "b", "step"]
    assert len(lines) == 3


def test_hydra_run_and_report_is_what_full_disk_cli_wraps() -> None:
    import hydra._internal.utils as hydra_utils

    from mtl_clippy.full_disk_cli import full_disk_exits

    original = hydra_utils.run_and_report
    assert list(inspect.signature(original).parameters) == ["func"]
    assert original(lambda: 41 + 1) == 42
    with full_disk_exits():
        assert hydra_utils.run_and_report is not original
        assert hydra_utils.run_and_report(lambda: 7) == 7
    assert hydra_utils.run_and_report is original
    # @hydra.main reaches it through the module attribute (what the wrapper replaces)
    import hydra.main as hydra_main

    source = inspect.getsource(hydra_main)
    assert "_run_hydra" in source
    from hydra._internal import utils

    assert "run_and_report(" in inspect.getsource(utils._run_hydra)


@pytest.mark.parametrize("name", ["_group_tensors_by_device_and_dtype"])
def test_torch_optimizer_helper_exists(name: str) -> None:
    from torch.optim import Optimizer

    assert callable(getattr(Optimizer, name))


def test_lightning_lr_monitor_hooks_exist_with_the_shape_we_override() -> None:
    from collections import defaultdict

    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor as Lightning

    from mtl_clippy.callbacks import LearningRateMonitor

    shapes = {
        "_find_names_from_schedulers": ["self", "lr_scheduler_configs"],
        "_find_names_from_optimizers": [
            "self", "optimizers", "seen_optimizers", "seen_optimizer_types"
        ],
        "_get_optimizer_stats": ["self", "optimizer", "names"],
    }  # fmt: skip
    for name, params in shapes.items():
        assert list(inspect.signature(getattr(Lightning, name)).parameters) == params, name
    # the hooks are reached and give our tags: one group, then named groups, with momentum
    w = [torch.nn.Parameter(torch.zeros(2)) for _ in range(2)]
    monitor = LearningRateMonitor(log_momentum=True)
    for groups, expected in [
        ([{"params": w}], ["lr"]),
        ([{"params": w[:1], "name": "default"}, {"params": w[1:], "name": "embeddings"}],
         ["lr/default", "lr/embeddings"]),
    ]:  # fmt: skip
        opt = torch.optim.Adam(groups, lr=0.1)
        names, left = monitor._find_names_from_optimizers(
            [opt], seen_optimizers=[], seen_optimizer_types=defaultdict(int)
        )
        assert names == [expected] and left == [opt]
        monitor.lrs = {n: [] for n in expected}
        stats = monitor._get_optimizer_stats(opt, expected)
        momentum = [n.replace("lr", "momentum", 1) for n in expected]
        assert stats == {**dict.fromkeys(expected, 0.1), **dict.fromkeys(momentum, 0.9)}

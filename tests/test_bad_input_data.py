"""Bad data settings that are one clear line (or a warning) before any training, never a
traceback mid-fit:

* generated data into a folder that cannot be written (``/sys``, which even root cannot
  write; chmod would not stop root, who runs CI), or whose final rename fails;
* ``model.norm=batch`` with one-row training batches;
* resuming a checkpoint trained with another vocabulary (another ``data.min_count``);
* a ``data.min_count`` above every count (an empty vocabulary).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from app_helpers import ROOT, run_train
from mtl_clippy.data import AliExpressDataModule, DataError, generate_dataset
from mtl_clippy.data.datamodule import EpochBatchSampler
from mtl_clippy.data.schema import CATEGORICAL_COLUMNS
from mtl_clippy.errors import ConfigError, DiskFull


def _unwritable() -> Path:
    """A folder under /sys that does not exist and cannot be created, even by root."""
    path = Path("/sys") / f"mtl_clippy_review_{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError:
        return path
    path.rmdir()
    pytest.skip("/sys is writable here")


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- unwritable


def test_generating_into_an_unwritable_folder_is_a_data_error():
    out = _unwritable() / "x"
    with pytest.raises(DataError, match=r"cannot write the generated data: /sys is not writable"):
        generate_dataset(out, train_rows=100, test_rows=50)
    assert not out.parent.exists()


def test_the_data_module_names_the_key_that_sets_the_folder():
    dm = AliExpressDataModule(cache_dir=str(_unwritable()), train_rows=100, test_rows=50)
    with pytest.raises(DataError, match=r"not writable.*set data\.cache_dir \(by default paths\.data_dir\)"):  # fmt: skip
        dm.prepare_data()


def test_the_command_line_prints_one_line_and_exits_2():
    out = _unwritable() / "x"
    cmd = [sys.executable, "-m", "mtl_clippy.data.synthetic", "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--train-rows", "100", "--test-rows", "50"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert line.startswith(f"error: {out}: cannot write the generated data: /sys is not writable")
    assert line.endswith("(choose another --out)")
    assert proc.stdout == ""


def test_a_failure_after_the_files_are_written_is_not_success(tmp_path, monkeypatch):
    """The data were drawn and written (``meta`` complete) but the final rename failed: no
    dataset exists, so generate_dataset must not return as if it did."""
    out = tmp_path / "gen"
    rename = os.rename

    def failing(src, dst, *args, **kwargs):
        if Path(dst) == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(DiskFull) as caught:  # one line naming the dataset folder
        generate_dataset(out, train_rows=100, test_rows=50)
    assert str(caught.value) == f"no space left on device while writing {out}"
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder or lock file left


@pytest.mark.slow  # a train.py subprocess (the in-process check above is fast)
def test_train_py_with_an_unwritable_data_dir_is_one_line(tmp_path):
    folder = _unwritable()
    result = run_train(
        [f"paths.data_dir={folder}", f"paths.log_dir={tmp_path}/out", "logger=none",
         "data.train_rows=300", "data.test_rows=100"],
        cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = _error_lines(result.stderr)
    assert line.startswith(f"error: {folder}/synthetic/"), line
    assert "/sys is not writable" in line and "data.cache_dir" in line
    assert "paths.data_dir" in line


# ----------------------------------------------------------------------------- norm=batch


def _compose(tmp_path: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "data.train_rows=600",
                "data.test_rows=300",
                "trainer.accelerator=cpu",
                "logger=none",
                *overrides,
            ],
        )
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(tmp_path.parent / "data"), force_add=True)
    return cfg


def test_batch_norm_with_one_row_batches_is_rejected_before_training(tmp_path):
    from mtl_clippy.train import build

    with pytest.raises(ConfigError, match=r"data\.batch_size=1: .*use model\.norm=layer"):
        build(_compose(tmp_path, ["data.batch_size=1"]))
    # the suggested fix builds
    _, module = build(_compose(tmp_path, ["data.batch_size=1", "model.norm=layer"]))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in module.modules())


@settings(max_examples=30)
@given(
    n_rows=st.integers(1, 700),
    batch=st.integers(1, 300),
    world=st.integers(1, 4),
    epoch=st.integers(0, 3),
)
def test_training_batches_are_full_or_the_whole_shard(n_rows, batch, world, epoch):
    """The training loader drops an incomplete last batch, so no batch of one row occurs
    unless the batch size or the whole shard is one row (both rejected with BatchNorm)."""
    sizes = []
    for rank in range(world):
        sampler = EpochBatchSampler(
            n_rows, batch, shuffle=True, seed=1, rank=rank, world_size=world, drop_last=True
        )
        sampler.set_epoch(epoch)
        sizes += [len(b) for b in sampler]
    shard = n_rows // world
    expected = min(batch, shard)
    assert all(s == expected for s in sizes), (sizes, expected)
    if n_rows >= world:
        assert len(sizes) == world * max(shard // batch, 1 if shard else 0)


# ----------------------------------------------------------------------------- resume


def test_resuming_with_another_min_count_names_the_vocabulary(tmp_path):
    from mtl_clippy.train import train

    first = _compose(tmp_path, ["data.min_count=1", "trainer.max_epochs=1", "data.batch_size=128"])
    OmegaConf.update(first, "callbacks.progress_bar.refresh_rate", 0)
    assert train(first)["status"] == "completed"
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    sizes_then = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"][
        "metadata"
    ]["vocab_sizes"]

    again = _compose(
        tmp_path / "again",
        ["data.min_count=5", "trainer.max_epochs=2", "data.batch_size=128", f"ckpt_path={ckpt}"],
    )
    OmegaConf.update(again, "paths.data_dir", str(tmp_path.parent / "data"))
    with pytest.raises(ConfigError) as err:
        train(again)
    message = str(err.value)
    assert "\n" not in message
    assert "different vocabulary" in message and str(list(sizes_then)) in message
    assert "data.min_count=1" in message and "data.min_count=5" in message

    # a checkpoint from before data.min_count existed (no min_count in its metadata)
    old = torch.load(ckpt, map_location="cpu", weights_only=False)
    old["hyper_parameters"]["metadata"]["extra"].pop("min_count")
    torch.save(old, tmp_path / "old.ckpt")
    OmegaConf.update(again, "ckpt_path", str(tmp_path / "old.ckpt"))
    with pytest.raises(ConfigError, match=r"before it existed.*data\.min_count=5"):
        train(again)


# ----------------------------------------------------------------------------- min_count


def test_a_min_count_above_every_count_warns_per_field(tmp_path, caplog):
    dm = AliExpressDataModule(
        cache_dir=str(tmp_path), train_rows=300, test_rows=100, min_count=10**6, progress=False
    )
    with caplog.at_level(logging.WARNING, logger="mtl_clippy.data.datamodule"):
        dm.setup("fit")
    assert dm.oov_rate["train"] == 1.0  # every id is OOV
    warnings = [r.getMessage() for r in caplog.records if "vocabulary is empty" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(", ".join(CATEGORICAL_COLUMNS) + ":")
    assert "data.min_count=1000000" in warnings[0]
    assert all(v.size == 1 for v in dm.vocabularies)
    assert np.asarray(dm._train[0]).max() == 0

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mtl_clippy.data.datamodule"):
        AliExpressDataModule(
            cache_dir=str(tmp_path), train_rows=300, test_rows=100, min_count=1, progress=False
        ).setup("fit")
    assert not [r for r in caplog.records if "vocabulary is empty" in r.getMessage()]

"""Checkpoints are loaded with ``torch.load(weights_only=True)`` everywhere, so a crafted
checkpoint (a pickle whose ``__reduce__`` calls ``os.system``) cannot run code.

Every crafted file here carries a harmless payload: it would create a marker file. A refused
file is one line ``error: checkpoint <file> is refused: ...`` and exit status 2, before
anything runs, whether it is named with ``ckpt_path=`` or found in a run's ``checkpoints/``
by ``resume=true``; the marker never appears. The project's own checkpoints (every callback
state, Clippy's accumulators, the schedulers) load that way.
"""

from __future__ import annotations

import builtins
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from app_helpers import run_train
from mtl_clippy.callbacks import AtomicCheckpointIO
from mtl_clippy.resume import UnsafeCheckpoint, checkpoint_step, find_checkpoint, load_checkpoint


class _Payload:
    """Unpickled by a loader that trusts the file, this would create ``marker``."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch '{self.marker}'",)
        if self.how == "exec":
            return builtins.exec, (f"open({self.marker!r}, 'w').close()",)
        return builtins.eval, (f"open({self.marker!r}, 'w').close()",)


def _craft(path: Path, marker: Path, how: str = "system", fmt: str = "zip", where: str = "top"):
    """A checkpoint-like file with the payload at ``where``, written as ``fmt``: torch's zip
    format, its old format, or a bare pickle of protocol 0-5 (``pickle<n>``)."""
    payload = _Payload(marker, how)
    content = {
        "top": {"epoch": 0, "global_step": 7, "payload": payload},
        "nested": {"global_step": 7, "state_dict": {"w": torch.ones(2), "x": [1, payload]}},
        "alone": payload,
    }[where]
    if fmt == "zip":
        torch.save(content, path)
    elif fmt == "legacy":
        torch.save(content, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(content, f, protocol=int(fmt.removeprefix("pickle")))
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@given(
    how=st.sampled_from(["system", "exec", "eval"]),
    fmt=st.sampled_from(["zip", "legacy", *(f"pickle{p}" for p in range(6))]),
    where=st.sampled_from(["top", "nested", "alone"]),
)
def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(how, fmt, where):
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "MARKER"
        path = _craft(Path(tmp) / "evil.ckpt", marker, how, fmt, where)
        for load in (
            load_checkpoint,
            checkpoint_step,
            # Lightning's own loading (trainer.fit/test(ckpt_path=...)), even when asked not to
            lambda p: AtomicCheckpointIO().load_checkpoint(p, weights_only=False),
        ):
            with pytest.raises(UnsafeCheckpoint) as err:
                load(path)
            message = str(err.value)
            assert "\n" not in message and str(path) in message
            assert "weights_only=True" in message
        assert not marker.exists()


def test_lightning_loading_stays_safe_when_the_environment_turns_it_off(tmp_path, monkeypatch):
    # torch's own switch for calls that leave weights_only unset (as Lightning 2.6 does)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = _craft(tmp_path / "evil.ckpt", tmp_path / "MARKER")
    with pytest.raises(UnsafeCheckpoint, match=r"evil\.ckpt is refused"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not (tmp_path / "MARKER").exists()
    torch.save({"global_step": 3, "w": torch.zeros(1)}, tmp_path / "good.ckpt")
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "good.ckpt")["global_step"] == 3


def test_a_planted_checkpoint_stops_the_search_for_the_newest(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"global_step": 5, "epoch": 0}, folder / "last.ckpt")
    (folder / "step-0000009.ckpt").write_bytes(b"PK\x03\x04 cut short")  # damaged: skipped
    (folder / "step-0000008.ckpt").write_text("not a checkpoint")  # no pickle at all: skipped
    assert find_checkpoint(tmp_path) == (folder / "last.ckpt", 5)
    assert "skipping unreadable checkpoint" in caplog.text
    _craft(folder / "step-0000001.ckpt", tmp_path / "MARKER", fmt="pickle2")
    with pytest.raises(UnsafeCheckpoint, match=r"step-0000001\.ckpt is refused"):
        find_checkpoint(tmp_path)
    assert not (tmp_path / "MARKER").exists()


def _zip_with_pickle(path: Path, data_pkl: bytes) -> Path:
    """A file in torch's zip layout whose ``data.pkl`` is ``data_pkl``."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def test_a_payload_of_inst_opcodes_in_a_zip_is_refused_not_skipped(tmp_path):
    """``INST`` imports and calls in one opcode (no ``GLOBAL``); torch's safe loader meets an
    opcode it does not run. The ``data.pkl`` inside the zip is a complete pickle: refused,
    not "damaged" (which would skip it in silence and resume from an older file)."""
    marker = tmp_path / "MARKER"
    evil = _zip_with_pickle(tmp_path / "evil.ckpt", f"(S'touch {marker}'\nios\nsystem\n.".encode())
    for load in (load_checkpoint, checkpoint_step):
        with pytest.raises(UnsafeCheckpoint, match=r"evil\.ckpt is refused"):
            load(evil)
    assert not marker.exists()


def test_a_checkpoint_cut_short_is_damaged_not_refused(tmp_path):
    """A real checkpoint cut in half (a partial copy), in the zip and the old format, or a
    zip whose data.pkl is cut: skipped with a warning, the resume takes an older one."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"global_step": 5, "epoch": 0}, folder / "last.ckpt")
    content = {"global_step": 9, "epoch": 0, "state_dict": {"w": torch.randn(64, 64)}}
    for name, zipped in (("step-0000009.ckpt", False), ("step-0000008.ckpt", True)):
        torch.save(content, folder / name, _use_new_zipfile_serialization=zipped)
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
    pickled = pickle.dumps({"global_step": 7}, protocol=2)
    _zip_with_pickle(folder / "step-0000007.ckpt", pickled[: len(pickled) // 2])
    assert find_checkpoint(tmp_path) == (folder / "last.ckpt", 5)


def test_a_fifo_named_like_a_checkpoint_is_skipped_not_waited_on(tmp_path):
    """Opening a FIFO for reading blocks until someone writes: resume would hang."""
    import threading

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"global_step": 3, "epoch": 0}, folder / "step-0000003.ckpt")
    os.mkfifo(folder / "step-0000009.ckpt")
    (folder / "last.ckpt").symlink_to(folder / "step-0000009.ckpt")  # a link to it, too
    found = []
    search = threading.Thread(target=lambda: found.append(find_checkpoint(tmp_path)), daemon=True)
    search.start()
    search.join(20)
    if search.is_alive():  # blocked in open(): let it go, then fail
        os.close(os.open(folder / "step-0000009.ckpt", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("find_checkpoint waited on a FIFO")
    assert found == [(folder / "step-0000003.ckpt", 3)]
    with pytest.raises(OSError, match="not a regular file"):
        load_checkpoint(folder / "step-0000009.ckpt")


def test_a_planted_best_checkpoint_stops_a_resume_before_training(tmp_path):
    """best.ckpt is never resumed from, but the test loads it after training: it is refused
    when the resume looks for its checkpoint, before anything trains."""
    from omegaconf import OmegaConf

    from mtl_clippy.resume_point import resume_point as _resume_point

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"global_step": 5, "epoch": 0}, folder / "last.ckpt")
    _craft(folder / "best.ckpt", tmp_path / "MARKER")
    with pytest.raises(UnsafeCheckpoint, match=r"best\.ckpt is refused"):
        find_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpoint, match=r"best\.ckpt is refused"):
        _resume_point(OmegaConf.create({"resume": str(tmp_path), "ckpt_path": None}), tmp_path)
    assert not (tmp_path / "MARKER").exists()


def test_load_from_checkpoint_stays_safe_when_the_environment_turns_it_off(tmp_path, monkeypatch):
    """``MultiTaskModule.load_from_checkpoint`` (docs/models.md): weights_only=True whatever
    is asked, and no class named by the hyper-parameters outside the project and torch."""
    from mtl_clippy.models import MultiTaskModule

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "MARKER"
    evil = _craft(tmp_path / "evil.ckpt", marker)
    for weights_only in (None, False):
        with pytest.raises(UnsafeCheckpoint, match=r"evil\.ckpt is refused"):
            MultiTaskModule.load_from_checkpoint(evil, weights_only=weights_only)
    # plain values only, but they name a function to call when the model is built
    run = {"_target_": "os.system", "_args_": [f"touch {marker}"]}
    hparams = {"backbone": {"_target_": "mtl_clippy.models.SharedBottom", "embed_dim": run}}
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, tmp_path / "targets.ckpt")
    with pytest.raises(UnsafeCheckpoint, match=r"backbone\.embed_dim\._target_ is 'os\.system'"):
        MultiTaskModule.load_from_checkpoint(tmp_path / "targets.ckpt")
    assert not marker.exists()


# ----------------------------------------------------------------------------- end to end

FAST = ["logger=none", "threads=1", "callbacks.progress_bar.refresh_rate=0"]


def _one_error_line(res) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), res.stderr[-3000:]
    return lines[-1]


def test_train_py_refuses_a_crafted_ckpt_path_before_anything_runs(tmp_path):
    evil = _craft(tmp_path / "evil.ckpt", tmp_path / "MARKER")
    args = [*FAST, f"paths.log_dir={tmp_path}/outputs", f"paths.data_dir={tmp_path}/data"]
    line = _one_error_line(run_train([*args, f"ckpt_path={evil}"], cwd=tmp_path))
    assert line.startswith(f"error: checkpoint {evil} is refused: it holds Python objects")
    assert not (tmp_path / "MARKER").exists()
    assert not (tmp_path / "data").exists()  # nothing was built: no data generated


@pytest.mark.slow  # about 10 s end to end; test_a_planted_checkpoint_stops_the_search_for_the_newest checks it in-process
def test_resume_refuses_a_checkpoint_planted_in_the_run_folder(tmp_path):
    args = [*FAST, f"paths.log_dir={tmp_path}/outputs", f"paths.data_dir={tmp_path}/data"]
    # an earlier run of the same overrides (as far as resume=true can tell) ...
    run = tmp_path / "outputs" / "runs" / "2020-01-01_00-00-00_000000_sb-clippy"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {a}\n" for a in args))
    (run / "checkpoints").mkdir()
    # ... whose checkpoints folder someone dropped a file into
    evil = _craft(run / "checkpoints" / "step-0000100.ckpt", tmp_path / "MARKER", how="exec")
    line = _one_error_line(run_train([*args, "resume=true"], cwd=tmp_path))
    assert line.startswith(f"error: checkpoint {evil} is refused"), line
    assert not (tmp_path / "MARKER").exists()
    assert not (run / "metrics.json").exists()
    # resume=<run folder> searches the same folder the same way (in-process: the same call)
    from omegaconf import OmegaConf

    from mtl_clippy.resume_point import resume_point as _resume_point

    with pytest.raises(UnsafeCheckpoint, match=r"step-0000100\.ckpt is refused"):
        _resume_point(OmegaConf.create({"resume": str(run), "ckpt_path": None}), run)
    assert not (tmp_path / "MARKER").exists()


def test_the_projects_own_checkpoints_load_with_weights_only(tmp_path, monkeypatch):
    """ClippyAdagrad with sparse embeddings, a plateau scheduler, every default callback
    (early stopping, best/last/step checkpoints, divergence monitor, telemetry, random
    states) and the module's hyper-parameters with the data's metadata."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from app_helpers import ROOT
    from mtl_clippy.train import train

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "data.train_rows=600",
                "data.test_rows=300",
                "data.batch_size=128",
                "trainer.max_epochs=2",
                "optim=clippy",
                "model.sparse_embeddings=true",
                "scheduler=plateau",
                "callbacks.step_checkpoint.every_n_train_steps=2",
                "callbacks.progress_bar.refresh_rate=0",
                "logger=csv",
                "trainer.log_every_n_steps=2",  # 4 batches an epoch: log within the epoch
                "threads=1",
                "test=false",
                "keep_checkpoints=all",  # every kind of checkpoint, the step one included
            ],
        )
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(tmp_path / "data"), force_add=True)
    assert train(cfg)["status"] == "completed"
    files = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert {p.name.split("-")[0] for p in files} == {"best.ckpt", "last.ckpt", "step"}
    for path in files:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert {"optimizer_states", "lr_schedulers", "callbacks"} <= set(ckpt)
        assert "ResumeState" in ckpt["callbacks"] and "DivergenceMonitor" in ckpt["callbacks"]
        assert ckpt["hyper_parameters"]["metadata"]["vocab_sizes"]
    # the documented way to rebuild a model without its data, safe even so
    from mtl_clippy.models import MultiTaskModule

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    model = MultiTaskModule.load_from_checkpoint(files[0])
    saved = torch.load(files[0], map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())

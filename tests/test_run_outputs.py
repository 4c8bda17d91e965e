"""What a run leaves for comparing runs, and how much of it.

* TensorBoard: the learning rate has one tag for every optimizer (``lr``, ``lr/<group>``),
  and a run's folder (TensorBoard's run name) says model, optimizer and overrides, as one
  safe folder name whatever the override values hold.
* Checkpoints: a run that completed or diverged keeps ``best.ckpt`` and ``last.ckpt``
  (``keep_checkpoints=best``: ``best.ckpt`` only; ``all``: every one); an interrupted or
  failed run keeps every checkpoint, for resuming.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

from app_helpers import TINY
from mtl_clippy import config_checks
from mtl_clippy import train as train_mod
from mtl_clippy.callbacks import (
    KEEP_CHECKPOINTS,
    RunCheckpoint,
    StepCheckpoint,
    prune_finished_run,
)
from mtl_clippy.errors import ConfigError
from mtl_clippy.report.study import read_scalars
from mtl_clippy.run_names import (
    MAX_BYTES,
    overrides_label,
    run_folder_name,
    safe_name,
    safe_name_resolver,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
#: What a folder name made here may hold (the module's documented alphabets): a single
#: run's, plain text to Hydra's override parser and a shell; a sweep job's, Hydra's own too.
SAFE = re.compile(r"^[A-Za-z0-9._+@%\-]+$")
SAFE_JOB = re.compile(r"^[A-Za-z0-9._+@%\-=,~\[\]]+$")
OPTIMIZER_CLASSES = ("ClippyAdagrad", "Adagrad", "Adam", "LAMB", "Lamb")
#: Override values a folder name must survive: a path, a space, unicode, a list, a long value.
HOSTILE = ["+tag=a/b c", "+note=café ☕", "task_weights=[1,2]", f"+long={'9' * 500}"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs_data")


# ----------------------------------------------------------------------------- folder names


def _is_one_safe_folder_name(name: str, tmp_path: Path, alphabet: re.Pattern = SAFE) -> bool:
    ok = bool(alphabet.match(name)) and len(name.encode()) <= MAX_BYTES
    ok = ok and name not in (".", "..") and name[0] not in ".-"
    if ok:
        (tmp_path / name).mkdir(exist_ok=True)  # the file system takes it as one folder
        ok = [p.name for p in tmp_path.iterdir() if p.name == name] == [name]
        (tmp_path / name).rmdir()
    return ok


@given(st.text(max_size=400))
def test_any_text_gives_one_safe_folder_name(tmp_path_factory, text):
    tmp = tmp_path_factory.mktemp("names", numbered=True)
    name = safe_name(text)
    assert _is_one_safe_folder_name(name, tmp), (text, name)
    assert safe_name(text) == name  # the same text, the same name (resume, sweep resume)
    job = safe_name_resolver(text)  # a sweep job's folder
    assert _is_one_safe_folder_name(job, tmp, SAFE_JOB) and "/" not in job, (text, job)


def test_a_path_into_a_run_folder_is_one_hydra_override_value_as_typed(tmp_path):
    """ckpt_path=<run>/checkpoints/best.ckpt, pasted unquoted, parses as that path."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    name = run_folder_name("2026-12-02_16-20-00_123456", "sb-adam", HOSTILE)
    path = f"/home/me/outputs/runs/{name}/checkpoints/best.ckpt"
    (parsed,) = OverridesParser.create().parse_overrides([f"ckpt_path={path}"])
    assert parsed.value() == path


@given(st.text(alphabet="abcXYZ019.+-_@%", min_size=1, max_size=MAX_BYTES))
def test_a_name_that_is_safe_already_is_kept_as_it_is(text):
    expected = text if text[0] not in ".-" else "_" + text[1:]
    assert safe_name(text) == expected


@given(st.text(min_size=1, max_size=50), st.text(min_size=1, max_size=50))
def test_long_names_that_differ_only_at_their_end_stay_apart(tail_a, tail_b):
    head = "x" * (2 * MAX_BYTES)
    a, b = safe_name(head + tail_a), safe_name(head + tail_b)
    assert len(a) == len(b) == MAX_BYTES
    assert (a == b) == (tail_a == tail_b)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("optim.lr-0.2", "optim.lr-0.2"),
        ("a/b c", "a_b_c"),  # a slash would nest folders, a space needs quoting
        ("lr=0.2,seed=3", "lr_0.2_seed_3"),  # = and , are Hydra's syntax in a value
        ("../../etc", "_._.._etc"),  # never a path out of outputs/
        ("-rf", "_rf"),  # not read as an option by rm, ls ...
        (".hidden", "_hidden"),
        ("résumé", "resume"),  # accents dropped, the letters kept
        ("日本語\n\t\x00", "_"),
        ("", "_"),
        ("a'b\"c:d*e?f<g>h|i\\j", "a_b_c_d_e_f_g_h_i_j"),
    ],
)
def test_hostile_texts_give_a_safe_readable_name(text, expected):
    assert safe_name(text) == expected


def test_a_folder_label_says_the_overrides_short_and_leaves_out_what_the_name_says():
    assert overrides_label(["model=ncf", "optim=adam", "optim.lr=0.2", "seed=3"]) == (
        "lr-0.2_seed-3"
    )
    # keys sharing their last part stay whole; additions lose their +; deletions say no-
    assert overrides_label(["optim.lr=0.2", "param_groups.embeddings.lr=0.4", "+x.y=1"]) == (
        "optim.lr-0.2_param_groups.embeddings.lr-0.4_y-1"
    )
    assert (
        overrides_label(["~callbacks.lr_monitor", "model.norm=none"]) == "no-lr_monitor_norm-none"
    )
    assert overrides_label(["model.bottom_dims=[64, 32]"]) == "bottom_dims-64+32"
    # how a run starts, Hydra's keys and the excluded keys (paths) are no part of it
    hidden = ["resume=true", "ckpt_path=/a/b.ckpt", "hydra.run.dir=/x", "paths.log_dir=/o"]
    assert overrides_label(hidden, exclude_keys=["paths.log_dir"]) == ""


def test_a_run_folder_says_model_optimizer_and_overrides_within_the_length_limit(tmp_path):
    stamp = "2026-12-02_16-20-00_123456"
    assert run_folder_name(stamp, "sb-clippy", []) == f"{stamp}_sb-clippy"
    assert run_folder_name(stamp, "sb-adam", ["optim=adam", "optim.lr=0.01"]) == (
        f"{stamp}_sb-adam_lr-0.01"
    )
    name = run_folder_name(stamp, "sb-adam", HOSTILE)
    assert name.startswith(f"{stamp}_sb-adam_tag-a_b_c_note-cafe__task_weights-1+2_long-999")
    assert _is_one_safe_folder_name(name, tmp_path) and len(name.encode()) == MAX_BYTES


@pytest.fixture(autouse=True)
def _hydra_config_restored():
    """_composed sets Hydra's global config, as a run has it; later tests must not see it
    (``${hydra:...}`` would resolve against it)."""
    from hydra.core.hydra_config import HydraConfig

    saved = HydraConfig.instance().cfg
    yield
    HydraConfig.instance().cfg = saved


def _composed(overrides: list[str], tmp_path: Path):
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    OmegaConf.update(cfg, "paths.log_dir", str(tmp_path / "outputs"), force_add=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_the_run_and_sweep_folder_configs_give_these_names(tmp_path):
    """configs/hydra/default.yaml's run.dir and sweep.subdir, resolved as Hydra does."""
    cfg = _composed(["optim=adam", "optim.lr=0.01", f"paths.data_dir={tmp_path}/d"], tmp_path)
    folder = Path(cfg.hydra.run.dir)
    assert folder.parent == tmp_path / "outputs" / "runs"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}_sb-adam_lr-0\.01", folder.name)
    # a sweep job: <n>_<Hydra's override_dirname>, made safe (the commas are Hydra's)
    subdir = OmegaConf.load(CONFIGS / "hydra" / "default.yaml").sweep._get_node("subdir")
    for dirname, expected in [
        ("optim=adam,+tag=a/b c,x=日本", "3_optim=adam,+tag=a_b_c,x=_"),
        ("model=sb,optim=clippy,optim.lr=0.2", "3_model=sb,optim=clippy,optim.lr=0.2"),  # as before
    ]:
        job = {"job": {"num": 3, "override_dirname": dirname}, "subdir": subdir._value()}
        assert OmegaConf.create({"hydra": job}).hydra.subdir == expected


def test_resume_finds_runs_by_their_overrides_old_names_included(tmp_path):
    """resume=true picks the newest run of the same overrides, whether its folder has the
    overrides in its name (this version) or not (earlier ones)."""
    runs = tmp_path / "outputs" / "runs"
    wanted = ["optim=adam", "optim.lr=0.01"]
    for name, overrides in [
        ("2026-01-01_00-00-00_000001_sb-adam", wanted),  # an earlier version's name
        ("2026-01-01_00-00-00_000002_sb-adam_lr-0.02", ["optim=adam", "optim.lr=0.02"]),
    ]:
        (runs / name / ".hydra").mkdir(parents=True)
        (runs / name / "checkpoints").mkdir()
        (runs / name / "checkpoints" / "last.ckpt").write_bytes(b"x")
        OmegaConf.save(OmegaConf.create(overrides), runs / name / ".hydra" / "overrides.yaml")
    cfg = _composed([*wanted, "resume=true"], tmp_path)
    assert Path(cfg.hydra.run.dir) == runs / "2026-01-01_00-00-00_000001_sb-adam"
    cfg = _composed(["optim=adam", "optim.lr=0.02", "resume=true"], tmp_path)
    assert Path(cfg.hydra.run.dir) == runs / "2026-01-01_00-00-00_000002_sb-adam_lr-0.02"


# ----------------------------------------------------------------------------- learning rate


def _tiny_fit(tmp_path: Path, data_dir: Path, optim: str) -> dict:
    """A tiny fit with named parameter groups and momentum logging; its scalar tags."""
    overrides = [
        *TINY,
        f"optim={optim}",
        "param_groups=embedding_lr",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "trainer.log_every_n_steps=1",
        "trainer.accelerator=cpu",
        "trainer.enable_model_summary=false",
        "+callbacks.lr_monitor.log_momentum=true",
        "+callbacks.lr_monitor.log_weight_decay=true",
        "callbacks.progress_bar.refresh_rate=0",
        "model.embed_dim=4",
        "model.bottom_dims=[8]",
        "model.tower_dims=[4]",
        "test=false",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    run = tmp_path / optim
    OmegaConf.update(cfg, "paths.output_dir", str(run), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(data_dir), force_add=True)
    summary = train_mod.train(cfg)
    assert summary["status"] == "completed", summary.get("error")
    return read_scalars(run, "")


# Lightning says so for Clippy, which has no momentum (logged as 0): expected here
@pytest.mark.filterwarnings("ignore:You have set log_momentum=True:RuntimeWarning")
def test_every_optimizer_logs_its_learning_rate_under_the_same_tags(tmp_path, data_root):
    clippy = _tiny_fit(tmp_path, data_root / "data", "clippy")
    adam = _tiny_fit(tmp_path, data_root / "data", "adam")
    groups = {"lr/default", "lr/embeddings"}  # param_groups=embedding_lr's named groups
    others = {"momentum/default", "momentum/embeddings"}
    others |= {"weight_decay/default", "weight_decay/embeddings"}
    for tags in (clippy, adam):
        assert groups | others <= set(tags)
        named = [t for t in tags if any(c in t for c in OPTIMIZER_CLASSES) or t.startswith("lr-")]
        assert named == [], named
    lr_tags = {t for t in clippy if t.split("/")[0] in ("lr", "momentum", "weight_decay")}
    assert lr_tags == {t for t in adam if t.split("/")[0] in ("lr", "momentum", "weight_decay")}
    # the rates themselves: embedding_lr's 0.2 for the tables, the optimizer's own for the rest
    assert [v for _, v in clippy["lr/embeddings"]] == pytest.approx([0.2] * 4)
    assert [v for _, v in clippy["lr/default"]] == pytest.approx([0.1] * 4)
    assert [v for _, v in adam["momentum/default"]] == pytest.approx([0.9] * 4)  # Adam's beta1


# ----------------------------------------------------------------------------- checkpoints


def _fake_trainer(folder: Path, *, model_checkpoint: bool = True, rank_zero: bool = True):
    """The checkpoint callbacks of the default config after a run, with their files: a step
    checkpoint of this run, last.ckpt and best.ckpt, as the callbacks record them."""
    folder.mkdir(parents=True, exist_ok=True)
    step = StepCheckpoint(dirpath=str(folder), every_n_train_steps=5)
    best = RunCheckpoint(dirpath=str(folder), filename="best", monitor="val/auc_mean", mode="max")
    last = RunCheckpoint(dirpath=str(folder), filename="last", monitor=None)
    state = {"run_id": step.run_id, "best_model_path": str(folder / "step-0000010.ckpt")}
    torch.save({"callbacks": {"StepCheckpoint": state}}, folder / "step-0000010.ckpt")
    for cb, name in ((best, "best.ckpt"), (last, "last.ckpt")):
        torch.save({"global_step": 10}, folder / name)
        cb.best_model_path = str(folder / name)
        cb.best_k_models = {str(folder / name): torch.tensor(0.7)}
    callbacks = [best, last, step] if model_checkpoint else [last, step]
    if not model_checkpoint:
        os.remove(folder / "best.ckpt")
    removed: list[Path] = []

    def remove_checkpoint(path):
        removed.append(Path(path))
        os.remove(path)

    trainer = SimpleNamespace(
        checkpoint_callbacks=callbacks,
        is_global_zero=rank_zero,
        strategy=SimpleNamespace(remove_checkpoint=remove_checkpoint),
    )
    return trainer, callbacks[0]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize(
    ("keep", "left"),
    [
        ("best_and_last", ["best.ckpt", "last.ckpt"]),
        ("best", ["best.ckpt"]),
        ("all", ["best.ckpt", "last.ckpt", "step-0000010.ckpt"]),
    ],
)
def test_a_finished_run_keeps_the_checkpoints_its_setting_names(tmp_path, keep, left):
    trainer, tested = _fake_trainer(tmp_path / "checkpoints")
    prune_finished_run(trainer, keep, tested)
    assert _names(tmp_path / "checkpoints") == left


def test_best_only_without_a_best_checkpoint_keeps_the_tested_last_one(tmp_path):
    """callbacks.model_checkpoint=null: last.ckpt is the tested checkpoint, and stays."""
    trainer, tested = _fake_trainer(tmp_path / "checkpoints", model_checkpoint=False)
    prune_finished_run(trainer, "best", tested)
    assert _names(tmp_path / "checkpoints") == ["last.ckpt"]


def test_other_ranks_and_other_files_are_left_alone(tmp_path):
    folder = tmp_path / "checkpoints"
    trainer, tested = _fake_trainer(folder, rank_zero=False)
    assert prune_finished_run(trainer, "best", tested) == []
    # a step checkpoint another run saved into a shared folder is not this run's to delete
    trainer, tested = _fake_trainer(folder)
    other = {"run_id": uuid.uuid4().hex, "best_model_path": str(folder / "step-0000005.ckpt")}
    torch.save({"callbacks": {"StepCheckpoint": other}}, folder / "step-0000005.ckpt")
    (folder / "notes.txt").write_text("mine")
    prune_finished_run(trainer, "best", tested)
    assert _names(folder) == ["best.ckpt", "notes.txt", "step-0000005.ckpt"]


@pytest.mark.parametrize("status", ["interrupted", "failed"])
def test_a_run_that_may_be_resumed_keeps_every_checkpoint(tmp_path, status):
    trainer, _ = _fake_trainer(tmp_path / "checkpoints")
    cfg = OmegaConf.create({"keep_checkpoints": "best"})
    train_mod._prune_checkpoints(cfg, SimpleNamespace(status=status), trainer)
    assert _names(tmp_path / "checkpoints") == ["best.ckpt", "last.ckpt", "step-0000010.ckpt"]
    train_mod._prune_checkpoints(cfg, SimpleNamespace(status="diverged"), trainer)
    assert _names(tmp_path / "checkpoints") == ["best.ckpt"]


@pytest.mark.parametrize("value", ["last", "Best", True, 1, None, ["best"]])
def test_keep_checkpoints_takes_only_its_three_values(value):
    message = config_checks.problem("keep_checkpoints", value)
    assert message is not None and message.startswith("keep_checkpoints: ")
    assert "\n" not in message and all(repr(v) in message for v in KEEP_CHECKPOINTS)
    assert all(config_checks.problem("keep_checkpoints", v) is None for v in KEEP_CHECKPOINTS)
    with pytest.raises(ValueError, match=r"^keep_checkpoints: expected one of"):
        prune_finished_run(SimpleNamespace(), value, None)


def test_a_bad_keep_checkpoints_stops_the_run_before_it_starts(tmp_path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["keep_checkpoints=last"])
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"), force_add=True)
    with pytest.raises(ConfigError, match=r"^keep_checkpoints: "):
        train_mod.train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_records_of_the_fit_decide_not_those_the_test_pass_restored(tmp_path):
    """The test pass loads best.ckpt, and every callback's record with it: last.ckpt's
    callback then names no file (best.ckpt of epoch 0 was written before last.ckpt). What
    was saved when the fit ended decides."""
    trainer, tested = _fake_trainer(tmp_path / "checkpoints")
    for cb in trainer.checkpoint_callbacks:
        cb.files_of_fit = [cb.best_model_path]
    last = trainer.checkpoint_callbacks[1]
    last.best_model_path, last.best_k_models = "", {}
    prune_finished_run(trainer, "best", tested)
    assert _names(tmp_path / "checkpoints") == ["best.ckpt"]


def test_a_completed_run_keeps_best_only_when_asked_and_logs_lr_as_lr(tmp_path, data_root):
    """A real fit and test: keep_checkpoints=best leaves best.ckpt alone (the step and last
    checkpoints it wrote are gone), and the one-group optimizer's rate is the tag lr."""
    overrides = [
        *TINY,
        "optim=adam",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=7",
        "trainer.log_every_n_steps=1",
        "trainer.accelerator=cpu",
        "trainer.enable_model_summary=false",
        "callbacks.step_checkpoint.every_n_train_steps=3",
        "callbacks.progress_bar.refresh_rate=0",
        "keep_checkpoints=best",
        "model.embed_dim=4",
        "model.bottom_dims=[8]",
        "model.tower_dims=[4]",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    run = tmp_path / "run"
    OmegaConf.update(cfg, "paths.output_dir", str(run), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(data_root / "data"), force_add=True)
    summary = train_mod.train(cfg)
    assert summary["status"] == "completed" and summary["test"]["auc_click"] is not None
    assert summary["best"]["checkpoint"] == os.path.join("checkpoints", "best.ckpt")
    assert _names(run / "checkpoints") == ["best.ckpt"]
    tags = read_scalars(run, "")
    assert "lr" in tags and not [t for t in tags if t.startswith("lr-")]

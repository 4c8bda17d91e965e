"""Bad configuration values (issue 12, item 3): every documented key, given a value it does
not allow, stops the run in one line naming the key and what it allows (exit status 2, no
traceback, metrics.json "failed" with that error), before anything is built.

The table of rules is ``mtl_clippy.config_checks.RULES``. The property tests draw values for
each key and run them through the checks the app runs (``check_config``, then the code that
builds the key's object: the data module, the module with its optimizer and scheduler, the
trainer, the callbacks); any value must end there either accepted or as a one-line
``ConfigError``, never another exception. A few runs of ``python train.py`` check the whole
contract for the issue's named cases, and one short run trains without a validation split.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

import mtl_clippy.train as app
from app_helpers import ROOT, TINY, run_train
from mtl_clippy import build as builder
from mtl_clippy import config_checks, run_checks, runtime
from mtl_clippy.config_checks import RULES, check_config, problem
from mtl_clippy.data.schema import DatasetMetadata
from mtl_clippy.errors import ConfigError
from mtl_clippy.summary import format_summary

CONFIGS = ROOT / "configs"
GROUPS = ("data", "model", "optim", "scheduler", "trainer")

# ----------------------------------------------------------------------------- composing


def _load(group: str, choice: str) -> dict:
    """A group's config file as a plain dict, with its ``defaults`` (another choice of the
    same group) merged under it; composing through Hydra takes ~0.2 s a config."""
    node = OmegaConf.load(CONFIGS / group / f"{choice}.yaml")
    base = OmegaConf.create()
    for parent in node.pop("defaults", []) or []:
        base = OmegaConf.merge(base, _load(group, str(parent)))
    return OmegaConf.to_container(OmegaConf.merge(base, node))


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The default config (composed once) on tiny data, one epoch, run folder in tmp (so
    that a value the checks let through costs seconds, not a full run)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                *TINY,
                "trainer.max_epochs=1",
                "logger=none",
                "callbacks.progress_bar.refresh_rate=0",
            ],
        )
    out = tmp_path_factory.mktemp("base")
    OmegaConf.update(cfg, "paths.output_dir", str(out / "run"), force_add=True)
    OmegaConf.update(cfg, "paths.data_dir", str(out / "data"), force_add=True)
    return cfg


#: Small sizes, so that building a model for each drawn value takes milliseconds.
SMALL = {"embed_dim": 4, "bottom_dims": [8], "tower_dims": [4], "expert_dims": [8],
         "mlp_dims": [8], "n_experts": 2, "n_shared_experts": 1, "n_task_experts": 1}  # fmt: skip

META = DatasetMetadata(vocab_sizes=(4,) * 16)


def _config_with(base, key: str, value, *, add: bool = True):
    """A copy of ``base`` whose group holds a choice that has ``key`` (model=mmoe for
    ``model.n_experts``, ...), with ``key`` set to ``value``."""
    cfg = base.copy()
    group, _, rest = key.partition(".")
    if group in GROUPS and rest not in (cfg[group] or {}):
        choice = next((c for c in _choices(group) if rest in _load(group, c)), None)
        if choice is not None:
            cfg[group] = _load(group, choice)
    if group == "model":
        for k, v in SMALL.items():
            if k in cfg.model:
                cfg.model[k] = v
    OmegaConf.update(cfg, key, value, force_add=add)
    return cfg


def _built(cfg, key: str) -> None:
    """Build what ``key`` configures, as ``train`` does (raises ``ConfigError`` on a value
    the object rejects)."""
    group = key.split(".", 1)[0]
    if group == "data":
        builder.instantiate_config(cfg.data, "data")
    elif group in ("model", "optim", "scheduler", "task_weights"):
        builder.build_module(cfg, META)
    elif group == "trainer":
        deterministic = torch.are_deterministic_algorithms_enabled()
        try:
            run_checks.check_trainer_values(cfg.trainer)
            builder.instantiate_config(
                cfg.trainer,
                "trainer",
                callbacks=[],
                logger=False,
                enable_progress_bar=False,
                precision=runtime.resolve_precision(
                    cfg.trainer.get("precision", "32-true"), str(cfg.trainer.get("accelerator"))
                ),
            )
        finally:  # Trainer(deterministic=True) sets it for the whole process
            torch.use_deterministic_algorithms(deterministic)
    elif group == "callbacks":
        builder.instantiate_callbacks(cfg.callbacks)


# ----------------------------------------------------------------------------- values

WORDS = ["min", "max", "step", "epoch", "rel", "abs", "auto", "warn", "link", "batch", "layer",
         "none", "32-true", "bf16-mixed", "16", "64", "abc", "", "val/auc_mean", "train/loss",
         "val/logloss_click", "val/calibration_click", "cpu"]  # fmt: skip
#: Anything an override can hold: numbers of every size and sign, NaN and infinities,
#: booleans, null, words, lists. Text avoids ``$`` and ``\`` (OmegaConf interpolation).
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-1.5, 1.5),
    st.sampled_from(WORDS),
    st.text(alphabet="abz019 ./-_", max_size=6),
    st.lists(st.integers(1, 9), max_size=3),
    st.lists(st.floats(0, 0.99), min_size=2, max_size=2),
    st.lists(st.one_of(st.integers(-2, 9), st.floats(-1.5, 1.5), st.just("a")), max_size=3),
)
HERE = sorted(k for k, r in RULES.items() if not r.where)


def _one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


@pytest.mark.parametrize("key", HERE)
@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(value=VALUES)
def test_each_rule_names_its_key_and_what_it_allows(key, value):
    """check_config applies each key's rule: a value it rejects is one line naming the key,
    what it allows and the value (``<key>: expected <what is allowed>, got <value>``); one
    it allows passes."""
    cfg = OmegaConf.create()
    OmegaConf.update(cfg, key, value, force_add=True)
    if RULES[key].ok(value):
        check_config(cfg)
        assert problem(key, value) is None
    else:
        with pytest.raises(ConfigError) as info:
            check_config(cfg)
        message = _one_line(info.value)
        assert message == problem(key, value)
        assert message.startswith(key) and RULES[key].allowed in message and repr(value) in message


#: The keys whose objects the app builds, by what builds them.
BUILT = {
    group: sorted(k for k in RULES if k.split(".", 1)[0] in prefixes)
    for group, prefixes in {
        "data": ("data",),
        "module": ("model", "optim", "scheduler", "task_weights"),
        "trainer": ("trainer",),
        "callbacks": ("callbacks",),
    }.items()
}
_CONFIGS: dict[str, object] = {}


def _drawn(base, key: str, value):
    """The config for ``key`` (made once per key), with ``key`` set to ``value``."""
    if key not in _CONFIGS:
        _CONFIGS[key] = _config_with(base, key, value)
    else:
        OmegaConf.update(_CONFIGS[key], key, value, force_add=True)
    return _CONFIGS[key]


#: Not drawn for keys the table leaves to the code that takes them, which accepts them:
#: booleans (torch and ClippyAdagrad take True for 1), text for ClippyAdagrad (it reads
#: float("0.5")) and for Lightning's devices ("0,1").
def _lenient(key: str, value) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, str) and (key.startswith("optim.") or key == "trainer.devices")


@pytest.mark.parametrize("group", sorted(BUILT))
@given(data=st.data())
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_any_value_is_built_or_one_line_naming_its_key(group, data, base):
    """The app's checks in the app's order (check_config, then building the key's object as
    ``train`` does) on a drawn value of a drawn key: accepted, or a one-line ConfigError
    from the key's group, never a traceback. A value its rule rejects is rejected naming the
    key: by check_config in the rule's words, or (keys the table leaves to the code that
    takes them: the data module's sizes, ClippyAdagrad's thresholds, ...) by that code.
    Allowed values may still be refused by the code where the table says it checks further
    (an empty layer list for a backbone that needs a layer, an accelerator this machine
    lacks), in one line too."""
    key = data.draw(st.sampled_from(BUILT[group]), label="key")
    value = data.draw(VALUES, label="value")
    if key.startswith("model.") and isinstance(value, int | list):  # sizes: keep them small
        numbers = value if isinstance(value, list) else [value]
        assume(all(abs(v) <= 16 for v in numbers if isinstance(v, int | float)))
    rule = RULES[key]
    cfg = _drawn(base, key, value)
    try:
        check_config(cfg)
        _built(cfg, key)
    except ConfigError as exc:
        message = _one_line(exc)
        assert message.startswith(key.split(".", 1)[0]), message
        if not rule.where and not rule.ok(value):
            assert message == problem(key, value)
        elif not rule.ok(value):
            assert key.rsplit(".", 1)[-1] in message, message
    else:
        assert rule.ok(value) or (rule.where and _lenient(key, value)), (key, value)


# ----------------------------------------------------------------------------- the table


def _leaves(group: str) -> set[str]:
    keys = set()
    for choice in _choices(group):
        for k in _load(group, choice):
            if k not in ("_target_", "_partial_"):
                keys.add(f"{group}.{k}")
    return keys


def test_every_documented_key_has_a_rule():
    """Each key of configs/train.yaml and of every choice of data, model, optim, scheduler,
    trainer and callbacks is in the table (a new key gets a rule)."""
    top = OmegaConf.load(CONFIGS / "train.yaml")
    documented = {k for k in top if k != "defaults"}
    for group in GROUPS:
        documented |= _leaves(group)
    for name, node in OmegaConf.load(CONFIGS / "callbacks" / "default.yaml").items():
        documented |= {f"callbacks.{name}.{k}" for k in node if k != "_target_"}
    assert documented - set(RULES) == set()
    for key in ("trainer.max_steps", "trainer.accumulate_grad_batches"):  # README / docs
        assert key in RULES


def test_every_shipped_config_passes(base, tmp_path):
    """The configs as shipped, every choice of every group and every experiment with each
    value its sweep lists, are valid."""
    import yaml
    from hydra import compose, initialize_config_dir

    for group in (*GROUPS, "callbacks"):
        for choice in _choices(group):
            cfg = base.copy()
            cfg[group] = _load(group, choice) if group != "callbacks" else cfg[group]
            if group == "data":
                cfg.data.data_dir = "somewhere" if choice == "aliexpress" else None
            check_config(cfg)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for experiment in _choices("experiment"):
            cfg = compose("train", [f"experiment={experiment}"], return_hydra_config=True)
            if cfg.hydra.sweeper.params is None:  # an Optuna study: each optimizer's ranges
                _check_search_spaces(cfg.hydra.sweeper.search_spaces, experiment, compose)
                continue
            for key, values in cfg.hydra.sweeper.params.items():
                for value in str(values).split(","):
                    run = cfg.copy()
                    if (CONFIGS / key).is_dir():
                        # a group choice (a `# @package _global_` group such as `method` sets
                        # other groups: compose it as a run does)
                        run = compose(
                            "train",
                            [f"experiment={experiment}", f"{key}={value}"],
                            return_hydra_config=True,
                        )
                    else:
                        OmegaConf.update(run, key, yaml.safe_load(value))
                    check_config(run)


def _check_search_spaces(spaces, experiment: str, compose) -> None:
    """Each optimizer's search space (hydra/sweeper=tune) at both ends of every range."""
    import re

    for optim, space in spaces.items():
        cfg = compose("train", [f"experiment={experiment}", f"optim={optim}"])
        for key, sweep in space.items():
            low, high = re.search(r"interval\(([^,]+),([^)]+)\)", str(sweep)).groups()
            for value in (float(low), float(high)):
                run = cfg.copy()
                OmegaConf.update(run, key, value)
                check_config(run)


# ----------------------------------------------------------------------------- named cases

#: The cases the issue names, and neighbours: (override, the error's start).
NAMED = [
    ("seed=1.5", "seed: expected a whole number in [0, 4294967295], got 1.5"),
    ("seed=abc", "seed: expected a whole number in [0, 4294967295], got 'abc'"),
    ("seed=-1", "seed: expected a whole number"),
    ("task_weights=[-1,1]", "task_weights: expected null (equal weights) or a list of 2 finite numbers >= 0"),
    ("task_weights=[1]", "task_weights: expected"),
    ("task_weights=[a,b]", "task_weights: expected"),
    ("task_weights=[0,0]", "task_weights: expected"),
    ("trainer.max_epochs=0", "trainer.max_epochs: expected a whole number >= 1, or -1 (no limit), or null, got 0"),
    ("trainer.max_epochs=-2", "trainer.max_epochs: expected"),
    ("+trainer.max_steps=0", "trainer.max_steps: expected a whole number >= 1, or -1 (no limit), got 0"),
    ("callbacks.step_checkpoint.every_n_train_steps=0", "callbacks.step_checkpoint.every_n_train_steps: expected a whole number >= 1, got 0"),
    ("optim.lr=abc", "optim.lr: expected a finite number >= 0, got 'abc'"),
    ("optim.lr=inf", "optim.lr: expected a finite number >= 0, got inf"),
    # torch's optimizers said "optim: Invalid learning rate: -0.1" (no key, no range)
    ("optim.lr=-0.1", "optim.lr: expected a finite number >= 0, got -0.1"),
    # interpolations that cannot be resolved (a traceback, and for optim.lr and seed no
    # metrics.json: the summary read them first)
    ("optim.lr=${nope}", "optim.lr: cannot resolve ${nope} (Interpolation key 'nope' not found)"),
    ("seed=${oc.env:MTL_CLIPPY_TEST_UNSET}", "seed: cannot resolve ${oc.env:MTL_CLIPPY_TEST_UNSET} (Environment variable 'MTL_CLIPPY_TEST_UNSET' not found)"),
    ("trainer.max_epochs=${nope}", "trainer.max_epochs: cannot resolve ${nope} ("),
    ("data.batch_size=${nope}", "data.batch_size: cannot resolve ${nope} ("),
    ("callbacks.early_stopping.patience=${nope}", "callbacks.early_stopping.patience: cannot resolve ${nope} ("),
    ("task_weights=[${nope},1]", "task_weights: cannot resolve ${nope} ("),
    # beyond torch's C integers (an overflow from torch.set_num_threads / torch.empty)
    (f"threads={2**70}", f"threads: expected a whole number in [1, 1024], or null, got {2**70}"),
    (f"model.embed_dim={2**70}", f"model.embed_dim: expected a whole number in [1, 1048576], got {2**70}"),
    (f"model.bottom_dims=[{2**21}]", "model.bottom_dims: expected a list of whole numbers >= 1 and <= 1048576"),
    # a ZeroDivisionError from Lightning
    ("+trainer.val_check_interval=0", "trainer.val_check_interval: expected a whole number of training batches >= 1, a fraction in (0, 1] of an epoch, or null, got 0"),
    ("test=abc", "test: expected true or false"),
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches: expected"),
    ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch: expected"),
    ("trainer.check_val_every_n_epoch=9", "trainer.check_val_every_n_epoch: expected at most trainer.max_epochs=1"),
    ("trainer.min_epochs=9", "trainer.min_epochs: expected at most trainer.max_epochs=1"),
    ("trainer.gradient_clip_val=abc", "trainer.gradient_clip_val: expected"),
    ("+trainer.gradient_clip_algorithm=l2", "trainer.gradient_clip_algorithm: expected 'norm' or 'value', or null, got 'l2'"),
    ("+callbacks.agc.clipping=0", "callbacks.agc.clipping: expected a finite number > 0, got 0"),
    ("model.dropout=1", "model.dropout: expected a finite number in [0, 1), got 1"),
    ("model.bottom_dims=[0]", "model.bottom_dims: expected a list of whole numbers >= 1"),
    ("model.sparse_embeddings=abc", "model.sparse_embeddings: expected true or false"),
    ("data.data_seed=-1", "data.data_seed: expected a whole number >= 0"),
    ("data.hard=abc", "data.hard: expected true or false"),
    ("callbacks.early_stopping.patience=abc", "callbacks.early_stopping.patience: expected"),
    ("callbacks.early_stopping.monitor=val/nope", "callbacks.early_stopping.monitor: 'val/nope' is not a metric of this run; choose from train/loss"),
    ("callbacks.early_stopping.mode=min", "callbacks.early_stopping.mode: min is the wrong direction for val/auc_mean"),
    ("callbacks.model_checkpoint.mode=min", "callbacks.model_checkpoint.mode: min is the wrong direction"),
    ("+callbacks.divergence_monitor.small_spike_factor=20", "callbacks.divergence_monitor.small_spike_factor: removed: a spike is now"),
    ("callbacks.divergence_monitor.persist_steps=0", "callbacks.divergence_monitor.persist_steps: expected a whole number >= 1, got 0"),
    ("callbacks.divergence_monitor.max_loss=-1", "callbacks.divergence_monitor.max_loss: expected a number > 0"),
    ("callbacks.progress_bar.refresh_rate=-1", "callbacks.progress_bar.refresh_rate: expected"),
    ("resume=5", "resume: expected true, false or a run folder, got 5"),
]  # fmt: skip


@pytest.mark.parametrize(("override", "expected"), NAMED, ids=[o for o, _ in NAMED])
def test_named_bad_values_stop_train_main_in_one_line(override, expected, base, tmp_path, capsys):
    """Through ``train.main`` in-process: status 2, one ``error:`` line on stderr, and
    metrics.json with status failed and the same error, before any data is read."""
    cfg = base.copy()
    key, value = override.lstrip("+").split("=", 1)
    OmegaConf.update(cfg, key, _parse(value), force_add=True)
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"))
    OmegaConf.update(cfg, "paths.data_dir", str(tmp_path / "data"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        app.main(cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {expected}"), err
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["status"] == "failed" and "traceback" not in summary
    assert summary["error"] == f"ConfigError: {err[len('error: ') :].strip()}"
    assert not (tmp_path / "data").exists()  # stopped before the data was generated


def _parse(value: str):
    """An override's value as Hydra parses it (1.5 a float, [a,b] a list, inf a float)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"x={value}").value()


def test_a_folder_with_a_metrics_json_keeps_it(base, tmp_path):
    """A bad value when continuing a run (``resume=<folder>``): the run's own record stays."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"status": "completed"}')
    cfg = base.copy()
    OmegaConf.update(cfg, "paths.output_dir", str(run))
    OmegaConf.update(cfg, "seed", 1.5)
    with pytest.raises(ConfigError, match=r"^seed: expected"):
        app.train(cfg)
    assert json.loads((run / "metrics.json").read_text()) == {"status": "completed"}


def test_a_value_only_a_constructor_rejects_is_one_line(base):
    """A callback argument no rule covers (an addition): one line naming the callback, not
    Hydra's multi-line report."""
    cfg = base.copy()
    OmegaConf.update(cfg, "callbacks.lr_monitor.log_momentum", "sometimes", force_add=True)
    OmegaConf.update(cfg, "callbacks.model_checkpoint.every_n_epochs", -3, force_add=True)
    with pytest.raises(ConfigError) as info:
        builder.instantiate_callbacks(cfg.callbacks)
    assert _one_line(info.value).startswith("callbacks.model_checkpoint"), str(info.value)


def test_summary_fields_do_not_fail_on_bad_values():
    assert config_checks.whole_or_none(1.5) is None and config_checks.whole_or_none(7) == 7
    assert config_checks.number_or_none("abc") is None and config_checks.number_or_none(2) == 2.0
    assert config_checks.number_or_none(float("inf")) is None
    assert config_checks.number_or_none(10**400) is None


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def e2e(tmp_path_factory) -> dict:
    """`python train.py` with two of the issue's named values, side by side (the others go
    through ``train.main`` in-process above)."""
    cases = {"seed": "seed=1.5", "lr": "optim.lr=abc"}

    def run(name: str):
        root = tmp_path_factory.mktemp(name)
        args = [cases[name], *TINY, f"paths.log_dir={root}/outputs", f"paths.data_dir={root}/data", "logger=none"]  # fmt: skip
        return name, (run_train(args, cwd=root, timeout=300), root)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, cases))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("seed", "seed: expected a whole number in [0, 4294967295], got 1.5"),
        ("lr", "optim.lr: expected a finite number >= 0, got 'abc'"),
    ],
)  # fmt: skip
def test_train_py_bad_value_is_one_line_status_2_and_a_failed_metrics_json(e2e, name, message):
    res, root = e2e[name]
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip() == f"error: {message}", res.stderr[-2000:]
    (metrics,) = root.glob("outputs/runs/*/metrics.json")
    summary = json.loads(metrics.read_text())
    assert summary["status"] == "failed" and summary["error"] == f"ConfigError: {message}"
    assert summary["seed"] == (None if name == "seed" else 42)  # read without failing
    assert summary["lr"] == (None if name == "lr" else 0.1)
    assert not (root / "data").exists()  # nothing built


# ----------------------------------------------------------------------------- no validation


def test_without_validation_drops_early_stopping_and_keeps_the_last_epoch(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from mtl_clippy.callbacks import StepCheckpoint

    stop = EarlyStopping(monitor="val/auc_mean", mode="max")
    on_loss = EarlyStopping(monitor="train/loss", mode="min")
    best = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/auc_mean", mode="max")
    step = StepCheckpoint(dirpath=str(tmp_path), every_n_train_steps=5)
    kept, stopping = config_checks.without_validation([stop, on_loss, best, step])
    assert kept == [on_loss, best, step] and stopping == config_checks.NO_EARLY_STOPPING
    assert best.monitor is None and step.monitor is None
    assert config_checks.best_monitor(best, validation=False) == "last epoch (no validation rows)"
    assert config_checks.best_monitor(None, validation=False) is None
    assert config_checks.has_validation(OmegaConf.create({"data": {"val_fraction": 0.0}})) is False
    assert (
        config_checks.has_validation(OmegaConf.create({"trainer": {"limit_val_batches": 0}}))
        is False
    )
    assert config_checks.has_validation(OmegaConf.create({"data": {"val_fraction": 0.1}}))


def test_a_plateau_on_val_metrics_without_the_validation_loop_is_rejected(base):
    cfg = _config_with(base, "scheduler.monitor", "val/auc_mean")
    OmegaConf.update(cfg, "trainer.limit_val_batches", 0)
    with pytest.raises(ConfigError, match=r"^scheduler.monitor: val/auc_mean is computed by the validation loop, but trainer.limit_val_batches=0"):  # fmt: skip
        check_config(cfg)


def test_summary_table_without_validation_lists_the_tasks():
    table = format_summary(
        {"status": "completed", "val": {}, "test": {"auc_click": 0.7, "auc_conversion": 0.8, "auc_mean": 0.75}}
    )  # fmt: skip
    assert "| click " in table and "| conversion " in table and "0.7000" in table


def test_train_py_without_a_validation_split(tmp_path):
    """data.val_fraction=0: the run trains every epoch (no early stopping), keeps the last
    epoch as best.ckpt, tests it and says so in metrics.json and on stdout."""
    res = run_train(
        [*TINY, "data.val_fraction=0", "trainer.max_epochs=2", "logger=none",
         "callbacks.progress_bar.refresh_rate=0", f"paths.log_dir={tmp_path}/outputs",
         f"paths.data_dir={tmp_path}/data"],
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (tmp_path / "outputs" / "runs").iterdir()
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and m["epochs"] == 2 and m["val"] == {}
    assert m["best"]["monitor"] == "last epoch (no validation rows)"
    assert m["best"]["checkpoint"] == "checkpoints/best.ckpt" and m["best"]["epoch"] == 1
    assert m["early_stopping"] == "off (no validation rows)"
    assert 0 < m["test"]["auc_click"] < 1
    assert "| click " in res.stdout and "no validation: early stopping off" in res.stdout
    assert (run / "checkpoints" / "best.ckpt").is_file()


# ----------------------------------------------------------------------------- wrong for the data
# Values a rule allows that the data makes impossible: checked once the data is set up.


def _main(cfg, capsys):
    """``train.main`` in-process: (exit status, stderr, metrics.json or None)."""
    capsys.readouterr()
    try:
        app.main(cfg)
        code = 0
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    path = Path(cfg.paths.output_dir) / "metrics.json"
    return code, err, json.loads(path.read_text()) if path.is_file() else None


def _with(base, tmp_path, overrides: list[str]):
    cfg = base.copy()
    for override in overrides:
        key, value = override.lstrip("+").split("=", 1)
        OmegaConf.update(cfg, key, _parse(value), force_add=True)
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"))
    return cfg


#: (overrides, the error's start) on TINY data: 2700 training rows (10 batches of 256), 300
#: validation rows (1 batch of data.eval_batch_size=8192).
FOR_THE_DATA = [
    # Lightning: MisconfigurationException "... 0.5 * 1 < 1" (a traceback)
    (["trainer.limit_val_batches=0.5"], "trainer.limit_val_batches: 0.5 of the 1 validation batch (300 rows, data.eval_batch_size=8192) is no batch; expected at least 1.0 (one batch), a whole number of batches >= 1, or null (all)"),
    (["trainer.limit_train_batches=0.05"], "trainer.limit_train_batches: 0.05 of the 10 training batches (2700 rows, data.batch_size=256) is no batch; expected at least 0.1 (one batch)"),
    # Lightning: ValueError mid-setup of the fit
    (["+trainer.val_check_interval=50"], "trainer.val_check_interval: expected at most the 10 training batches of an epoch, or a fraction in (0, 1] of it, got 50"),
    # 1 validation row: every AUC NaN, best.ckpt chosen on NaN ("completed")
    (["data.val_fraction=0.0001"], "data.val_fraction=0.0001 holds out 1 of the 3000 training rows for validation, too few for an AUC (it needs a positive and a negative); expected at least 0.00067 here, or 0 (no validation)"),
    # said "<file>: 3000 rows are too few to hold out 100% for validation"
    (["data.val_fraction=0.9999"], "data.val_fraction=0.9999 holds out all 3000 training rows for validation, leaving none to train on; expected at most 0.9996 (or 0: no validation)"),
    (["data.train_rows=1"], "data.train_rows=1: too few to hold out data.val_fraction=0.1 for validation and train on the rest; expected at least 2, or data.val_fraction=0 (no validation)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "expected"), FOR_THE_DATA, ids=[o[0] for o, _ in FOR_THE_DATA]
)
def test_values_wrong_for_the_data_are_one_line(overrides, expected, base, tmp_path, capsys):
    code, err, summary = _main(_with(base, tmp_path, overrides), capsys)
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), err[-2000:]
    assert summary["status"] == "failed" and "traceback" not in summary
    assert summary["error"] == f"ConfigError: {lines[0][len('error: ') :]}"


def _loader_batches(rows: int, size: int, world: int, train: bool) -> int:
    from mtl_clippy.data.datamodule import EpochBatchSampler

    return min(
        len(EpochBatchSampler(rows, size, shuffle=train, rank=r, world_size=world, drop_last=train))
        for r in range(world)
    )


@given(
    rows=st.integers(1, 5000),
    size=st.integers(1, 700),
    world=st.integers(1, 4),
    split=st.sampled_from(["train", "val", "test"]),
    fraction=st.floats(1e-4, 1.0),
)
def test_a_batch_fraction_is_rejected_exactly_when_lightning_would(
    rows, size, world, split, fraction
):
    """``check_batches`` raises where Lightning's own check would (``int(fraction x
    batches) == 0``), and the fraction it suggests gives Lightning at least one batch."""
    from types import SimpleNamespace

    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
    from lightning.pytorch.trainer.states import RunningStage

    assume(rows >= world)
    counts = {"train": 5000, "val": 5000, "test": 5000, split: rows}
    dm = SimpleNamespace(
        metadata=SimpleNamespace(extra={"rows": counts}), batch_size=size, eval_batch_size=size
    )
    cfg = OmegaConf.create({"trainer": {f"limit_{split}_batches": fraction}})
    length = _loader_batches(rows, size, world, split == "train")
    stage = {"train": RunningStage.TRAINING, "val": RunningStage.VALIDATING,
             "test": RunningStage.TESTING}[split]  # fmt: skip
    try:
        _parse_num_batches(stage, length, fraction)
        lightning_fails = False
    except MisconfigurationException:
        lightning_fails = True
    try:
        config_checks.check_batches(cfg, dm, world)
    except ConfigError as exc:
        assert lightning_fails, str(exc)
        message = _one_line(exc)
        assert message.startswith(f"trainer.limit_{split}_batches: {fraction} of the {length} ")
        suggested = float(message.split("expected at least ")[1].split(" ")[0])
        assert 0 < suggested <= 1 and _parse_num_batches(stage, length, suggested) >= 1
    else:
        assert not lightning_fails


@given(n=st.integers(2, 10**7), fraction=st.floats(0.0, 0.9999999))
def test_the_suggested_val_fraction_works(n, fraction):
    """The value named for ``data.val_fraction`` (its largest value that leaves a training
    row, or its smallest that holds out an AUC's 2 rows) does what the message says, with
    the data module's own rounding."""
    from types import SimpleNamespace

    from mtl_clippy.data.datamodule import AliExpressDataModule

    def held_out(f: float) -> int:
        return max(round(n * f), 1) if f > 0 else 0

    assume(fraction > 0)
    n_val = held_out(fraction)
    if n - n_val < 1:  # the data module's own check
        fake = SimpleNamespace(val_fraction=fraction, train_rows=None)
        message = str(AliExpressDataModule._too_few_to_train(fake, "train.csv", n))
        assert message.startswith(f"data.val_fraction={fraction} holds out all {n} ")
        most = float(message.split("expected at most ")[1].split(" ")[0])
        assert 0 < most < 1 and n - held_out(most) >= 1
        return
    fake = SimpleNamespace(metadata=SimpleNamespace(extra={"rows": {"train": n - n_val, "val": n_val}}),
                           train_rows=n)  # fmt: skip
    cfg = OmegaConf.create({"data": {"val_fraction": fraction}})
    if n_val >= config_checks.MIN_VAL_ROWS:
        return  # the classes are checked on the rows themselves (below)
    with pytest.raises(ConfigError) as info:
        config_checks.check_data(cfg, fake)
    message = _one_line(info.value)
    if "expected at least " in message and " here" in message:
        needed = float(message.split("expected at least ")[1].split(" ")[0])
        assert needed < 1 and held_out(needed) >= 2 and n - held_out(needed) >= 1
    else:  # no fraction can do both
        assert message.startswith(f"data.train_rows={n}: too few") and n <= 3


# ----------------------------------------------------------------------------- endless, filename


def test_no_validation_and_no_limit_never_ends_so_it_is_rejected(base):
    """Without validation early stopping on val/auc_mean is off: with max_epochs=-1 and no
    step or time limit nothing would end the run."""
    cfg = base.copy()
    OmegaConf.update(cfg, "data.val_fraction", 0.0)
    OmegaConf.update(cfg, "trainer.max_epochs", -1)
    with pytest.raises(ConfigError, match=r"^trainer\.max_epochs: -1 \(no limit\) never ends without validation \(data\.val_fraction=0: early stopping is off\)"):  # fmt: skip
        check_config(cfg)
    for key, value in (("trainer.max_steps", 50), ("trainer.max_time", "00:01:00:00"),
                       ("callbacks.early_stopping.monitor", "train/loss")):  # fmt: skip
        ended = cfg.copy()
        OmegaConf.update(ended, key, value, force_add=True)
        if key.endswith("monitor"):
            OmegaConf.update(ended, "callbacks.early_stopping.mode", "min")
        check_config(ended)  # something ends it
    limited = cfg.copy()
    OmegaConf.update(limited, "data.val_fraction", 0.1)
    OmegaConf.update(limited, "trainer.limit_val_batches", 0)
    with pytest.raises(ConfigError, match=r"trainer\.limit_val_batches=0: early stopping"):
        check_config(limited)


def test_lightnings_default_checkpoint_name_is_allowed(base, tmp_path):
    """``callbacks.model_checkpoint.filename=null``: Lightning names the file
    ``<epoch>-<step>.ckpt``; it was rejected as not a text."""
    cfg = base.copy()
    OmegaConf.update(cfg, "callbacks.model_checkpoint.filename", None)
    check_config(cfg)
    callbacks = builder.instantiate_callbacks(cfg.callbacks)
    assert any(getattr(c, "filename", "") is None for c in callbacks)


def test_every_optimizer_rejects_a_negative_lr_by_its_key(base):
    for optim in _choices("optim"):
        cfg = base.copy()
        cfg.optim = _load("optim", optim)
        cfg.optim.lr = -0.1
        with pytest.raises(ConfigError, match=r"^optim\.lr: expected a finite number >= 0, got -0\.1$"):  # fmt: skip
            check_config(cfg)


# ----------------------------------------------------------------------------- the best checkpoint


@pytest.mark.slow  # end-to-end runs; test_the_default_best_is_val_auc_mean covers the default
@pytest.mark.parametrize(
    "overrides",
    [
        ["callbacks.model_checkpoint.monitor=val/logloss_click", "callbacks.model_checkpoint.mode=min"],
        ["data.val_fraction=0", "callbacks.model_checkpoint.monitor=train/loss", "callbacks.model_checkpoint.mode=min"],
    ],
    ids=["val-logloss", "no-validation-train-loss"],
)  # fmt: skip
def test_best_names_its_metric_and_keeps_val_auc_mean_apart(overrides, base, tmp_path, capsys):
    """best.ckpt kept by another metric than val/auc_mean: metrics.json's ``best`` names it
    (``monitor``) with its value (``score``, what train.main returns to a sweeper), and
    ``val/auc_mean`` is that epoch's mean AUC (null without validation); it held the
    monitored value before, a log loss or a train loss filed as an AUC."""
    cfg = _with(base, tmp_path, [*overrides, "test=false"])  # the test pass is not looked at
    capsys.readouterr()
    returned = app.main(cfg)
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    best = summary["best"]
    monitor = overrides[-2].split("=", 1)[1]
    assert summary["status"] == "completed" and best["monitor"] == monitor
    assert isinstance(best["score"], float) and returned == best["score"]
    assert best["checkpoint"] == "checkpoints/best.ckpt" and best["epoch"] == 0
    if summary["val"]:
        assert best["val/auc_mean"] == summary["val"]["auc_mean"]  # one epoch: the same
        assert best["score"] == summary["val"]["logloss_click"]
    else:
        assert best["val/auc_mean"] is None


def test_the_default_best_is_val_auc_mean(tmp_path):
    """``mtl_clippy.best.summary`` on a checkpoint callback that watched val/auc_mean: the
    score and val/auc_mean are the same number; without a checkpoint callback, the final
    validation's mean AUC (the weights tested) and no score."""
    from types import SimpleNamespace

    from mtl_clippy import best

    cb = SimpleNamespace(
        monitor="val/auc_mean", best_model_score=torch.tensor(0.7), best_model_path=""
    )
    out, tested = best.summary(cb, True, tmp_path, {"auc_mean": 0.69})
    assert tested == {"auc_mean": 0.69}  # no checkpoint file: the final weights are tested
    assert out == {"monitor": "val/auc_mean", "score": pytest.approx(0.7), "val/auc_mean": pytest.approx(0.7), "checkpoint": None}  # fmt: skip
    assert best.score(out) == pytest.approx(0.7)
    none, _ = best.summary(None, True, tmp_path, {"auc_mean": 0.69})
    assert none["monitor"] is None and none["score"] is None and none["val/auc_mean"] == 0.69


LAST_VAL = {"auc_click": 0.61, "auc_mean": 0.6}
BEST_VAL = {"auc_click": 0.72, "auc_mean": 0.7}


@pytest.mark.parametrize(
    "record, ckpt_epoch, ckpt_step, expected",
    [
        # the record of the checkpoint's own validation: its metrics
        ({"epoch": 2, "val/auc_mean": 0.7, "metrics": BEST_VAL}, 2, 30, BEST_VAL),
        # an older checkpoint (no metrics) of an earlier step: not known
        ({"epoch": 2, "val/auc_mean": 0.7}, 2, 30, None),
        # an older checkpoint of the final step: the last validation is its own
        ({"epoch": 4, "val/auc_mean": 0.6}, 4, 50, LAST_VAL),
        # a step checkpoint written between validations (the record is the epoch before)
        ({"epoch": 1, "val/auc_mean": 0.7, "metrics": BEST_VAL}, 2, 28, None),
        # no record at all, final step
        (None, 4, 50, LAST_VAL),
        # every N steps within an epoch: the record is an earlier validation of that epoch
        ({"epoch": 1, "step": 15, "val/auc_mean": 0.7, "metrics": BEST_VAL}, 1, 18, None),
        ({"epoch": 1, "step": 18, "val/auc_mean": 0.7, "metrics": BEST_VAL}, 1, 18, BEST_VAL),
    ],
)
def test_val_is_the_tested_checkpoints_validation_or_unknown(
    record, ckpt_epoch, ckpt_step, expected, tmp_path
):
    """The validation metrics ``mtl_clippy.best.summary`` reports for the tested checkpoint:
    never the last validation's numbers for other weights (the run ended at step 50)."""
    from types import SimpleNamespace

    from mtl_clippy import best

    path = tmp_path / "best.ckpt"
    callbacks = {} if record is None else {"ValidationRecord": record}
    torch.save({"epoch": ckpt_epoch, "global_step": ckpt_step, "callbacks": callbacks}, path)
    cb = SimpleNamespace(monitor="val/auc_mean", best_model_score=torch.tensor(0.7),
                         best_model_path=str(path))  # fmt: skip
    out, tested = best.summary(cb, True, tmp_path, LAST_VAL, final_step=50)
    assert tested == expected and out["epoch"] == ckpt_epoch


def test_the_printed_epoch_tested_needs_a_test(tmp_path):
    """A diverged run or test=false has a best epoch but tests nothing: the first line of
    the printed summary says no 'tested'."""
    base = {"model": "sb", "optim": "clippy", "lr": 0.1, "seed": 1, "epochs": 3,
            "best": {"epoch": 1}}  # fmt: skip
    tested = format_summary({**base, "status": "completed", "test": {"auc_click": 0.7}})
    assert "3 epochs (epoch 2 tested)" in tested.splitlines()[0]
    for untested in ({**base, "status": "diverged"}, {**base, "status": "completed"}):
        assert "tested" not in format_summary(untested).splitlines()[0]


@pytest.mark.slow  # about 15 s end to end; the rule is checked in-process by the FOR_THE_DATA cases
def test_a_validation_split_with_one_class_keeps_the_last_epoch(base, tmp_path, capsys, caplog):
    """30 validation rows without a positive conversion: val/auc_conversion and so
    val/auc_mean are NaN every epoch. One warning names data.val_fraction and the task;
    best.ckpt is the last epoch and early stopping is off, and metrics.json says why (a
    best.ckpt kept by a NaN score, early stopping on it, before)."""
    cfg = _with(base, tmp_path, ["data.val_fraction=0.01", "trainer.max_epochs=2", "test=false"])
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="mtl_clippy"):
        app.main(cfg)
    warned = [r.getMessage() for r in caplog.records if "data.val_fraction=0.01" in r.getMessage()]
    assert len(warned) == 1 and "no positive conversion (30 rows)" in warned[0], warned
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    why = "val/auc_mean undefined: the validation split has no positive conversion"
    assert summary["status"] == "completed" and summary["epochs"] == 2
    assert summary["best"]["monitor"] == f"last epoch ({why})" and summary["best"]["epoch"] == 1
    assert summary["best"]["score"] is None and summary["best"]["val/auc_mean"] is None
    assert summary["early_stopping"] == f"off ({why})"
    assert f"best.ckpt: last epoch ({why})" in capsys.readouterr().out

"""The sweep report: table over seeds equal to the runs' metrics.json, every figure written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtl_clippy.report.__main__ import main


def _run(
    root: Path,
    name: str,
    optim: str,
    lr: float,
    seed: int,
    auc: float | None,
    status: str = "completed",
):
    run = root / name
    run.mkdir(parents=True)
    test = None if auc is None else {
        "auc_click": auc, "auc_conversion": auc + 0.1, "logloss_click": 0.1, "logloss_conversion": 0.02,
    }  # fmt: skip
    metrics = {
        "status": status, "model": "sb", "optim": optim, "lr": lr, "seed": seed, "test": test,
        "best": {"val/auc_mean": auc}, "epochs": 1, "steps": 20, "wall_time_s": 1.0, "samples_per_s": 10.0,
        "divergence": {"step": 7 if status == "diverged" else None},
    }  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "tensorboard"))
    for step in range(0, 20, 2):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
        if optim == "clippy":
            writer.add_scalar("telemetry/clip_min/bottom", 0.5 + step / 40, step)
    writer.close()


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    _run(root, "0_a", "clippy", 0.1, 1, 0.70)
    _run(root, "1_a", "clippy", 0.1, 2, 0.72)
    _run(root, "2_a", "clippy", 10.0, 1, 0.68)
    _run(root, "3_a", "adagrad", 0.1, 1, 0.69)
    _run(root, "4_a", "adagrad", 10.0, 1, None, status="diverged")
    return root


def test_report_from_runs(sweep):
    assert main([str(sweep)]) == 0
    out = sweep / "report"
    for name in (
        "report.md",
        "results_by_seed.csv",
        "loss_curves.png",
        "test_auc.png",
        "test_logloss.png",
        "stability.png",
        "clipping.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = pd.read_csv(out / "results_by_seed.csv").set_index(["optim", "lr"])
    row = summary.loc[("clippy", 0.1)]
    assert row["runs"] == 2
    assert row["test_auc_click_mean"] == pytest.approx(0.71)
    assert row["test_auc_click_std"] == pytest.approx(pd.Series([0.70, 0.72]).std())
    assert row["test_auc_conversion_mean"] == pytest.approx(0.81)
    bad = summary.loc[("adagrad", 10.0)]
    assert bad["diverged"] == 1 and pd.isna(bad["test_auc_click_mean"])
    md = (out / "report.md").read_text()
    assert "| sb | clippy | 0.1 | 2 | 0.7100 ± 0.0141 |" in md
    assert "1 diverged" in md and "![Stability" in md and "![Clippy's clipping factor" in md
    # stable lrs: clippy both (best 0.1: mean AUC over tasks 0.76 > 0.73 at lr 10); adagrad only 0.1
    assert (
        "| sb | clippy | 0.1, 10 | 0.1, 10 | - | - | 0.1 | 0.7100 ± 0.0141 | 0.8100 ± 0.0141 |"
        in md
    )
    assert "| sb | adagrad | 0.1, 10 | 0.1 | 10 | - | 0.1 | 0.6900 | 0.7900 |" in md
    assert len(pd.read_csv(sweep / "results.csv")) == 5


_BACKEND_CHECK = """
import sys, matplotlib
before = matplotlib.get_backend()
import mtl_clippy.report, mtl_clippy.report.__main__, mtl_clippy.report.hydra_callback
import mtl_clippy.report.study
assert "matplotlib.pyplot" not in sys.modules, "the report imported pyplot"
mtl_clippy.report.study.build_report(sys.argv[1])
assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())
assert matplotlib.rcParams["backend"] == before
assert "matplotlib.pyplot" not in sys.modules, "the report imported pyplot"
"""


def test_the_report_leaves_matplotlibs_backend_to_the_process(sweep):
    """Importing the report and building one neither chooses nor switches matplotlib's
    backend (a setting of the whole process): a notebook or an application that uses it keeps
    its own. In a fresh interpreter that chose one (svg), as the report never would."""
    env = {**os.environ, "MPLBACKEND": "svg"}
    done = subprocess.run(
        [sys.executable, "-c", _BACKEND_CHECK, str(sweep)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (sweep / "report" / "stability.png").is_file()


def test_report_of_an_empty_or_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no run" in capsys.readouterr().err
    assert main([str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


EXPERIMENTS = sorted(
    p.stem for p in (Path(__file__).resolve().parents[1] / "configs" / "experiment").glob("*.yaml")
)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_sweeps_compose_with_each_of_their_values(experiment):
    """Every value an experiment sweeps over is a valid override of the composed config."""
    from hydra import compose, initialize_config_dir

    configs = str(Path(__file__).resolve().parents[1] / "configs")
    with initialize_config_dir(config_dir=configs, version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True
        )
        spaces = cfg.hydra.sweeper.get("search_spaces")
        if cfg.hydra.sweeper.params is None and spaces:  # an Optuna study (experiment=tune_lr)
            from omegaconf import OmegaConf

            for optim, space in spaces.items():  # each key searched is a key of the run
                job = compose(
                    config_name="train", overrides=[f"experiment={experiment}", f"optim={optim}"]
                )
                for key in space:
                    assert OmegaConf.select(job, key) is not None, (optim, key)
            return
        params = dict(cfg.hydra.sweeper.params)
        assert params, "an experiment defines its sweep"
        for key, values in params.items():
            for value in str(values).split(","):
                job = compose(
                    config_name="train", overrides=[f"experiment={experiment}", f"{key}={value}"]
                )
                node = job
                for part in key.split("."):
                    node = node[part] if part in node else None
                    if node is None:
                        break
                if key in ("model", "optim"):
                    assert job[key]["_target_"]
                elif key == "method":  # a `_global_` group: it chooses the optimizer (and clipping)
                    import yaml

                    spec = yaml.safe_load((Path(configs) / "method" / f"{value}.yaml").read_text())
                    optim = next(
                        d["override /optim"] for d in spec["defaults"] if "override /optim" in d
                    )
                    want = compose(config_name="train", overrides=[f"optim={optim}"])
                    assert job.optim["_target_"] == want.optim["_target_"], (key, value)
                else:
                    assert (node is not None and str(node) == value) or float(node) == float(
                        value
                    ), (key, value)


def test_notebook_runs_on_a_sweep(sweep, monkeypatch):
    """notebooks/results.ipynb: committed without outputs, and its code runs top to bottom."""
    path = Path(__file__).resolve().parents[1] / "notebooks" / "results.ipynb"
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), (
        "commit it without outputs"
    )
    namespace: dict = {}
    for cell in code:
        source = "".join(cell["source"])
        exec(compile(source, str(path), "exec"), namespace)
        if "parameters" in cell["metadata"].get("tags", []):
            namespace["SWEEP_DIR"] = str(sweep)  # as papermill would inject it
    assert len(namespace["runs"]) == 5
    assert "| sb | clippy | 0.1 | 2 |" in namespace["table"]
    assert (sweep / "report" / "stability.png").is_file()


def test_variant_keeps_runs_that_differ_beyond_model_optimizer_lr_and_seed_apart():
    from mtl_clippy.report.sweep import variant_of

    assert (
        variant_of(["optim=clippy", "optim.lr=1", "model.norm=none", "seed=1", "experiment=x"])
        == "model.norm=none"
    )
    assert variant_of(["model=sb", "paths.data_dir=/d", "hydra.sweep.dir=/s", "optim.lr=3"]) is None
    assert variant_of(["data.hard=true", "model.norm=batch"]) == "data.hard=true,model.norm=batch"
    # a continued job (-m ... resume=true, or the folder a resumed run records) is the same
    # run as its siblings that had finished
    for continued in (
        "resume=true",
        "resume=/runs/s11",
        "threads=1",
        "slurm_requeue=true",
        "logger=none",
    ):
        assert variant_of(["model=sb", "optim.lr=3", continued]) is None


_GOOD_METRICS = {
    "status": "completed", "model": "sb", "optim": "clippy", "lr": 0.1, "seed": 1,
    "overrides": ["model.norm=none"], "epochs": 1, "steps": 3, "wall_time_s": 1.0,
    "samples_per_s": 10.0, "val": {"auc_click": 0.6}, "best": {"val/auc_mean": 0.6},
    "test": {"auc_click": 0.6, "logloss_click": 0.1}, "bayes": {"auc_click": 0.65},
    "divergence": {"step": None, "spikes": 0, "spike_steps": [], "reason": None},
    "max_abs_logit": 3.0, "collapsed": [], "error": None, "oov_rate": None,
}  # fmt: skip
#: Where a value may be put: a key of metrics.json, or a key inside one of its objects.
_PLACES = [(k,) for k in _GOOD_METRICS] + [
    ("divergence", k) for k in ("step", "spikes", "spike_steps", "reason")
] + [("best", "monitor"), ("best", "score"), ("best", "val/auc_mean"), ("test", "auc_click")]  # fmt: skip

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(place=st.sampled_from(_PLACES), value=_json_values)
def test_a_wrongly_typed_value_in_one_jobs_metrics_json_never_costs_the_others_their_rows(
    place, value, caplog
):
    """Whatever JSON value one job's metrics.json holds at one of its keys, the table is
    written: that job has its row, or is skipped with a warning naming its file and key;
    the good job always has its row."""
    from mtl_clippy.report.sweep import write_results

    bad = json.loads(json.dumps(_GOOD_METRICS))
    if len(place) == 1:
        bad[place[0]] = value
    else:
        bad[place[0]][place[1]] = value
    caplog.clear()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for job, metrics in (("0_good", _GOOD_METRICS), ("1_bad", bad)):
            (root / job).mkdir()
            (root / job / "metrics.json").write_text(json.dumps(metrics))
        with caplog.at_level("WARNING", logger="mtl_clippy.report.sweep"):
            df = write_results(root)
        assert "0_good" in list(df["job"])
        assert (root / "results.csv").is_file() and (root / "results.md").is_file()
        if "1_bad" not in list(df["job"]):
            (warning,) = [r.getMessage() for r in caplog.records]
            assert "skipping unreadable" in warning and "1_bad" in warning
            # the key (or the key inside divergence, test) whose value is wrong
            assert f"'{place[0]}" in warning and "should be" in warning


def test_the_callbacks_old_path_still_works_with_a_deprecation_warning():
    """``SweepResultsCallback`` moved to ``hydra_callback``; a config naming the old path
    (``mtl_clippy.report.sweep.SweepResultsCallback``) gets it, with a warning naming the new
    one, and importing ``sweep`` alone still does not import Hydra."""
    from hydra.utils import get_class

    import mtl_clippy.report.sweep as sweep_mod
    from mtl_clippy.report.hydra_callback import SweepResultsCallback

    with pytest.warns(DeprecationWarning, match="mtl_clippy.report.hydra_callback"):
        assert sweep_mod.SweepResultsCallback is SweepResultsCallback
    with pytest.warns(DeprecationWarning):
        assert get_class("mtl_clippy.report.sweep.SweepResultsCallback") is SweepResultsCallback
    with pytest.raises(AttributeError):
        sweep_mod.NoSuchThing  # noqa: B018
    check = (
        "import sys, mtl_clippy.report.sweep\n"
        "assert not any(m == 'hydra' or m.startswith('hydra.') for m in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_data_folder_is_a_setting_shown_by_its_name_only_where_that_is_unique():
    from mtl_clippy.report.sweep import short_paths, variant_of

    assert variant_of(["model=sb", "data.data_dir=/data/A"]) == "data.data_dir=/data/A"
    assert short_paths([{"data.data_dir": "/data/A"}, {"data.data_dir": "/data/B/"}]) == [
        {"data.data_dir": "A"},
        {"data.data_dir": "B"},
    ]
    # two folders of one name: the whole paths, or the runs would look alike
    same = [{"data.data_dir": "/a/data"}, {"data.data_dir": "/b/data"}, {"model.norm": "none"}]
    assert short_paths(same) == same

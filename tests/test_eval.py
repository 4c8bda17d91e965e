"""eval.py and predict.py: a checkpoint evaluated and predicted from, outside its run.

One tiny run is trained with the real app (``python train.py``, bfloat16 autocast where the
CPU has it, as any run); its best checkpoint is then evaluated on its own test split, which
must give exactly (``==``) the test numbers of its metrics.json, and predicted from, whose
probabilities must give the same AUC again when scored independently. The bad inputs are
each checked for their one line, in this process (no start of Lightning per case), and once
through the command line (status 2, one line, no folder left).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.classification import BinaryAUROC

from app_helpers import ROOT, only_run, read_metrics, run_train
from data_fixtures import SAMPLE_DIR
from mtl_clippy import evaluate
from mtl_clippy.data.errors import DataError
from mtl_clippy.errors import ConfigError

# 1,800 training rows in 7 batches, one epoch: best.ckpt is that epoch's.
TRAIN_ARGS = [
    "data.train_rows=2000",
    "data.test_rows=1000",
    "data.batch_size=256",
    "trainer.max_epochs=1",
    "logger=csv",
    "callbacks.progress_bar.refresh_rate=0",
]
TASKS = ("click", "conversion")


def run_script(
    script: str, args: list[str], cwd: Path, warnings: bool = False
) -> subprocess.CompletedProcess:
    """`python eval.py ARGS` (or predict.py) started from ``cwd`` (Python's warnings shown
    as to a user with ``warnings=True``)."""
    env = {**os.environ, "MTL_CLIPPY_DISABLE_FUSED": "1", "PYTHONWARNINGS": "ignore"}
    if warnings:
        env.pop("PYTHONWARNINGS")
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(the folder the run was started in, its run folder) of one tiny training run."""
    tmp = tmp_path_factory.mktemp("eval_run")
    args = [*TRAIN_ARGS, f"paths.log_dir={tmp}/outputs", f"paths.data_dir={tmp}/data"]
    res = run_train(args, cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    run = only_run(tmp)
    assert read_metrics(run)["status"] == "completed"
    return tmp, run


@pytest.fixture(scope="module")
def evaluated(trained):
    """`python eval.py ckpt_path=<run>/checkpoints/best.ckpt`: (its result, its folder)."""
    tmp, run = trained
    ckpt = run / "checkpoints" / "best.ckpt"
    res = run_script("eval.py", [f"ckpt_path={ckpt}", f"paths.log_dir={tmp}/outputs"], tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    (folder,) = (tmp / "outputs" / "eval").iterdir()
    return res, folder


def _run_data(run: Path) -> Path:
    """The folder of the generated data the run trained on (``<tmp>/data/synthetic/<key>``)."""
    (folder,) = (run.parents[2] / "data" / "synthetic").iterdir()
    return folder


def _test_csv(run: Path) -> Path:
    """The test.csv the run was tested on."""
    return _run_data(run) / "test.csv"


def _compose(name: str, overrides: list[str], out: Path, data_dir: Path) -> object:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose(
            name,
            overrides=[*overrides, f"paths.output_dir={out}", f"paths.data_dir={data_dir}"],
        )


# ----------------------------------------------------------------------------- evaluation


def test_the_best_checkpoint_gives_exactly_the_runs_test_numbers(trained, evaluated):
    tmp, run = trained
    res, folder = evaluated
    record = json.loads((folder / "metrics.json").read_text())
    theirs = read_metrics(run)
    assert record["metrics"] == theirs["test"]  # exactly: same weights, batches, precision
    assert record["run_metrics"] == theirs["test"]
    assert record["precision"] == theirs["precision"]
    assert record["checkpoint"]["path"] == str((run / "checkpoints" / "best.ckpt").resolve())
    assert record["data"] | {"file": None} == {
        "source": "synthetic",
        "run_data": True,
        "split": "test",
        "file": None,
        "rows": [0, 1000],
        "n_rows": 1000,
        "oov_rate": record["data"]["oov_rate"],
    }
    assert record["bayes"]["auc_click"] == theirs["bayes"]["auc_click"]
    assert folder.name.endswith("_sb-clippy") and folder.parent == tmp / "outputs" / "eval"
    # train.py's table, the test column filled; the same in the folder's eval.log
    auc = f"{theirs['test']['auc_click']:.4f}"
    row = next(line for line in res.stdout.splitlines() if line.startswith("| click"))
    assert auc in row and row.count("|") == 7
    assert "| task         | val AUC | test AUC |" in res.stdout
    assert row in (folder / "eval.log").read_text()
    assert "note: batch_size" not in res.stdout + res.stderr  # the run's batches


def test_other_batches_than_the_runs_are_noted(trained, tmp_path, caplog):
    tmp, run = trained
    cfg = _compose("eval", [f"ckpt_path={run}", "batch_size=500"], tmp_path, tmp / "data")
    with caplog.at_level("INFO", logger="mtl_clippy"):
        record = evaluate.evaluate(cfg)
    assert record["batch_size"] == 500
    notes = [r.getMessage() for r in caplog.records if "note: batch_size" in r.getMessage()]
    assert notes == [
        "note: batch_size=500, the run tested in batches of 8192: the metrics (the AUC too) "
        "can differ from the run's in their last digits"
    ]


# The 200 validation rows hold no conversion: that AUC is undefined (null), as in the run.
@pytest.mark.filterwarnings("ignore:val/auc_conversion. AUC is undefined:UserWarning")
def test_the_validation_split_gives_the_runs_validation_numbers(trained, tmp_path):
    tmp, run = trained
    ckpt = run / "checkpoints" / "best.ckpt"
    cfg = _compose("eval", [f"ckpt_path={run}", "split=val"], tmp_path, tmp / "data")
    record = evaluate.evaluate(cfg)  # ckpt_path=<run folder>: its best.ckpt
    assert record["checkpoint"]["path"] == str(ckpt.resolve())
    assert record["data"]["n_rows"] == 200 and record["data"]["rows"] == [1800, 2000]
    assert record["metrics"] == read_metrics(run)["val"]


@settings(max_examples=30)
@given(n=st.integers(1, 300), batch=st.integers(1, 120))
def test_the_loader_yields_every_row_once_in_order(n, batch):
    """Predictions are written in the batches' order: it must be the file's, for any size."""
    cat = np.arange(n * 16, dtype=np.int32).reshape(n, 16)
    num = np.arange(n * 63, dtype=np.float32).reshape(n, 63)
    labels = (np.arange(n * 2).reshape(n, 2) % 2).astype(np.float32)
    rows = evaluate.Rows(cat, num, labels, Path("x.csv"), 0, [0] * 16)
    batches = list(evaluate.loader(rows, batch))
    assert [len(b[0]) for b in batches[:-1]] == [batch] * (len(batches) - 1)
    for i, array in enumerate((cat, num, labels)):
        assert np.array_equal(torch.cat([b[i] for b in batches]).numpy(), array)


# ----------------------------------------------------------------------------- predictions


def _mann_whitney(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC as the Mann-Whitney statistic, ties counted half (exact integer ranks)."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts  # 0-based first rank of each distinct score
    twice_rank = 2 * starts + counts + 1  # twice the mean 1-based rank of each tie group
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    twice_sum = int(twice_rank[inverse][pos].sum())
    return (twice_sum - n_pos * (n_pos + 1)) / (2 * n_pos * n_neg)


def test_predictions_one_row_per_input_row_in_order(trained, evaluated, tmp_path):
    tmp, run = trained
    source = _test_csv(run)
    out = tmp_path / "preds.parquet"
    cfg = _compose(
        "predict", [f"ckpt_path={run}", f"input={source}", f"output={out}"], tmp_path, tmp
    )
    assert evaluate.predict(cfg)["n_rows"] == 1000
    table = pq.read_table(out)
    given = pacsv.read_csv(source)
    assert table.column_names == ["search_id", "click_probability", "conversion_probability"]
    assert table.num_rows == given.num_rows == 1000
    assert table.column("search_id").equals(_ids_as_written(source))
    record = json.loads((evaluated[1] / "metrics.json").read_text())["metrics"]
    for task in TASKS:
        p = table.column(f"{task}_probability").to_numpy()
        labels = given.column(task).to_numpy()
        assert p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))
        auroc = BinaryAUROC(thresholds=None)
        auroc.update(torch.tensor(p, dtype=torch.float64), torch.tensor(labels).long())
        assert auroc.compute().item() == record[f"auc_{task}"]  # the evaluated AUC, exactly
        # and an independent statistic, exact: torchmetrics integrates the ROC curve in
        # float32 (its result is float32), so the two agree to float32 rounding only
        assert _mann_whitney(p, labels) == pytest.approx(record[f"auc_{task}"], abs=1e-6)
    assert json.loads((tmp_path / "predict.json").read_text())["output"] == str(out)


def _ids_as_written(csv: Path) -> pa.ChunkedArray:
    """The search_id column of a CSV as its text (independently: split on commas)."""
    lines = csv.read_text().splitlines()[1:]
    return pa.chunked_array([pa.array([ln.split(",", 1)[0] for ln in lines], pa.string())])


def _read_ids(out: Path) -> pa.ChunkedArray:
    if out.suffix == ".parquet":
        return pq.read_table(out).column("search_id")
    options = pacsv.ConvertOptions(column_types={"search_id": pa.string()})
    return pacsv.read_csv(out, convert_options=options).column("search_id")


_ID = st.one_of(
    st.from_regex(r"\A0[0-9]{0,30}\Z"),  # leading zeros
    st.integers(2**53, 10**40).map(str),  # beyond a double's exact integers
    st.sampled_from(["1.5e3", "3", "-0", "NaN", "null", "", "1e400", " 7 "]),
    st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters=',"\n\r'),
        max_size=12,
    ),
)


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(_ID, min_size=1, max_size=12))
def test_search_ids_are_copied_through_as_written(ids, tmp_path_factory):
    """Whatever text a search_id is, the output holds that text (Parquet and CSV)."""
    tmp = tmp_path_factory.mktemp("ids")
    source = tmp / "rows.csv"
    source.write_text("search_id,x\n" + "".join(f"{i},1\n" for i in ids), encoding="utf-8")
    column = evaluate.search_ids(source, len(ids))
    assert column.type == pa.string() and column.to_pylist() == ids
    for name in ("p.parquet", "p.csv"):
        evaluate.write_table(pa.table({"search_id": column}), tmp / name)
        assert _read_ids(tmp / name).to_pylist() == ids, name


def test_csv_output_holds_the_same_probabilities(trained, tmp_path):
    tmp, run = trained
    source = _test_csv(run)
    parquet, csv = tmp_path / "p.parquet", tmp_path / "sub" / "p.csv"
    for out in (parquet, csv):
        cfg = _compose(
            "predict", [f"ckpt_path={run}", f"input={source}", f"output={out}"], tmp_path, tmp
        )
        evaluate.predict(cfg)
    types = {
        "search_id": pa.string(),
        "click_probability": pa.float32(),
        "conversion_probability": pa.float32(),
    }
    from_csv = pacsv.read_csv(csv, convert_options=pacsv.ConvertOptions(column_types=types))
    assert from_csv.equals(pq.read_table(parquet))  # float32 written so it reads back exactly


def test_real_sample_rows_use_the_runs_id_mapping(trained, tmp_path):
    """The real AliExpress sample rows (other ids than the run's): read with the run's
    vocabularies, every id it did not keep in the OOV slot, whatever the new files hold."""
    tmp, run = trained
    data = tmp_path / "sample"
    shutil.copytree(SAMPLE_DIR, data)
    cfg = _compose(
        "eval",
        [f"ckpt_path={run}", "data=aliexpress", f"data.data_dir={data}"],
        tmp_path,
        tmp_path / "cache",
    )
    record = evaluate.evaluate(cfg)
    assert record["data"]["n_rows"] == 20 and record["data"]["source"] == str(data)
    # independently: the ids the run keeps are those seen >= min_count times in its 1,800
    # training rows (train.csv minus the validation rows), counted here with numpy
    train = pacsv.read_csv(_run_data(run) / "train.csv").slice(0, 1800)
    test = pacsv.read_csv(data / "test.csv")
    oov = 0
    for f in range(1, 17):
        ids, counts = np.unique(train.column(f"categorical_{f}").to_numpy(), return_counts=True)
        kept = ids[counts >= 5]
        oov += int((~np.isin(test.column(f"categorical_{f}").to_numpy(), kept)).sum())
    assert record["data"]["oov_rate"] == oov / (20 * 16)
    for key, value in record["metrics"].items():  # 20 rows: an AUC may be undefined (None)
        assert value is None or np.isfinite(value), key

    out = tmp_path / "sample.csv"
    cfg = _compose(
        "predict",
        [f"ckpt_path={run}", f"input={data / 'test.csv'}", f"output={out}"],
        tmp_path,
        tmp,
    )
    assert evaluate.predict(cfg)["oov_rate"] == oov / (20 * 16)
    assert _read_ids(out).equals(_ids_as_written(data / "test.csv"))


# ----------------------------------------------------------------------------- bad input


def _write_csv_without(path: Path, column: str) -> Path:
    lines = (SAMPLE_DIR / "test.csv").read_text().splitlines()
    k = lines[0].split(",").index(column)
    path.write_text(
        "".join(",".join(c for i, c in enumerate(ln.split(",")) if i != k) + "\n" for ln in lines)
    )
    return path


def test_bad_input_is_one_line_naming_it(trained, tmp_path):
    tmp, run = trained
    best = run / "checkpoints" / "best.ckpt"
    alone = tmp_path / "alone" / "checkpoints"
    alone.mkdir(parents=True)
    shutil.copy(best, alone / "best.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint\n")
    (tmp_path / "cut.ckpt").write_bytes(best.read_bytes()[:100_000])  # an interrupted copy
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    shutil.copy(SAMPLE_DIR / "train.csv", only_train / "train.csv")
    no_click = _write_csv_without(tmp_path / "no_click.csv", "click")
    exists = tmp_path / "exists.parquet"
    exists.write_bytes(b"earlier results")
    sample = SAMPLE_DIR / "test.csv"
    # a run whose training data no longer gives the checkpoint's vocabularies (here: the
    # checkpoint's table of categorical_3 made one row larger than the data gives)
    changed = tmp_path / "changed_run"
    shutil.copytree(run, changed)
    content = torch.load(best, weights_only=True)
    content["hyper_parameters"]["metadata"]["vocab_sizes"][2] += 1
    torch.save(content, changed / "checkpoints" / "best.ckpt")
    sizes = content["hyper_parameters"]["metadata"]["vocab_sizes"]
    cases = [
        ("eval", [], ConfigError, "ckpt_path: give the checkpoint to use"),
        ("eval", ["ckpt_path=nowhere.ckpt"], ConfigError, "ckpt_path=nowhere.ckpt: no such file"),
        ("eval", [f"ckpt_path={tmp_path}"], ConfigError, "a folder, not a checkpoint file"),
        ("eval", [f"ckpt_path={tmp_path / 'text.ckpt'}"], ConfigError, "not a checkpoint file"),
        ("eval", [f"ckpt_path={tmp_path / 'cut.ckpt'}"], ConfigError, "cannot be read (damaged"),
        (
            "eval",
            [f"ckpt_path={alone / 'best.ckpt'}"],
            ConfigError,
            "the config of the run that wrote it is not there",
        ),
        (
            "eval",
            [f"ckpt_path={best}", "data=aliexpress", f"data.data_dir={only_train}"],
            DataError,
            f"{only_train / 'test.csv'}: file not found (split=test reads test.csv of the data "
            "folder, which holds: train.csv",
        ),
        ("eval", [f"ckpt_path={best}", "split=train"], ConfigError, "split: expected one of"),
        ("eval", [f"ckpt_path={best}", "precision=17"], ConfigError, "precision=17: Precision 17"),
        (
            "eval",
            [f"ckpt_path={changed}"],
            DataError,
            "the training data of the checkpoint's run no longer gives the vocabularies the "
            f"checkpoint was trained with (categorical_3: {sizes[2]} embedding rows in the "
            f"checkpoint, {sizes[2] - 1} from the data now)",
        ),
        (
            "predict",
            [f"ckpt_path={best}", f"input={no_click}", f"output={tmp_path / 'p.csv'}"],
            DataError,
            "line 1: header is not the 82 processed AliExpress columns: missing click",
        ),
        (
            "predict",
            [f"ckpt_path={best}", f"input={sample}", f"output={tmp_path / 'p.txt'}"],
            ConfigError,
            "unknown file type '.txt'; end the name with .csv or .parquet",
        ),
        (
            "predict",
            [f"ckpt_path={best}", f"input={sample}", f"output={exists}"],
            ConfigError,
            "the file exists; choose another name, or add overwrite=true",
        ),
        ("predict", [f"ckpt_path={best}", f"input={sample}"], ConfigError, "output: give"),
        (
            "predict",
            [f"ckpt_path={best}", f"input={sample}", f"output={exists / 'sub' / 'x.csv'}"],
            ConfigError,
            f"{exists} is a file, not a folder, so the output cannot be written under it",
        ),
    ]
    for name, overrides, kind, message in cases:
        cfg = _compose(name, overrides, tmp_path / "out", tmp)
        with pytest.raises(kind) as info:
            getattr(evaluate, "evaluate" if name == "eval" else "predict")(cfg)
        assert message in str(info.value), (overrides, str(info.value))
        assert "\n" not in str(info.value)
        print(f"error: {info.value}")  # the lines of docs/running.md#mistakes
    assert exists.read_bytes() == b"earlier results"  # refused: left as it was
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "p.txt").exists()


def test_overwrite_true_replaces_an_output(trained, tmp_path):
    tmp, run = trained
    out = tmp_path / "p.parquet"
    out.write_bytes(b"earlier results")
    cfg = _compose(
        "predict",
        [f"ckpt_path={run}", f"input={SAMPLE_DIR / 'test.csv'}", f"output={out}", "overwrite=true"],
        tmp_path,
        tmp,
    )
    evaluate.predict(cfg)
    assert pq.read_table(out).num_rows == 20


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    out = tmp_path / "p.parquet"
    out.write_bytes(b"earlier results")

    def half_then_fail(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("the device went away")

    monkeypatch.setattr(pq, "write_table", half_then_fail)
    with pytest.raises(OSError, match="went away"):
        evaluate.write_table(pa.table({"search_id": [1]}), out)
    assert out.read_bytes() == b"earlier results"
    assert [p.name for p in tmp_path.iterdir()] == ["p.parquet"]  # no temporary left


def test_a_killed_writers_temporary_goes_with_the_next_write(tmp_path):
    out = tmp_path / "p.csv"
    (tmp_path / "p.csv.tmp999999").write_bytes(b"search_id,click_prob")  # its writer is gone
    (tmp_path / "p.csv.tmp999999.keep").write_bytes(b"not ours")
    evaluate.write_table(pa.table({"search_id": [1, 2]}), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.csv.tmp999999.keep"]
    assert pacsv.read_csv(out).column("search_id").to_pylist() == [1, 2]


def test_the_command_line_says_one_line_and_leaves_no_folder(tmp_path):
    out = tmp_path / "p.parquet"
    args = ["ckpt_path=nowhere.ckpt", f"output={out}", f"paths.log_dir={tmp_path}"]
    res = run_script("predict.py", [*args, "input=rows.csv"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: ckpt_path=nowhere.ckpt: no such file"]
    assert not out.exists()
    assert not (tmp_path / "predict").exists() or not any((tmp_path / "predict").iterdir())


def test_an_output_under_a_file_is_refused_before_predicting(trained, tmp_path):
    _tmp, run = trained
    (tmp_path / "one.csv").write_text("a file\n")
    out = tmp_path / "one.csv" / "x.csv"
    args = [f"ckpt_path={run}", f"input={SAMPLE_DIR / 'test.csv'}", f"output={out}"]
    res = run_script("predict.py", [*args, f"paths.log_dir={tmp_path}/outputs"], tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [
        f"error: output={out}: {tmp_path / 'one.csv'} is a file, not a folder, so the output "
        "cannot be written under it; name a file in a folder"
    ]
    assert (tmp_path / "one.csv").read_text() == "a file\n"
    assert not (tmp_path / "outputs" / "predict").exists() or not any(
        (tmp_path / "outputs" / "predict").iterdir()
    )


def test_an_output_folder_in_the_checkpoints_run_is_refused(trained, tmp_path):
    """Hydra would write eval's .hydra/config.yaml over the run's: refused before it starts."""
    tmp, run = trained
    before = {p: p.read_bytes() for p in (run / ".hydra").iterdir()}
    files = sorted(p.relative_to(run) for p in run.rglob("*"))
    predict_args = [f"input={SAMPLE_DIR / 'test.csv'}", f"output={tmp_path / 'p.csv'}"]
    for script, args in [
        ("eval.py", [f"ckpt_path={run}", f"hydra.run.dir={run}"]),
        ("eval.py", [f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", f"hydra.run.dir={run}/x"]),
        ("eval.py", [f"ckpt_path={run}", f"paths.log_dir={run}"]),
        ("predict.py", [f"ckpt_path={run}", f"hydra.run.dir={run}", *predict_args]),
    ]:
        res = run_script(script, args, tmp)
        assert res.returncode == 2, (args, res.stderr[-2000:])
        (line,) = res.stderr.strip().splitlines()
        assert f"the checkpoint's run ({run.resolve()})" in line, line
        assert "would replace the run's" in line and line.startswith("error: ")
    assert {p: p.read_bytes() for p in (run / ".hydra").iterdir()} == before
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == files
    assert not (tmp_path / "p.csv").exists()


def test_data_overrides_without_a_data_config_say_what_to_choose(tmp_path):
    res = run_script("eval.py", ["ckpt_path=nowhere.ckpt", "data.test_rows=100"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: override 'data.test_rows=100': the run's own data is used unless a data "
        "config is chosen, and data.* overrides apply to a chosen one: put data=aliexpress "
        "(with data.data_dir=DIR) or data=synthetic before it"
    ]
    assert not (tmp_path / "outputs").exists()
    # with a data config chosen, the override is the check of overrides' to judge
    assert evaluate.check_command_line(["data=synthetic", "data.test_rows=100"], "eval") is None


def test_the_console_says_each_line_once_without_library_noise(trained, tmp_path):
    """As train.py's: no Lightning tip, no LeafSpec deprecation, no line twice (Lightning's
    own and Hydra's), Lightning's lines in the task's log file; the note on other batches."""
    tmp, run = trained
    one_row = tmp_path / "one.csv"
    one_row.write_text("".join((SAMPLE_DIR / "test.csv").read_text().splitlines(True)[:2]))
    log_dir = f"paths.log_dir={tmp_path}/outputs"
    for script, args in [
        ("eval.py", [f"ckpt_path={run}", "batch_size=500", log_dir]),
        (
            "predict.py",
            [f"ckpt_path={run}", f"input={one_row}", f"output={tmp_path}/p.csv", log_dir],
        ),
    ]:
        res = run_script(script, args, tmp, warnings=True)
        assert res.returncode == 0, res.stderr[-3000:]
        text = res.stdout + res.stderr
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("|--")]
        assert "💡" not in text and "LeafSpec" not in text and "Warning" not in text, text
        assert len(lines) == len(set(lines)), text
        assert sum("GPU available" in ln for ln in lines) == 1, text
        assert sum("note: batch_size=500" in ln for ln in lines) == (script == "eval.py"), text
        (folder,) = (tmp_path / "outputs" / script.removesuffix(".py")).iterdir()
        assert "GPU available" in (folder / f"{script.removesuffix('.py')}.log").read_text()


@pytest.mark.slow  # a second training run (the default suite has one)
def test_a_run_on_real_rows_in_a_relative_folder_evaluates_from_anywhere(tmp_path):
    """A run of data=aliexpress on the real sample rows, its data_dir relative to the folder
    it started in, evaluated from another folder: the run's paths are read from where it
    started, and its test numbers come back exactly."""
    start = tmp_path / "project"
    shutil.copytree(SAMPLE_DIR, start / "sample")
    args = [
        "data=aliexpress",
        "data.data_dir=sample",
        "data.batch_size=32",
        "data.min_count=1",
        "trainer.max_epochs=1",
        "logger=csv",
        "callbacks.progress_bar.refresh_rate=0",
    ]
    res = run_train(args, cwd=start)
    assert res.returncode == 0, res.stderr[-3000:]
    run = only_run(start)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = run_script("eval.py", [f"ckpt_path={run}", f"paths.log_dir={elsewhere}"], elsewhere)
    assert res.returncode == 0, res.stderr[-3000:]
    (folder,) = (elsewhere / "eval").iterdir()
    record = json.loads((folder / "metrics.json").read_text())
    assert record["data"]["file"] == str(start / "sample" / "test.csv")
    assert record["metrics"] == read_metrics(run)["test"]

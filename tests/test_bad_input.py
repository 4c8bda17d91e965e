"""Bad input, end to end: each user mistake of issue 7, run through `python train.py`, ends with
status 2 and one line on stderr (``error: ...``) naming the problem and its place (file, line
and column; or the config key), no traceback, and nothing half-written.

Starting `python train.py` costs about 5 s (importing Lightning), so the slow cases share
processes: every bad data folder is one job of a single sweep (a sweep job that fails logs the
same ``error: ...`` line a single run prints, and records it in its metrics.json), a few
representative single runs check the whole single-run contract (status, stderr, metrics.json),
and these processes run two at a time. A mistyped override is caught before that import
(``mtl_clippy.cli``), in well under a second.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app_helpers import ROOT, run_train
from mtl_clippy import cli
from mtl_clippy.cli import check_overrides, exit_on_bad_overrides
from mtl_clippy.data import DataError, generate_dataset, read_split
from mtl_clippy.data import reader as reader_module
from mtl_clippy.data.schema import COLUMNS

CONFIGS = ROOT / "configs"


# ----------------------------------------------------------------------------- bad data files


def _lines(good: Path, name: str = "train.csv") -> list[str]:
    return (good / name).read_text().splitlines(keepends=True)


def _set(lines: list[str], line: int, column: str, value: str) -> list[str]:
    """A copy of ``lines`` with the cell at editor ``line`` of ``column`` set to ``value``."""
    out = list(lines)
    cells = out[line - 1].rstrip("\n").split(",")
    cells[COLUMNS.index(column)] = value
    out[line - 1] = ",".join(cells) + "\n"
    return out


def _truncated(lines: list[str]) -> str:
    text = "".join(lines)
    return text[: len(text) - len(lines[-1]) // 2]  # cut in the middle of the last row


def _orphan_conversion(lines: list[str]) -> list[str]:
    return _set(_set(lines, 13, "click", "0"), 13, "conversion", "1")


def _bad_bytes(lines: list[str]) -> bytes:
    out = [line.encode() for line in _set(lines, 17, "numerical_9", "MARK")]
    out[16] = out[16].replace(b"MARK", b"0\xff\xfe5")
    return b"".join(out)


def _folder(lines: list[str]) -> list[str]:
    """Stands for train.csv made a folder (unreadable as a file; chmod 000 would not stop
    root, who runs CI)."""
    return []


# (case, how train.csv is made from the good one's lines (None: no file), message after
# "<folder>/train.csv"). Each folder holds a good test.csv unless said otherwise.
DATA_CASES: list[tuple[str, Callable[[list[str]], str | bytes | list[str]] | None, str]] = [
    ("missing file", None, r": file not found \(.*it holds: test\.csv\)"),
    ("empty file", lambda L: "", r": the file is empty"),
    ("header only", lambda L: L[:1], r", line 2: the file has a header but no data rows"),
    ("wrong header", lambda L: [L[0].replace("numerical_5,", "numerical_five,"), *L[1:]],
     r", line 1: header is not the 82 processed AliExpress columns: missing numerical_5; "
     r"unexpected numerical_five"),
    ("truncated last line", _truncated,
     r", line 601: expected 82 comma-separated cells, got \d+ \(the file ends in the middle "
     r"of this line: was it cut short"),
    ("non-numeric cell", lambda L: _set(L, 11, "numerical_7", "abc"),
     r", line 11, column 'numerical_7': numerical value 'abc' is not a number"),
    ("empty cell", lambda L: _set(L, 12, "categorical_3", ""),
     r", line 12, column 'categorical_3': empty cell"),
    ("empty line between rows", lambda L: [*L[:20], "\n", *L[20:]],
     r", line 21: the line is empty \(rows must follow each other; only the end of the file "
     r"may have empty lines: delete this one\)"),
    ("pandas index column", lambda L: ["," + L[0], *(f"{i},{x}" for i, x in enumerate(L[1:]))],
     r", line 1: the first column has no name: a pandas index column, as DataFrame\.to_csv\(\) "
     r"writes it without index=False \(write the file with df\.to_csv\(path, index=False\), or "
     r"delete its first column\)"),
    ("only commas between rows", lambda L: [*L[:30], "," * 81 + "\n", *L[30:]],
     r", line 31: the line has no values \(only commas\) \(rows must follow each other; only the "
     r"end of the file may have empty lines or lines of only commas: delete this one\)"),
    ("CR CR LF line ends", lambda L: "".join(x.replace("\n", "\r\r\n") for x in L),
     r", line 1: line ends are \\r\\r\\n \(a file written by Python's csv module without "
     r"newline=''\) \(write it with newline='' or convert it\)"),
    ("CR line ends", lambda L: "".join(x.replace("\n", "\r") for x in L),
     r", line 1: line ends are \\r only \(old Mac format\) \(save with \\n or \\r\\n line ends\)"),
    ("first column without its name", lambda L: [L[0].replace("search_id", "", 1), *L[1:]],
     r", line 1: the first column has no name, expected search_id \(name it search_id in the "
     r"header: its cells are the search ids\)"),
    ("label 2", lambda L: _set(L, 12, "click", "2"),
     r", line 12, column 'click': label 2 is not 0 or 1"),
    ("label text", lambda L: _set(L, 12, "conversion", "yes"),
     r", line 12, column 'conversion': label 'yes' is not 0 or 1"),
    ("conversion without click", _orphan_conversion,
     r", line 13, column 'conversion': conversion = 1 with click = 0"),
    ("NaN", lambda L: _set(L, 14, "numerical_3", "nan"),
     r", line 14, column 'numerical_3': numerical value nan is not finite"),
    ("infinity", lambda L: _set(L, 15, "numerical_63", "-inf"),
     r", line 15, column 'numerical_63': numerical value -inf is not finite"),
    ("negative id", lambda L: _set(L, 16, "categorical_2", "-5"),
     r", line 16, column 'categorical_2': negative categorical id -5"),
    ("binary file", lambda L: bytes(range(256)) * 8,
     r", line 1: not a CSV text file: byte 1 of the first line \(0x00\) is not UTF-8 text"),
    ("bytes not UTF-8", _bad_bytes,
     r", line 17, column 'numerical_9': cell '.*' holds bytes that are not UTF-8 text"),
    ("folder named train.csv", _folder, r": (file not found|this is a folder, not a file)"),
]  # fmt: skip


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    generate_dataset(folder, train_rows=600, test_rows=300, seed=0)
    return folder


def _case_dir(cases: Path, name: str) -> Path:
    return cases / re.sub(r"\W+", "_", name)


def _make_case(cases: Path, good: Path, name: str, make) -> Path:
    folder = _case_dir(cases, name)
    folder.mkdir(parents=True)
    shutil.copy(good / "test.csv", folder / "test.csv")
    if make is _folder:
        (folder / "train.csv").mkdir()
    elif make is not None:
        content = make(_lines(good))
        target = folder / "train.csv"
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content if isinstance(content, str) else "".join(content))
    return folder


def _error_line(stderr: str) -> str:
    """The message of the one ``error:`` line of a failed single run (asserting the rest)."""
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert [line for line in stderr.splitlines() if line.strip()] == errors, stderr
    return errors[0][len("error: ") :]


def _assert_nothing_half_written(root: Path) -> None:
    """No temporary file or folder left, every cache complete, every metrics.json valid."""
    leftovers = [p for p in root.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    for meta in root.rglob("cache.json"):
        assert json.loads(meta.read_text())["rows"] > 0
        assert {p.name for p in meta.parent.iterdir()} == {
            "cache.json", "categorical.npy", "numerical.npy", "labels.npy",
        }  # fmt: skip
    for metrics in root.rglob("metrics.json"):
        summary = json.loads(metrics.read_text())
        assert summary["status"] == "failed" and summary["error"]


# ----------------------------------------------------------------------------- the slow runs


@pytest.fixture(scope="module")
def cases(tmp_path_factory, good) -> Path:
    """A folder per bad data case, plus one with a bad test.csv and one that does not exist."""
    cases = tmp_path_factory.mktemp("cases")
    for name, make, _ in DATA_CASES:
        _make_case(cases, good, name, make)
    bad_test = _make_case(cases, good, "bad test file", lambda L: L)
    (bad_test / "test.csv").write_text("".join(_set(_lines(good, "test.csv"), 9, "click", "yes")))
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory, good, cases) -> dict:
    """Every slow `python train.py` of this file, run two at a time; by name: (result, root)."""
    aliexpress = ["data=aliexpress", f"data.data_dir={good}"]
    dirs = ",".join(str(p) for p in [*sorted(cases.iterdir()), cases / "no_such_folder"])
    specs = {
        "data_sweep": ["-m", "data=aliexpress", f"data.data_dir={dirs}"],
        "config_sweep": ["-m", *aliexpress, "data.hard=false,true", "optim.lr=-1,0.1", "optim.variable_relative_threshold=abc"],
        "truncated": ["data=aliexpress", f"data.data_dir={cases / 'truncated_last_line'}"],
        "sparse_adam": [*aliexpress, "model.sparse_embeddings=true", "optim=adam"],
        "value_sweep": ["-m", *aliexpress, "data.batch_size=abc,0,256", "trainer.max_epochs=abc"],
    }  # fmt: skip

    def run(name: str):
        root = tmp_path_factory.mktemp(name)
        args = [*specs[name], f"paths.log_dir={root}/outputs", f"paths.data_dir={root}/cache", "logger=none"]  # fmt: skip
        return name, (run_train(args, cwd=root, timeout=300), root)

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(run, specs))


def _jobs(root: Path, *keys: str) -> dict:
    """metrics.json of each sweep job, by the values of its overrides of ``keys`` (one key:
    the value, several: a tuple of values)."""
    jobs = {}
    for metrics in root.glob("outputs/multirun/*/*/metrics.json"):
        summary = json.loads(metrics.read_text())
        given = dict(o.split("=", 1) for o in summary["overrides"])
        values = tuple(given[key] for key in keys)
        jobs[values[0] if len(keys) == 1 else values] = summary
    return jobs


def test_every_bad_data_file_is_one_line_naming_file_line_and_column(runs, cases):
    res, root = runs["data_sweep"]
    expected = {
        _case_dir(cases, name): re.escape(str(_case_dir(cases, name) / "train.csv")) + tail
        for name, _, tail in DATA_CASES
    }
    expected[cases / "bad_test_file"] = re.escape(str(cases / "bad_test_file" / "test.csv")) + (
        r", line 9, column 'click': label 'yes' is not 0 or 1"
    )
    expected[cases / "no_such_folder"] = re.escape(str(cases / "no_such_folder" / "train.csv")) + (
        r": folder not found \(.* must hold the processed AliExpress files train\.csv and test\.csv"
    )
    jobs = _jobs(root, "data.data_dir")
    assert set(jobs) == {str(folder) for folder in expected}
    output = res.stdout + res.stderr
    logged = [line.split("job failed: error: ", 1)[1] for line in output.splitlines() if "job failed: error: " in line]  # fmt: skip
    assert "Traceback" not in output
    for folder, pattern in expected.items():
        summary = jobs[str(folder)]
        assert summary["status"] == "failed" and "traceback" not in summary  # a user error
        kind, message = summary["error"].split(": ", 1)
        assert kind == "DataError"
        assert re.match(pattern, message), (message, pattern)
        assert message.isprintable()  # one line, whatever the file held
        assert message in logged  # the line a single run prints after "error: "
    _assert_nothing_half_written(root)
    _assert_nothing_half_written(cases)
    # the good train.csv next to the bad test.csv was cached whole; no bad file was
    (cached,) = (root / "cache" / "splits").iterdir()
    assert cached.name.startswith("train-")


def test_a_bad_data_file_in_a_single_run(runs):
    res, root = runs["truncated"]
    assert res.returncode == 2
    message = _error_line(res.stderr)
    assert re.fullmatch(r".*/truncated_last_line/train\.csv, line 601: expected 82 comma-separated cells, got \d+ \(the file ends in the middle of this line: .*\)", message)  # fmt: skip
    (metrics,) = root.glob("outputs/runs/*/metrics.json")
    summary = json.loads(metrics.read_text())
    assert summary["status"] == "failed" and summary["error"] == f"DataError: {message}"
    _assert_nothing_half_written(root)
    assert not list(root.rglob("*.ckpt"))


def test_invalid_optimizer_arguments_are_one_line(runs):
    _, root = runs["config_sweep"]
    jobs = _jobs(root, "data.hard", "optim.lr")
    assert re.fullmatch(
        r"ConfigError: optim\.lr: expected a finite number >= 0, got -1",
        jobs["False", "-1"]["error"],
    )
    assert re.fullmatch(
        r"ConfigError: optim: ClippyAdagrad: variable_relative_threshold must be a number, "
        r"got 'abc'",
        jobs["False", "0.1"]["error"],
    )
    assert all("traceback" not in jobs["False", lr] for lr in ("-1", "0.1"))
    _assert_nothing_half_written(root)


def test_incompatible_options_in_a_single_run(runs):
    res, root = runs["sparse_adam"]
    assert res.returncode == 2
    message = _error_line(res.stderr)
    assert "sparse_embeddings=true" in message and "Adam" in message
    assert "Set sparse_embeddings=false or use an optimizer that supports them" in message
    (metrics,) = root.glob("outputs/runs/*/metrics.json")
    assert json.loads(metrics.read_text())["error"] == f"ConfigError: {message}"
    _assert_nothing_half_written(root)


def test_generated_data_option_on_real_data_is_a_user_error(runs):
    _, root = runs["config_sweep"]
    jobs = _jobs(root, "data.hard", "optim.lr")
    job = jobs["True", "0.1"]
    assert job["status"] == "failed" and "traceback" not in job
    assert job["error"] == (
        "ConfigError: data: hard=True only applies to generated data (data_dir=None)"
    )
    # every value is checked before the data is built: the bad lr is named first
    lr_error = "ConfigError: optim.lr: expected a finite number >= 0, got -1"
    assert jobs["True", "-1"]["error"] == lr_error


def test_values_of_the_wrong_type_name_their_key(runs):
    """Caught before training: Lightning and the data loader would fail mid-run."""
    _, root = runs["value_sweep"]
    jobs = _jobs(root, "data.batch_size")
    expected = {
        "abc": "data.batch_size must be a positive whole number, got 'abc'",
        "0": "data.batch_size must be a positive whole number, got 0",
        "256": "trainer.max_epochs: expected a whole number >= 1, or -1 (no limit), or null, got 'abc'",
    }
    for value, message in expected.items():
        assert jobs[value]["status"] == "failed" and "traceback" not in jobs[value]
        assert jobs[value]["error"] == f"ConfigError: {message}"
    _assert_nothing_half_written(root)


# ----------------------------------------------------------------------------- bad overrides

BAD_OVERRIDES = [
    (["modle=ncf"], "override 'modle=ncf': no key or config group 'modle' (did you mean model?)"),
    (["optim.lrr=0.1"], "override 'optim.lrr=0.1': optim has no key 'lrr' (did you mean lr?)"),
    (["model=nfc"], "model=nfc: no such option; choose from aitm, esmm, lr, metaheac, mmoe, mmoe_large, ncf, omoe, ple, ple_large, sb, sb_large, sb_small, single_task (did you mean ncf?)"),
    (["-m", "model=sb,nfc"], "model=nfc: no such option; choose from aitm, esmm, lr, metaheac, mmoe, mmoe_large, ncf, omoe, ple, ple_large, sb, sb_large, sb_small, single_task (did you mean ncf?)"),
    (["model=sb,ncf"], "override 'model=sb,ncf': several values: add -m to sweep over them, or write model=[sb,ncf] for a list, or quote the value for a string"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "expected"), BAD_OVERRIDES, ids=[" ".join(a) for a, _ in BAD_OVERRIDES]
)
def test_a_typo_in_an_override_is_one_line(args, expected, tmp_path):
    res = run_train([*args, f"paths.log_dir={tmp_path}/outputs"], cwd=tmp_path, timeout=120)
    assert res.returncode == 2
    assert _error_line(res.stderr) == expected
    assert not (tmp_path / "outputs").exists()  # stopped before Hydra made a run folder


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data.dat_dir=x"], "override 'data.dat_dir=x': data has no key 'dat_dir' (did you mean data_dir or data_seed or cache_dir?)"),
        (["optim=adam", "optim.clip=1"], "override 'optim.clip=1': optim has no key 'clip' (to add it, write +optim.clip=1)"),
        (["seed.x=1"], "override 'seed.x=1': seed is 42, not a node with keys"),
        (["+model.embed_dim=3"], "override '+model.embed_dim=3': model.embed_dim already exists (to change it, write model.embed_dim=3)"),
        (["~foo"], "override '~foo': there is no foo to delete"),
        (["+model=ncf"], "override '+model=ncf': model is already chosen (to change it, write model=ncf)"),
        (["experiment=nope"], "experiment=nope: no such option; choose from clippy_thresholds, lr_stability, lr_stability_hard, paper_baselines, paper_comparison, seed_study, seed_study_ours, tune_lr"),
        (["-m", "experiment=lr_stability,nope"], "experiment=nope: no such option; choose from clippy_thresholds, lr_stability, lr_stability_hard, paper_baselines, paper_comparison, seed_study, seed_study_ours, tune_lr"),
        (["seed=range(0,3)"], "override 'seed=range(0,3)': a sweep needs -m (--multirun)"),
        (["optim.lr=[1,"], "override 'optim.lr=[1,': cannot parse it: no viable alternative at input '[1,' (overrides are key=value; quote values with special characters)"),
        (["optim.lr"], "override 'optim.lr': cannot parse it: missing EQUAL at '<EOF>' (overrides are key=value; quote values with special characters)"),
        (["--cfg", "job", "modle=3"], "override 'modle=3': no key or config group 'modle' (did you mean model?)"),
    ],
)  # fmt: skip
def test_bad_overrides_are_named_with_a_fix(args, expected):
    assert check_overrides(args, CONFIGS) == expected


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["model=ncf", "optim=adam"],
        ["+foo=1"],
        ["++seed=3"],
        ["~scheduler"],
        ["experiment=lr_stability"],
        ["hydra/launcher=joblib"],
        ["-m", "hydra/launcher=joblib", "model=sb,ncf"],
        ["trainer=ddp", "trainer.devices=2"],
        ["resume=true"],
        ["ckpt_path=/tmp/run/checkpoints/last.ckpt"],
        ["-m", "model=sb,ncf,lr", "optim=clippy,adam,adagrad", "optim.lr=0.01,0.1"],
        ["--multirun", "seed=range(0,3)"],
        ["-m", "model=glob(*)"],
        ["data=aliexpress", "data.data_dir=/no/such/folder"],  # the data module's to report
        ["optim.lr=abc"],  # a value: the optimizer's to check
        ["hydra.run.dir=/tmp/x", "hydra.job.chdir=true"],
        ["hydra.mode=MULTIRUN", "model=sb,ncf"],
        ["paths.log_dir=${oc.env:HOME}/runs"],
        ["--help"],
        ["--version"],
        ["--info", "defaults"],
        ["-cd", "/elsewhere", "model=mine"],
        ["--cfg", "job"],
    ],
    ids=lambda a: " ".join(a) or "(none)",
)
def test_valid_command_lines_pass_the_check(args):
    if args == ["resume=true"] and "resume:" not in (CONFIGS / "train.yaml").read_text():
        pytest.skip("configs/train.yaml has no resume key yet")
    assert check_overrides(args, CONFIGS) is None


def test_the_check_prints_one_escaped_line_and_never_blocks_on_its_own_failure(capsys, monkeypatch):
    with pytest.raises(SystemExit) as info:
        exit_on_bad_overrides(["model=n\rfc"], CONFIGS)  # a control character in the override
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: override 'model=n\\rfc': cannot parse it") and err.count("\n") == 1  # fmt: skip

    def broken(*args):
        raise RuntimeError("a bug in the check")

    monkeypatch.setattr(cli, "check_overrides", broken)
    exit_on_bad_overrides(["model=sb"], CONFIGS)  # returns: Hydra goes on
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- reader details


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\x1f\x8b\x08\x00rest", "line 1: not a CSV text file: it looks like a gzip archive"),
        (b"PK\x03\x04rest", "line 1: not a CSV text file: it looks like a zip archive"),
        ("search_id,x\n".encode("utf-16"), "line 1: not a CSV text file: it looks like UTF-16"),
        (b"search_id,a\x1b[2J,b\rc\n1,2\n", r"unexpected 'a\x1b[2J', 'b\rc'"),
        (b"\n1,2\n", "line 1: the header line is empty"),
    ],
    ids=["gzip", "zip", "utf-16", "control characters", "blank header"],
)
def test_files_that_are_not_the_csv_are_named_as_such(content, words, tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_split(path, cache_dir=tmp_path / "cache")
    assert words in str(info.value)
    assert str(info.value).isprintable()  # one line, whatever the bytes
    assert not (tmp_path / "cache").exists()


def test_unreadable_file_is_a_data_error(tmp_path, good, monkeypatch):
    def denied(path, *args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(reader_module, "_parse", denied)
    with pytest.raises(DataError) as info:
        read_split(good / "train.csv", cache_dir=tmp_path / "cache")
    assert str(info.value) == (
        f"{good / 'train.csv'}: cannot read the file: Permission denied "
        "(check that it is a readable file)"
    )
    with pytest.raises(DataError, match="this is a folder, not a file"):
        read_split(tmp_path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_cut_short_first_cell_on_the_last_line_is_found(tmp_path, good):
    lines = _lines(good)
    path = tmp_path / "train.csv"
    path.write_text("".join(lines[:-1]) + lines[-1].split(",")[0])  # no comma on the last line
    with pytest.raises(DataError) as info:
        read_split(path, cache=False)
    assert info.value.line == len(lines)
    assert "got 1 (the file ends in the middle of this line" in str(info.value)


@pytest.mark.parametrize("value", ["abc", 0, -2, 1.5, True])
def test_threads_must_be_a_positive_whole_number(value):
    from mtl_clippy.errors import ConfigError
    from mtl_clippy.runtime import threads_setting as _threads

    with pytest.raises(ConfigError, match=r"^threads: expected a positive whole number or null"):
        _threads(value)
    assert _threads(None) is None and _threads(3) == 3

"""The paper's report (``mtl_clippy.report.paper``) on a hand-made sweep with known outcomes:
2 model sizes x 3 methods x 4 learning rates x 3 seeds, every table cell checked."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mtl_clippy.report import paper
from mtl_clippy.report.__main__ import main

LRS = (0.1, 0.2, 0.4, 0.8)
SEEDS = (1, 2, 3)
METHODS = {"AdaGrad": ("adagrad", "none"), "AdaGrad + GC": ("adagrad", "norm"),
           "Clippy": ("clippy", "none")}  # fmt: skip
STEPS = 300
#: (size, method, lr) -> {seed: outcome}, "stable" where not listed; None: the lr is not run.
SPECIAL: dict[tuple[str, str, float], dict[int, str] | None] = {
    ("sb_small", "AdaGrad", 0.4): {1: "diverged", 2: "diverged"},
    ("sb_small", "AdaGrad", 0.8): {1: "diverged", 2: "diverged", 3: "diverged"},
    ("sb_small", "AdaGrad + GC", 0.4): {3: "spiked"},
    ("sb_small", "AdaGrad + GC", 0.8): {1: "collapsed"},
    ("sb_small", "Clippy", 0.8): None,
    ("sb", "AdaGrad", 0.4): {1: "diverged", 2: "diverged", 3: "diverged"},
    ("sb", "AdaGrad", 0.8): {1: "diverged", 2: "diverged", 3: "diverged"},
    ("sb", "AdaGrad + GC", 0.4): {3: "failed"},
    ("sb", "AdaGrad + GC", 0.8): {1: "diverged", 2: "collapsed"},
}
#: The test AUC (click) of seed 0 of each stable cell; seed s adds s / 1000, conversion + 0.1.
BASE_AUC = {("sb_small", "AdaGrad", 0.1): 0.70, ("sb_small", "AdaGrad", 0.2): 0.72,
            ("sb", "AdaGrad", 0.1): 0.71, ("sb", "AdaGrad", 0.2): 0.69}  # fmt: skip
#: Clippy's mean clipping factor per role in the fake telemetry: the bottom clipped most.
CLIP = {"embeddings": 0.95, "numerical": 1.0, "bottom": 0.6, "towers": 0.85}


def divergence_step(lr: float, seed: int) -> int:
    return int(120 + 40 * seed + 50 * (0.8 - lr))


def write_job(root: Path, n: int, size: str, method: str, lr: float, seed: int, outcome: str,
              *, with_key: bool = True, csv: bool = True, auc: float = 0.65,
              experiment: str = "paper_baselines") -> Path:  # fmt: skip
    """One job folder as a run of train.py leaves it (metrics.json, .hydra, csv/)."""
    optim, grad_clip = METHODS.get(method, (method, "none"))
    job = root / f"{n}_model={size},optim={optim},optim.lr={lr},seed={seed}"
    (job / ".hydra").mkdir(parents=True)
    choices = {"experiment": experiment, "model": size, "optim": optim, "grad_clip": grad_clip}
    (job / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices, "output_dir": "${x:y}"}}})
    )
    status = {"diverged": "diverged", "failed": "failed"}.get(outcome, "completed")
    d = divergence_step(lr, seed) if outcome == "diverged" else None
    click = auc + seed / 1000
    test = None
    if status == "completed":
        test = {"auc_click": click, "auc_conversion": click + 0.1, "auc_mean": click + 0.05}
        if outcome == "collapsed":
            test = {"auc_click": 0.5, "auc_conversion": 0.5, "auc_mean": 0.5}
    metrics = {
        "status": status, "model": size, "optim": optim, "lr": lr, "seed": seed,
        "overrides": [f"model={size}", f"optim={optim}"], "steps": d or STEPS,
        "wall_time_s": 10.0, "test": test,
        "divergence": {"step": d, "detected_step": d and d + 3,
                       "spikes": 2 if outcome == "spiked" else 0,
                       "spike_steps": [50, 60] if outcome == "spiked" else [], "reason": None},
        "collapsed": ["click", "conversion"] if outcome == "collapsed" else [],
    }  # fmt: skip
    if with_key and outcome in paper.OUTCOMES:
        metrics["stability"] = outcome
    (job / "metrics.json").write_text(json.dumps(metrics))
    if csv and status != "failed":
        (job / "csv").mkdir()
        roles = list(CLIP) if optim == "clippy" else []
        cols = ["epoch", "step", "train/loss"] + [
            f"telemetry/{q}/{r}" for q in ("clip_fraction", "clip_mean", "clip_min") for r in roles
        ]
        rows = [",".join(cols)]
        # a diverged run logs its loss up to the step before the one that settled it
        last = (d + 2) if d else STEPS
        for step in range(last):
            loss = 0.4 * math.exp(-step / 60) + 0.12 + 0.01 * math.sin(step * seed)
            if d and step >= d - 1:  # the blow-up, from (1-based) step d
                loss *= math.exp((step - (d - 2)) / 1.2)
            rows.append(",".join(["0", str(step), f"{loss:.6g}"] + [""] * (len(cols) - 3)))
            if roles and (step + 1) % 10 == 0:
                cells = []
                for q in ("clip_fraction", "clip_mean", "clip_min"):
                    for r in roles:
                        m = CLIP[r] - (0.1 * lr * math.exp(-step / 100) if CLIP[r] < 1 else 0)
                        cells.append({"clip_fraction": f"{(1 - m):.4f}" if m < 1 else "0",
                                      "clip_mean": f"{min(m, 1.0):.4f}",
                                      "clip_min": f"{min(m - 0.2, 1.0) if m < 1 else 1.0:.4f}"}[q])  # fmt: skip
                rows.append(",".join(["", str(step + 1), "", *cells]))
        (job / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    return job


def make_sweep(root: Path) -> Path:
    n = 0
    for size in ("sb_small", "sb"):
        for method in METHODS:
            for lr in LRS:
                special = SPECIAL.get((size, method, lr), {})
                if special is None:
                    continue
                for seed in SEEDS:
                    outcome = special.get(seed, "stable")
                    auc = BASE_AUC.get((size, method, lr), 0.65)
                    # old files (seed 2) have no stability key: it is derived
                    write_job(root, n, size, method, lr, seed, outcome, with_key=seed != 2,
                              auc=auc)  # fmt: skip
                    n += 1
    bad = root / f"{n}_corrupt"
    (bad / ".hydra").mkdir(parents=True)
    (bad / "metrics.json").write_text('{"status": "completed", "lr": ')
    return root


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, paper.PaperReport]:
    root = make_sweep(tmp_path_factory.mktemp("paper") / "sweep")
    return root, paper.build_paper_report(root)


def _row(md: str, start: str) -> str:
    (line,) = [x for x in md.splitlines() if x.startswith(start)]
    return line


def test_largest_stable_lr_per_size_and_method(sweep):
    root, done = sweep
    md = (root / "paper_report.md").read_text()
    assert done.path == root / "paper_report.md"
    cases = {
        ("sb_small", "AdaGrad"): "0.2",
        ("sb_small", "AdaGrad + GC"): "0.4",  # a spike is stable; a collapse at 0.8 is not
        ("sb_small", "Clippy"): "0.4",
        ("sb", "AdaGrad"): "0.2",
        ("sb", "AdaGrad + GC"): "0.2",  # a failed seed at 0.4 is not stable
        ("sb", "Clippy"): "0.8",
    }
    for (size, method), lr in cases.items():
        cells = [c.strip() for c in _row(md, f"| {size} | {method} | ").split("|")[1:-1]]
        assert cells[3] == lr, (size, method, cells)
    small = _row(md, "| sb_small | AdaGrad | ").split(" | ")
    assert small[2] == "0.1, 0.2, 0.4, 0.8"
    d = divergence_step
    assert small[4] == (
        f"0.4: diverged seeds 1, 2 (at steps {d(0.4, 1)}, {d(0.4, 2)})<br>"
        f"0.8: diverged seeds 1, 2, 3 (at steps {d(0.8, 1)}, {d(0.8, 2)}, {d(0.8, 3)})"
    )
    gc = _row(md, "| sb_small | AdaGrad + GC | ").split(" | ")
    assert gc[4] == "0.8: collapsed seed 1" and gc[5] == "0.4: 2 |"
    assert _row(md, "| sb_small | Clippy | ").split(" | ")[2] == "0.1, 0.2, 0.4"
    assert _row(md, "| sb | AdaGrad + GC | ").split(" | ")[4] == (
        f"0.4: failed seed 3<br>0.8: diverged seed 1 (at step {d(0.8, 1)}); collapsed seed 2"
    )


def test_auc_at_1x_2x_4x_the_baselines_best_stable_lr(sweep):
    root, _ = sweep
    md = (root / "paper_report.md").read_text()
    small, large = md.split("### sb_small")[1].split("### sb\n")
    # sb_small: AdaGrad is best at 0.2 (0.72 > 0.70): 2x = 0.4, 4x = 0.8
    assert "AdaGrad's best stable lr for sb_small: 0.2 " in small
    assert "| Method | 1x = 0.2: click AUC | 1x: conversion AUC | 2x = 0.4: click AUC |" in small
    assert (
        "| AdaGrad | 0.7220 ± 0.0010 | 0.8220 ± 0.0010 | diverged 2/3 | diverged 2/3 | "
        "diverged 3/3 | diverged 3/3 |" in small
    )
    assert (
        "| AdaGrad + GC | 0.6520 ± 0.0010 | 0.7520 ± 0.0010 | 0.6520 ± 0.0010 | "
        "0.7520 ± 0.0010 | collapsed 1/3 | collapsed 1/3 |" in small
    )
    assert "| Clippy | 0.6520 ± 0.0010 | 0.7520 ± 0.0010 | 0.6520 ± 0.0010 | 0.7520 ± 0.0010 | - | - |" in small  # fmt: skip
    # sb: AdaGrad is best at 0.1 (0.71 > 0.69 at 0.2): 2x = 0.2, 4x = 0.4
    assert "AdaGrad's best stable lr for sb: 0.1 " in large
    assert "| AdaGrad | 0.7120 ± 0.0010 | 0.8120 ± 0.0010 | 0.6920 ± 0.0010 | 0.7920 ± 0.0010 | diverged 3/3 | diverged 3/3 |" in large  # fmt: skip
    assert "| AdaGrad + GC | 0.6520 ± 0.0010 | 0.7520 ± 0.0010 | 0.6520 ± 0.0010 | 0.7520 ± 0.0010 | failed 1/3 | failed 1/3 |" in large  # fmt: skip


def test_header_clipping_table_and_the_corrupt_job(sweep):
    root, done = sweep
    md = (root / "paper_report.md").read_text()
    n_div = sum(o == "diverged" for c in SPECIAL.values() if c for o in c.values())
    assert f"{n_div} diverged" in md and "1 failed" in md and "1 spiked" in md
    assert "- **Runs**: 69;" in md and f"{69 * 10.0 / 60:.1f} min in all" in md
    assert "learning rates 0.1, 0.2, 0.4, 0.8; seeds 1, 2, 3." in md
    assert "model sizes sb_small, sb; methods AdaGrad, AdaGrad + GC, Clippy;" in md
    # the corrupt job: one line, named, nothing else lost; the failed job has no csv
    (line,) = [p for p in done.problems if "corrupt" in p]
    assert line.startswith("69_corrupt: unreadable metrics.json") and line in md
    assert any("no csv/metrics.csv" in p and "optim.lr=0.4,seed=3" in p for p in done.problems)
    # Clippy at 1x and 4x: the bottom is clipped most, every interval
    assert "- sb_small, lr 0.2 (1x): most clipped role **bottom**" in md
    assert "- sb, lr 0.4 (4x): most clipped role **bottom**" in md
    row = _row(md, "| sb | 0.4 (4x) | bottom | ")
    assert row.split(" | ")[5] == "100%"
    assert "| sb | 0.4 (4x) | numerical | 1.000 | 1.000 | 0% | 0.0% |" in md
    assert "sb_small | 0.8 (4x)" not in md  # Clippy was not run there


def test_figures_are_written_small_and_not_blank(sweep):
    import matplotlib.image

    root, _ = sweep
    md = (root / "paper_report.md").read_text()
    for name in (paper.DIVERGENCE_FIGURE, paper.CLIPPING_FIGURE):
        path = root / "report" / name
        assert f"(report/{name})" in md
        assert 10_000 < path.stat().st_size < 150_000, (name, path.stat().st_size)
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 600
        # lines in several colours, not an empty canvas
        colours = {tuple(p) for p in pixels[::4, ::4, :3].reshape(-1, 3).round(1).tolist()}
        assert len(colours) > 20, name


def test_the_cli_builds_it_for_a_paper_sweep_and_says_why_a_job_is_left_out(tmp_path, capsys):
    root = tmp_path / "s"
    for n, (method, lr, outcome) in enumerate(
        [("AdaGrad", 0.1, "stable"), ("AdaGrad", 1.0, "diverged"), ("Clippy", 1.0, "stable")]
    ):
        write_job(root, n, "sb", method, lr, 1, outcome, csv=n != 2)
    # a job without .hydra: its size and optimizer come from metrics.json
    shutil.rmtree(write_job(root, 3, "sb", "Clippy", 0.1, 1, "stable") / ".hydra")
    assert main([str(root)]) == 0  # experiment=paper_baselines: without --paper
    captured = capsys.readouterr()
    assert f"wrote {root / 'paper_report.md'}" in captured.out
    assert "2_model=sb,optim=clippy,optim.lr=1.0,seed=1: no csv/metrics.csv" in captured.err
    assert (
        "3_model=sb,optim=clippy,optim.lr=0.1,seed=1: no readable .hydra/hydra.yaml" in captured.err
    )
    md = (root / "paper_report.md").read_text()
    assert "| sb | Clippy | 0.1, 1 | 1 | - | - |" in md
    d = divergence_step(1.0, 1)
    assert f"| sb | AdaGrad | 0.1, 1 | 0.1 | 1: diverged seed 1 (at step {d}) | - |" in md
    assert (root / "report" / paper.DIVERGENCE_FIGURE).is_file()


def test_the_end_of_a_paper_multirun_writes_it(tmp_path, monkeypatch):
    """Hydra's callback at the end of a multirun (configs/hydra/default.yaml) adds the paper's
    report for a sweep of experiment=paper_baselines, and only for one."""
    from omegaconf import OmegaConf

    from mtl_clippy.report import hydra_callback
    from mtl_clippy.report.hydra_callback import SweepResultsCallback

    # one process: rank 0 (Lightning's rank rule, which imports torch, is tested elsewhere)
    monkeypatch.setattr(hydra_callback, "_is_global_zero", lambda config: True)

    for experiment in ("paper_baselines", "lr_stability"):
        root = tmp_path / experiment
        write_job(root, 0, "sb", "AdaGrad", 0.1, 1, "stable", experiment=experiment)
        config = {"hydra": {"sweep": {"dir": str(root)}}, "trainer": {"accelerator": "cpu"}}
        SweepResultsCallback().on_multirun_end(OmegaConf.create(config))
        assert (root / "results.md").is_file()
        assert (root / "paper_report.md").is_file() == (experiment == "paper_baselines")


def test_cli_flag_help_and_an_empty_sweep(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--paper" in capsys.readouterr().out
    root = tmp_path / "other"
    write_job(root, 0, "sb", "AdaGrad", 0.1, 1, "stable", experiment="lr_stability")
    assert main([str(root)]) == 0 and not (root / "paper_report.md").exists()
    assert main(["--paper", str(root)]) == 0 and (root / "paper_report.md").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--paper", str(empty)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: no run (metrics.json) under {empty}"  # fmt: skip
    assert paper.build_paper_report(empty).path is None


def test_method_names_grid_lookup_and_derived_outcome():
    assert paper.method_name("adagrad", None) == "AdaGrad"
    assert paper.method_name("adagrad", "agc") == "AdaGrad + AGC"
    assert paper.method_name("lamb", "none") == "LAMB"
    assert paper.method_name("clippy_noclip", "none") == "Clippy without clipping"
    assert paper.method_name("adam", "norm") == "adam + norm"
    assert paper.grid_lr([0.1, 0.316, 1.0], 0.3162) == 0.316
    assert paper.grid_lr([0.1, 0.316, 1.0], 0.2) is None
    # kept in step with the backbones' roles (read as text: importing them imports torch)
    base = Path(paper.__file__).parents[1] / "models" / "backbones" / "base.py"
    roles = '", "'.join(paper.ROLES)
    assert f'ROLES: tuple[str, ...] = ("{roles}")' in base.read_text()


# ----------------------------------------------------------------------------- property


def _reference_largest_stable(outcomes: dict[tuple[float, int], str]) -> float | None:
    """Written apart from the report: an lr counts if every run there is stable or spiked."""
    lrs = {lr for lr, _ in outcomes}
    good = [lr for lr in lrs if all(o in ("stable", "spiked") for (x, _), o in outcomes.items() if x == lr)]  # fmt: skip
    return max(good) if good else None


_outcome = st.sampled_from(["stable", "spiked", "diverged", "collapsed", "failed"])


@settings(max_examples=40, deadline=None)
@given(
    cells=st.dictionaries(
        st.tuples(st.sampled_from([0.01, 0.0316, 0.1, 0.316, 1.0, 3.16]), st.sampled_from(SEEDS)),
        st.tuples(_outcome, st.booleans()),
        min_size=1,
        max_size=12,
    )
)
def test_largest_stable_lr_matches_an_independent_computation(cells):
    """Random outcomes per (lr, seed), written with or without the stability key (derived
    then): the report's largest stable lr is the reference's, in the table too."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n, ((lr, seed), (outcome, key)) in enumerate(sorted(cells.items())):
            write_job(root, n, "sb", "AdaGrad", lr, seed, outcome, with_key=key, csv=False)
        runs, _ = paper.read_runs(root)
        assert {(r.lr, r.seed): r.stability for r in runs} == {k: o for k, (o, _) in cells.items()}
        expected = _reference_largest_stable({k: o for k, (o, _) in cells.items()})
        assert paper.largest_stable_lr(runs) == expected
        row = _row(paper.stable_lr_table(runs), "| sb | AdaGrad | ").split(" | ")
        shown = "none" if expected is None else f"{expected:g}"
        full = len({seed for _, seed in cells})  # every cell is over distinct seeds here
        have = sum(lr == expected for lr, _ in cells)
        if expected is not None and have < full:  # not every seed ran there
            shown += f" ({have} of {full} runs)"
        assert row[3] == shown


# ----------------------------------------------------------------------------- review cases


def _table_row(md: str, size: str, method: str) -> list[str]:
    return [c.strip() for c in _row(md, f"| {size} | {method} | ").split("|")[1:-1]]


def test_a_sweep_started_again_into_its_folder_counts_each_run_once(tmp_path):
    """The same (size, method, lr, seed) in two job folders: the newer metrics.json is kept,
    the other named; the cell is not counted as two seeds nor averaged over both."""
    import os

    root = tmp_path / "s"
    for n, seed in enumerate(SEEDS):
        write_job(root, n, "sb", "AdaGrad", 0.1, seed, "stable", auc=0.70)
    old = write_job(root, 3, "sb", "AdaGrad", 0.2, 1, "diverged")
    new = write_job(root, 4, "sb", "AdaGrad", 0.2, 1, "stable", auc=0.60)
    os.utime(old / "metrics.json", (1_000, 1_000))
    runs, problems = paper.read_runs(root)
    assert [(r.lr, r.seed, r.stability) for r in runs if r.lr == 0.2] == [(0.2, 1, "stable")]
    (line,) = [p for p in problems if "the same run" in p]
    assert line.startswith(old.name) and new.name in line
    md = paper.build_paper_report(root).path.read_text()
    assert _table_row(md, "sb", "AdaGrad")[2:4] == ["0.1, 0.2 (1 of 3 runs)", "0.2 (1 of 3 runs)"]


def test_runs_of_another_experiment_in_the_folder_are_left_out(tmp_path):
    root = tmp_path / "s"
    write_job(root, 0, "sb", "AdaGrad", 0.1, 1, "stable")
    write_job(root, 1, "sb", "AdaGrad", 0.2, 1, "stable")
    other = write_job(root, 2, "sb", "AdaGrad", 0.2, 2, "diverged", experiment="lr_stability")
    runs, problems = paper.read_runs(root)
    assert len(runs) == 2 and all(r.experiment == "paper_baselines" for r in runs)
    assert (
        f"{other.name}: a run of experiment=lr_stability, not paper_baselines: left out" in problems
    )
    md = paper.build_paper_report(root).path.read_text()
    assert _table_row(md, "sb", "AdaGrad")[3] == "0.2"
    # --paper on a folder without any paper_baselines run keeps every run
    only = tmp_path / "o"
    write_job(only, 0, "sb", "AdaGrad", 0.1, 1, "stable", experiment="lr_stability")
    assert len(paper.read_runs(only)[0]) == 1


def test_an_interrupted_run_is_left_out_not_counted_unstable(tmp_path):
    """A run whose metrics.json says interrupted has no outcome yet (as a job without one)."""
    root = tmp_path / "s"
    for n, seed in enumerate(SEEDS):
        write_job(root, n, "sb", "AdaGrad", 0.1, seed, "stable")
        job = write_job(root, 3 + n, "sb", "AdaGrad", 0.2, seed, "stable", auc=0.75)
    data = json.loads((job / "metrics.json").read_text())  # seed 3 at lr 0.2
    data.update(status="interrupted", stability=None, test=None)
    (job / "metrics.json").write_text(json.dumps(data))
    done = paper.build_paper_report(root)
    assert {(r.lr, r.seed) for r in done.runs} == {(0.1, 1), (0.1, 2), (0.1, 3), (0.2, 1), (0.2, 2)}
    assert any(p.startswith(f"{job.name}: interrupted") for p in done.problems)
    md = done.path.read_text()
    assert _table_row(md, "sb", "AdaGrad")[3] == "0.2 (2 of 3 runs)"
    assert "AdaGrad's best stable lr for sb: 0.2 " in md
    assert "| AdaGrad | 0.7515 ± 0.0007 (n=2) |" in md
    assert "- **Not finished**: 1 job folder without an outcome yet" in md
    # a job still running (its folder has .hydra, no metrics.json yet) is one more
    (write_job(root, 9, "sb", "Clippy", 0.1, 1, "stable") / "metrics.json").unlink()
    md = paper.build_paper_report(root).path.read_text()
    assert "- **Not finished**: 2 job folders without an outcome yet" in md


def test_a_sweep_without_the_baseline_says_so(tmp_path):
    root = tmp_path / "s"
    write_job(root, 0, "sb", "Clippy", 0.1, 1, "stable")
    md = paper.build_paper_report(root).path.read_text()
    assert "AdaGrad has no run for sb: no reference learning rate." in md
    assert "No reference learning rate: the sweep has no AdaGrad run." in md
    assert "stable at none" not in md
    # stable, but run with test=false: no AUC to choose its best lr by
    job = write_job(root, 1, "sb", "AdaGrad", 0.1, 1, "stable")
    data = json.loads((job / "metrics.json").read_text())
    (job / "metrics.json").write_text(json.dumps({**data, "test": None}))
    md = paper.build_paper_report(root).path.read_text()
    assert "AdaGrad has no test AUC where it is stable for sb: no reference learning rate." in md
    assert "No reference learning rate: AdaGrad has none at any size (see above)." in md


def test_two_spellings_of_one_learning_rate_are_one_grid_point(tmp_path):
    root = tmp_path / "s"
    write_job(root, 0, "sb", "AdaGrad", 0.3, 1, "stable")
    write_job(root, 1, "sb", "AdaGrad", 0.1 * 3, 2, "stable")  # 0.30000000000000004
    runs, _ = paper.read_runs(root)
    assert {r.lr for r in runs} == {0.3}
    assert _table_row(paper.stable_lr_table(runs), "sb", "AdaGrad")[2] == "0.3"


def test_the_end_of_a_multirun_keeps_each_report_apart_from_the_others(tmp_path, monkeypatch):
    """A failing report (plots or the paper's) costs neither the sweep's results.csv nor the
    other report, and the callback does not raise."""
    from omegaconf import OmegaConf

    from mtl_clippy.report import hydra_callback, study
    from mtl_clippy.report.hydra_callback import SweepResultsCallback

    monkeypatch.setattr(hydra_callback, "_is_global_zero", lambda config: True)
    root = tmp_path / "s"
    write_job(root, 0, "sb", "AdaGrad", 0.1, 1, "stable")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(root)}}, "trainer": {}})

    def broken(_root):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(study, "build_report", broken)
    SweepResultsCallback().on_multirun_end(config)
    assert (root / "paper_report.md").is_file() and (root / "results.csv").is_file()
    table = (root / "results.csv").read_text()
    monkeypatch.undo()
    monkeypatch.setattr(hydra_callback, "_is_global_zero", lambda config: True)
    (root / "paper_report.md").unlink()
    monkeypatch.setattr(paper, "build_paper_report", broken)
    SweepResultsCallback().on_multirun_end(config)
    assert (root / "results.csv").read_text() == table and (root / "results.md").is_file()
    assert not (root / "paper_report.md").exists()


def test_a_diverged_run_without_losses_near_its_divergence_is_not_drawn(tmp_path):
    """Its CSV ends over STEPS_BEFORE steps before the step it diverged at (logged rarely, or
    cut short): the report is written, that run is left out of the figure (it crashed)."""
    root = tmp_path / "s"
    write_job(root, 0, "sb", "AdaGrad", 0.1, 1, "stable")
    job = write_job(root, 1, "sb", "AdaGrad", 0.8, 1, "diverged")
    data = json.loads((job / "metrics.json").read_text())
    data["divergence"]["step"] = 5000
    (job / "metrics.json").write_text(json.dumps(data))
    md = paper.build_paper_report(root).path.read_text()
    assert "Runs diverged, but none has a training loss in csv/metrics.csv within 100" in md
    assert not (root / "report" / paper.DIVERGENCE_FIGURE).exists()
    # with another diverged run that has its losses, the figure is drawn from that one
    write_job(root, 2, "sb", "AdaGrad", 0.8, 2, "diverged")
    paper.build_paper_report(root)
    assert (root / "report" / paper.DIVERGENCE_FIGURE).is_file()


def test_variants_of_a_size_are_kept_apart_not_merged_or_dropped(tmp_path):
    """model=sb_small model.norm=batch,none in one sweep: two rows per method, each cell over
    its own seeds; an override all runs share (data.train_rows) is not in the names."""
    root = tmp_path / "s"
    n = 0
    for norm, outcome in (("batch", "stable"), ("none", "diverged")):
        for seed in (1, 2):
            job = write_job(root, n, "sb_small", "AdaGrad", 0.4, seed, outcome)
            data = json.loads((job / "metrics.json").read_text())
            data["overrides"] += [f"model.norm={norm}", "data.train_rows=3000", "method=adagrad"]
            (job / "metrics.json").write_text(json.dumps(data))
            n += 1
    done = paper.build_paper_report(root)
    assert not [p for p in done.problems if "the same run" in p]
    md = done.path.read_text()
    assert _table_row(md, "sb_small, model.norm=batch", "AdaGrad")[2:4] == ["0.4", "0.4"]
    assert _table_row(md, "sb_small, model.norm=none", "AdaGrad")[2:4] == ["0.4", "none"]
    assert "data.train_rows" not in md


def test_a_control_at_lr_0_a_nan_auc_and_a_continued_job(tmp_path):
    """Hostile but legal sweeps: an lr-0 control (stable, best AUC) is no reference lr, whose
    multiples would all be 0; a hand-edited NaN AUC is no measurement; a job continued with
    resume=true is the same grid cell as its siblings, not a model size of its own."""
    root = tmp_path / "s"
    write_job(root, 0, "sb", "AdaGrad", 0.0, 1, "stable", auc=0.9)
    write_job(root, 1, "sb", "AdaGrad", 0.2, 1, "stable", auc=0.60)
    write_job(root, 2, "sb", "AdaGrad", 0.4, 1, "stable", auc=0.70)
    nan_job = write_job(root, 3, "sb", "AdaGrad", 0.8, 1, "stable", auc=0.80)
    data = json.loads((nan_job / "metrics.json").read_text())
    data["test"] = {**data["test"], "auc_mean": float("nan"), "auc_click": float("nan")}
    (nan_job / "metrics.json").write_text(json.dumps(data))
    for n, seed in ((4, 1), (5, 2)):
        job = write_job(root, n, "sb", "Clippy", 0.4, seed, "stable")
        if seed == 2:
            data = json.loads((job / "metrics.json").read_text())
            data["overrides"].append("resume=true")
            (job / "metrics.json").write_text(json.dumps(data))
    report = paper.build_paper_report(root)  # no ZeroDivisionError
    runs, _ = paper.read_runs(root)
    adagrad = [r for r in runs if r.method == "AdaGrad"]
    nan_run = next(r for r in adagrad if r.lr == 0.8)
    assert "mean" not in nan_run.auc and "click" not in nan_run.auc
    assert paper.best_stable_lr(adagrad) == 0.4  # not 0 (no multiples), not 0.8 (NaN)
    assert {r.size for r in runs} == {"sb"}
    md = report.path.read_text()
    assert "resume=true" not in md
    assert "AdaGrad's best stable lr for sb: 0.4" in md


def test_a_run_is_named_by_the_clipping_its_config_did(tmp_path):
    """grad_clip=none in the choices, but trainer.gradient_clip_val=1.0 in the resolved
    config (set without the group, before method= refused that): AdaGrad + GC, said so."""
    root = tmp_path / "s"
    job = write_job(root, 0, "sb", "AdaGrad", 0.4, 1, "stable")
    (job / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"trainer": {"gradient_clip_val": 1.0, "gradient_clip_algorithm": "norm"}})
    )
    plain = write_job(root, 1, "sb", "AdaGrad", 0.4, 2, "stable")
    (plain / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"trainer": {"gradient_clip_val": None}, "callbacks": {"agc": None}})
    )
    runs, problems = paper.read_runs(root)
    assert {r.seed: r.method for r in runs} == {1: "AdaGrad + GC", 2: "AdaGrad"}
    assert any("clips by norm: named by what it ran" in p for p in problems)


def test_a_job_refused_before_training_neither_is_renamed_nor_replaces_a_result(tmp_path):
    """`-m method=adagrad_gc,adagrad trainer.gradient_clip_val=0.5`: the adagrad job is
    refused (failed, 0 steps) with the clipping in its config; it keeps its own name, and a
    completed twin is never replaced by a newer failed one."""
    import os

    root = tmp_path / "s"
    done = write_job(root, 0, "sb", "AdaGrad + GC", 0.1, 1, "stable")
    refused = write_job(root, 1, "sb", "AdaGrad", 0.1, 1, "failed")
    data = json.loads((refused / "metrics.json").read_text())
    (refused / "metrics.json").write_text(json.dumps({**data, "steps": 0}))
    (refused / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"trainer": {"gradient_clip_val": 0.5}})
    )
    runs, problems = paper.read_runs(root)
    assert {r.job: r.method for r in runs} == {done.name: "AdaGrad + GC", refused.name: "AdaGrad"}
    assert not any("named by what it ran" in p for p in problems)
    # the same cell twice: the completed run stays, however old
    twin = write_job(root, 2, "sb", "AdaGrad + GC", 0.1, 1, "failed")
    os.utime(done / "metrics.json", (1_000, 1_000))
    runs, problems = paper.read_runs(root)
    gc = [r for r in runs if r.method == "AdaGrad + GC"]
    assert [r.job for r in gc] == [done.name]
    assert any(
        p.startswith(twin.name) and "which is completed (this one failed)" in p for p in problems
    )

"""What the sweep report's figures and results.md show: which curve and bar is which setting.

Built from fabricated run folders (metrics.json and TensorBoard scalars, as a run writes
them) of two models x two optimizers, with two seeds for one setting and one seed for the
others. Every figure is caught as it is saved, so the checks read the drawn matplotlib
artists (lines, bars, error bars, reference lines), not the code that drew them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

from mtl_clippy.report.study import build_report
from mtl_clippy.report.sweep import write_results

BAYES = {"auc_click": 0.78, "auc_conversion": 0.9, "logloss_click": 0.1, "logloss_conversion": 0.01}
# (job, model, optim, lr, seed, test AUC click, status, extra overrides, clipping factor)
RUNS = [
    ("0_a", "sb", "clippy", 0.1, 1, 0.70, "completed", [], 0.2),
    ("1_a", "sb", "clippy", 0.1, 2, 0.72, "completed", [], 0.4),
    ("2_a", "sb", "adam", 0.001, 1, 0.69, "completed", [], None),
    ("3_a", "lr", "clippy", 0.1, 1, 0.66, "completed", [], 0.8),
    ("4_a", "lr", "adam", 0.001, 1, 0.65, "completed", [], None),
    ("5_a", "lr", "adam", 0.001, 2, None, "diverged", [], None),
]


def _write_run(root: Path, job, model, optim, lr, seed, auc, status, extra, clip) -> None:
    run = root / job
    run.mkdir(parents=True)
    test = None if auc is None else {
        "auc_click": auc, "auc_conversion": auc + 0.1, "auc_mean": auc + 0.05,
        "logloss_click": 0.11 + (0.7 - auc) / 10, "logloss_conversion": 0.02,
    }  # fmt: skip
    metrics = {
        "status": status, "model": model, "optim": optim, "lr": lr, "seed": seed,
        "overrides": [f"model={model}", f"optim={optim}", f"seed={seed}", *extra],
        "test": test, "bayes": BAYES, "best": {"val/auc_mean": auc, "epoch": 2},
        "epochs": 4, "steps": 20, "wall_time_s": 12.3456, "samples_per_s": 10.0,
        "divergence": {"step": 7 if status == "diverged" else None},
    }  # fmt: skip
    (run / "metrics.json").write_text(json.dumps(metrics))
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run / "tensorboard"))
    for step in range(0, 20, 2):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
        if clip is not None:
            writer.add_scalar("telemetry/clip_min/towers", clip, step)
    writer.close()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("figures") / "sweep"
    for spec in RUNS:
        _write_run(root, *spec)
    return root


def _build(root: Path, monkeypatch) -> dict[str, Figure]:
    """Build the report of ``root``; every figure it saves, by the PNG's name."""
    saved: dict[str, Figure] = {}
    original = Figure.savefig

    def record(fig, fname, *args, **kwargs):
        # written to a hidden temporary name first, then moved: ".clipping.tmp123.png"
        name = re.sub(r"^\.(.*)\.tmp\d+\.png$", r"\1.png", Path(fname).name)
        saved[name] = fig
        return original(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    write_results(root)
    build_report(root)
    return saved


@pytest.fixture(scope="module")
def figures(sweep) -> dict[str, Figure]:
    with pytest.MonkeyPatch.context() as mp:
        return _build(sweep, mp)


def _colour_of(artist) -> str:
    get = getattr(artist, "get_facecolor", None) or artist.get_color
    return to_hex(get())


def test_clipping_has_one_curve_per_setting_averaged_over_its_own_seeds(figures):
    """sb and lr with Clippy are two curves (not one "clippy lr=0.1" mean over models), each
    averaged over its own seeds only, and the legend says over how many."""
    fig = figures["clipping.png"]
    (ax,) = [a for a in fig.axes if a.get_visible()]
    curves = {line.get_label(): {round(y, 6) for y in line.get_ydata()} for line in ax.get_lines()}
    assert curves == {"sb (mean of 2 seeds)": {0.3}, "lr (1 seed)": {0.8}}
    # what every curve shares is said once, under the title
    title = " ".join(fig.get_suptitle().split())  # wrapped to the figure's width
    assert "optimizer clippy" in title and "lr=0.1" in title
    assert "averaged over its seeds only" in title


def test_loss_curves_have_a_panel_per_model_and_a_colour_per_optimizer(figures):
    fig = figures["loss_curves.png"]
    panels = {ax.get_title().split(";")[0]: ax for ax in fig.axes if ax.get_visible()}
    assert set(panels) == {"model lr", "model sb"}
    runs = {
        model: sorted(line.get_gid() for line in ax.get_lines() if line.get_gid())
        for model, ax in panels.items()
    }
    assert runs == {
        "model lr": [
            "lr · adam · lr=0.001 · seed=1", "lr · adam · lr=0.001 · seed=2",
            "lr · clippy · lr=0.1 · seed=1",
        ],
        "model sb": [
            "sb · adam · lr=0.001 · seed=1", "sb · clippy · lr=0.1 · seed=1",
            "sb · clippy · lr=0.1 · seed=2",
        ],
    }  # fmt: skip
    colours = {
        line.get_gid().split(" · ")[1]: _colour_of(line)
        for ax in panels.values()
        for line in ax.get_lines()
        if line.get_gid()
    }
    assert colours == {"clippy": to_hex("C0"), "adam": to_hex("C1")}
    assert "seeds: adam 2, clippy 1" in panels["model lr"].get_title()


@pytest.mark.parametrize("metric", ["auc", "logloss"])
def test_bars_are_one_per_setting_with_bayes_and_error_bars_only_for_several_seeds(figures, metric):
    fig = figures[f"test_{metric}.png"]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2  # click, conversion
    for ax, task in zip(panels, ("click", "conversion"), strict=True):
        bars = {c.get_label(): c.patches[0] for c in ax.containers if isinstance(c, BarContainer)}
        assert set(bars) == {
            "lr · adam · lr=0.001", "lr · clippy · lr=0.1",
            "sb · adam · lr=0.001", "sb · clippy · lr=0.1",
        }  # fmt: skip
        # one colour per optimizer, the loss curves' colours
        for label, bar in bars.items():
            assert _colour_of(bar) == to_hex("C0" if "clippy" in label else "C1"), label
        top = {k: b.get_y() + b.get_height() for k, b in bars.items()}
        if metric == "auc":
            want = 0.71 if task == "click" else 0.81
            assert top["sb · clippy · lr=0.1"] == pytest.approx(want)
            assert bars["sb · clippy · lr=0.1"].get_y() == pytest.approx(0.5)  # from chance
            assert ax.get_ylim()[0] == pytest.approx(0.5)
        else:
            low = ax.get_ylim()[0]
            assert 0 < low < BAYES[f"logloss_{task}"]  # not from 0, and Bayes is on the axis
            assert "not 0" in ax.get_ylabel()
        # the Bayes line at the data's value, across the panel
        (bayes,) = [line for line in ax.get_lines() if line.get_label().startswith("Bayes")]
        assert set(bayes.get_ydata()) == {BAYES[f"{metric}_{task}"]}
        # an error bar only where two seeds completed; "1 seed" under the others
        errorbars = [c.get_label() for c in ax.containers if isinstance(c, ErrorbarContainer)]
        assert errorbars == ["std: sb · clippy · lr=0.1"]
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert sum(t.endswith("\n1 seed") for t in ticks) == 3  # lr + adam: 1 of 2 completed
        assert sum(t.endswith("\n2 seeds") for t in ticks) == 1
        assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 9
        assert ax.get_ylabel()


def test_an_override_that_varies_gets_its_own_curves_and_bars(sweep, tmp_path, monkeypatch):
    """A run with another model.norm is its own setting: its own clipping curve and bar,
    named by the override."""
    root = tmp_path / "sweep"
    for spec in RUNS:
        _write_run(root, *spec)
    _write_run(root, "6_a", "sb", "clippy", 0.1, 1, 0.6, "completed", ["model.norm=none"], 0.6)
    figures = _build(root, monkeypatch)
    (ax,) = [a for a in figures["clipping.png"].axes if a.get_visible()]
    assert {line.get_label() for line in ax.get_lines()} == {
        "sb · model.norm=(default) (mean of 2 seeds)",
        "lr · model.norm=(default) (1 seed)",
        "sb · model.norm=none (1 seed)",
    }
    bars = [
        c.get_label()
        for c in figures["test_auc.png"].axes[0].containers
        if isinstance(c, BarContainer)
    ]
    assert len(bars) == 5 and "sb · clippy · lr=0.1 · model.norm=none" in bars
    md = (root / "results.md").read_text()
    assert "| model | optim | lr | seed | model.norm | status |" in md
    assert "| sb | clippy | 0.1 | 1 | none | completed |" in md


def test_real_data_without_bayes_values_gets_no_bayes_line(tmp_path):
    """Runs on real data (metrics.json without ``bayes``): no reference line and no legend
    entry for one, the AUC axis still from chance, and every bar drawn."""
    from mtl_clippy.report.study import plot_test_metric, summarise
    from mtl_clippy.report.sweep import collect_results

    root = tmp_path / "sweep"
    for job, model, optim, lr, seed, auc, status, *_ in RUNS:
        run = root / job
        run.mkdir(parents=True)
        test = None if auc is None else {
            "auc_click": auc, "auc_conversion": auc, "logloss_click": 0.1, "logloss_conversion": 0.02,
        }  # fmt: skip
        metrics = {"status": status, "model": model, "optim": optim, "lr": lr, "seed": seed,
                   "test": test, "epochs": 1, "steps": 2}  # fmt: skip
        (run / "metrics.json").write_text(json.dumps(metrics))
    summary = summarise(collect_results(root))
    for metric in ("auc", "logloss"):
        fig = plot_test_metric(summary, metric, tmp_path / f"{metric}.png")
        for ax in fig.axes:
            assert not [line for line in ax.get_lines() if "Bayes" in line.get_label()]
            assert len([c for c in ax.containers if isinstance(c, BarContainer)]) == 4
            assert "Bayes" not in ax.get_title()
        assert not any("Bayes" in t.get_text() for legend in fig.legends for t in legend.texts)
        if metric == "auc":
            assert fig.axes[0].get_ylim()[0] == pytest.approx(0.5)


def test_results_md_has_the_compared_columns_at_fixed_decimals(figures, sweep):
    md = (sweep / "results.md").read_text()
    head, _sep, *rows = [line for line in md.splitlines() if line.startswith("|")]
    assert head == (
        "| model | optim | lr | seed | status | test AUC click | test AUC conversion | "
        "test log loss click | test log loss conversion | best val AUC mean | epochs (best) | "
        "wall time (s) |"
    )
    assert rows[0] == (
        "| sb | clippy | 0.1 | 1 | completed | 0.7000 | 0.8000 | 0.1100 | 0.0200 | 0.7000 | "
        "4 (3) | 12 |"
    )
    assert rows[5] == "| lr | adam | 0.001 | 2 | diverged | - | - | - | - | - | 4 (3) | 12 |"
    assert "results.csv" in md.split(rows[-1], 1)[1]  # said under the table
    csv = (sweep / "results.csv").read_text().splitlines()[0].split(",")
    assert {"job", "samples_per_s", "bayes_auc_click", "bayes_logloss_click"} <= set(csv)


_unit = st.floats(0, 1, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(auc=_unit, loss=st.floats(0, 20, allow_nan=False), lr=st.floats(1e-6, 1e3))
def test_every_auc_and_log_loss_cell_has_four_decimals_and_reads_back(auc, loss, lr):
    import pandas as pd

    from mtl_clippy.report.sweep import results_markdown

    df = pd.DataFrame([{
        "job": "0", "model": "sb", "optim": "adam", "lr": lr, "seed": 3, "status": "completed",
        "test_auc_click": auc, "test_logloss_click": loss, "best_val_auc_mean": auc,
    }])  # fmt: skip
    row = results_markdown(df).splitlines()[2].strip("|").split("|")
    cells = [c.strip() for c in row]
    for cell, value in ((cells[5], auc), (cells[6], loss), (cells[7], auc)):
        assert re.fullmatch(r"\d+\.\d{4}", cell), cell
        assert abs(float(cell) - value) <= 0.5e-4 + 1e-12
    assert float(cells[2]) == pytest.approx(lr, rel=1e-5)


_key = st.from_regex(r"[a-z][a-z_]{0,6}(\.[a-z_]{1,6}){0,2}", fullmatch=True)
_value = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True),
    st.lists(st.integers(0, 99), min_size=1, max_size=3).map(
        lambda xs: "[" + ",".join(map(str, xs)) + "]"
    ),
)


@given(st.dictionaries(_key, _value, max_size=4))
def test_split_variant_reads_back_every_override_even_with_commas_in_values(overrides):
    from mtl_clippy.report.sweep import split_variant

    variant = ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    assert split_variant(variant or None) == overrides


def test_runs_on_different_data_are_different_settings_not_seeds(tmp_path, monkeypatch):
    """Two runs that differ only in data.data_dir are two settings: two bars, two rows of
    report.md (by the data folder's name), and a data_dir column in results.md."""
    root = tmp_path / "sweep"
    for job, auc, data in (("0_a", 0.6, "/data/A"), ("1_a", 0.8, "/data/B")):
        _write_run(root, job, "sb", "clippy", 0.1, 1, auc, "completed",
                   [f"data.data_dir={data}"], 0.2)  # fmt: skip
    figures = _build(root, monkeypatch)
    bars = [
        c.get_label()
        for c in figures["test_auc.png"].axes[0].containers
        if isinstance(c, BarContainer)
    ]
    assert sorted(bars) == [
        "sb · clippy · lr=0.1 · data.data_dir=A",
        "sb · clippy · lr=0.1 · data.data_dir=B",
    ]
    report = (root / "report" / "report.md").read_text()
    assert "| sb | clippy | data.data_dir=A | 0.1 | 1 | 0.6000 |" in report
    assert "| sb | clippy | data.data_dir=B | 0.1 | 1 | 0.8000 |" in report
    md = (root / "results.md").read_text()
    assert "| model | optim | lr | seed | data.data_dir | status |" in md
    assert "| sb | clippy | 0.1 | 1 | A | completed | 0.6000 |" in md


def test_report_md_variant_column_names_only_what_differs(tmp_path, monkeypatch):
    """A tune sweep: settings that every run shares are said once under the table, not on
    every row of report.md's Variant column."""
    root = tmp_path / "sweep"
    for job, thr in (("0_a", "0.1"), ("1_a", "0.2")):
        _write_run(root, job, "sb", "clippy", 0.1, 1, 0.7, "completed",
                   [f"optim.absolute_threshold={thr}", "data.train_rows=3000"], 0.2)  # fmt: skip
    _build(root, monkeypatch)
    report = (root / "report" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| sb |")]
    assert len(rows) == 2 and not any("train_rows" in r for r in rows)
    assert "| optim.absolute_threshold=0.1 |" in rows[0]
    assert "Every run: `data.train_rows=3000`." in report


_CONSTANT = ["data.batch_size=256", "data.train_rows=3000", "data.test_rows=1500",
             "trainer.max_epochs=2", "callbacks.progress_bar.refresh_rate=0",
             "trainer.enable_model_summary=false"]  # fmt: skip


def _tune_sweep(root: Path) -> Path:
    """A tune sweep as Optuna writes it: many settings, one seed each, long override keys,
    and the same long list of constant overrides on every run."""
    for i, (lr, a, v) in enumerate(
        (
            (0.1329, 0.01247, 0.6994),
            (0.1294, 0.01761, 0.2386),
            (0.06164, 0.2243, 1.342),
            (0.05, 0.1, 0.5),
        )
    ):
        extra = [f"optim.absolute_threshold={a}", f"optim.variable_relative_threshold={v}"]
        _write_run(root, f"{i}_t", "sb", "clippy", lr, 42, 0.6 + i / 50, "completed",
                   extra + _CONSTANT, 0.3)  # fmt: skip
    return root


def _dims_sweep(root: Path) -> Path:
    for i, dims in enumerate(("[128,64]", "[64,32]", "[256,128,64]")):
        for o, lr in (("clippy", 0.1), ("adam", 0.001)):
            _write_run(root, f"{i}{o}_d", "sb", o, lr, 1, 0.65 + i / 50, "completed",
                       [f"model.hidden_dims={dims}", *_CONSTANT], 0.3 if o == "clippy" else None)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def crowded(tmp_path_factory) -> dict[str, dict[str, Figure]]:
    """The figures of a tune sweep and of a sweep over a list-valued override."""
    base = tmp_path_factory.mktemp("crowded")
    out = {}
    for name, make in (("tune", _tune_sweep), ("dims", _dims_sweep)):
        with pytest.MonkeyPatch.context() as mp:
            out[name] = _build(make(base / name), mp)
    return out


def _texts(fig: Figure):
    """Every text the figure draws (tick labels of ticks outside an axis' view are not)."""
    from matplotlib.text import Text

    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if (
                    not low - 1e-9 * abs(high - low)
                    <= tick.get_loc()
                    <= high + 1e-9 * abs(high - low)
                ):
                    hidden |= {id(tick.label1), id(tick.label2)}
    return [
        t for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip() and id(t) not in hidden
    ]  # fmt: skip


def test_every_title_label_and_legend_lies_inside_the_canvas(crowded, figures):
    """Nothing is cropped: every text artist and legend of every figure, drawn, lies inside
    the figure's canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    checked = 0
    for sweep_name, figs in [*crowded.items(), ("default", figures)]:
        for name, fig in figs.items():
            canvas = FigureCanvasAgg(fig)
            canvas.draw()
            renderer = canvas.get_renderer()
            w, h = canvas.get_width_height()
            items = [*_texts(fig), *fig.legends]
            for artist in items:
                box = artist.get_window_extent(renderer)
                where = f"{sweep_name}/{name}: {getattr(artist, 'get_text', lambda: 'legend')()!r}"
                assert box.x0 >= -1 and box.y0 >= -1, where
                assert box.x1 <= w + 1 and box.y1 <= h + 1, where
                checked += 1
    assert checked > 50


def test_no_two_tick_labels_overprint(crowded):
    """Long override keys are shortened to their last dotted part, numbers to 4 significant
    digits, and labels that would still collide are turned: no two overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for sweep_name, figs in crowded.items():
        for name, fig in figs.items():
            canvas = FigureCanvasAgg(fig)
            canvas.draw()
            renderer = canvas.get_renderer()
            for ax in fig.axes:
                boxes = [
                    (t.get_text(), t.get_window_extent(renderer))
                    for t in ax.get_xticklabels()
                    if t.get_visible() and t.get_text()
                ]
                for i, (a, ba) in enumerate(boxes):
                    for b, bb in boxes[i + 1 :]:
                        apart = (
                            ba.x1 <= bb.x0 + 0.5
                            or bb.x1 <= ba.x0 + 0.5
                            or (ba.y1 <= bb.y0 + 0.5 or bb.y1 <= ba.y0 + 0.5)
                        )
                        assert apart, f"{sweep_name}/{name}: {a!r} overlaps {b!r}"
    ticks = [t.get_text() for t in crowded["tune"]["test_auc.png"].axes[0].get_xticklabels()]
    assert any("absolute_threshold=0.01247" in t for t in ticks), ticks
    assert not any("optim.absolute_threshold" in t for t in ticks)
    dims = [t.get_text() for t in crowded["dims"]["test_auc.png"].axes[0].get_xticklabels()]
    assert any("hidden_dims=[128,64]" in t for t in dims)


def test_the_every_run_line_is_short(crowded):
    """Shared settings by the last part of their key; logging-only settings left out; the
    panel title of a tune sweep counts its settings instead of listing them."""
    fig = crowded["tune"]["loss_curves.png"]
    title = fig.get_suptitle()
    assert "batch_size=256" in title and "data.batch_size" not in title
    assert "progress_bar" not in title and "enable_" not in title
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert ax.get_title() == "model sb; 4 settings, 1 seed each"


def test_a_failed_setting_and_a_crashed_job_are_said(tmp_path, monkeypatch):
    """A setting whose every run failed says so under its (empty) slot; a job folder without
    metrics.json is named in report.md; one run is "1 run"."""
    root = tmp_path / "sweep"
    _write_run(root, "0_a", "sb", "clippy", 0.1, 1, 0.7, "completed", [], 0.2)
    (root / "1_b").mkdir()
    (root / "1_b" / "train.log").write_text("boom\n")
    (root / "2_c").mkdir()
    (root / "2_c" / "metrics.json").write_text(json.dumps({
        "status": "failed", "model": "sb", "optim": "lamb", "lr": 0.01, "seed": 1,
        "overrides": ["optim=lamb"], "test": None, "error": "FileNotFoundError: x",
    }))  # fmt: skip
    figures = _build(root, monkeypatch)
    ticks = [t.get_text() for t in figures["test_auc.png"].axes[0].get_xticklabels()]
    assert sorted(ticks) == ["clippy\n1 seed", "lamb\nfailed"]
    report = (root / "report" / "report.md").read_text()
    assert "2 runs: 1 completed, 1 failed." in report
    assert "| sb | lamb | 0.01 | 1 (1 failed) | - |" in report
    assert "1 job folder without metrics.json" in report and "`1_b`" in report
    only = tmp_path / "one"
    _write_run(only, "0_a", "sb", "clippy", 0.1, 1, 0.7, "completed", [], 0.2)
    _build(only, monkeypatch)
    one = (only / "report" / "report.md").read_text()
    assert "1 run: 1 completed." in one and "without metrics.json" not in one


def test_small_numbers_read_sensibly(tmp_path, monkeypatch):
    """The log-loss axis note to 3 significant digits; a wall time under 10 s to 0.1 s; the x
    marks of two optimizers that diverged at one lr apart."""
    import pandas as pd

    from mtl_clippy.report.sweep import results_markdown

    md = results_markdown(pd.DataFrame([{"model": "sb", "optim": "adam", "lr": 0.1, "seed": 1,
                                          "status": "completed", "wall_time_s": 0.42}]))  # fmt: skip
    assert md.splitlines()[2].endswith("| 0.4 |")
    root = tmp_path / "sweep"
    for i, (o, lr, auc) in enumerate((("clippy", 0.1, 0.7), ("clippy", 10.0, None),
                                      ("adagrad", 0.1, 0.68), ("adagrad", 10.0, None))):  # fmt: skip
        _write_run(
            root, f"{i}_a", "sb", o, lr, 1, auc, "completed" if auc else "diverged", [], None
        )
    figures = _build(root, monkeypatch)
    notes = [
        re.search(r"axis from ([\d.]+),", ax.get_ylabel())
        for ax in figures["test_logloss.png"].axes
    ]
    assert any(notes)
    for note in filter(None, notes):
        assert len(note.group(1).replace("0.", "", 1).lstrip("0")) <= 3, note.group(1)
    (ax,) = figures["stability.png"].axes
    xs = [tuple(c.get_offsets()[:, 0]) for c in ax.collections if len(c.get_offsets())]
    crosses = [x for pts in xs for x in pts if x > 1]
    assert len(crosses) == 2 and len(set(crosses)) == 2  # one per optimizer, not on top

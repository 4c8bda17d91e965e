"""experiment=paper_baselines end to end, tiny: the sweep runs every kind of method it
compares (an optimizer alone, with Lightning's clipping, with AGC, LAMB, Clippy), and its end
writes the paper-framing report with a row per method."""

from __future__ import annotations

import csv
import json

from app_helpers import TINY, run_train


def test_a_tiny_paper_baselines_sweep_runs_and_builds_its_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        [
            "-m",
            "experiment=paper_baselines",
            "method=adagrad,adagrad_gc,adagrad_agc,lamb,clippy",
            "optim.lr=0.2",
            "model=sb_small",
            "seed=1",
            *TINY,
            "trainer.max_epochs=2",
            "callbacks.progress_bar.refresh_rate=0",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(jobs) == 5
    for job in jobs:
        m = json.loads((job / "metrics.json").read_text())
        assert m["status"] == "completed", (job.name, m.get("error"))
        assert m["stability"] in {"stable", "spiked", "collapsed"}, job.name
        assert m["steps"] >= 2 * (2400 // 256)  # min_epochs 2 of 2,400 training rows, batch 256
        # every step's training loss is logged, for the loss curves around divergences
        with open(job / "csv" / "metrics.csv") as f:
            losses = [r for r in csv.DictReader(f) if r.get("train/loss")]
        assert len(losses) >= m["steps"] - 1
    # what each job ran: the method's optimizer and clipping
    agc = next(j for j in jobs if "method=adagrad_agc," in j.name)
    cfg = (agc / ".hydra" / "config.yaml").read_text()
    assert "AdaptiveGradientClipping" in cfg and "torch.optim.Adagrad" in cfg
    gc = next(j for j in jobs if "method=adagrad_gc," in j.name)
    assert "gradient_clip_val: 1.0" in (gc / ".hydra" / "config.yaml").read_text()
    lamb = next(j for j in jobs if "method=lamb," in j.name)
    assert "pytorch_optimizer.Lamb" in (lamb / ".hydra" / "config.yaml").read_text()

    report = (sweep / "paper_report.md").read_text()
    for label in ("AdaGrad", "AdaGrad + GC", "AdaGrad + AGC", "LAMB", "Clippy"):
        assert f"| {label} |" in report, label
    assert (sweep / "results.md").is_file()

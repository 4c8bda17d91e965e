"""Full-size data: peak memory and throughput of a shared-bottom + Clippy epoch at 5 M rows.

Run: ``python benchmarks/bench_scale.py [--rows 5000000] [--test-rows 500000] [--ddp]``

1. Generates ``--rows`` train rows and ``--test-rows`` test rows in the processed AliExpress
   layout (once, under ``--data``; about 2.4 GB of CSV per 5 M rows).
2. ``first read``: a fresh process parses both CSV files into the ``.npy`` cache.
3. ``epoch``: ``python train.py data=aliexpress data.data_dir=<generated>`` for one epoch of
   shared-bottom + Clippy (validation on the last 10 % of the train rows, no test), exactly
   what a user runs on the real NL files, memory-mapping the cache written in step 2.
4. ``epoch_300k``, the baseline measured in the same run: the same epoch on the first
   300,000 rows; the ratio of throughputs shows whether the data's size costs speed.
5. With ``--ddp``, the same epoch with ``trainer=ddp trainer.devices=2`` and half the batch
   per rank (the same global batch).

Memory is sampled every 0.2 s from ``/proc/<pid>/status`` over the process and all its
children (DDP ranks): ``RssAnon`` is memory private to a process (what would be copied per
rank); ``RssFile`` is file-backed, mostly the memory-mapped arrays, shared between processes
through the page cache and given back under memory pressure. Peaks are of the sums over the
process tree. Results go to ``--json`` and are printed as a table, with the extrapolation to
the NL split (12.16 M train and 5.56 M test rows): memory-mapped bytes scale with rows, the
private memory does not (the model, the optimizer state and one batch), and an epoch's time
scales with the training rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NL_TRAIN, NL_TEST = 12_160_000, 5_560_000
#: Bytes per row of the memory-mapped arrays: raw ids int64 x 16, numerical float32 x 63,
#: labels float32 x 2, encoded ids int32 x 16.
MAPPED_BYTES_PER_ROW = 16 * 8 + 63 * 4 + 2 * 4 + 16 * 4


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def run_measured(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``; sample the memory of its process tree; return peaks (MiB) and time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peaks = {"rss": 0, "anon": 0, "file": 0, "processes": 1}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        pids = _tree(proc.pid)
        stats = [_status_kib(p) for p in pids]
        peaks["rss"] = max(peaks["rss"], sum(s.get("VmRSS", 0) for s in stats))
        peaks["anon"] = max(peaks["anon"], sum(s.get("RssAnon", 0) for s in stats))
        peaks["file"] = max(peaks["file"], sum(s.get("RssFile", 0) for s in stats))
        peaks["processes"] = max(peaks["processes"], sum(1 for s in stats if s))
        time.sleep(0.2)
    reader.join()
    if proc.returncode != 0:
        sys.stderr.write("".join(output[-60:]))
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return {
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mib": round(peaks["rss"] / 1024),
        "peak_anon_mib": round(peaks["anon"] / 1024),
        "peak_file_mib": round(peaks["file"] / 1024),
        "processes": peaks["processes"],
    }


def generate(folder: Path, rows: int, test_rows: int) -> float:
    if (folder / "meta.json").is_file():
        return 0.0
    from mtl_clippy.data.synthetic import generate_dataset

    t0 = time.perf_counter()
    generate_dataset(folder, rows, test_rows, seed=0, progress=True)
    return time.perf_counter() - t0


def epoch(data: Path, logs: Path, extra: list[str], threads: int) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "data=aliexpress",
        f"data.data_dir={data}",
        f"paths.data_dir={logs}/cache",
        f"paths.log_dir={logs}",
        "model=sb",
        "optim=clippy",
        "trainer.max_epochs=1",
        "test=false",
        "logger=none",
        "callbacks.progress_bar.refresh_rate=200",
        *extra,
    ]
    measured = run_measured(cmd, ROOT, env)
    metrics = next(logs.glob("runs/*/metrics.json"))
    m = json.loads(metrics.read_text())
    measured.update(
        samples_per_s=round(m["samples_per_s"] or 0),
        steps=m["steps"],
        precision=m.get("precision"),
        val_auc_click=m["val"].get("auc_click"),
        val_auc_conversion=m["val"].get("auc_conversion"),
        status=m["status"],
    )
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--test-rows", type=int, default=500_000)
    parser.add_argument("--data", default=str(ROOT / "data" / "bench_scale"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--ddp", action="store_true", help="also a 2-process DDP epoch")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "bench_scale.json"))
    args = parser.parse_args()

    data = Path(args.data) / f"rows{args.rows}_test{args.test_rows}"
    gen_s = generate(data, args.rows, args.test_rows)
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "rows": args.rows,
        "test_rows": args.test_rows,
        "generate_s": round(gen_s, 1),
        "csv_gib": round(sum(p.stat().st_size for p in data.glob("*.csv")) / 2**30, 2),
    }
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        tmp = Path(tmp)
        read_code = (
            "import sys; from mtl_clippy.data.reader import read_split;"
            "[read_split(p, cache_dir=sys.argv[1]) for p in sys.argv[2:]]"
        )
        results["first_read"] = run_measured(
            [sys.executable, "-c", read_code, str(tmp / "logs" / "cache" / "splits"),
             str(data / "train.csv"), str(data / "test.csv")],
            ROOT,
        )  # fmt: skip
        results["epoch"] = epoch(data, tmp / "logs", [], args.threads)
        # The baseline, in the same run: the same epoch on the first 300,000 rows (the
        # built-in dataset's size). Throughput should not fall with the data's size.
        small = tmp / "small"
        small.mkdir()
        (small / "cache").symlink_to(tmp / "logs" / "cache", target_is_directory=True)
        results["epoch_300k"] = epoch(
            data, small, ["data.train_rows=300000", "data.test_rows=30000"], args.threads
        )
        if args.ddp:
            ddp_logs = tmp / "ddp"
            ddp_logs.mkdir()
            (ddp_logs / "cache").symlink_to(tmp / "logs" / "cache", target_is_directory=True)
            results["epoch_ddp2"] = epoch(
                data, ddp_logs, ["trainer=ddp", "trainer.devices=2", "data.batch_size=1024"],
                args.threads,
            )  # fmt: skip

    e = results["epoch"]
    results["throughput_ratio_vs_300k"] = round(
        e["samples_per_s"] / max(results["epoch_300k"]["samples_per_s"], 1), 2
    )
    nl_fit = int(NL_TRAIN * 0.9)
    mapped_here = (args.rows + args.test_rows) * MAPPED_BYTES_PER_ROW / 2**20
    mapped_nl = (NL_TRAIN + NL_TEST) * MAPPED_BYTES_PER_ROW / 2**20
    results["nl_extrapolation"] = {
        "mapped_arrays_mib": round(mapped_nl),
        "private_memory_mib": e["peak_anon_mib"],
        "peak_rss_upper_bound_mib": round(e["peak_anon_mib"] + mapped_nl),
        "epoch_minutes": round(nl_fit / max(e["samples_per_s"], 1) / 60, 1),
        "note": "private memory does not grow with rows; mapped arrays are page cache",
    }
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{results['machine']}; {args.rows:,} train + {args.test_rows:,} test rows "
          f"({results['csv_gib']} GiB CSV; generated in {results['generate_s']} s)\n")  # fmt: skip
    print("| phase | wall s | peak RSS MiB | private (anon) MiB | file-backed MiB | samples/s |")
    print("|---|---|---|---|---|---|")
    for name in ("first_read", "epoch_300k", "epoch", "epoch_ddp2"):
        if name in results:
            r = results[name]
            print(
                f"| {name} | {r['wall_s']} | {r['peak_rss_mib']:,} | {r['peak_anon_mib']:,} | "
                f"{r['peak_file_mib']:,} | {r.get('samples_per_s', '')} |"
            )
    print(
        f"\nthroughput at {args.rows:,} rows / at 300,000 rows (same run): "
        f"{results['throughput_ratio_vs_300k']}x"
    )
    x = results["nl_extrapolation"]
    print(
        f"\nNL ({NL_TRAIN:,} train + {NL_TEST:,} test rows): memory-mapped arrays "
        f"{x['mapped_arrays_mib']:,} MiB (here {mapped_here:,.0f} MiB) + private "
        f"{x['private_memory_mib']:,} MiB; at most {x['peak_rss_upper_bound_mib']:,} MiB "
        f"resident even if every mapped page stays cached; one epoch ({nl_fit:,} rows) "
        f"~{x['epoch_minutes']} min at {e['samples_per_s']:,} samples/s."
    )
    print(f"written: {args.json}")


if __name__ == "__main__":
    main()

"""Benchmark of the data path on generated processed CSVs (default 300,000 and 1,000,000 rows).

Measures, each in a fresh subprocess (so peak memory is that method's alone, read from
``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

* ``pandas``: the existing loaders' approach, ``pd.read_csv(path).to_numpy()`` (float64 for
  the whole table) then slicing and casting to int64 / float32;
* ``pyarrow parse``: pyarrow's typed multithreaded parse alone (the bound for any reader
  built on it);
* ``read_split``: our reader, parsing and validating (no cache);
* ``write cache``: ``read_split``'s first read of a file, parsing, validating and writing its
  ``.npy`` cache (each run starts without a cache): what a user waits for the first time;
* ``cached reload``: ``read_split`` from its ``.npy`` cache (memory-mapped), then the same
  again while touching every byte (as a training epoch would);
* ``imports only``: the interpreter with the libraries loaded, the floor of every peak.

Plus the generator's time for the file. The methods run in rounds (each round runs every
method once, in turn), so that a load that comes and goes on a shared machine hits them
alike; each figure is the median over the rounds, and the ratios of the first read (``write
cache``) to ``pandas`` are the medians of the ratios within each round, printed against the
targets (at least 1.5x faster, at most half the peak memory above imports). Usage::

    python benchmarks/bench_data.py [--rows 300000,1000000] [--repeat 5] [--workdir DIR]

The tables it prints are recorded in ``docs/data.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np, pandas as pd, pyarrow as pa, pyarrow.csv as pacsv
from mtl_clippy.data import read_split
from mtl_clippy.data.schema import CATEGORICAL_COLUMNS, COLUMNS, LABEL_COLUMNS, NUMERICAL_COLUMNS

method, path, cache_dir = sys.argv[1], sys.argv[2], sys.argv[3]
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu_start = usage.ru_utime + usage.ru_stime
start = time.perf_counter()
if method == "pandas":
    table = pd.read_csv(path).to_numpy()
    categorical = table[:, 1:17].astype(np.int64)
    numerical = table[:, 17:80].astype(np.float32)
    labels = table[:, 80:82].astype(np.float32)
    del table
elif method == "pyarrow parse":
    types = {c: pa.int64() for c in CATEGORICAL_COLUMNS}
    types.update({c: pa.float32() for c in (*NUMERICAL_COLUMNS, *LABEL_COLUMNS)})
    table = pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(column_types=types, include_columns=list(COLUMNS[1:])),
    )
elif method == "read_split":
    split = read_split(path, cache=False)
elif method == "write cache":
    split = read_split(path, cache_dir=cache_dir)
    assert not split.from_cache
elif method == "cached reload":
    split = read_split(path, cache_dir=cache_dir)
    assert split.from_cache
elif method == "cached reload + touch":
    split = read_split(path, cache_dir=cache_dir)
    assert split.from_cache
    total = float(split.numerical.sum(dtype=np.float64)) + float(split.categorical.sum())
elif method != "imports only":
    raise SystemExit(f"unknown method {method}")
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu = usage.ru_utime + usage.ru_stime - cpu_start
print(json.dumps({"seconds": seconds, "cpu_s": cpu, "peak_mb": usage.ru_maxrss / 1024}))
"""

METHODS = (
    "imports only",
    "pandas",
    "pyarrow parse",
    "read_split",
    "write cache",
    "cached reload",
    "cached reload + touch",
)


def _run(method: str, path: Path, cache_dir: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(path), str(cache_dir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GiB, Python {platform.python_version()}, "
        + ", ".join(f"{n} {ver(n)}" for n in ("numpy", "pandas", "pyarrow", "torch"))
    )


#: The issue's targets for the first read (parse + validate + write the cache) against pandas.
TARGET_SPEEDUP = 1.5
TARGET_PEAK = 0.5


def _measure(rows: int, repeat: int, work: Path) -> dict[str, object]:
    """Generate ``rows`` rows under ``work`` and run every method ``repeat`` times, in rounds."""
    data = work / f"bench_data_{rows}"
    generate = (
        "import sys, time; from mtl_clippy.data import generate_dataset; "
        "t = time.perf_counter(); "
        "generate_dataset(sys.argv[1], train_rows=int(sys.argv[2]), test_rows=1000, seed=0); "
        "print(time.perf_counter() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", generate, str(data), str(rows)],
        check=True,
        capture_output=True,
        text=True,
    )
    generate_s = float(out.stdout.strip().splitlines()[-1])
    path = data / "train.csv"
    cache_dir = work / f"bench_cache_{rows}"
    _run("write cache", path, cache_dir)  # warms the page cache and the imports
    runs: dict[str, list[dict[str, float]]] = {method: [] for method in METHODS}
    for _ in range(repeat):
        for method in METHODS:
            if method == "write cache":  # the first read: no cache yet
                shutil.rmtree(cache_dir, ignore_errors=True)
            runs[method].append(_run(method, path, cache_dir))
    csv_mb = path.stat().st_size / 2**20
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(cache_dir, ignore_errors=True)
    return {"rows": rows, "runs": runs, "generate_s": generate_s, "csv_mb": csv_mb}


def _report(
    rows: int, runs: dict[str, list[dict[str, float]]], csv_mb: float, gen_s: float
) -> None:
    results = {
        method: {
            key: statistics.median(r[key] for r in rs) for key in ("seconds", "cpu_s", "peak_mb")
        }
        for method, rs in runs.items()
    }
    array_mb = rows * (16 * 8 + 63 * 4 + 2 * 4) / 2**20
    base = results["imports only"]["peak_mb"]
    pandas_s = results["pandas"]["seconds"]
    pandas_extra = results["pandas"]["peak_mb"] - base
    print(
        f"rows: {rows:,}; CSV {csv_mb:.0f} MiB; final arrays {array_mb:.0f} MiB; "
        f"generator {gen_s:.1f} s (train + 1,000 test rows, CSV written); "
        f"medians of {len(runs['pandas'])} rounds"
    )
    print()
    print(
        "| method | time (s) | speed-up vs pandas | CPU time (s) | peak RSS (MiB) "
        "| peak above imports (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    for method in METHODS:
        r = results[method]
        extra = max(0.0, r["peak_mb"] - base)
        if method == "imports only":
            print(f"| {method} | - | - | - | {r['peak_mb']:.0f} | 0 |")
            continue
        speed = pandas_s / max(r["seconds"], 1e-6)
        ratio = f" ({extra / pandas_extra:.2f}x pandas)"
        print(
            f"| {method} | {r['seconds']:.3f} | {speed:.1f}x | {r['cpu_s']:.2f} "
            f"| {r['peak_mb']:.0f} | {extra:.0f}{ratio} |"
        )
    parse_s = results["read_split"]["seconds"]
    print()
    print(
        f"cached reload vs parsing: {parse_s / results['cached reload']['seconds']:.0f}x "
        f"(memory-mapped), {parse_s / results['cached reload + touch']['seconds']:.1f}x "
        "(reading every byte)"
    )
    # The first read against pandas, round by round (the same load on both), then the median.
    pairs = list(zip(runs["pandas"], runs["write cache"], runs["imports only"], strict=True))
    speedups = [p["seconds"] / max(w["seconds"], 1e-6) for p, w, _ in pairs]
    peaks = [
        max(0.0, w["peak_mb"] - i["peak_mb"]) / max(p["peak_mb"] - i["peak_mb"], 1e-6)
        for p, w, i in pairs
    ]
    speedup, peak = statistics.median(speedups), statistics.median(peaks)
    met = {True: "met", False: "MISSED"}
    print(
        f"first read (parse + validate + write cache) vs pandas at {rows:,} rows: "
        f"{speedup:.2f}x faster (target >= {TARGET_SPEEDUP}x: {met[speedup >= TARGET_SPEEDUP]}; "
        f"rounds {min(speedups):.2f}x-{max(speedups):.2f}x), peak above imports "
        f"{peak:.2f}x pandas (target <= {TARGET_PEAK}x: {met[peak <= TARGET_PEAK]})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", default="300000,1000000", help="comma-separated sizes (rows of train.csv)"
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="rounds of all methods (medians are reported)"
    )
    parser.add_argument("--workdir", default=None, help="where to generate (default: a temp dir)")
    args = parser.parse_args()
    sizes = [int(r.replace("_", "")) for r in args.rows.split(",") if r.strip()]

    # Everything heavy runs in children: on Linux a child inherits its parent's peak RSS
    # (ru_maxrss survives fork + exec), so the parent must stay small.
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        for rows in sizes:
            measured.append(_measure(rows, args.repeat, work))
    print(f"machine: {_machine()}; load average at the end: {os.getloadavg()[0]:.1f}")
    for m in measured:
        print()
        _report(m["rows"], m["runs"], m["csv_mb"], m["generate_s"])  # type: ignore[arg-type]


if __name__ == "__main__":
    main()

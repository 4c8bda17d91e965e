"""Peak memory with small and with huge id values, same rows (issue 12, item 7).

A vocabulary's id -> index mapping used to be a lookup table sized by the field's largest id
below 2**24: one row with ids near 16,777,215 made each of the 16 fields allocate a 64 MiB
table. This benchmark measures, each case in a fresh subprocess (peak resident set from
``getrusage``; a child inherits nothing of the parent's peak, which stays small):

1. **Vocabularies + encoding** of a generated ``--rows``-row file (default 100), with the
   ids as generated (small), with one row of ids near 2**24 - 1, with every id near
   2**24 - 1 (``2**24 - 1 - id``: the same counts) and with every id above 2**40: peak RSS
   above the process's state before building (file read, libraries imported), and the
   ``tracemalloc`` peak (NumPy reports its arrays to it).
2. **A whole run**, ``python train.py data=aliexpress`` on the same folders (one epoch,
   ``logger=none``): the process's peak RSS.
3. **Encoding speed at scale**: building the vocabularies and encoding ``--scale-rows`` rows
   (default 12,000,000, the NL split's size) of ids resembling the real data's (label-encoded,
   Zipf-like, 3 to 3,000,000 values per field), and the same ids scattered over
   ``[0, 2**24)`` (a sparse field: a sorted search of its ids now, a 64 MiB lookup table
   before).

``--compare ROOT`` runs every case also with another checkout (for example a worktree of
the commit before the fix: ``git worktree add /tmp/before c4e28d3``), its ``src`` and its
``train.py``, and prints both. Usage::

    python benchmarks/bench_memory_ids.py [--rows 100] [--scale-rows 12000000] \\
        [--repeat 3] [--no-train] [--compare /tmp/before]

The tables it prints are recorded in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 1 << 24

#: Child of the vocabulary cases: read the split, then build + encode, measuring around it.
VOCAB_CHILD = r"""
import json, resource, sys, time, tracemalloc
import numpy as np
from mtl_clippy.data.reader import read_split
from mtl_clippy.data.vocab import build_vocabularies, encode_all

def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

split = read_split(sys.argv[1], cache=False)
categorical = np.ascontiguousarray(split.categorical)
before = rss_mib()
tracemalloc.start()
start = time.perf_counter()
vocabularies = build_vocabularies(categorical, int(sys.argv[2]))
codes = encode_all(categorical, vocabularies)
seconds = time.perf_counter() - start
traced = tracemalloc.get_traced_memory()[1] / 2**20
tracemalloc.stop()
print(json.dumps({"before_mib": before, "peak_mib": rss_mib(), "traced_mib": traced,
                  "seconds": seconds, "sizes": [v.size for v in vocabularies]}))
"""

#: Child of the scale cases: ids like the real data's, generated here, then timed.
SCALE_CHILD = r"""
import json, resource, sys, time
import numpy as np
from mtl_clippy.data.vocab import build_vocabularies, encode_all

rows, layout = int(sys.argv[1]), sys.argv[2]
cards = [3, 4, 8, 10, 12, 20, 40, 300, 2_000, 5_000, 30_000, 200_000, 1_000_000, 3_000_000,
         100, 15]
rng = np.random.default_rng(0)
categorical = np.empty((rows, len(cards)), dtype=np.int64)
for f, card in enumerate(cards):
    ids = (card * rng.random(rows) ** 3).astype(np.int64)  # Zipf-like: small ids frequent
    if layout == "sparse":  # the same ids scattered over [0, 2**24)
        ids = np.sort(rng.choice(1 << 24, size=card, replace=False))[ids]
    categorical[:, f] = ids
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
n_fit = int(rows * 0.9)  # as the data module does: vocabularies from the training rows
start = time.perf_counter()
vocabularies = build_vocabularies(categorical[:n_fit], 5)
built = time.perf_counter() - start
codes = encode_all(categorical, vocabularies)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"build_s": built, "seconds": seconds, "before_mib": before,
                  "peak_mib": peak, "sizes": [v.size for v in vocabularies]}))
"""

CASES = ("small ids", "one row near 2^24-1", "all near 2^24-1", "all above 2^40")


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree / "src"), "MTL_CLIPPY_DISABLE_FUSED": "1"}


def _child(code: str, args: list[str], tree: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code, *args],
        check=True,
        capture_output=True,
        text=True,
        env=_env(tree),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _write_cases(work: Path, rows: int) -> dict[str, Path]:
    """One folder per case: the generated rows, their ids rewritten (same counts)."""
    code = (
        "import sys; from mtl_clippy.data import generate_dataset; "
        "generate_dataset(sys.argv[1], train_rows=int(sys.argv[2]), "
        "test_rows=int(sys.argv[2]), seed=0)"
    )
    base = work / "generated"
    subprocess.run([sys.executable, "-c", code, str(base), str(rows)], check=True, env=_env(ROOT))
    folders = {}
    for case in CASES:
        folder = work / case.replace(" ", "_").replace("^", "")
        folder.mkdir()
        for name in ("train.csv", "test.csv"):
            lines = (base / name).read_text().splitlines()
            out = [lines[0]]
            for k, line in enumerate(lines[1:]):
                cells = line.split(",")
                ids = [int(c) for c in cells[1:17]]
                if case == "one row near 2^24-1" and k == 0:
                    ids = [LIMIT - 1 - f for f in range(16)]
                elif case == "all near 2^24-1":
                    ids = [LIMIT - 1 - i for i in ids]
                elif case == "all above 2^40":
                    ids = [(1 << 40) + i for i in ids]
                cells[1:17] = [str(i) for i in ids]
                out.append(",".join(cells))
            (folder / name).write_text("\n".join(out) + "\n")
        folders[case] = folder
    return folders


def _train_peak(folder: Path, tree: Path, work: Path) -> tuple[float, float]:
    """(peak RSS MiB, wall s) of one ``python train.py data=aliexpress`` run on ``folder``."""
    import time

    run_dir = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    args = [
        sys.executable,
        str(tree / "train.py"),
        "data=aliexpress",
        f"data.data_dir={folder}",
        "data.batch_size=16",
        "data.min_count=1",
        "trainer.max_epochs=1",
        "logger=none",
        f"paths.log_dir={run_dir}/outputs",
        f"paths.data_dir={run_dir}/cache",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(
        args, cwd=run_dir, env=_env(tree), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"train.py failed on {folder}: {stderr.decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def _best(runs: list[dict], key: str) -> float:
    return min(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100, help="rows of the small files")
    parser.add_argument("--scale-rows", type=int, default=12_000_000, help="0: skip")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (best kept)")
    parser.add_argument("--no-train", action="store_true", help="skip the train.py runs")
    parser.add_argument("--compare", type=Path, default=None, help="another checkout's root")
    args = parser.parse_args()
    trees = {"now": ROOT} if args.compare is None else {"before": args.compare, "now": ROOT}

    from bench_data import _machine  # the same machine line as the data benchmark

    print(f"machine: {_machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders = _write_cases(work, args.rows)

        print(f"\n1. vocabularies + encoding of {args.rows} rows (min_count 1): the process's")
        print("peak RSS, its part above the state before building, and the tracemalloc peak;")
        print("best of", args.repeat)
        print(
            "\n| case | code | peak RSS (MiB) | ratio to small ids | RSS above before (MiB) "
            "| tracemalloc peak (MiB) | time (ms) |"
        )
        print("|---|---|---|---|---|---|---|")
        for label, tree in trees.items():
            small = None
            for case in CASES:
                runs = [
                    _child(VOCAB_CHILD, [str(folders[case] / "train.csv"), "1"], tree)
                    for _ in range(args.repeat)
                ]
                peak = _best(runs, "peak_mib")
                small = small or peak
                above = min(r["peak_mib"] - r["before_mib"] for r in runs)
                print(
                    f"| {case} | {label} | {peak:.0f} | {peak / small:.2f}x | {above:.1f} "
                    f"| {_best(runs, 'traced_mib'):.2f} | {1000 * _best(runs, 'seconds'):.1f} |"
                )

        if not args.no_train:
            print(f"\n2. python train.py data=aliexpress on the {args.rows}-row folders")
            print("(one epoch, batch 16, logger=none): peak RSS of the process, best of 1")
            print("\n| case | code | peak RSS (MiB) | ratio to small ids | wall (s) |")
            print("|---|---|---|---|---|")
            for label, tree in trees.items():
                small_peak = None
                for case in CASES:
                    peak, wall = _train_peak(folders[case], tree, work)
                    small_peak = small_peak or peak
                    print(
                        f"| {case} | {label} | {peak:.0f} | {peak / small_peak:.2f}x | {wall:.1f} |"
                    )

        if args.scale_rows:
            print(f"\n3. vocabularies (min_count 5) + encoding of {args.scale_rows:,} rows x 16")
            print("fields; best of", args.repeat, "(peak RSS: above the generated ids)")
            print(
                "\n| ids | code | build (s) | build + encode (s) | time ratio "
                "| peak above ids (MiB) |"
            )
            print("|---|---|---|---|---|---|")
            for layout in ("dense", "sparse"):
                runs: dict[str, list[dict]] = {label: [] for label in trees}
                for _ in range(args.repeat):  # interleaved: drifting load hits both alike
                    for label, tree in trees.items():
                        runs[label].append(
                            _child(SCALE_CHILD, [str(args.scale_rows), layout], tree)
                        )
                first = _best(next(iter(runs.values())), "seconds")
                for label, done in runs.items():
                    above = min(r["peak_mib"] - r["before_mib"] for r in done)
                    print(
                        f"| {layout} | {label} | {_best(done, 'build_s'):.2f} "
                        f"| {_best(done, 'seconds'):.2f} | {_best(done, 'seconds') / first:.2f}x "
                        f"| {above:.0f} |"
                    )
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

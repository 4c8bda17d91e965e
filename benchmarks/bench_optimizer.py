"""Time one optimizer ``step()`` of ClippyAdagrad against torch's Adagrad and Adam.

Run: ``python benchmarks/bench_optimizer.py [--steps 60] [--threads 2] [--device cuda]``

(a) The parameter set of the shared-bottom model (16 embedding fields x 128 with a few thousand
    vocabulary rows in total, MLP 2176 -> 512 -> 256 with BatchNorm, two towers
    256 -> 128 -> 64 -> 1), all gradients dense: every ClippyAdagrad path against torch's
    Adagrad in its three modes and fused Adam. Bar: torch's fused Adagrad (one pass over memory).
(b) A 1,000,000 x 128 embedding table updated from a batch of 2048 x 16 lookups (Zipf and
    uniform ids), with sparse gradients (ClippyAdagrad's C++ kernel, or its eager path where the
    kernel cannot be built: the run says which) against torch's sparse Adagrad on the same
    gradients and against the same table with dense gradients. Targets: the sparse step at
    least 20x faster than the dense step, and at least 2x faster than torch's sparse Adagrad.
(c) The same sparse steps with each batch's forward and backward run (untimed) before the
    step, as in training, where the lookup has just read the touched rows and the backward
    has just written the gradient; (b) finds every row in memory, not in the caches.

Each figure is the median of ``--steps`` timed steps after warm-up steps (which also absorb
``torch.compile``'s compilation); gradients are fixed, so only the step is timed. Ratios are
against a baseline measured in the same run, since absolute times on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from mtl_clippy.optim import ClippyAdagrad

CLIPPY_KW = dict(variable_relative_threshold=0.5, absolute_threshold=1e-2)

#: where the tensors live (``--device``); on CUDA every timed step is synchronised
DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def shared_bottom_params(vocab_rows: int = 4000, embed_dim: int = 128) -> list[nn.Parameter]:
    """Parameters shaped like SharedBottom's at published sizes, with random dense grads."""
    torch.manual_seed(0)

    def mlp(dims: list[int]) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b)]
        return layers

    modules: list[nn.Module] = [nn.Embedding(vocab_rows, embed_dim), nn.Linear(63, embed_dim)]
    modules += mlp([17 * embed_dim, 512, 256])
    for _ in range(2):
        modules += mlp([256, 128, 64]) + [nn.Linear(64, 1)]
    params = [p for m in modules for p in m.parameters()]
    params = [nn.Parameter(p.detach().to(DEVICE)) for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    return params


def time_steps(make_opt: Callable[[], torch.optim.Optimizer], steps: int, warmup: int) -> float:
    """Median time of one step of one optimizer (for cases too large to keep side by side)."""
    return time_interleaved([("", make_opt)], steps, warmup)[0][1]


def time_interleaved(
    cases: list[tuple[str, Callable[[], torch.optim.Optimizer]]], steps: int, warmup: int
) -> list[tuple[str, float]]:
    """Median step time of each case, timing the cases in turn, round after round.

    Interleaving makes the ratios robust to load that drifts during the run (other processes
    on a shared machine): every case sees the same conditions in every round.
    """
    opts = [make() for _, make in cases]
    for opt in opts:
        for _ in range(warmup):  # includes torch.compile's compilation for the fused path
            opt.step()
    _sync()
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(steps):
        for i, opt in enumerate(opts):
            t0 = time.perf_counter()
            opt.step()
            _sync()
            times[i].append(time.perf_counter() - t0)
    return [(name, statistics.median(t)) for (name, _), t in zip(cases, times, strict=True)]


def bench_shared_bottom(steps: int, warmup: int) -> list[tuple[str, float]]:
    params = shared_bottom_params()
    n = sum(p.numel() for p in params)
    print(f"(a) shared-bottom parameter set: {len(params)} tensors, {n / 1e6:.2f} M values")
    cases: list[tuple[str, Callable[[], torch.optim.Optimizer]]] = [
        ("torch Adagrad fused=True", lambda: torch.optim.Adagrad(params, lr=0.1, fused=True)),
        ("torch Adagrad foreach=True", lambda: torch.optim.Adagrad(params, lr=0.1, foreach=True)),
        (
            "torch Adagrad foreach=False",
            lambda: torch.optim.Adagrad(params, lr=0.1, foreach=False),
        ),
        ("torch Adam fused=True", lambda: torch.optim.Adam(params, lr=1e-3, fused=True)),
        (
            "ClippyAdagrad default",
            lambda: ClippyAdagrad(params, lr=0.1, **CLIPPY_KW),
        ),
        (
            "ClippyAdagrad fused=True",
            lambda: ClippyAdagrad(params, lr=0.1, fused=True, **CLIPPY_KW),
        ),
        (
            "ClippyAdagrad foreach=True",
            lambda: ClippyAdagrad(params, lr=0.1, foreach=True, **CLIPPY_KW),
        ),
        (
            "ClippyAdagrad per-tensor",
            lambda: ClippyAdagrad(params, lr=0.1, foreach=False, fused=False, **CLIPPY_KW),
        ),
    ]
    # All cases step the same parameters in turn; values drift a little, which changes
    # nothing in the cost of a step.
    return time_interleaved(cases, steps, warmup)


def lookup_ids(kind: str, n: int, rows: int) -> torch.Tensor:
    """Ids of one batch: ``uniform`` (worst case: nearly all rows distinct) or ``zipf``
    (frequencies ~ 1/rank^1.1 over a random permutation of the rows, as in recommender logs)."""
    gen = torch.Generator().manual_seed(0)
    if kind == "uniform":
        return torch.randint(0, rows, (n,), generator=gen)
    ranks = torch.arange(1, rows + 1, dtype=torch.float64)
    probs = ranks.pow(-1.1)
    draws = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen)
    return torch.randperm(rows, generator=gen)[draws]


#: which sparse path ClippyAdagrad took in part (b): its ``implementation()["sparse_paths"]``
SPARSE_PATH = ["not run"]


def _recording(opt: ClippyAdagrad) -> ClippyAdagrad:
    """Record, after the optimizer's first step, which sparse path it took."""

    def note(optimizer: ClippyAdagrad, args: object, kwargs: object) -> None:
        used = optimizer.implementation()
        SPARSE_PATH[0] = ", ".join(used["sparse_paths"]) + (
            f" (fallback: {used['fallback']})" if used["fallback"] else ""
        )

    opt.register_step_post_hook(note)
    return opt


def bench_sparse_table(steps: int, warmup: int) -> list[tuple[str, float]]:
    rows, dim, batch, fields = 1_000_000, 128, 2048, 16
    print(f"(b) {rows:,} x {dim} table, {batch} x {fields} lookups per step")
    cases: list[tuple[str, Callable[[], torch.optim.Optimizer]]] = []
    for kind in ("zipf", "uniform"):
        ids = lookup_ids(kind, batch * fields, rows).to(DEVICE)
        w = nn.Parameter(torch.randn(rows, dim, device=DEVICE) * 0.1)
        nn.functional.embedding(ids, w, sparse=True).sum().backward()
        distinct = ids.unique().numel()
        cases.append(
            (
                f"ClippyAdagrad sparse, {kind} ids ({distinct:,} rows)",
                lambda w=w: _recording(ClippyAdagrad([w], lr=0.1, **CLIPPY_KW)),
            )
        )
        cases.append(
            (f"torch Adagrad sparse, {kind} ids", lambda w=w: torch.optim.Adagrad([w], lr=0.1))
        )
    w = nn.Parameter(torch.randn(rows, dim, device=DEVICE) * 0.1)
    w.grad = torch.randn_like(w) * 0.01
    cases += [
        ("ClippyAdagrad dense (default path)", lambda: ClippyAdagrad([w], lr=0.1, **CLIPPY_KW)),
        (
            "ClippyAdagrad dense (per-tensor)",
            lambda: ClippyAdagrad([w], lr=0.1, foreach=False, fused=False, **CLIPPY_KW),
        ),
        ("torch Adagrad dense (fused)", lambda: torch.optim.Adagrad([w], lr=0.1, fused=True)),
    ]
    return time_interleaved(cases, steps, warmup)


def bench_sparse_in_training(steps: int) -> list[tuple[str, float]]:
    """Part (c): the sparse steps as training sees them. Before each timed step, untimed, the
    batch's forward (the embedding lookup, which reads the touched rows) and backward (which
    writes the gradient) run, so the step finds in the caches what training leaves there;
    part (b) steps the same gradient again and again with other cases in between, so every
    row comes from memory. The dense step is the same in both (it streams the whole table)."""
    rows, dim, batch, fields = 1_000_000, 128, 2048, 16
    out: list[tuple[str, float]] = []
    for kind in ("zipf", "uniform"):
        ids = lookup_ids(kind, batch * fields, rows).to(DEVICE)
        made = {
            "ClippyAdagrad": lambda w: ClippyAdagrad([w], lr=0.1, **CLIPPY_KW),
            "torch Adagrad": lambda w: torch.optim.Adagrad([w], lr=0.1),
        }
        tables = {name: nn.Parameter(torch.randn(rows, dim, device=DEVICE) * 0.1) for name in made}
        opts = {name: make(tables[name]) for name, make in made.items()}
        times: dict[str, list[float]] = {name: [] for name in made}
        for i in range(steps + 3):
            for name, opt in opts.items():
                opt.zero_grad(set_to_none=True)
                nn.functional.embedding(ids, tables[name], sparse=True).sum().backward()
                _sync()
                t0 = time.perf_counter()
                opt.step()
                _sync()
                if i >= 3:
                    times[name].append(time.perf_counter() - t0)
        out += [(f"{name} sparse, {kind} ids", statistics.median(t)) for name, t in times.items()]
    return out


def print_table(title: str, results: list[tuple[str, float]], baseline: str) -> None:
    base = dict(results)[baseline]
    print(f"\n{title} (ratio = time / time of '{baseline}')")
    print(f"| {'optimizer':<44} | {'median step':>12} | {'ratio':>7} |")
    print(f"|{'-' * 46}|{'-' * 14}|{'-' * 9}|")
    for name, t in results:
        print(f"| {name:<44} | {t * 1e3:>9.3f} ms | {t / base:>7.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="timed steps per case (median)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per case")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-sparse", action="store_true", help="skip part (b)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: no CUDA GPU is available here")
    torch.set_num_threads(args.threads)
    where = (
        torch.cuda.get_device_name(DEVICE)
        if DEVICE.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads"
    )
    print(f"torch {torch.__version__}, {where}, median of {args.steps} steps")
    a = bench_shared_bottom(args.steps, args.warmup)
    print_table("(a) shared-bottom parameters, dense gradients", a, "torch Adagrad fused=True")
    if not args.skip_sparse:
        b = bench_sparse_table(max(10, args.steps // 3), 3)
        times = dict(b)
        dense = times["ClippyAdagrad dense (default path)"]
        print_table("(b) 1M x 128 embedding table", b, "ClippyAdagrad dense (default path)")
        print(f"ClippyAdagrad's sparse path here: {SPARSE_PATH[0]}")
        for kind in ("zipf", "uniform"):
            ours = next(t for name, t in b if name.startswith(f"ClippyAdagrad sparse, {kind}"))
            torch_sparse = times[f"torch Adagrad sparse, {kind} ids"]
            print(
                f"{kind} ids: the sparse step is {dense / ours:.1f}x faster than the dense step "
                f"(target >= 20x: {'met' if dense / ours >= 20 else 'missed'}) and "
                f"{torch_sparse / ours:.2f}x faster than torch's sparse Adagrad "
                f"(target >= 2x: {'met' if torch_sparse / ours >= 2 else 'missed'})"
            )
        c = bench_sparse_in_training(max(10, args.steps // 3))
        print_table(
            "(c) the same sparse steps after each batch's forward and backward, as in training",
            c + [("ClippyAdagrad dense (default path), from (b)", dense)],
            "ClippyAdagrad dense (default path), from (b)",
        )
        times_c = dict(c)
        for kind in ("zipf", "uniform"):
            ours = times_c[f"ClippyAdagrad sparse, {kind} ids"]
            torch_sparse = times_c[f"torch Adagrad sparse, {kind} ids"]
            print(
                f"{kind} ids, as in training: {dense / ours:.1f}x faster than the dense step, "
                f"{torch_sparse / ours:.2f}x faster than torch's sparse Adagrad"
            )


if __name__ == "__main__":
    main()

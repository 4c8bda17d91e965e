"""The CUDA kernels of Clippy's sparse (row) step, in Triton.

``sparse_step(p, acc, rows, g_rows, ...)`` updates the rows ``rows`` (distinct) of the table
``p`` and its accumulator ``acc`` from their summed gradients ``g_rows``: one kernel computes
every touched element's update ``delta`` and each block's smallest clipping ratio (the update
goes to a scratch buffer), ``torch.amin`` reduces the blocks' minima to sigma on the device,
and a second kernel applies ``w - delta * sigma`` and the accumulator's increment to the same
rows. Nothing waits for the host; nothing as large as the table is allocated.

The arithmetic is the eager step's, in the table's dtype (float32 or float64): correctly
rounded ``sqrt`` and division (``sqrt_rn``, ``div_rn``), and a fused multiply-add where torch's
``addcmul_`` has one. The hyperparameters are read from a small tensor of that dtype (so a
float64 table gets float64 thresholds and a new learning rate compiles nothing).

Used only on CUDA tensors, where Triton is installed; the tests also run it on CPU tensors
under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: rows and columns per program; the column tile is a power of two covering short rows whole
BLOCK_ROWS = 16
MAX_BLOCK_COLS = 128


@triton.jit
def _block_rows(rows_ptr, pid, n_rows, n_table, BLOCK_R: tl.constexpr):
    """This program's slots ``r``, their table rows, and which of them to touch: slots past
    the end and rows outside the table never are (the caller asserts on the latter)."""
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    row = tl.load(rows_ptr + r, mask=r_ok, other=0)
    return r, row, r_ok & (row >= 0) & (row < n_table)


@triton.jit
def _tile(r, row, r_ok, c0, width, BLOCK_C: tl.constexpr):
    """Columns ``c0 ..`` of the block: the mask, offsets in the table and in the row buffers."""
    c = c0 + tl.arange(0, BLOCK_C)
    ok = r_ok[:, None] & (c[None, :] < width)
    at_table = row[:, None].to(tl.int64) * width + c[None, :]
    at_rows = r[:, None].to(tl.int64) * width + c[None, :]
    return ok, at_table, at_rows


@triton.jit
def _delta_and_block_min(
    w_ptr, acc_ptr, g_ptr, rows_ptr, delta_ptr, mins_ptr, hyper_ptr, n_rows, n_table, width,
    HAS_ACC_REL: tl.constexpr, STANDARD: tl.constexpr, IS_F64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    r, row, r_ok = _block_rows(rows_ptr, pid, n_rows, n_table, BLOCK_R)
    lr = tl.load(hyper_ptr + 0)
    eps = tl.load(hyper_ptr + 1)
    rel = tl.load(hyper_ptr + 2)
    acc_rel = tl.load(hyper_ptr + 3)
    abs_t = tl.load(hyper_ptr + 4)
    one = tl.load(hyper_ptr + 5)
    running = tl.full((BLOCK_R, BLOCK_C), 1.0, tl.float32).to(lr.dtype)
    for c0 in range(0, width, BLOCK_C):
        ok, at_table, at_rows = _tile(r, row, r_ok, c0, width, BLOCK_C)
        w = tl.load(w_ptr + at_table, mask=ok, other=0.0)
        a = tl.load(acc_ptr + at_table, mask=ok, other=0.0)
        g = tl.load(g_ptr + at_rows, mask=ok, other=0.0)
        if STANDARD:
            a = tl.fma(g, g, a)
        if IS_F64:  # float64 sqrt and division are correctly rounded as written
            p = one / tl.sqrt(a + eps)
        else:
            p = tl.div_rn(tl.zeros_like(a) + one, tl.sqrt_rn(a + eps))
        delta = (g * lr) * p
        tl.store(delta_ptr + at_rows, delta, mask=ok)
        bound = tl.abs(w) * rel + abs_t
        if HAS_ACC_REL:
            bound = tl.fma(p, acc_rel, bound)
        ad = tl.abs(delta)
        clipped = ok & (bound < ad)  # only these can bring sigma below 1
        safe = tl.where(clipped, ad, one)
        if IS_F64:
            ratio = tl.where(clipped, bound / safe, one)
        else:
            ratio = tl.where(clipped, tl.div_rn(bound, safe), one)
        running = tl.minimum(running, ratio)
    tl.store(mins_ptr + pid, tl.min(tl.min(running, axis=1), axis=0))


@triton.jit
def _apply(
    w_ptr, acc_ptr, g_ptr, rows_ptr, delta_ptr, sigma_ptr, n_rows, n_table, width,
    CLIP_ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    r, row, r_ok = _block_rows(rows_ptr, pid, n_rows, n_table, BLOCK_R)
    sigma = tl.load(sigma_ptr)
    for c0 in range(0, width, BLOCK_C):
        ok, at_table, at_rows = _tile(r, row, r_ok, c0, width, BLOCK_C)
        w = tl.load(w_ptr + at_table, mask=ok, other=0.0)
        a = tl.load(acc_ptr + at_table, mask=ok, other=0.0)
        g = tl.load(g_ptr + at_rows, mask=ok, other=0.0)
        delta = tl.load(delta_ptr + at_rows, mask=ok, other=0.0)
        if CLIP_ACC:
            sg = g * sigma
            a = tl.fma(sg, sg, a)
        else:  # standard: g^2 belongs to this step too; otherwise added after it, unclipped
            a = tl.fma(g, g, a)
        tl.store(acc_ptr + at_table, a, mask=ok)
        tl.store(w_ptr + at_table, tl.fma(-delta, sigma, w), mask=ok)


def compile_errors() -> tuple[type[BaseException], ...]:
    """Triton's exceptions for a kernel that cannot be compiled or launched here."""
    found: list[type[BaseException]] = []
    for module, name in (
        ("triton.compiler.errors", "CompilationError"),
        ("triton.runtime.errors", "OutOfResources"),
        ("triton.runtime.autotuner", "OutOfResources"),
    ):
        try:
            cls = getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found) or (RuntimeError,)


def sparse_step(
    p: torch.Tensor,
    acc: torch.Tensor,
    rows: torch.Tensor,
    g_rows: torch.Tensor,
    delta: torch.Tensor,
    hyper: torch.Tensor,
    *,
    has_acc_rel: bool,
    clip_acc: bool,
    standard: bool,
) -> torch.Tensor:
    """Update rows ``rows`` (distinct, int64) of ``p`` and ``acc`` (contiguous) from ``g_rows``
    (``len(rows)`` contiguous rows of the table's width); returns sigma (0-dim, on the device).

    ``delta``: ``g_rows.numel()`` elements of the table's dtype, for the updates; ``hyper``:
    ``[lr, eps, rel, acc_rel, abs, 1]`` in the table's dtype, on its device.
    """
    n_rows = rows.numel()
    width = p.numel() // p.shape[0]
    block_c = min(MAX_BLOCK_COLS, triton.next_power_of_2(max(width, 1)))
    grid = (triton.cdiv(n_rows, BLOCK_ROWS),)
    mins = torch.empty(grid[0], dtype=p.dtype, device=p.device)
    _delta_and_block_min[grid](
        p, acc, g_rows, rows, delta, mins, hyper, n_rows, p.shape[0], width,
        HAS_ACC_REL=has_acc_rel, STANDARD=standard, IS_F64=p.dtype == torch.float64,
        BLOCK_R=BLOCK_ROWS, BLOCK_C=block_c,
    )  # fmt: skip
    sigma = torch.amin(mins).clamp_(max=1.0)
    _apply[grid](
        p, acc, g_rows, rows, delta, sigma, n_rows, p.shape[0], width,
        CLIP_ACC=clip_acc, BLOCK_R=BLOCK_ROWS, BLOCK_C=block_c,
    )  # fmt: skip
    return sigma

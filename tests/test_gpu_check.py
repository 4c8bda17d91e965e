"""benchmarks/gpu_check.sh, the GPU check run when a GPU is lent: on a machine without one it
says so in one line and exits 0, and the optimizer benchmark refuses --device cuda in one
line. (Where a GPU is present the script itself is the check; it is not run from here.)"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from app_helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run the script")


def test_the_script_parses():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@no_gpu
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    res = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (
        "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing checked"
    )


@no_gpu
def test_the_optimizer_benchmark_refuses_cuda_without_a_gpu():
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_optimizer.py"), "--device", "cuda"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.strip() == "error: --device cuda: no CUDA GPU is available here"

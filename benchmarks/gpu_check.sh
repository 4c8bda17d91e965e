#!/usr/bin/env bash
# The CUDA paths, checked in one go when a GPU is at hand (at most about 5 minutes on one GPU):
#   1. the tests that need a CUDA GPU (skipped elsewhere), run here: the divergence monitor's
#      device reads, and the sparse (embedding) step's Triton kernels against the exact CPU step;
#   2. ClippyAdagrad's default (compiled) step on the GPU against the exact per-tensor step on
#      the CPU, on the same parameters and gradients: the largest relative difference;
#   3. the optimizer benchmark on the GPU: Clippy's default path against torch's fused AdaGrad
#      and Adam on the same device (benchmarks/bench_optimizer.py --device cuda);
#   4. one epoch of `python train.py trainer=gpu` (bfloat16 autocast where the GPU has it),
#      with its samples per second;
# then one summary table. On a machine without a CUDA GPU it says so and exits 0.
#
#   bash benchmarks/gpu_check.sh            # from the project's root
# Files go to $OUT when it is set (the device machine's result folder), else a temporary folder.
set -u
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing checked"
    exit 0
fi

out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
summary="$out/gpu_check.md"
rows=()
status=0
row() { rows+=("| $1 | $2 | $3 |"); }

gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0))")
echo "gpu_check on $gpu; logs in $out"

# 1. CUDA tests
if timeout 150 python -m pytest -q -m "slow or not slow" -rs tests/test_divergence_device.py \
    tests/test_sparse_kernel.py -k "cuda or gpu or device" >"$out/tests.log" 2>&1; then
    row "CUDA tests" "passed" "$(tail -n 1 "$out/tests.log")"
else
    row "CUDA tests" "FAILED" "see tests.log: $(tail -n 1 "$out/tests.log")"
    status=1
fi

# 2. Clippy on the GPU against the exact CPU step
if timeout 120 python - >"$out/clippy_equal.log" 2>&1 <<'EOF'; then
import torch
from torch import nn

from mtl_clippy.optim import ClippyAdagrad

kw = dict(lr=0.5, variable_relative_threshold=0.5, absolute_threshold=1e-2)
torch.manual_seed(0)
shapes = [(4000, 64), (2176, 512), (512,), (256, 128), (1,)]
cpu = [nn.Parameter(torch.randn(*s, dtype=torch.float64) * 0.1) for s in shapes]
gpu = [nn.Parameter(p.detach().to("cuda", torch.float32)) for p in cpu]
ref = ClippyAdagrad(cpu, foreach=False, fused=False, **kw)
opt = ClippyAdagrad(gpu, **kw)
worst = 0.0
for step in range(20):
    for p, q in zip(cpu, gpu):
        g = torch.randn(p.shape, dtype=torch.float64) * (10.0 if step % 7 == 0 else 0.01)
        p.grad, q.grad = g, g.to("cuda", torch.float32)
    ref.step()
    opt.step()
    for p, q in zip(cpu, gpu):
        d = (q.detach().double().cpu() - p.detach()).abs().max() / p.detach().abs().max()
        worst = max(worst, float(d))
print(f"paths {opt.implementation()}; largest relative difference {worst:.2e}")
assert worst < 1e-4, worst
EOF
    row "Clippy on GPU = exact CPU step" "passed" "$(tail -n 1 "$out/clippy_equal.log")"
else
    row "Clippy on GPU = exact CPU step" "FAILED" "see clippy_equal.log: $(tail -n 1 "$out/clippy_equal.log")"
    status=1
fi

# 3. optimizer benchmark on the GPU
if timeout 150 python benchmarks/bench_optimizer.py --device cuda --steps 30 >"$out/bench_optimizer.log" 2>&1; then
    line() { grep -F "| $1" "$out/bench_optimizer.log" | head -n 1 | awk -F'|' '{gsub(/ +/," "); print $3 "(x" $4 ")"}'; }
    row "optimizer step, SharedBottom parameters" "ran" \
        "Clippy default $(line 'ClippyAdagrad default'); torch fused AdaGrad $(line 'torch Adagrad fused=True'); fused Adam $(line 'torch Adam fused=True') (ratio to fused AdaGrad)"
    row "sparse 1M x 128 table" "ran" "$(grep -F 'faster than the dense step' "$out/bench_optimizer.log" | tr '\n' ';')"
else
    row "optimizer benchmark" "FAILED" "see bench_optimizer.log: $(tail -n 1 "$out/bench_optimizer.log")"
    status=1
fi

# 4. one epoch of the app on the GPU
run="$out/train_gpu"
if timeout 180 python train.py trainer=gpu trainer.max_epochs=1 logger=none \
    callbacks.progress_bar.refresh_rate=0 paths.output_dir="$run" hydra.run.dir="$run" \
    >"$out/train_gpu.log" 2>&1; then
    row "python train.py trainer=gpu, 1 epoch" "completed" "$(python - "$run/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
t = m.get("test") or {}
path = m.get("optimizer_path")
path = path.get("dense") if isinstance(path, dict) else path
print(f"{m.get('samples_per_s') or 0:,.0f} samples/s, precision {m.get('precision')}, "
      f"Clippy path {path}, test AUC {t.get('auc_click', float('nan')):.4f} / "
      f"{t.get('auc_conversion', float('nan')):.4f}")
EOF
)"
else
    row "python train.py trainer=gpu, 1 epoch" "FAILED" "see train_gpu.log: $(tail -n 1 "$out/train_gpu.log")"
    status=1
fi

{
    echo "gpu_check on $gpu ($(python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))"
    echo
    echo "| check | outcome | figures |"
    echo "|---|---|---|"
    printf '%s\n' "${rows[@]}"
} | tee "$summary"
exit "$status"

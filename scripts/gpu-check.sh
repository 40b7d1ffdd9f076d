#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, its driver and PyTorch with CUDA (whose
# nvidia-* wheels carry cuDNN, cuBLAS and NCCL) but without Debian's -dev packages or internet:
# runs the gpu-labelled tests (test_cuda: every CUDA op and whole ResNet-50/152 training steps
# against the CPU engine, the trainer on one GPU against the CPU with checkpoints and resume;
# test_nccl) and the one-GPU benchmark against PyTorch from gpu-bundle/
# (made beforehand by scripts/gpu-bundle.sh on a Debian machine), and writes one report,
# $OUT/gpu-report.md (or ./gpu-report.md). At most 8 minutes (timeouts 200 + 60 + 180 + 45 s
# after the test binaries start; expected about 5). The benchmark prints its rows as it goes, so
# a timeout keeps the ones measured.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x gpu-bundle/bin/test_cuda ] || { echo "gpu-check: gpu-bundle/ is missing: run scripts/gpu-bundle.sh first"; exit 1; }
report=${OUT:-.}/gpu-report.md
py=$(command -v python3)
nv=$("$py" -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
libs=""
[ -n "$nv" ] && libs=$(ls -d "$nv"/*/lib 2>/dev/null | tr '\n' ':')
export LD_LIBRARY_PATH="$PWD/gpu-bundle/lib:${libs}${LD_LIBRARY_PATH:-}"
export DPTRAIN_BIN="$PWD/gpu-bundle/bin/dptrain"  # for test_cuda's trainer test
{
  echo "# dptrain GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  echo
  echo "## test_cuda"
  echo '```'
  timeout 200 gpu-bundle/bin/test_cuda 2>&1 | tail -60
  echo '```'
  echo "## test_nccl"
  echo '```'
  timeout 60 gpu-bundle/bin/test_nccl 2>&1 | tail -30
  echo '```'
  echo "## benchmark: ResNet-152 training step, fp32, tf32, fp16 and bf16; DataParallel"
  timeout 180 "$py" benchmarks/gpu_step.py --binary gpu-bundle/bin/bench_gpu --model resnet152 \
    --batch 64 --steps 15 2>&1
  echo
  echo "## the whole trainer on cuda:0: loader (8 workers, pinned batches) + fp16 steps"
  echo '```'
  timeout 45 "$DPTRAIN_BIN" train --model resnet152 --stem imagenet --data synthetic \
    --synthetic-size 1920 --image-size 224 --batch-size 64 --max-steps 30 --workers 8 \
    --devices cuda:0 --precision fp16 --json 2>&1 | tail -2
  echo '```'
} 2>&1 | tee "$report"
status=0
grep -q "FAILED\|Traceback\|error:" "$report" && status=1
grep -q "SKIPPED \]" "$report" && { echo "gpu-check: some GPU tests were skipped (see why above)"; status=1; }
echo "gpu-check: report in $report (status $status)"
exit $status

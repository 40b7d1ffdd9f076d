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
# cuDNN 9, cuBLAS 13 and NCCL 2: wherever PyTorch's wheels put them (nvidia/<lib>/lib,
# nvidia/cu13/lib, torch/lib), else the toolkit's. cuDNN loads its engine libraries from its own
# directory.
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
libs=$(find "$site/nvidia" "$site/torch/lib" /usr/local/cuda/lib64 /usr/local/cuda/lib \
  -maxdepth 3 \( -name libcudnn.so.9 -o -name libcublas.so.13 -o -name libcublasLt.so.13 \
  -o -name libnccl.so.2 \) -printf '%h\n' 2>/dev/null | awk '!seen[$0]++' | tr '\n' ':')
export LD_LIBRARY_PATH="$PWD/gpu-bundle/lib:${libs}${LD_LIBRARY_PATH:-}"
missing=$(ldd gpu-bundle/bin/* 2>&1 | grep "not found" | sort -u)
IFS=: read -ra dirs <<<"$libs"
for l in libcudnn.so.9 libcublas.so.13 libnccl.so.2; do
  found=0
  for d in "${dirs[@]}"; do [ -e "$d/$l" ] && found=1; done
  ((found)) || missing+=$'\n'"$l not found under $site/nvidia, $site/torch/lib or /usr/local/cuda"
done
export DPTRAIN_BIN="$PWD/gpu-bundle/bin/dptrain"  # for test_cuda's trainer test
{
  echo "# dptrain GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  echo
  echo "libraries from: ${libs:-nowhere}"
  if [ -n "$(echo "$missing" | tr -d '[:space:]')" ]; then
    echo "error: the bundle cannot start here:$missing"
    exit 1
  fi
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

#!/usr/bin/env bash
# Builds the GPU tests and the GPU benchmark on this Debian machine (CUDA toolkit, cuDNN and NCCL
# under /usr/local/cuda, no GPU needed) and packs them into gpu-bundle/ with the shared libraries
# a CUDA + PyTorch image lacks (Debian's OpenMPI, HDF5, libgomp, ...). The CUDA libraries
# themselves (cuDNN 9, cuBLAS 13, NCCL 2) are not packed: scripts/gpu-check.sh takes them from
# the GPU machine's PyTorch (its nvidia-* wheels). Then, on the GPU machine:
#
#   bash scripts/gpu-check.sh          # tests + benchmark, report in gpu-report.md (or $OUT/)
set -euo pipefail
cd "$(dirname "$0")/.."
# Portable code (no -march=native): the GPU machine's CPU is not this one.
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DDPTRAIN_NATIVE=OFF >/dev/null
cmake --build build-gpu --target test_cuda test_nccl bench_gpu dptrain
rm -rf gpu-bundle
mkdir -p gpu-bundle/bin gpu-bundle/lib
cp build-gpu/tests/test_cuda build-gpu/tests/test_nccl build-gpu/benchmarks/bench_gpu build-gpu/dptrain \
  gpu-bundle/bin/
for b in gpu-bundle/bin/*; do
  ldd "$b" | awk '/=> \// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so* | libm.so* | libpthread* | libdl.so* | librt.so* | ld-linux* | libgcc_s* | libstdc++*) ;;
      libcuda.so* | libcudnn* | libcublas* | libnccl* | libcudart*) ;;
      *) cp -n "$lib" gpu-bundle/lib/ ;;
    esac
  done
done
du -sh gpu-bundle

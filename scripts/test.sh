#!/usr/bin/env bash
# Builds dptrain (installing missing Debian packages) and runs the whole test suite with CTest,
# then the loaders of untrusted bytes (checkpoints, .pth, safetensors, IDX, images, CIFAR) again
# under AddressSanitizer + UndefinedBehaviorSanitizer in build-asan/, the data loader under
# ThreadSanitizer in build-tsan/, and the GPU tests on the CPU CUDA emulator in build-emu/
# (tests/cuda_emu, docs/cuda-emulator.md).
# Extra arguments go to ctest, e.g. `scripts/test.sh -L fast` or `-E Parity` (and skip the
# sanitizer run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== CTest, at ${SECONDS} s (set-up and build done)"
ctest --test-dir build --output-on-failure --timeout 600 "$@"
(($#)) && exit 0

echo "== sanitizer run (AddressSanitizer + UndefinedBehaviorSanitizer), at ${SECONDS} s"
# -O1, as the sanitizers' documentation advises: half the -O3 build time, the tests 15% slower.
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE="-O1 -DNDEBUG" \
  -DDPTRAIN_SANITIZE=address -DDPTRAIN_CUDA=OFF -DDPTRAIN_BENCHMARKS=OFF >/dev/null
cmake --build build-asan --target test_interop test_interop_oracle test_fuzz_corpus test_data \
  test_checkpoint test_images test_core test_models
export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
build-asan/tests/test_interop --gtest_brief=1
build-asan/tests/test_interop_oracle --gtest_brief=1 \
  --gtest_filter='InteropHostile.*:InteropViews.*:InteropSafetensors.*'
build-asan/tests/test_fuzz_corpus --gtest_brief=1
build-asan/tests/test_data --gtest_brief=1
build-asan/tests/test_images --gtest_brief=1 --gtest_filter='-*TrainingResumes*:*Mpi*'
build-asan/tests/test_checkpoint --gtest_brief=1 \
  --gtest_filter='*RoundTrip*:*Corrupt*:*FailedSaves*:*DiskFull*:*Strictness*:*Streamed*:*Version*'
build-asan/tests/test_core --gtest_brief=1  # the caching allocator's logic among others
build-asan/tests/test_models --gtest_brief=1 --gtest_filter='MixedPrecision.*'

echo "== ThreadSanitizer run of the data loader (worker pool, prefetch, sharding), at ${SECONDS} s"
cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=Release -DDPTRAIN_SANITIZE=thread \
  -DDPTRAIN_CUDA=OFF -DDPTRAIN_BENCHMARKS=OFF >/dev/null
cmake --build build-tsan --target test_data
# One OpenMP thread: Debian's libgomp is not instrumented. A report fails the run (exit 66).
OMP_NUM_THREADS=1 TSAN_OPTIONS=halt_on_error=1 build-tsan/tests/test_data --gtest_brief=1

echo "== CUDA emulator, at ${SECONDS} s: the gpu-labelled tests on 2 emulated GPUs (kernels/cuda"
echo "   and the cuDNN, cuBLAS and NCCL calls run on the CPU; docs/cuda-emulator.md)"
if [ -z "$(find build -name 'conv.cu.o' -print -quit)" ]; then
  echo "skipped: this build found no CUDA toolkit with cuDNN (see the CMake output above)"
  exit 0
fi
cmake -S . -B build-emu -G Ninja -DCMAKE_BUILD_TYPE=Release -DDPTRAIN_CUDA_EMULATE=ON >/dev/null
cmake --build build-emu --target test_cuda test_nccl bench_gpu
# Not here, for time (docs/cuda-emulator.md says how to run every test there, about 8 minutes more):
# the trainer tests (they need the tree's dptrain), the ResNet-152 step (ResNet-50's has the same
# kernels), and one NCCL DataParallel case that AcrossGpus covers.
export DPT_CUDA_EMU_DEVICES=2
build-emu/tests/test_cuda --gtest_brief=1 --gtest_filter='-Cuda.Trainer*:Cuda.Resnet152*'
build-emu/tests/test_nccl --gtest_brief=1 --gtest_filter='-NcclDataParallel.OneGpu*'
# The GPU benchmark's code paths (16-bit NCHW, and channels-last with loss scaling and
# DataParallel), one small step each: it must run through (its figures mean nothing here).
build-emu/benchmarks/bench_gpu resnet18 1 1 bf16 nchw
build-emu/benchmarks/bench_gpu resnet18 2 1 fp16 dp
echo "== all passed in ${SECONDS} s"

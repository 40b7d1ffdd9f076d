// The CUDA emulator's view of device code (force-included, -include, into every kernels/cuda/*.cu
// compiled as C++ by a -DDPTRAIN_CUDA_EMULATE=ON build; see tests/cuda_emu/runtime.cpp and
// docs/cuda-emulator.md). The real CUDA headers declare the types (dim3, __half, __nv_bfloat16);
// this header turns the execution-space keywords into plain C++, gives kernels threadIdx,
// blockIdx, blockDim and gridDim from the emulated thread that runs them, and supplies
// __syncthreads, __shfl_down_sync and atomicAdd. tests/cuda_emu/rewrite.cmake has already turned
// each launch `k<<<grid, block, smem, stream>>>(args)` into `dpt_emu::launch(grid, block, smem,
// stream)([](auto... a) { k(a...); }, args)`, which deduces k's template arguments as nvcc does.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <functional>
#include <type_traits>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
// Blocks run one after another on one host thread, so a function's static is the block's shared
// memory.
#define __shared__ static
#define __forceinline__ inline

using std::isfinite;
using std::isinf;
using std::isnan;

namespace dpt_emu {

struct ThreadIds {
  dim3 thread, block, block_dim, grid_dim;
};
// The emulated thread that runs now.
const ThreadIds& ids();

// Runs body (a launch of kernel) once per thread of a grid x block launch, every thread with its
// own stack (a barrier suspends it until the others arrive). Errors of the launch (geometry or
// arguments out of CUDA's limits, a pointer argument outside the current device's memory, a
// barrier the block's threads disagree on) are returned by the next cudaGetLastError().
void run(dim3 grid, dim3 block, size_t arg_bytes, bool pointers_ok, const void* kernel,
         const std::function<void()>& body);

// Waits for every live thread of the block (kind 0) or of the calling thread's warp (kind 1).
void barrier(int kind);
// The calling thread's 8-byte slot in the warp's exchange area, and lane l's.
unsigned char* warp_slot(int lane);
int lane();

// For the emulated libraries: whether [p, p + bytes) lies inside one emulated device allocation;
// and work that the next cudaStreamSynchronize of `stream` runs (a wait for a collective).
bool device_range(const void* p, size_t bytes);
// Whether p points into memory of the calling thread's current device.
bool on_current_device(const void* p);
// How many convolutions ran with an algorithm a careful choice passes over (docs/cuda-emulator.md,
// cuDNN): a non-deterministic one, one over the workspace limit, one reported unsupported.
int cudnn_unwanted_runs();

// A launch's pointer arguments (null or into the current device's memory; a pointer passed
// inside a struct goes unchecked).
template <typename A>
bool pointer_ok(const A& a) {
  if constexpr (std::is_pointer_v<A>)
    return a == nullptr || on_current_device(a);
  else
    return true;
}
void on_synchronize(cudaStream_t stream, std::function<void()> wait);

template <typename... A>
constexpr size_t bytes_of() {
  return (size_t(0) + ... + sizeof(A));
}

struct Launch {
  dim3 grid, block;
  template <typename K, typename... A>
  void operator()(K kernel, A... args) const {
    static const char key = 0;  // one per kernel and argument types
    run(grid, block, bytes_of<A...>(), (pointer_ok(args) && ...), &key, [&] { kernel(args...); });
  }
};
inline Launch launch(dim3 grid, dim3 block, size_t = 0, cudaStream_t = nullptr) {
  return {grid, block};
}

}  // namespace dpt_emu

#define threadIdx (::dpt_emu::ids().thread)
#define blockIdx (::dpt_emu::ids().block)
#define blockDim (::dpt_emu::ids().block_dim)
#define gridDim (::dpt_emu::ids().grid_dim)
#define warpSize 32

inline void __syncthreads() {
  dpt_emu::barrier(0);
}

template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  std::memcpy(dpt_emu::warp_slot(dpt_emu::lane()), &v, sizeof(T));
  dpt_emu::barrier(1);
  const int lane = dpt_emu::lane(), src = lane + int(delta);
  T r = v;
  if (src / width == lane / width && src < 32) std::memcpy(&r, dpt_emu::warp_slot(src), sizeof(T));
  dpt_emu::barrier(1);
  return r;
}

// One emulated thread runs at a time: atomics are plain read-modify-writes.
template <typename T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}

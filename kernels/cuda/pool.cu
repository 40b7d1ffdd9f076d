// CUDA max pooling and global average pooling (math in kernels/pool.h). Max pooling picks the
// first maximal element of each window (NaN wins), as the CPU engine and PyTorch do; its
// backward overwrites dx, each element the sum of the dy of the windows whose argmax it is, taken
// in the windows' order as the CPU engine adds them (a gather: no atomics, so the same bits on
// every run, and the CPU's in float32; in float32, then rounded once for a 16-bit dx). The
// activations are float32 or 16-bit, NCHW or channels-last (max pool: x, y, dy, dx of one dtype and
// layout; average pool: x and dx, its y and dy float32 [N, C]).
#include "kernels/cuda/common.h"
#include "kernels/pool.h"

namespace dpt::cuda {
namespace {

// Output element o of a max pool and where its window reads: the input offset of its (n, c)
// plane, the step between the plane's columns (1 in NCHW, C channels-last) and the output row
// and column.
struct Window {
  int64_t base, step, i, j;
};
__device__ Window window_of(int64_t o, int64_t C, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                            bool last) {
  if (!last) {
    const int64_t q = o / (Ho * Wo), ij = o % (Ho * Wo);  // q = n*C + c
    return {q * H * W, 1, ij / Wo, ij % Wo};
  }
  const int64_t c = o % C, r = o / C, n = r / (Ho * Wo), ij = r % (Ho * Wo);
  return {n * H * W * C + c, C, ij / Wo, ij % Wo};
}

// The offset (from the window's base) of the first maximal element of the window (NaN wins).
template <typename T>
__device__ int64_t window_argmax(const T* x, const Window& win, int64_t H, int64_t W,
                                 PoolParams p) {
  float best = 0;
  int64_t arg = -1;
  for (int a = 0; a < p.kernel; ++a) {
    const int64_t h = win.i * p.stride - p.pad + a;
    if (h < 0 || h >= H) continue;
    for (int b = 0; b < p.kernel; ++b) {
      const int64_t w = win.j * p.stride - p.pad + b;
      if (w < 0 || w >= W) continue;
      const float v = ld(x[win.base + (h * W + w) * win.step]);
      if (arg < 0 || v > best || v != v) best = v, arg = (h * W + w) * win.step;
    }
  }
  return arg;
}

template <typename T>
__global__ void maxpool_fwd(const T* x, T* y, int64_t total, int64_t C, int64_t H, int64_t W,
                            int64_t Ho, int64_t Wo, bool last, PoolParams p) {
  for (int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; o < total;
       o += int64_t(gridDim.x) * blockDim.x) {
    const Window win = window_of(o, C, H, W, Ho, Wo, last);
    y[o] = x[win.base + window_argmax(x, win, H, W, p)];
  }
}

// A thread per input element e: the windows (i, j) that hold it, row by row.
template <typename T>
__global__ void maxpool_bwd(const T* dy, const T* x, T* dx, int64_t total, int64_t C, int64_t H,
                            int64_t W, int64_t Ho, int64_t Wo, bool last, PoolParams p) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    // e's plane (its input and output offsets and the step between columns) and position.
    const int64_t hw = last ? e / C % (H * W) : e % (H * W), step = last ? C : 1;
    const int64_t base = last ? e / C / (H * W) * H * W * C + e % C : e / (H * W) * H * W;
    const int64_t out = last ? e / C / (H * W) * Ho * Wo * C + e % C : e / (H * W) * Ho * Wo;
    const int64_t h = hw / W, w = hw % W;
    const int64_t lo_i = h + p.pad - p.kernel + 1, lo_j = w + p.pad - p.kernel + 1;
    const int64_t i1 = (h + p.pad) / p.stride < Ho ? (h + p.pad) / p.stride : Ho - 1;
    const int64_t j1 = (w + p.pad) / p.stride < Wo ? (w + p.pad) / p.stride : Wo - 1;
    float s = 0;
    for (int64_t i = lo_i <= 0 ? 0 : (lo_i + p.stride - 1) / p.stride; i <= i1; ++i)
      for (int64_t j = lo_j <= 0 ? 0 : (lo_j + p.stride - 1) / p.stride; j <= j1; ++j)
        if (window_argmax(x, Window{base, step, i, j}, H, W, p) == hw * step)
          s += ld(dy[out + (i * Wo + j) * step]);
    dx[e] = st<T>(s);
  }
}

// NCHW: one warp per plane (grid-stride over planes, warp-uniform): y[q] = mean of its P values.
template <typename T>
__global__ void avgpool_fwd(const T* x, float* y, int64_t NC, int64_t P) {
  const int lane = threadIdx.x % 32;
  for (int64_t q = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; q < NC;
       q += int64_t(gridDim.x) * blockDim.x / 32) {
    float s = 0;
    for (int64_t i = lane; i < P; i += 32) s += ld(x[q * P + i]);
    for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) y[q] = s / float(P);
  }
}

// Channels-last: a thread per (n, c), adjacent threads on adjacent channels.
template <typename T>
__global__ void avgpool_fwd_last(const T* x, float* y, int64_t NC, int64_t C, int64_t P) {
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < NC;
       q += int64_t(gridDim.x) * blockDim.x) {
    const T* at = x + (q / C) * P * C + q % C;
    float s = 0;
    for (int64_t i = 0; i < P; ++i) s += ld(at[i * C]);
    y[q] = s / float(P);
  }
}

template <typename T>
__global__ void avgpool_bwd(const float* dy, T* dx, int64_t total, int64_t C, int64_t P,
                            bool last) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x)
    dx[i] = st<T>(dy[last ? (i / (P * C)) * C + i % C : i / P] / float(P));
}

}  // namespace

void maxpool2d_forward(const Tensor& x, Tensor& y, const PoolParams& p) {
  check_activations("maxpool2d_forward", {&x, &y});
  const int64_t total = y.numel();
  DPT_CUDA(cudaSetDevice(x.device().index));
  with_type(x.dtype(), [&](auto type) {
    using T = typename decltype(type)::type;
    maxpool_fwd<<<blocks_for(total), kThreads, 0, cudaStreamPerThread>>>(
        ptr<const T>(x), ptr<T>(y), total, x.dim(1), x.dim(2), x.dim(3), y.dim(2), y.dim(3),
        x.channels_last(), p);
  });
  check_launch("maxpool2d_forward");
}

void maxpool2d_backward(const Tensor& dy, const Tensor& x, Tensor& dx, const PoolParams& p) {
  check_activations("maxpool2d_backward", {&x, &dy, &dx});
  const int64_t total = dx.numel();
  DPT_CUDA(cudaSetDevice(x.device().index));
  with_type(x.dtype(), [&](auto type) {
    using T = typename decltype(type)::type;
    maxpool_bwd<<<blocks_for(total), kThreads, 0, cudaStreamPerThread>>>(
        ptr<const T>(dy), ptr<const T>(x), ptr<T>(dx), total, x.dim(1), x.dim(2), x.dim(3),
        dy.dim(2), dy.dim(3), x.channels_last(), p);
  });
  check_launch("maxpool2d_backward");
}

void global_avgpool_forward(const Tensor& x, Tensor& y) {
  check_activations("global_avgpool_forward", {&x});
  check_operands("global_avgpool_forward", {&y});
  const int64_t NC = x.dim(0) * x.dim(1), P = x.dim(2) * x.dim(3);
  DPT_CUDA(cudaSetDevice(x.device().index));
  with_type(x.dtype(), [&](auto type) {
    using T = typename decltype(type)::type;
    if (x.channels_last())
      avgpool_fwd_last<<<blocks_for(NC), kThreads, 0, cudaStreamPerThread>>>(
          ptr<const T>(x), y.data<float>(), NC, x.dim(1), P);
    else
      avgpool_fwd<<<blocks_for(NC * 32), kThreads, 0, cudaStreamPerThread>>>(
          ptr<const T>(x), y.data<float>(), NC, P);
  });
  check_launch("global_avgpool_forward");
}

void global_avgpool_backward(const Tensor& dy, Tensor& dx) {
  check_activations("global_avgpool_backward", {&dx});
  check_operands("global_avgpool_backward", {&dy});
  const int64_t total = dx.numel(), P = dx.dim(2) * dx.dim(3);
  DPT_CUDA(cudaSetDevice(dx.device().index));
  with_type(dx.dtype(), [&](auto type) {
    using T = typename decltype(type)::type;
    avgpool_bwd<<<blocks_for(total), kThreads, 0, cudaStreamPerThread>>>(
        dy.data<float>(), ptr<T>(dx), total, dx.dim(1), P, dx.channels_last());
  });
  check_launch("global_avgpool_backward");
}

}  // namespace dpt::cuda

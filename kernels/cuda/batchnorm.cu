// CUDA batch normalisation pieces (math in kernels/batchnorm.h), mirroring the CPU engine: the
// per-channel reductions accumulate in double, each channel split over up to 64 blocks whose
// partial sums a second kernel adds in a fixed order (deterministic; the variance in one pass over
// values shifted by the channel's first one), the elementwise parts a block row per plane. Outputs
// are overwritten. The activations (x, y, dy, dx) are float32 or 16-bit, all of one dtype;
// statistics and parameters float32.
#include <algorithm>

#include "kernels/batchnorm.h"
#include "kernels/cuda/common.h"

namespace dpt::cuda {
namespace {

struct Dims {
  int64_t N, C, P;
};
// The activations of one dtype, the statistics and parameters float32, all on x's device.
Dims dims(const char* op, std::initializer_list<const Tensor*> acts,
          std::initializer_list<const Tensor*> stats) {
  check_activations(op, acts);
  check_operands(op, stats);
  const Tensor& x = **acts.begin();
  DPT_ASSERT((*stats.begin())->device() == x.device(), op, ": operands on two devices");
  DPT_ASSERT(x.ndim() == 4 || x.ndim() == 2, "batchnorm expects NCHW or NC, got ",
             shape_str(x.shape()));
  return {x.dim(0), x.dim(1), x.ndim() == 4 ? x.dim(2) * x.dim(3) : 1};
}

constexpr int kReduceThreads = 256;

// Blocks per channel for the reductions: each takes the images n = s, s + S, ... of its channel
// (whole planes, read contiguously), at least about 16 values a thread, at most 64 slices (and
// no more than N), so that a layer with few channels still spreads over every SM.
int slices(const Dims& d) {
  const int64_t want = (d.N * d.P + 16 * kReduceThreads - 1) / (16 * kReduceThreads);
  return int(std::max<int64_t>(1, std::min<int64_t>({want, d.N, 64})));
}

// Per-channel partial sums in double, [C][S][2], from the slice kernels to the final ones.
Tensor partials(const Dims& d, int S, const Device& dev) {
  return Tensor({d.C * S * 2}, DType::I64, dev);  // 8-byte elements holding doubles
}

__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kReduceThreads / 2; s > 0; s /= 2) {
    if (int(threadIdx.x) < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const double r = shared[0];
  __syncthreads();
  return r;
}

// Calls f(value index) for every value of channel blockIdx.x in this block's slice blockIdx.y;
// the two sums the block's threads gather go to part[c][s]. Planes of at least a block's width
// are walked one by one; smaller ones (7x7 maps, NC inputs) as one run over the slice's images,
// so that the threads stay busy.
template <typename F>
__device__ void slice_sums(const Dims& d, double* part, F f) {
  __shared__ double shared[kReduceThreads];
  const int64_t c = blockIdx.x;
  double a = 0, b = 0;
  if (d.P >= kReduceThreads) {
    for (int64_t n = blockIdx.y; n < d.N; n += gridDim.y)
      for (int64_t p = threadIdx.x; p < d.P; p += kReduceThreads) f((n * d.C + c) * d.P + p, a, b);
  } else {
    const int64_t images = (d.N - blockIdx.y + gridDim.y - 1) / gridDim.y;  // n = y, y + S, ...
    for (int64_t j = threadIdx.x; j < images * d.P; j += kReduceThreads) {
      const int64_t n = blockIdx.y + (j / d.P) * gridDim.y;
      f((n * d.C + c) * d.P + j % d.P, a, b);
    }
  }
  a = block_sum(a, shared);
  b = block_sum(b, shared);
  if (threadIdx.x == 0) {
    part[(c * gridDim.y + blockIdx.y) * 2] = a;
    part[(c * gridDim.y + blockIdx.y) * 2 + 1] = b;
  }
}

// Sums of (x - k) and (x - k)^2, k being the channel's first value (0 if it is not finite): one
// pass, and shifted so that the variance E[(x-k)^2] - E[x-k]^2 keeps double's precision.
template <typename T>
__device__ double shift_of(const T* x, int64_t c, const Dims& d) {
  const double k = ld(x[c * d.P]);
  return isfinite(k) ? k : 0.0;
}

template <typename T>
__global__ void stats_slices(const T* x, double* part, Dims d) {
  const double k = shift_of(x, blockIdx.x, d);
  slice_sums(d, part, [&](int64_t i, double& a, double& b) {
    const double v = ld(x[i]) - k;
    a += v;
    b += v * v;
  });
}

template <typename T>
__global__ void stats_final(const T* x, const double* part, int S, float* mean, float* var,
                            Dims d) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d.C) return;
  double a = 0, b = 0;
  for (int s = 0; s < S; ++s) a += part[(c * S + s) * 2], b += part[(c * S + s) * 2 + 1];
  const double M = double(d.N * d.P), m = a / M;
  const double v = b / M - m * m;  // NaN and inf pass through, as on the CPU
  mean[c] = float(shift_of(x, c, d) + m);
  var[c] = float(v < 0 ? 0.0 : v);
}

// dy[i], or 0 where the fused forward's ReLU output relu_y (if any) is not positive.
template <typename T>
__device__ float grad_at(const T* dy, const T* relu_y, int64_t i) {
  return relu_y && !(ld(relu_y[i]) > 0) ? 0.0f : ld(dy[i]);
}

// Sums of dy and dy * (x - mean).
template <typename T>
__global__ void grad_slices(const T* dy, const T* relu_y, const T* x, const float* mean,
                            double* part, Dims d) {
  const double mu = mean[blockIdx.x];
  slice_sums(d, part, [&](int64_t i, double& a, double& b) {
    const double g = grad_at(dy, relu_y, i);
    a += g;
    b += g * (double(ld(x[i])) - mu);
  });
}

__global__ void grad_final(const double* part, int S, const float* var, float eps, float* sum_dy,
                           float* sum_dy_xhat, int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double a = 0, b = 0;
  for (int s = 0; s < S; ++s) a += part[(c * S + s) * 2], b += part[(c * S + s) * 2 + 1];
  sum_dy[c] = float(a);
  sum_dy_xhat[c] = float(b / sqrt(double(var[c]) + eps));
}

// The elementwise kernels: blockIdx.y walks the planes (n, c), blockIdx.x and the threads the
// plane's P values, so the channel is found once a plane and not once a value.
struct Grid {
  dim3 blocks, threads;
};
Grid plane_grid(const Dims& d) {
  const unsigned threads = unsigned(std::min<int64_t>(256, (d.P + 31) / 32 * 32));
  const int64_t across = std::min<int64_t>(64, (d.P + threads - 1) / threads);
  return {dim3(unsigned(across), unsigned(std::min<int64_t>(d.N * d.C, 65535))), dim3(threads)};
}

template <typename T>
__global__ void normalize(const T* x, const float* mean, const float* var, const float* gamma,
                          const float* beta, float eps, bool relu, T* y, Dims d) {
  for (int64_t q = blockIdx.y; q < d.N * d.C; q += gridDim.y) {
    const int64_t c = q % d.C;
    const float scale = gamma[c] / sqrtf(var[c] + eps), shift = beta[c] - mean[c] * scale;
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < d.P;
         p += int64_t(gridDim.x) * blockDim.x) {
      const float v = ld(x[q * d.P + p]) * scale + shift;
      y[q * d.P + p] = st<T>(relu && !(v > 0) ? 0.0f : v);
    }
  }
}

__global__ void running(float* rm, float* rv, int64_t* batches, const float* mean, const float* var,
                        int64_t C, double unbias, float m) {
  if (blockIdx.x == 0 && threadIdx.x == 0) ++*batches;
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C;
       c += int64_t(gridDim.x) * blockDim.x) {
    rm[c] = (1 - m) * rm[c] + m * mean[c];
    rv[c] = float((1 - m) * rv[c] + m * (var[c] * unbias));
  }
}

template <typename T>
__global__ void backward_data(const T* dy, const T* relu_y, const T* x, const float* mean,
                              const float* var, const float* gamma, const float* sum_dy,
                              const float* sum_dy_xhat, float eps, float count, T* dx, Dims d) {
  for (int64_t q = blockIdx.y; q < d.N * d.C; q += gridDim.y) {
    const int64_t c = q % d.C;
    const float invstd = 1.0f / sqrtf(var[c] + eps), mu = mean[c], k = gamma[c] * invstd;
    const float a = sum_dy[c] / count, b = sum_dy_xhat[c] / count;
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < d.P;
         p += int64_t(gridDim.x) * blockDim.x) {
      const int64_t i = q * d.P + p;
      dx[i] = st<T>(k * (grad_at(dy, relu_y, i) - a - (ld(x[i]) - mu) * invstd * b));
    }
  }
}

}  // namespace

void batchnorm_stats(const Tensor& x, Tensor& mean, Tensor& var) {
  const Dims d = dims("batchnorm_stats", {&x}, {&mean, &var});
  if (d.C == 0) return;
  DPT_CUDA(cudaSetDevice(x.device().index));
  if (d.N * d.P == 0) {  // no values: NaN statistics (all bits set), as the CPU's 0/0
    DPT_CUDA(cudaMemsetAsync(mean.raw(), 0xff, mean.nbytes(), cudaStreamPerThread));
    DPT_CUDA(cudaMemsetAsync(var.raw(), 0xff, var.nbytes(), cudaStreamPerThread));
    return;
  }
  const int S = slices(d);
  const Tensor part = partials(d, S, x.device());
  double* pp = static_cast<double*>(part.raw());
  with_type(x.dtype(), [&](auto type) {
    using T = typename decltype(type)::type;
    stats_slices<<<dim3(unsigned(d.C), unsigned(S)), kReduceThreads, 0, cudaStreamPerThread>>>(
        ptr<const T>(x), pp, d);
    stats_final<<<blocks_for(d.C), kThreads, 0, cudaStreamPerThread>>>(
        ptr<const T>(x), pp, S, mean.data<float>(), var.data<float>(), d);
  });
  check_launch("batchnorm_stats");
}

void batchnorm_forward(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& gamma,
                       const Tensor& beta, float eps, Tensor& y, bool relu) {
  const Dims d = dims("batchnorm_forward", {&x, &y}, {&mean, &var, &gamma, &beta});
  DPT_CUDA(cudaSetDevice(x.device().index));
  if (d.N * d.C * d.P == 0) return;
  const Grid g = plane_grid(d);
  with_type(x.dtype(), [&](auto type) {
    using T = typename decltype(type)::type;
    normalize<<<g.blocks, g.threads, 0, cudaStreamPerThread>>>(
        ptr<const T>(x), mean.data<float>(), var.data<float>(), gamma.data<float>(),
        beta.data<float>(), eps, relu, ptr<T>(y), d);
  });
  check_launch("batchnorm_forward");
}

void batchnorm_update_running(Tensor& running_mean, Tensor& running_var, Tensor& batches,
                              const Tensor& mean, const Tensor& var, int64_t count,
                              float momentum) {
  check_operands("batchnorm_update_running", {&running_mean, &running_var, &mean, &var});
  DPT_ASSERT(
      batches.dtype() == DType::I64 && batches.numel() == 1 && batches.device() == mean.device(),
      "batchnorm_update_running: batches must be an int64 scalar on ", mean.device().str());
  const double unbias = count > 1 ? double(count) / double(count - 1) : 1.0;
  DPT_CUDA(cudaSetDevice(running_mean.device().index));
  running<<<blocks_for(mean.numel()), kThreads, 0, cudaStreamPerThread>>>(
      running_mean.data<float>(), running_var.data<float>(), batches.data<int64_t>(),
      mean.data<float>(), var.data<float>(), mean.numel(), unbias, momentum);
  check_launch("batchnorm_update_running");
}

void batchnorm_backward_reduce(const Tensor& dy, const Tensor* relu_y, const Tensor& x,
                               const Tensor& mean, const Tensor& var, float eps, Tensor& sum_dy,
                               Tensor& sum_dy_xhat) {
  const Dims d = dims("batchnorm_backward_reduce", {&x, &dy, relu_y ? relu_y : &dy},
                      {&mean, &var, &sum_dy, &sum_dy_xhat});
  if (d.C == 0) return;
  DPT_CUDA(cudaSetDevice(x.device().index));
  const int S = slices(d);
  const Tensor part = partials(d, S, x.device());
  double* pp = static_cast<double*>(part.raw());
  if (d.N * d.P == 0) DPT_CUDA(cudaMemsetAsync(pp, 0, part.nbytes(), cudaStreamPerThread));
  with_type(x.dtype(), [&](auto type) {
    using T = typename decltype(type)::type;
    if (d.N * d.P > 0)
      grad_slices<<<dim3(unsigned(d.C), unsigned(S)), kReduceThreads, 0, cudaStreamPerThread>>>(
          ptr<const T>(dy), relu_y ? ptr<const T>(*relu_y) : nullptr, ptr<const T>(x),
          mean.data<float>(), pp, d);
  });
  grad_final<<<blocks_for(d.C), kThreads, 0, cudaStreamPerThread>>>(
      pp, S, var.data<float>(), eps, sum_dy.data<float>(), sum_dy_xhat.data<float>(), d.C);
  check_launch("batchnorm_backward_reduce");
}

void batchnorm_backward_data(const Tensor& dy, const Tensor* relu_y, const Tensor& x,
                             const Tensor& mean, const Tensor& var, const Tensor& gamma,
                             const Tensor& sum_dy, const Tensor& sum_dy_xhat, float eps,
                             int64_t count, Tensor& dx) {
  const Dims d = dims("batchnorm_backward_data", {&x, &dy, &dx, relu_y ? relu_y : &dy},
                      {&mean, &var, &gamma, &sum_dy, &sum_dy_xhat});
  DPT_CUDA(cudaSetDevice(x.device().index));
  if (d.N * d.C * d.P == 0) return;
  const Grid g = plane_grid(d);
  with_type(x.dtype(), [&](auto type) {
    using T = typename decltype(type)::type;
    backward_data<<<g.blocks, g.threads, 0, cudaStreamPerThread>>>(
        ptr<const T>(dy), relu_y ? ptr<const T>(*relu_y) : nullptr, ptr<const T>(x),
        mean.data<float>(), var.data<float>(), gamma.data<float>(), sum_dy.data<float>(),
        sum_dy_xhat.data<float>(), eps, float(count), ptr<T>(dx), d);
  });
  check_launch("batchnorm_backward_data");
}

namespace {
__global__ void combine(const float* all, const int64_t* counts, int64_t k, int64_t C, float* mean,
                        float* var) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double total = 0, mu = 0, sq = 0;
  for (int64_t r = 0; r < k; ++r) {
    const float* q = all + r * 2 * C;
    const double n = double(counts[r]);
    total += n;
    mu += n * q[c];
    sq += n * (double(q[C + c]) + double(q[c]) * q[c]);
  }
  mu /= total;
  mean[c] = float(mu);
  var[c] = float(fmax(0.0, sq / total - mu * mu));
}
}  // namespace

void batchnorm_combine_stats(const Tensor& all, const Tensor& counts, Tensor& mean, Tensor& var) {
  check_operands("batchnorm_combine_stats", {&mean, &var, &all});
  const int64_t C = mean.numel(), k = counts.numel();
  DPT_ASSERT(all.numel() == 2 * C * k && var.numel() == C && counts.dtype() == DType::I64 &&
                 counts.device() == mean.device(),
             "batchnorm_combine_stats: shapes, or counts not int64 on ", mean.device().str());
  DPT_CUDA(cudaSetDevice(mean.device().index));
  combine<<<blocks_for(C), kThreads, 0, cudaStreamPerThread>>>(
      all.data<float>(), counts.data<int64_t>(), k, C, mean.data<float>(), var.data<float>());
  check_launch("batchnorm_combine_stats");
}

}  // namespace dpt::cuda

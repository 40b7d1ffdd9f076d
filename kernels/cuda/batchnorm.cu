// CUDA batch normalisation pieces (math in kernels/batchnorm.h), mirroring the CPU engine. The
// per-channel reductions accumulate in double, each channel split over several blocks whose
// partial sums a second kernel adds in a fixed order (deterministic); the variance takes one pass
// over values shifted by the channel's first one. NCHW: a block per (channel, slice of images);
// channels-last: a block per (32 adjacent channels, slice of rows). The elementwise parts walk
// planes (NCHW) or values (channels-last). Outputs are overwritten. The activations (x, y, dy,
// dx) are float32 or 16-bit, all of one dtype and memory format; statistics and parameters
// float32.
#include <algorithm>

#include "kernels/batchnorm.h"
#include "kernels/cuda/common.h"

namespace dpt::cuda {
namespace {

struct Dims {
  int64_t N, C, P;
  bool last;  // channels-last: value (m, c) of row m = n*P + p at m*C + c
};
// The activations of one dtype and layout, the statistics and parameters float32, all on x's
// device.
Dims dims(const char* op, std::initializer_list<const Tensor*> acts,
          std::initializer_list<const Tensor*> stats) {
  check_activations(op, acts);
  check_operands(op, stats);
  const Tensor& x = **acts.begin();
  DPT_ASSERT((*stats.begin())->device() == x.device(), op, ": operands on two devices");
  DPT_ASSERT(x.ndim() == 4 || x.ndim() == 2, "batchnorm expects NCHW or NC, got ",
             shape_str(x.shape()));
  return {x.dim(0), x.dim(1), x.ndim() == 4 ? x.dim(2) * x.dim(3) : 1, x.channels_last()};
}

constexpr int kReduceThreads = 256;
constexpr int kLastChannels = 32, kLastRows = 8;  // channels-last reduction blocks: 256 threads

// The reductions' launch: blocks (channels, slices) and threads. NCHW: a block per channel and
// slice, the slice taking images n = s, s + S, ... (whole planes), at most 64 slices and no more
// than N; channels-last: a block per 32 channels and slice of rows, at most 256 slices. Either
// way at least about 16 values a thread, so that a layer with few channels still fills the SMs.
struct Launch {
  dim3 blocks, threads;
  int S;
};
Launch reduction(const Dims& d) {
  const int64_t M = d.N * d.P;
  if (d.last) {
    const int64_t want = (M + 16 * kLastRows - 1) / (16 * kLastRows);
    const int S = int(std::clamp<int64_t>(want, 1, 256));
    return {dim3(unsigned((d.C + kLastChannels - 1) / kLastChannels), unsigned(S)),
            dim3(kLastChannels, kLastRows), S};
  }
  const int64_t want = (M + 16 * kReduceThreads - 1) / (16 * kReduceThreads);
  const int S = int(std::max<int64_t>(1, std::min<int64_t>({want, d.N, 64})));
  return {dim3(unsigned(d.C), unsigned(S)), dim3(kReduceThreads), S};
}

// Per-channel partial sums in double, [C][S][2], from the slice kernels to the final ones.
Tensor partials(const Dims& d, int S, const Device& dev) {
  return Tensor({d.C * S * 2}, DType::I64, dev);  // 8-byte elements holding doubles
}

// This thread's channel in a reduction block.
__device__ int64_t channel(const Dims& d) {
  return d.last ? int64_t(blockIdx.x) * kLastChannels + threadIdx.x : int64_t(blockIdx.x);
}

// Calls f(value index, a, b) for every value of this thread's channel in the block's slice, and
// writes the block's sums of a and b to part[c][s]. NCHW: planes of at least a block's width are
// walked one by one, smaller ones (7x7 maps, NC inputs) as one run over the slice's images so
// that the threads stay busy; channels-last: the 8 rows of threads step through the slice's rows.
template <typename F>
__device__ void slice_sums(const Dims& d, double* part, F f) {
  const int64_t c = channel(d);
  double a = 0, b = 0;
  if (d.last) {
    __shared__ double sa[kLastRows][kLastChannels], sb[kLastRows][kLastChannels];
    if (c < d.C)
      for (int64_t m = int64_t(blockIdx.y) * kLastRows + threadIdx.y; m < d.N * d.P;
           m += int64_t(gridDim.y) * kLastRows)
        f(m * d.C + c, a, b);
    sa[threadIdx.y][threadIdx.x] = a;
    sb[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y != 0 || c >= d.C) return;
    for (int r = 1; r < kLastRows; ++r) a += sa[r][threadIdx.x], b += sb[r][threadIdx.x];
  } else {
    __shared__ double shared[kReduceThreads];
    if (d.P >= kReduceThreads) {
      for (int64_t n = blockIdx.y; n < d.N; n += gridDim.y)
        for (int64_t p = threadIdx.x; p < d.P; p += kReduceThreads)
          f((n * d.C + c) * d.P + p, a, b);
    } else {
      const int64_t images = (d.N - blockIdx.y + gridDim.y - 1) / gridDim.y;  // n = y, y + S, ...
      for (int64_t j = threadIdx.x; j < images * d.P; j += kReduceThreads) {
        const int64_t n = blockIdx.y + (j / d.P) * gridDim.y;
        f((n * d.C + c) * d.P + j % d.P, a, b);
      }
    }
    for (double* v : {&a, &b}) {
      shared[threadIdx.x] = *v;
      __syncthreads();
      for (int s = kReduceThreads / 2; s > 0; s /= 2) {
        if (int(threadIdx.x) < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
      }
      *v = shared[0];
      __syncthreads();
    }
    if (threadIdx.x != 0) return;
  }
  part[(c * gridDim.y + blockIdx.y) * 2] = a;
  part[(c * gridDim.y + blockIdx.y) * 2 + 1] = b;
}

// The channel's first value (0 if it is not finite), the shift of the variance's one pass.
template <typename T>
__device__ double shift_of(const T* x, int64_t c, const Dims& d) {
  const double k = ld(x[d.last ? c : c * d.P]);
  return isfinite(k) ? k : 0.0;
}

// Sums of (x - k) and (x - k)^2, so that E[(x-k)^2] - E[x-k]^2 keeps double's precision.
template <typename T>
__global__ void stats_slices(const T* x, double* part, Dims d) {
  const int64_t c = channel(d);
  const double k = c < d.C ? shift_of(x, c, d) : 0.0;
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
  const int64_t c = channel(d);
  const double mu = c < d.C ? mean[c] : 0.0;
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

// The elementwise kernels call f(value index, channel) for every value. NCHW: blockIdx.y walks
// the planes (n, c), blockIdx.x and the threads the plane's values, so the channel is found once
// a plane; channels-last: a grid-stride loop over the values, the channel being i % C.
struct Grid {
  dim3 blocks, threads;
};
Grid elementwise_grid(const Dims& d) {
  if (d.last) return {dim3(blocks_for(d.N * d.C * d.P)), dim3(kThreads)};
  const unsigned threads = unsigned(std::min<int64_t>(256, (d.P + 31) / 32 * 32));
  const int64_t across = std::min<int64_t>(64, (d.P + threads - 1) / threads);
  return {dim3(unsigned(across), unsigned(std::min<int64_t>(d.N * d.C, 65535))), dim3(threads)};
}
template <typename F>
__device__ void for_each_value(const Dims& d, F f) {
  if (d.last) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < d.N * d.C * d.P;
         i += int64_t(gridDim.x) * blockDim.x)
      f(i, i % d.C);
    return;
  }
  for (int64_t q = blockIdx.y; q < d.N * d.C; q += gridDim.y)
    for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < d.P;
         p += int64_t(gridDim.x) * blockDim.x)
      f(q * d.P + p, q % d.C);
}

// The elementwise parts' per-channel coefficients, computed once a call: forward k[0..C) the
// scale, k[C..2C) the shift; backward gamma * invstd, invstd, mean, sum_dy / M, sum_dy_xhat / M.
__global__ void forward_coefs(const float* mean, const float* var, const float* gamma,
                              const float* beta, float eps, float* k, int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const float scale = gamma[c] / sqrtf(var[c] + eps);
  k[c] = scale;
  k[C + c] = beta[c] - mean[c] * scale;
}
__global__ void backward_coefs(const float* mean, const float* var, const float* gamma,
                               const float* sum_dy, const float* sum_dy_xhat, float eps,
                               float count, float* k, int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const float invstd = 1.0f / sqrtf(var[c] + eps);
  k[c] = gamma[c] * invstd;
  k[C + c] = invstd;
  k[2 * C + c] = mean[c];
  k[3 * C + c] = sum_dy[c] / count;
  k[4 * C + c] = sum_dy_xhat[c] / count;
}

template <typename T>
__global__ void normalize(const T* x, const float* k, bool relu, T* y, Dims d) {
  for_each_value(d, [&](int64_t i, int64_t c) {
    const float v = ld(x[i]) * k[c] + k[d.C + c];
    y[i] = st<T>(relu && !(v > 0) ? 0.0f : v);
  });
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
__global__ void backward_data(const T* dy, const T* relu_y, const T* x, const float* k, T* dx,
                              Dims d) {
  const int64_t C = d.C;
  for_each_value(d, [&](int64_t i, int64_t c) {
    dx[i] = st<T>(k[c] * (grad_at(dy, relu_y, i) - k[3 * C + c] -
                          (ld(x[i]) - k[2 * C + c]) * k[C + c] * k[4 * C + c]));
  });
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
  const Launch l = reduction(d);
  const Tensor part = partials(d, l.S, x.device());
  double* pp = static_cast<double*>(part.raw());
  with_type(x.dtype(), [&](auto type) {
    using T = typename decltype(type)::type;
    stats_slices<<<l.blocks, l.threads, 0, cudaStreamPerThread>>>(ptr<const T>(x), pp, d);
    stats_final<<<blocks_for(d.C), kThreads, 0, cudaStreamPerThread>>>(
        ptr<const T>(x), pp, l.S, mean.data<float>(), var.data<float>(), d);
  });
  check_launch("batchnorm_stats");
}

void batchnorm_forward(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& gamma,
                       const Tensor& beta, float eps, Tensor& y, bool relu) {
  const Dims d = dims("batchnorm_forward", {&x, &y}, {&mean, &var, &gamma, &beta});
  DPT_CUDA(cudaSetDevice(x.device().index));
  if (d.N * d.C * d.P == 0) return;
  const Grid g = elementwise_grid(d);
  Tensor k({2 * d.C}, DType::F32, x.device());
  forward_coefs<<<blocks_for(d.C), kThreads, 0, cudaStreamPerThread>>>(
      mean.data<float>(), var.data<float>(), gamma.data<float>(), beta.data<float>(), eps,
      k.data<float>(), d.C);
  with_type(x.dtype(), [&](auto type) {
    using T = typename decltype(type)::type;
    normalize<<<g.blocks, g.threads, 0, cudaStreamPerThread>>>(ptr<const T>(x), k.data<float>(),
                                                               relu, ptr<T>(y), d);
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
  const Launch l = reduction(d);
  const Tensor part = partials(d, l.S, x.device());
  double* pp = static_cast<double*>(part.raw());
  if (d.N * d.P == 0) DPT_CUDA(cudaMemsetAsync(pp, 0, part.nbytes(), cudaStreamPerThread));
  with_type(x.dtype(), [&](auto type) {
    using T = typename decltype(type)::type;
    if (d.N * d.P > 0)
      grad_slices<<<l.blocks, l.threads, 0, cudaStreamPerThread>>>(
          ptr<const T>(dy), relu_y ? ptr<const T>(*relu_y) : nullptr, ptr<const T>(x),
          mean.data<float>(), pp, d);
  });
  grad_final<<<blocks_for(d.C), kThreads, 0, cudaStreamPerThread>>>(
      pp, l.S, var.data<float>(), eps, sum_dy.data<float>(), sum_dy_xhat.data<float>(), d.C);
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
  const Grid g = elementwise_grid(d);
  Tensor k({5 * d.C}, DType::F32, x.device());
  backward_coefs<<<blocks_for(d.C), kThreads, 0, cudaStreamPerThread>>>(
      mean.data<float>(), var.data<float>(), gamma.data<float>(), sum_dy.data<float>(),
      sum_dy_xhat.data<float>(), eps, float(count), k.data<float>(), d.C);
  with_type(x.dtype(), [&](auto type) {
    using T = typename decltype(type)::type;
    backward_data<<<g.blocks, g.threads, 0, cudaStreamPerThread>>>(
        ptr<const T>(dy), relu_y ? ptr<const T>(*relu_y) : nullptr, ptr<const T>(x),
        k.data<float>(), ptr<T>(dx), d);
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

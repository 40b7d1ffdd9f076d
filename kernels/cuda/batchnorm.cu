// CUDA batch normalisation pieces (math in kernels/batchnorm.h), mirroring the CPU engine: the
// per-channel reductions run one block per channel and accumulate in double (two passes for the
// variance), the elementwise parts one thread per value. Outputs are overwritten.
#include "kernels/batchnorm.h"
#include "kernels/cuda/common.h"

namespace dpt::cuda {
namespace {

struct Dims {
  int64_t N, C, P;
};
Dims dims(const Tensor& x) {
  check_f32_cuda(x, "batchnorm x");
  DPT_ASSERT(x.ndim() == 4 || x.ndim() == 2, "batchnorm expects NCHW or NC, got ",
             shape_str(x.shape()));
  return {x.dim(0), x.dim(1), x.ndim() == 4 ? x.dim(2) * x.dim(3) : 1};
}

constexpr int kReduceThreads = 256;

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

__global__ void stats(const float* x, float* mean, float* var, Dims d) {
  __shared__ double shared[kReduceThreads];
  const int64_t c = blockIdx.x, M = d.N * d.P;
  double s = 0;
  for (int64_t k = threadIdx.x; k < M; k += kReduceThreads)
    s += x[((k / d.P) * d.C + c) * d.P + k % d.P];
  const double mu = block_sum(s, shared) / double(M);
  double q = 0;
  for (int64_t k = threadIdx.x; k < M; k += kReduceThreads) {
    const double v = x[((k / d.P) * d.C + c) * d.P + k % d.P] - mu;
    q += v * v;
  }
  q = block_sum(q, shared);
  if (threadIdx.x == 0) {
    mean[c] = float(mu);
    var[c] = float(q / double(M));
  }
}

__global__ void normalize(const float* x, const float* mean, const float* var, const float* gamma,
                          const float* beta, float eps, float* y, Dims d) {
  const int64_t total = d.N * d.C * d.P;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (i / d.P) % d.C;
    const float scale = gamma[c] / sqrtf(var[c] + eps);
    y[i] = x[i] * scale + (beta[c] - mean[c] * scale);
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

__global__ void backward_reduce(const float* dy, const float* x, const float* mean,
                                const float* var, float eps, float* sum_dy, float* sum_dy_xhat,
                                Dims d) {
  __shared__ double shared[kReduceThreads];
  const int64_t c = blockIdx.x, M = d.N * d.P;
  const double mu = mean[c], invstd = 1.0 / sqrt(double(var[c]) + eps);
  double s = 0, sx = 0;
  for (int64_t k = threadIdx.x; k < M; k += kReduceThreads) {
    const int64_t i = ((k / d.P) * d.C + c) * d.P + k % d.P;
    s += dy[i];
    sx += double(dy[i]) * (double(x[i]) - mu);
  }
  s = block_sum(s, shared);
  sx = block_sum(sx, shared);
  if (threadIdx.x == 0) {
    sum_dy[c] = float(s);
    sum_dy_xhat[c] = float(sx * invstd);
  }
}

__global__ void backward_data(const float* dy, const float* x, const float* mean, const float* var,
                              const float* gamma, const float* sum_dy, const float* sum_dy_xhat,
                              float eps, float count, float* dx, Dims d) {
  const int64_t total = d.N * d.C * d.P;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (i / d.P) % d.C;
    const float invstd = 1.0f / sqrtf(var[c] + eps);
    const float a = sum_dy[c] / count, b = sum_dy_xhat[c] / count;
    dx[i] = gamma[c] * invstd * (dy[i] - a - (x[i] - mean[c]) * invstd * b);
  }
}

}  // namespace

void batchnorm_stats(const Tensor& x, Tensor& mean, Tensor& var) {
  const Dims d = dims(x);
  check_operands("batchnorm_stats", {&x, &mean, &var});
  DPT_CUDA(cudaSetDevice(x.device().index));
  stats<<<unsigned(d.C), kReduceThreads, 0, cudaStreamPerThread>>>(
      x.data<float>(), mean.data<float>(), var.data<float>(), d);
  check_launch("batchnorm_stats");
}

void batchnorm_forward(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& gamma,
                       const Tensor& beta, float eps, Tensor& y) {
  const Dims d = dims(x);
  check_operands("batchnorm_forward", {&x, &mean, &var, &gamma, &beta, &y});
  DPT_CUDA(cudaSetDevice(x.device().index));
  normalize<<<blocks_for(d.N * d.C * d.P), kThreads, 0, cudaStreamPerThread>>>(
      x.data<float>(), mean.data<float>(), var.data<float>(), gamma.data<float>(),
      beta.data<float>(), eps, y.data<float>(), d);
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

void batchnorm_backward_reduce(const Tensor& dy, const Tensor& x, const Tensor& mean,
                               const Tensor& var, float eps, Tensor& sum_dy, Tensor& sum_dy_xhat) {
  const Dims d = dims(x);
  check_operands("batchnorm_backward_reduce", {&x, &dy, &mean, &var, &sum_dy, &sum_dy_xhat});
  DPT_CUDA(cudaSetDevice(x.device().index));
  backward_reduce<<<unsigned(d.C), kReduceThreads, 0, cudaStreamPerThread>>>(
      dy.data<float>(), x.data<float>(), mean.data<float>(), var.data<float>(), eps,
      sum_dy.data<float>(), sum_dy_xhat.data<float>(), d);
  check_launch("batchnorm_backward_reduce");
}

void batchnorm_backward_data(const Tensor& dy, const Tensor& x, const Tensor& mean,
                             const Tensor& var, const Tensor& gamma, const Tensor& sum_dy,
                             const Tensor& sum_dy_xhat, float eps, int64_t count, Tensor& dx) {
  const Dims d = dims(x);
  check_operands("batchnorm_backward_data",
                 {&x, &dy, &mean, &var, &gamma, &sum_dy, &sum_dy_xhat, &dx});
  DPT_CUDA(cudaSetDevice(x.device().index));
  backward_data<<<blocks_for(d.N * d.C * d.P), kThreads, 0, cudaStreamPerThread>>>(
      dy.data<float>(), x.data<float>(), mean.data<float>(), var.data<float>(), gamma.data<float>(),
      sum_dy.data<float>(), sum_dy_xhat.data<float>(), eps, float(count), dx.data<float>(), d);
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

// CUDA softmax cross-entropy (math in kernels/loss.h): one block per row, log-sum-exp in double
// as on the CPU; the per-row losses and hits are summed on the host after one copy.
#include <cmath>
#include <vector>

#include "kernels/cuda/common.h"
#include "kernels/loss.h"

namespace dpt::cuda {
namespace {

constexpr int kRowThreads = 128;

// Block-wide reduction of v (max or sum) over kRowThreads threads.
template <bool is_max>
__device__ double block_reduce(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kRowThreads / 2; s > 0; s /= 2) {
    if (int(threadIdx.x) < s) {
      const double o = shared[threadIdx.x + s];
      shared[threadIdx.x] =
          is_max ? (o > shared[threadIdx.x] ? o : shared[threadIdx.x]) : shared[threadIdx.x] + o;
    }
    __syncthreads();
  }
  const double r = shared[0];
  __syncthreads();
  return r;
}

// row_loss[n] = lse - z[t]; row_hit[n] = argmax == t (first maximum, as on the CPU);
// dz = scale * (softmax - onehot) / N when dz is given.
__global__ void xent(const float* z, const int64_t* t, int64_t N, int64_t K, float scale, float* dz,
                     double* row_loss, int* row_hit) {
  __shared__ double shared[kRowThreads];
  __shared__ int64_t arg_shared[kRowThreads];
  const int64_t n = blockIdx.x;
  const float* row = z + n * K;
  // argmax (first index of the maximum; as on the CPU, a NaN only wins first in its row)
  int64_t arg = -1;
  float best = 0;
  for (int64_t k = threadIdx.x; k < K; k += kRowThreads)
    if ((arg < 0 && (k == 0 || row[k] == row[k])) || row[k] > best) best = row[k], arg = k;
  arg_shared[threadIdx.x] = arg;
  shared[threadIdx.x] = arg < 0 ? -1e300 : double(best);
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t a = -1;
    double b = 0;
    for (int i = 0; i < kRowThreads; ++i) {
      const int64_t ai = arg_shared[i];
      if (ai < 0) continue;
      const double bi = shared[i];
      if (a < 0 || bi > b || (bi == b && ai < a)) a = ai, b = bi;
    }
    arg_shared[0] = a;
  }
  __syncthreads();
  const int64_t am = arg_shared[0];
  const double m = row[am];
  __syncthreads();
  double s = 0;
  for (int64_t k = threadIdx.x; k < K; k += kRowThreads) s += exp(double(row[k]) - m);
  const double lse = log(block_reduce<false>(s, shared)) + m;
  const int64_t target = t[n];
  if (threadIdx.x == 0) {
    row_loss[n] = lse - row[target];
    row_hit[n] = am == target;
  }
  if (dz)
    for (int64_t k = threadIdx.x; k < K; k += kRowThreads)
      dz[n * K + k] = float(scale * (exp(double(row[k]) - lse) - (k == target)) / double(N));
}

}  // namespace

float softmax_cross_entropy(const Tensor& logits, const Tensor& targets, Tensor* dlogits,
                            float scale, int64_t* correct) {
  check_f32_cuda(logits, "logits");
  DPT_ASSERT(logits.ndim() == 2 && targets.dtype() == DType::I64 &&
                 targets.numel() == logits.dim(0) && targets.device() == logits.device(),
             "cross entropy: logits ", shape_str(logits.shape()), " vs targets ",
             shape_str(targets.shape()));
  const int64_t N = logits.dim(0), K = logits.dim(1);
  if (N == 0) {  // as the CPU engine: a mean over no rows
    if (correct) *correct = 0;
    return std::nanf("");
  }
  if (dlogits) check_operands("softmax_cross_entropy", {&logits, dlogits});
  const Tensor host_t = targets.to(Device::cpu());  // labels are checked before any kernel
  for (int64_t n = 0; n < N; ++n) {
    const int64_t v = host_t.data<int64_t>()[n];
    DPT_CHECK(v >= 0 && v < K, ConfigError, "label ", v, " at batch row ", n, " is outside [0, ", K,
              "): does --num-classes match the data?");
  }
  DPT_CUDA(cudaSetDevice(logits.device().index));
  Tensor rows({N * 3}, DType::F32, logits.device());  // N doubles of loss + N ints of hits
  double* row_loss = reinterpret_cast<double*>(rows.data<float>());
  int* row_hit = reinterpret_cast<int*>(row_loss + N);
  xent<<<unsigned(N), kRowThreads, 0, cudaStreamPerThread>>>(
      logits.data<float>(), targets.data<int64_t>(), N, K, scale,
      dlogits ? dlogits->data<float>() : nullptr, row_loss, row_hit);
  check_launch("softmax_cross_entropy");
  std::vector<double> loss(static_cast<size_t>(N));
  std::vector<int> hit(static_cast<size_t>(N));
  DPT_CUDA(cudaMemcpyAsync(loss.data(), row_loss, size_t(N) * sizeof(double),
                           cudaMemcpyDeviceToHost, cudaStreamPerThread));
  DPT_CUDA(cudaMemcpyAsync(hit.data(), row_hit, size_t(N) * sizeof(int), cudaMemcpyDeviceToHost,
                           cudaStreamPerThread));
  DPT_CUDA(cudaStreamSynchronize(cudaStreamPerThread));
  double total = 0;
  int64_t hits = 0;
  for (int64_t n = 0; n < N; ++n) total += loss[size_t(n)], hits += hit[size_t(n)];
  if (correct) *correct = hits;
  return float(total / double(N));
}

}  // namespace dpt::cuda

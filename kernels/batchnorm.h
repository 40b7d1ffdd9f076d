// Batch normalisation over (N, H, W) per channel of an NCHW tensor, split into pieces so that
// SyncBatchNorm can all-reduce the per-channel statistics between the pieces.
//
//   forward:   y = (x - mean) / sqrt(var + eps) * gamma + beta, then y = max(y, 0) with relu
//              (the ReLU that follows most batch norms in ResNet, fused: one pass fewer)
//   stats:     mean and biased var over the M = N*H*W values of each channel (training mode)
//   running:   rm = (1-m) rm + m mean;  rv = (1-m) rv + m var * M/(M-1);  batches += 1
//              (PyTorch's rule; batches is num_batches_tracked, an int64 scalar)
//   backward:  with xhat = (x - mean) * invstd, sum_dy = sum dy, sum_dy_xhat = sum dy * xhat,
//              dx = gamma * invstd * (dy - (sum_dy + xhat * sum_dy_xhat) / M);
//              with relu_y (the fused forward's output) dy is taken as dy * [relu_y > 0]
//   combine:   all holds k rows of 2C values, row r the mean then the biased var of n_r values
//              per channel, counts[r] (int64, on the same device) being n_r or any multiple of it
//              common to all rows; mean and var become those of the union of the k sets
//              (SyncBatchNorm; in double: sum n_r m_r / N, sum n_r (v_r + m_r^2) / N - mean^2)
// Outputs are overwritten; dgamma (+= sum_dy_xhat) and dbeta (+= sum_dy) are accumulated by the
// module, not here. The activations x, y, dy and dx share one dtype: float32, or float16 /
// bfloat16 in fp16 and bf16 training (math in float32, and double for the sums, rounded to
// nearest even as stored); statistics, parameters and sums are float32.
#pragma once

#include "core/tensor.h"
#include "kernels/dispatch.h"

namespace dpt {

// Declared once, for the CPU engine and for the CUDA backend.
#define DPT_BATCHNORM_KERNELS                                                                      \
  void batchnorm_stats(const Tensor& x, Tensor& mean, Tensor& var);                                \
  void batchnorm_forward(const Tensor& x, const Tensor& mean, const Tensor& var,                   \
                         const Tensor& gamma, const Tensor& beta, float eps, Tensor& y,            \
                         bool relu);                                                               \
  void batchnorm_update_running(Tensor& running_mean, Tensor& running_var, Tensor& batches,        \
                                const Tensor& mean, const Tensor& var, int64_t count,              \
                                float momentum);                                                   \
  void batchnorm_backward_reduce(const Tensor& dy, const Tensor* relu_y, const Tensor& x,          \
                                 const Tensor& mean, const Tensor& var, float eps, Tensor& sum_dy, \
                                 Tensor& sum_dy_xhat);                                             \
  void batchnorm_backward_data(const Tensor& dy, const Tensor* relu_y, const Tensor& x,            \
                               const Tensor& mean, const Tensor& var, const Tensor& gamma,         \
                               const Tensor& sum_dy, const Tensor& sum_dy_xhat, float eps,         \
                               int64_t count, Tensor& dx);                                         \
  void batchnorm_combine_stats(const Tensor& all, const Tensor& counts, Tensor& mean, Tensor& var);
namespace cpu {
DPT_BATCHNORM_KERNELS
}  // namespace cpu
namespace cuda {
DPT_BATCHNORM_KERNELS
}  // namespace cuda

inline void batchnorm_stats(const Tensor& x, Tensor& mean, Tensor& var) {
  DPT_ON_DEVICE(x.device(), batchnorm_stats, x, mean, var);
}
inline void batchnorm_forward(const Tensor& x, const Tensor& mean, const Tensor& var,
                              const Tensor& gamma, const Tensor& beta, float eps, Tensor& y,
                              bool relu = false) {
  DPT_ON_DEVICE(x.device(), batchnorm_forward, x, mean, var, gamma, beta, eps, y, relu);
}
inline void batchnorm_update_running(Tensor& running_mean, Tensor& running_var, Tensor& batches,
                                     const Tensor& mean, const Tensor& var, int64_t count,
                                     float momentum) {
  DPT_ON_DEVICE(mean.device(), batchnorm_update_running, running_mean, running_var, batches, mean,
                var, count, momentum);
}
// relu_y: the output of a forward with relu (its mask applies to dy), or null.
inline void batchnorm_backward_reduce(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                      const Tensor& var, float eps, Tensor& sum_dy,
                                      Tensor& sum_dy_xhat, const Tensor* relu_y = nullptr) {
  DPT_ON_DEVICE(x.device(), batchnorm_backward_reduce, dy, relu_y, x, mean, var, eps, sum_dy,
                sum_dy_xhat);
}
// count = M, the values per channel across all replicas.
inline void batchnorm_backward_data(const Tensor& dy, const Tensor& x, const Tensor& mean,
                                    const Tensor& var, const Tensor& gamma, const Tensor& sum_dy,
                                    const Tensor& sum_dy_xhat, float eps, int64_t count, Tensor& dx,
                                    const Tensor* relu_y = nullptr) {
  DPT_ON_DEVICE(x.device(), batchnorm_backward_data, dy, relu_y, x, mean, var, gamma, sum_dy,
                sum_dy_xhat, eps, count, dx);
}

inline void batchnorm_combine_stats(const Tensor& all, const Tensor& counts, Tensor& mean,
                                    Tensor& var) {
  DPT_ON_DEVICE(mean.device(), batchnorm_combine_stats, all, counts, mean, var);
}

}  // namespace dpt

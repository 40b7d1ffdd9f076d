// Softmax cross-entropy with mean reduction over the batch (PyTorch's CrossEntropyLoss):
//
//   loss = (1/N) sum_n [ logsumexp(z[n,:]) - z[n, t_n] ]
//   dz[n,k] = scale * (softmax(z[n,:])_k - [k == t_n]) / N     (overwritten)
//
// `scale` lets DataParallel weight a replica's chunk by its share of the whole batch. Targets are
// int64 class indices; one outside [0, K) is a ConfigError naming it. Returns the mean loss and
// counts the rows whose argmax equals the target in *correct (when not null).
#pragma once

#include "core/tensor.h"
#include "kernels/dispatch.h"

namespace dpt {

// Declared once, for the CPU engine and for the CUDA backend.
#define DPT_LOSS_KERNELS                                                                    \
  float softmax_cross_entropy(const Tensor& logits, const Tensor& targets, Tensor* dlogits, \
                              float scale, int64_t* correct);
namespace cpu {
DPT_LOSS_KERNELS
}  // namespace cpu
namespace cuda {
DPT_LOSS_KERNELS
}  // namespace cuda

inline float softmax_cross_entropy(const Tensor& logits, const Tensor& targets, Tensor* dlogits,
                                   float scale = 1.0f, int64_t* correct = nullptr) {
  DPT_ASSERT(!dlogits || dlogits->shape() == logits.shape(), "softmax_cross_entropy: dlogits ",
             dlogits ? shape_str(dlogits->shape()) : "", " for logits ", shape_str(logits.shape()));
  DPT_ON_DEVICE(logits.device(), softmax_cross_entropy, logits, targets, dlogits, scale, correct);
}

}  // namespace dpt

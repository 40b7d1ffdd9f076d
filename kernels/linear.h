// Fully connected layer: y[n,o] = sum_i x[n,i] * w[o,i] + b[o]   (w is [out, in], as PyTorch).
//
// Forward overwrites y. Backward overwrites dx (skipped when dx is null) and ACCUMULATES into
// dw (+= dy^T x) and db (+= sum_n dy).
#pragma once

#include "core/tensor.h"
#include "kernels/dispatch.h"

namespace dpt {

// Declared once, for the CPU engine and for the CUDA backend.
#define DPT_LINEAR_KERNELS                                                                         \
  void linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y);               \
  void linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx, Tensor& dw, \
                       Tensor& db);
namespace cpu {
DPT_LINEAR_KERNELS
}  // namespace cpu
namespace cuda {
DPT_LINEAR_KERNELS
}  // namespace cuda

inline void linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y) {
  DPT_ON_DEVICE(x.device(), linear_forward, x, w, b, y);
}
inline void linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx,
                            Tensor& dw, Tensor& db) {
  DPT_ON_DEVICE(x.device(), linear_backward, dy, x, w, dx, dw, db);
}

}  // namespace dpt

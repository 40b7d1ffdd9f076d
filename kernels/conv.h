// 2-D convolution, NCHW, square kernels, no bias (ResNet's convs have none), groups = 1.
//
//   y[n,co,i,j] = sum_{ci,a,b} w[co,ci,a,b] * x[n,ci, i*s - p + a, j*s - p + b]   (zero padding)
//
// Forward overwrites y. Backward overwrites dx (skipped when dx is undefined, e.g. for the stem)
// and ACCUMULATES into dw, so parameter gradients sum over calls until zero_grad.
//
// tf32: the products take both operands rounded to TF32 (10 mantissa bits), sums stay float32,
// as tensor cores do on Ampere and later GPUs (cuDNN's default math); the CPU engine rounds
// copies of the operands the same way. Off: float32 products throughout (cuDNN's FMA math).
#pragma once

#include "core/tensor.h"
#include "kernels/dispatch.h"

namespace dpt {

struct Conv2dParams {
  int stride = 1;
  int pad = 0;
  bool tf32 = false;
};

inline int64_t conv_out_size(int64_t in, int64_t k, int stride, int pad) {
  return (in + 2 * pad - k) / stride + 1;
}

// Declared once, for the CPU engine and for the CUDA backend.
#define DPT_CONV_KERNELS                                                                           \
  void conv2d_forward(const Tensor& x, const Tensor& w, Tensor& y, const Conv2dParams& p);         \
  void conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx, Tensor& dw, \
                       const Conv2dParams& p);
namespace cpu {
DPT_CONV_KERNELS
}  // namespace cpu
namespace cuda {
DPT_CONV_KERNELS
}  // namespace cuda

inline void conv2d_forward(const Tensor& x, const Tensor& w, Tensor& y, const Conv2dParams& p) {
  DPT_ON_DEVICE(x.device(), conv2d_forward, x, w, y, p);
}
inline void conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx,
                            Tensor& dw, const Conv2dParams& p) {
  DPT_ON_DEVICE(x.device(), conv2d_backward, dy, x, w, dx, dw, p);
}

}  // namespace dpt

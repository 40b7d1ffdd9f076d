// 2-D convolution, NCHW, square kernels, no bias (ResNet's convs have none), groups = 1.
//
//   y[n,co,i,j] = sum_{ci,a,b} w[co,ci,a,b] * x[n,ci, i*s - p + a, j*s - p + b]   (zero padding)
//
// Forward overwrites y. Backward overwrites dx (skipped when dx is undefined, e.g. for the stem)
// and ACCUMULATES into dw, so parameter gradients sum over calls until zero_grad.
//
// precision (kernels/amp.h), as tensor cores compute:
//   FP32  float32 products and sums (cuDNN's FMA math);
//   TF32  the operands rounded to TF32 (10 mantissa bits), products exact, sums float32 (cuDNN's
//         default math on Ampere and later);
//   FP16, BF16  the operands rounded to that format, products exact, sums float32, and the
//         outputs (y, dx, and what is added to dw) rounded to it (cuDNN on 16-bit copies with
//         tensor-core math).
// The CPU engine rounds copies of the operands and the outputs the same way.
//
// x, y, dy and dx are float32, or stored in the 16-bit format of an FP16 / BF16 convolution (the
// activations of fp16 and bf16 training, Conv2d's output): the rounding above is then the
// storage. w and dw are float32 (master weights).
#pragma once

#include <map>
#include <string>

#include "core/tensor.h"
#include "kernels/amp.h"
#include "kernels/dispatch.h"

namespace dpt {

struct Conv2dParams {
  int stride = 1;
  int pad = 0;
  Precision precision = Precision::FP32;
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
// The cuDNN algorithms chosen so far in this process, for reports: "forward 1 tensor-op" (with
// " non-deterministic" where so) -> how many convolution plans (shape, precision, thread) use it.
std::map<std::string, int64_t> conv_algorithms_chosen();
}  // namespace cuda

inline void conv2d_forward(const Tensor& x, const Tensor& w, Tensor& y, const Conv2dParams& p) {
  DPT_ON_DEVICE(x.device(), conv2d_forward, x, w, y, p);
}
inline void conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx,
                            Tensor& dw, const Conv2dParams& p) {
  DPT_ON_DEVICE(x.device(), conv2d_backward, dy, x, w, dx, dw, p);
}

}  // namespace dpt

// Elementwise ops on tensors of equal numel and one dtype, all in place on their first argument.
// The dtype is float32, or float16 / bfloat16 for the activations of fp16 and bf16 training: the
// math then runs in float32 and the result is rounded to nearest even as it is stored.
//
//   relu_(x):           x = max(x, 0)
//   relu_backward_(g, y): g = g * [y > 0]      (y is the ReLU's output)
//   add_(y, x):         y = y + x              (residual add)
//   add_relu_(y, x):    y = max(y + x, 0)      (residual add fused with the block's last ReLU)
#pragma once

#include "core/tensor.h"
#include "kernels/dispatch.h"

namespace dpt {

// Declared once, for the CPU engine and for the CUDA backend.
#define DPT_ELEMENTWISE_KERNELS                    \
  void relu_(Tensor& x);                           \
  void relu_backward_(Tensor& g, const Tensor& y); \
  void add_(Tensor& y, const Tensor& x);           \
  void add_relu_(Tensor& y, const Tensor& x);

namespace cpu {
DPT_ELEMENTWISE_KERNELS
}  // namespace cpu
namespace cuda {
DPT_ELEMENTWISE_KERNELS
}  // namespace cuda

inline void relu_(Tensor& x) {
  DPT_ON_DEVICE(x.device(), relu_, x);
}
inline void relu_backward_(Tensor& g, const Tensor& y) {
  DPT_ON_DEVICE(g.device(), relu_backward_, g, y);
}
inline void add_(Tensor& y, const Tensor& x) {
  DPT_ON_DEVICE(y.device(), add_, y, x);
}
inline void add_relu_(Tensor& y, const Tensor& x) {
  DPT_ON_DEVICE(y.device(), add_relu_, y, x);
}

}  // namespace dpt

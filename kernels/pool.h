// Pooling over NCHW tensors.
//
//   max pool (k, stride s, pad p; padding never wins): y[n,c,i,j] = max over the window;
//     backward routes dy to the first maximal element of each window, as PyTorch does.
//   global average pool (AdaptiveAvgPool2d(1)): y[n,c] = mean_{h,w} x[n,c,h,w];
//     backward spreads dy / (H*W) over the window.
// Backward outputs (dx) are overwritten. Max pooling's x, y, dy and dx share one dtype, average
// pooling's x and dx; float32, or float16 / bfloat16 in fp16 and bf16 training (math in float32,
// rounded as stored). Average pooling's y and dy are float32.
#pragma once

#include "core/tensor.h"
#include "kernels/dispatch.h"

namespace dpt {

struct PoolParams {
  int kernel = 3;
  int stride = 2;
  int pad = 1;
};

// Declared once, for the CPU engine and for the CUDA backend.
#define DPT_POOL_KERNELS                                                                       \
  void maxpool2d_forward(const Tensor& x, Tensor& y, const PoolParams& p);                     \
  void maxpool2d_backward(const Tensor& dy, const Tensor& x, Tensor& dx, const PoolParams& p); \
  void global_avgpool_forward(const Tensor& x, Tensor& y);                                     \
  void global_avgpool_backward(const Tensor& dy, Tensor& dx);
namespace cpu {
DPT_POOL_KERNELS
}  // namespace cpu
namespace cuda {
DPT_POOL_KERNELS
}  // namespace cuda

inline void maxpool2d_forward(const Tensor& x, Tensor& y, const PoolParams& p) {
  // A window of padding only would have no maximum (PyTorch refuses it the same way).
  DPT_ASSERT(p.pad <= p.kernel / 2, "max pool padding ", p.pad, " exceeds half the kernel ",
             p.kernel);
  DPT_ON_DEVICE(x.device(), maxpool2d_forward, x, y, p);
}
// x is the forward input: the argmax is recomputed instead of stored.
inline void maxpool2d_backward(const Tensor& dy, const Tensor& x, Tensor& dx, const PoolParams& p) {
  DPT_ON_DEVICE(x.device(), maxpool2d_backward, dy, x, dx, p);
}
inline void global_avgpool_forward(const Tensor& x, Tensor& y) {
  DPT_ON_DEVICE(x.device(), global_avgpool_forward, x, y);
}
inline void global_avgpool_backward(const Tensor& dy, Tensor& dx) {
  DPT_ON_DEVICE(dx.device(), global_avgpool_backward, dy, dx);
}

}  // namespace dpt

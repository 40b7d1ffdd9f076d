// SGD with PyTorch's exact update rule (torch.optim.SGD, dampening 0 or d):
//
//   g = grad + weight_decay * p
//   buf = g                                  on the first step
//   buf = momentum * buf + (1 - dampening) g  afterwards
//   g = g + momentum * buf  (Nesterov)  or  g = buf
//   p = p - lr * g
// Updates p and buf in place; grad is read only. One call steps a list of parameters (the CUDA
// engine in a few launches, up to kSgdSlotsPerLaunch tensors each: a multi-tensor update).
#pragma once

#include <vector>

#include "core/tensor.h"
#include "kernels/dispatch.h"

namespace dpt {

struct SgdParams {
  float lr = 0.1f;
  float momentum = 0.9f;
  float dampening = 0.0f;
  float weight_decay = 0.0f;
  bool nesterov = false;
};

#if defined(__CUDACC__)
#define DPT_HOST_DEVICE __host__ __device__
#else
#define DPT_HOST_DEVICE
#endif

// The update of one element, shared by both engines: returns the new p; buf (null without
// momentum) is updated in place.
DPT_HOST_DEVICE inline float sgd_update(float p, float grad, float* buf, const SgdParams& h,
                                        bool first_step) {
  float g = grad;
  if (h.weight_decay != 0) g += h.weight_decay * p;
  if (buf) {
    *buf = first_step ? g : h.momentum * *buf + (1 - h.dampening) * g;
    g = h.nesterov ? g + h.momentum * *buf : *buf;
  }
  return p - h.lr * g;
}

// One parameter of a step, all on one device: buf is null exactly when there is no momentum;
// first_step: buf has no history yet (meaningless without momentum).
struct SgdSlot {
  Tensor* p;
  const Tensor* grad;
  Tensor* buf;
  bool first_step;
};
inline constexpr int kSgdSlotsPerLaunch = 32;

// Declared once, for the CPU engine and for the CUDA backend.
#define DPT_OPTIM_KERNELS void sgd_step(const std::vector<SgdSlot>& slots, const SgdParams& h);
namespace cpu {
DPT_OPTIM_KERNELS
}  // namespace cpu
namespace cuda {
DPT_OPTIM_KERNELS
}  // namespace cuda

inline void sgd_step(const std::vector<SgdSlot>& slots, const SgdParams& h) {
  if (slots.empty()) return;
  DPT_ON_DEVICE(slots[0].p->device(), sgd_step, slots, h);
}

}  // namespace dpt

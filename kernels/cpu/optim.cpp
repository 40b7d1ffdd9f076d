// CPU SGD step with PyTorch's update rule (see kernels/optim.h); p and buf updated in place.
#include "kernels/optim.h"

#include "kernels/cpu/common.h"

namespace dpt::cpu {

void sgd_step(const std::vector<SgdSlot>& slots, const SgdParams& h) {
  for (const SgdSlot& s : slots) {
    check_f32_cpu(*s.p, "sgd parameter");
    DPT_ASSERT(s.grad->numel() == s.p->numel(), "sgd: grad shape");
    float* pp = s.p->data<float>();
    const float* gp = s.grad->data<float>();
    DPT_ASSERT((s.buf != nullptr) == (h.momentum != 0), "sgd: a momentum buffer without momentum");
    float* bp = s.buf ? s.buf->data<float>() : nullptr;
    const int64_t n = s.p->numel();
    const bool first = s.first_step;
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i)
      pp[i] = sgd_update(pp[i], gp[i], bp ? bp + i : nullptr, h, first);
  }
}

}  // namespace dpt::cpu

// CPU SGD step with PyTorch's update rule (see kernels/optim.h); p and buf updated in place.
#include "kernels/optim.h"

#include "kernels/cpu/common.h"

namespace dpt::cpu {

void sgd_step(Tensor& p, const Tensor& grad, Tensor& buf, const SgdParams& h, bool first_step) {
  check_f32_cpu(p, "sgd parameter");
  DPT_ASSERT(grad.numel() == p.numel(), "sgd: grad shape");
  float* pp = p.data<float>();
  const float* gp = grad.data<float>();
  float* bp = h.momentum != 0 ? buf.data<float>() : nullptr;
  const int64_t n = p.numel();
#pragma omp parallel for simd schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i)
    pp[i] = sgd_update(pp[i], gp[i], bp ? bp + i : nullptr, h, first_step);
}

}  // namespace dpt::cpu

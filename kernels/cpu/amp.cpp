// CPU mixed-precision helpers (math in kernels/amp.h): in place, split over threads.
#include "kernels/amp.h"

#include <cmath>

#include "kernels/cpu/common.h"

namespace dpt::cpu {

void round_(Tensor& x, DType t) {
  check_f32_cpu(x, "round_ operand");
  DPT_ASSERT(t == DType::F16 || t == DType::BF16, "round_ to ", dtype_name(t));
  float* p = x.data<float>();
  const int64_t n = x.numel();
  if (t == DType::F16) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) p[i] = f16_to_float(float_to_f16(p[i]));
  } else {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) p[i] = bf16_to_float(float_to_bf16(p[i]));
  }
}

void cast(const Tensor& src, Tensor& dst) {
  DPT_ASSERT(src.shape() == dst.shape() && src.device().is_cpu() && dst.device().is_cpu() &&
                 (src.dtype() == DType::F32) != (dst.dtype() == DType::F32),
             "cast from ", dtype_name(src.dtype()), " to ", dtype_name(dst.dtype()));
  dst.copy_from(src.to(dst.dtype()));  // Tensor::to rounds as round_ does
}

bool scale_check_(const std::vector<Tensor*>& ts, float factor) {
  bool bad = false;
  for (Tensor* t : ts) {
    check_f32_cpu(*t, "scale_check_ operand");
    float* p = t->data<float>();
    const int64_t n = t->numel();
    int found = 0;
#pragma omp parallel for simd schedule(static) reduction(| : found) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      found |= int(!std::isfinite(p[i]));
      p[i] *= factor;
    }
    bad = bad || found;
  }
  return bad;
}

}  // namespace dpt::cpu

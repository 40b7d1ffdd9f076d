// CPU elementwise ops (math in kernels/elementwise.h); all in place, split over threads; 16-bit
// operands are computed on in float32 and rounded back (on_float32).
#include "kernels/elementwise.h"

#include "kernels/cpu/common.h"

namespace dpt::cpu {

namespace {
template <typename F>
void each(Tensor& y, const Tensor* x, F f) {
  check_f32_cpu(y, "elementwise operand");
  DPT_ASSERT(!x || x->numel() == y.numel(), "elementwise: ", shape_str(y.shape()), " vs ",
             shape_str(x->shape()));
  float* yp = y.data<float>();
  const float* xp = x ? x->data<float>() : nullptr;
  const int64_t n = y.numel();
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) yp[i] = f(yp[i], xp ? xp[i] : 0.0f);
}
}  // namespace

void relu_(Tensor& x) {
  if (on_float32([](Tensor& f) { cpu::relu_(f); }, x)) return;
  each(x, nullptr, [](float v, float) { return v > 0 ? v : 0.0f; });
}
void relu_backward_(Tensor& g, const Tensor& y) {
  check_layouts("relu_backward_", {&g, &y});
  if (on_float32([](Tensor& gf, Tensor& yf) { cpu::relu_backward_(gf, yf); }, g, y)) return;
  each(g, &y, [](float gv, float yv) { return yv > 0 ? gv : 0.0f; });
}
void add_(Tensor& y, const Tensor& x) {
  check_layouts("add_", {&y, &x});
  if (on_float32([](Tensor& yf, Tensor& xf) { cpu::add_(yf, xf); }, y, x)) return;
  each(y, &x, [](float a, float b) { return a + b; });
}
void add_relu_(Tensor& y, const Tensor& x) {
  check_layouts("add_relu_", {&y, &x});
  if (on_float32([](Tensor& yf, Tensor& xf) { cpu::add_relu_(yf, xf); }, y, x)) return;
  each(y, &x, [](float a, float b) { return a + b > 0 ? a + b : 0.0f; });
}

}  // namespace dpt::cpu

// CPU max pooling and global average pooling (math in kernels/pool.h); 16-bit activations are
// computed on in float32 (on_float32).
#include "kernels/pool.h"

#include <cstring>
#include <limits>

#include "kernels/cpu/common.h"

namespace dpt::cpu {

namespace {
// Calls f(out_index, argmax_input_index) for every output element of plane (n, c).
template <typename F>
void for_each_window(const float* plane, int64_t H, int64_t W, int64_t Ho, int64_t Wo,
                     const PoolParams& p, F f) {
  for (int64_t i = 0; i < Ho; ++i) {
    for (int64_t j = 0; j < Wo; ++j) {
      float best = -std::numeric_limits<float>::infinity();
      int64_t arg = -1;
      for (int a = 0; a < p.kernel; ++a) {
        int64_t h = i * p.stride - p.pad + a;
        if (h < 0 || h >= H) continue;
        for (int b = 0; b < p.kernel; ++b) {
          int64_t w = j * p.stride - p.pad + b;
          if (w < 0 || w >= W) continue;
          float v = plane[h * W + w];
          if (arg < 0 || v > best || v != v) {
            best = v;
            arg = h * W + w;
          }
        }
      }
      f(i * Wo + j, arg);
    }
  }
}
}  // namespace

void maxpool2d_forward(const Tensor& x, Tensor& y, const PoolParams& p) {
  check_layouts("maxpool2d_forward", {&x, &y});
  if (on_float32([&](Tensor& xf, Tensor& yf) { cpu::maxpool2d_forward(xf, yf, p); }, x, y)) return;
  check_f32_cpu(x, "maxpool x");
  const int64_t NC = x.dim(0) * x.dim(1), H = x.dim(2), W = x.dim(3), Ho = y.dim(2), Wo = y.dim(3);
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
#pragma omp parallel for schedule(static) if (NC * H * W > kParallelMin)
  for (int64_t q = 0; q < NC; ++q) {
    const float* plane = xp + q * H * W;
    float* out = yp + q * Ho * Wo;
    for_each_window(plane, H, W, Ho, Wo, p, [&](int64_t o, int64_t arg) { out[o] = plane[arg]; });
  }
}

void maxpool2d_backward(const Tensor& dy, const Tensor& x, Tensor& dx, const PoolParams& p) {
  check_layouts("maxpool2d_backward", {&dy, &x, &dx});
  if (on_float32(
          [&](Tensor& dyf, Tensor& xf, Tensor& dxf) { cpu::maxpool2d_backward(dyf, xf, dxf, p); },
          dy, x, dx))
    return;
  const int64_t NC = x.dim(0) * x.dim(1), H = x.dim(2), W = x.dim(3), Ho = dy.dim(2),
                Wo = dy.dim(3);
  const float *xp = x.data<float>(), *gp = dy.data<float>();
  float* dxp = dx.data<float>();
#pragma omp parallel for schedule(static) if (NC * H * W > kParallelMin)
  for (int64_t q = 0; q < NC; ++q) {
    float* out = dxp + q * H * W;
    const float* g = gp + q * Ho * Wo;
    std::memset(out, 0, size_t(H * W) * 4);
    for_each_window(xp + q * H * W, H, W, Ho, Wo, p,
                    [&](int64_t o, int64_t arg) { out[arg] += g[o]; });
  }
}

void global_avgpool_forward(const Tensor& x, Tensor& y) {
  if (on_float32([](Tensor& xf, Tensor& yf) { cpu::global_avgpool_forward(xf, yf); }, x, y)) return;
  check_f32_cpu(x, "avgpool x");
  const int64_t NC = x.dim(0) * x.dim(1), P = x.dim(2) * x.dim(3);
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
#pragma omp parallel for schedule(static) if (NC * P > kParallelMin)
  for (int64_t q = 0; q < NC; ++q) {
    float s = 0;
    for (int64_t i = 0; i < P; ++i) s += xp[q * P + i];
    yp[q] = s / float(P);
  }
}

void global_avgpool_backward(const Tensor& dy, Tensor& dx) {
  if (on_float32([](Tensor& dyf, Tensor& dxf) { cpu::global_avgpool_backward(dyf, dxf); }, dy, dx))
    return;
  const int64_t NC = dx.dim(0) * dx.dim(1), P = dx.dim(2) * dx.dim(3);
  const float* gp = dy.data<float>();
  float* dxp = dx.data<float>();
#pragma omp parallel for schedule(static) if (NC * P > kParallelMin)
  for (int64_t q = 0; q < NC; ++q) {
    const float v = gp[q] / float(P);
    for (int64_t i = 0; i < P; ++i) dxp[q * P + i] = v;
  }
}

}  // namespace dpt::cpu

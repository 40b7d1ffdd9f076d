// CPU batch normalisation (math in kernels/batchnorm.h). Per-channel sums run in double so the
// statistics of large batches keep float32 accuracy; channels are spread over threads. 16-bit
// activations (x, y, dy, dx) are computed on in float32 (on_float32).
#include "kernels/batchnorm.h"

#include <algorithm>
#include <cmath>

#include "kernels/cpu/common.h"

namespace dpt::cpu {

namespace {
struct Dims {
  int64_t N, C, P;
};
Dims dims(const Tensor& x) {
  check_f32_cpu(x, "batchnorm x");
  DPT_ASSERT(x.ndim() == 4 || x.ndim() == 2, "batchnorm expects NCHW or NC, got ",
             shape_str(x.shape()));
  return {x.dim(0), x.dim(1), x.ndim() == 4 ? x.dim(2) * x.dim(3) : 1};
}
}  // namespace

void batchnorm_stats(const Tensor& x, Tensor& mean, Tensor& var) {
  if (on_float32([&](Tensor& xf) { cpu::batchnorm_stats(xf, mean, var); }, x)) return;
  Dims d = dims(x);
  const float* xp = x.data<float>();
  float *mp = mean.data<float>(), *vp = var.data<float>();
  const double M = double(d.N * d.P);
#pragma omp parallel for schedule(static) if (d.N * d.C * d.P > kParallelMin)
  for (int64_t c = 0; c < d.C; ++c) {
    double s = 0;
    for (int64_t n = 0; n < d.N; ++n) {
      const float* row = xp + (n * d.C + c) * d.P;
      for (int64_t p = 0; p < d.P; ++p) s += row[p];
    }
    const double mu = s / M;
    double q = 0;
    for (int64_t n = 0; n < d.N; ++n) {
      const float* row = xp + (n * d.C + c) * d.P;
      for (int64_t p = 0; p < d.P; ++p) q += (row[p] - mu) * (row[p] - mu);
    }
    mp[c] = float(mu);
    vp[c] = float(q / M);
  }
}

void batchnorm_forward(const Tensor& x, const Tensor& mean, const Tensor& var, const Tensor& gamma,
                       const Tensor& beta, float eps, Tensor& y, bool relu) {
  check_layouts("batchnorm_forward", {&x, &y});
  if (on_float32(
          [&](Tensor& xf, Tensor& yf) {
            cpu::batchnorm_forward(xf, mean, var, gamma, beta, eps, yf, relu);
          },
          x, y))
    return;
  Dims d = dims(x);
  const float *xp = x.data<float>(), *mp = mean.data<float>(), *vp = var.data<float>(),
              *gp = gamma.data<float>(), *bp = beta.data<float>();
  float* yp = y.data<float>();
#pragma omp parallel for collapse(2) schedule(static) if (d.N * d.C * d.P > kParallelMin)
  for (int64_t n = 0; n < d.N; ++n) {
    for (int64_t c = 0; c < d.C; ++c) {
      const float scale = gp[c] / std::sqrt(vp[c] + eps);
      const float shift = bp[c] - mp[c] * scale;
      const float* in = xp + (n * d.C + c) * d.P;
      float* out = yp + (n * d.C + c) * d.P;
      if (relu)
        for (int64_t p = 0; p < d.P; ++p) {
          const float v = in[p] * scale + shift;
          out[p] = v > 0 ? v : 0.0f;
        }
      else
        for (int64_t p = 0; p < d.P; ++p) out[p] = in[p] * scale + shift;
    }
  }
}

namespace {
// dy[p], or 0 where the fused forward's ReLU output ry (if any) is not positive.
inline float grad_at(const float* g, const float* ry, int64_t p) {
  return ry && !(ry[p] > 0) ? 0.0f : g[p];
}
}  // namespace

void batchnorm_update_running(Tensor& running_mean, Tensor& running_var, Tensor& batches,
                              const Tensor& mean, const Tensor& var, int64_t count,
                              float momentum) {
  float *rm = running_mean.data<float>(), *rv = running_var.data<float>();
  const float *mp = mean.data<float>(), *vp = var.data<float>();
  const double unbias = count > 1 ? double(count) / double(count - 1) : 1.0;
  for (int64_t c = 0; c < mean.numel(); ++c) {
    rm[c] = (1 - momentum) * rm[c] + momentum * mp[c];
    rv[c] = float((1 - momentum) * rv[c] + momentum * (vp[c] * unbias));
  }
  ++batches.data<int64_t>()[0];
}

void batchnorm_backward_reduce(const Tensor& dy, const Tensor* relu_y, const Tensor& x,
                               const Tensor& mean, const Tensor& var, float eps, Tensor& sum_dy,
                               Tensor& sum_dy_xhat) {
  check_layouts("batchnorm_backward_reduce", {&dy, &x});
  if (relu_y && on_float32(
                    [&](Tensor& dyf, Tensor& yf, Tensor& xf) {
                      cpu::batchnorm_backward_reduce(dyf, &yf, xf, mean, var, eps, sum_dy,
                                                     sum_dy_xhat);
                    },
                    dy, *relu_y, x))
    return;
  if (!relu_y && on_float32(
                     [&](Tensor& dyf, Tensor& xf) {
                       cpu::batchnorm_backward_reduce(dyf, nullptr, xf, mean, var, eps, sum_dy,
                                                      sum_dy_xhat);
                     },
                     dy, x))
    return;
  Dims d = dims(x);
  const float *gp = dy.data<float>(), *xp = x.data<float>(), *mp = mean.data<float>(),
              *vp = var.data<float>();
  const float* yp = relu_y ? relu_y->data<float>() : nullptr;
  float *sd = sum_dy.data<float>(), *sdx = sum_dy_xhat.data<float>();
#pragma omp parallel for schedule(static) if (d.N * d.C * d.P > kParallelMin)
  for (int64_t c = 0; c < d.C; ++c) {
    const double mu = mp[c], invstd = 1.0 / std::sqrt(double(vp[c]) + eps);
    double s = 0, sx = 0;
    for (int64_t n = 0; n < d.N; ++n) {
      const float* g = gp + (n * d.C + c) * d.P;
      const float* ry = yp ? yp + (n * d.C + c) * d.P : nullptr;
      const float* xr = xp + (n * d.C + c) * d.P;
      for (int64_t p = 0; p < d.P; ++p) {
        const float gv = grad_at(g, ry, p);
        s += gv;
        sx += gv * (xr[p] - mu);
      }
    }
    sd[c] = float(s);
    sdx[c] = float(sx * invstd);
  }
}

void batchnorm_backward_data(const Tensor& dy, const Tensor* relu_y, const Tensor& x,
                             const Tensor& mean, const Tensor& var, const Tensor& gamma,
                             const Tensor& sum_dy, const Tensor& sum_dy_xhat, float eps,
                             int64_t count, Tensor& dx) {
  check_layouts("batchnorm_backward_data", {&dy, &x, &dx});
  if (relu_y && on_float32(
                    [&](Tensor& dyf, Tensor& yf, Tensor& xf, Tensor& dxf) {
                      cpu::batchnorm_backward_data(dyf, &yf, xf, mean, var, gamma, sum_dy,
                                                   sum_dy_xhat, eps, count, dxf);
                    },
                    dy, *relu_y, x, dx))
    return;
  if (!relu_y && on_float32(
                     [&](Tensor& dyf, Tensor& xf, Tensor& dxf) {
                       cpu::batchnorm_backward_data(dyf, nullptr, xf, mean, var, gamma, sum_dy,
                                                    sum_dy_xhat, eps, count, dxf);
                     },
                     dy, x, dx))
    return;
  Dims d = dims(x);
  const float *gp = dy.data<float>(), *xp = x.data<float>(), *mp = mean.data<float>(),
              *vp = var.data<float>(), *gam = gamma.data<float>(), *sd = sum_dy.data<float>(),
              *sdx = sum_dy_xhat.data<float>();
  const float* yp = relu_y ? relu_y->data<float>() : nullptr;
  float* dxp = dx.data<float>();
#pragma omp parallel for collapse(2) schedule(static) if (d.N * d.C * d.P > kParallelMin)
  for (int64_t n = 0; n < d.N; ++n) {
    for (int64_t c = 0; c < d.C; ++c) {
      const float invstd = 1.0f / std::sqrt(vp[c] + eps);
      const float k = gam[c] * invstd;
      const float* g = gp + (n * d.C + c) * d.P;
      const float* ry = yp ? yp + (n * d.C + c) * d.P : nullptr;
      const float* xr = xp + (n * d.C + c) * d.P;
      float* out = dxp + (n * d.C + c) * d.P;
      const float a = sd[c] / float(count), b = sdx[c] / float(count), mu = mp[c];
      for (int64_t p = 0; p < d.P; ++p)
        out[p] = k * (grad_at(g, ry, p) - a - (xr[p] - mu) * invstd * b);
    }
  }
}

void batchnorm_combine_stats(const Tensor& all, const Tensor& counts, Tensor& mean, Tensor& var) {
  const int64_t C = mean.numel(), k = counts.numel();
  check_f32_cpu(all, "batchnorm_combine_stats all");
  DPT_ASSERT(all.numel() == 2 * C * k && var.numel() == C && counts.device().is_cpu(),
             "batchnorm_combine_stats: shapes");
  const float* a = all.data<float>();
  const int64_t* n_of = counts.data<int64_t>();
  float *m = mean.data<float>(), *v = var.data<float>();
  double total = 0;
  for (int64_t r = 0; r < k; ++r) total += double(n_of[r]);
  for (int64_t c = 0; c < C; ++c) {
    double mu = 0, sq = 0;
    for (int64_t r = 0; r < k; ++r) {
      const float* q = a + r * 2 * C;
      const double n = double(n_of[r]);
      mu += n * q[c];
      sq += n * (double(q[C + c]) + double(q[c]) * q[c]);
    }
    mu /= total;
    m[c] = float(mu);
    v[c] = float(std::max(0.0, sq / total - mu * mu));
  }
}

}  // namespace dpt::cpu

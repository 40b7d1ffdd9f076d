// CPU convolution as one GEMM over the whole batch (see kernels/conv.h for the math).
//
// The input is unfolded (im2col) into col[K, N*P] with K = Cin*k*k and P = Ho*Wo, so that
//   forward:          Y[Cout, N*P]  = W[Cout, K] * col
//   backward-filter:  dW[Cout, K]  += dY[Cout, N*P] * col^T       (accumulated)
//   backward-data:    dcol[K, N*P]  = W^T * dY, folded back (col2im) into dx (overwritten)
// One batch-wide GEMM keeps Eigen's kernels busy even where a single image's P is tiny (ResNet's
// last stage on 28x28 inputs has P = 1); measured no slower than one GEMM per image on 56x56
// maps. 1x1 stride-1 convolutions skip the unfolding.
#include "kernels/conv.h"

#include <algorithm>
#include <cstring>

#include "kernels/cpu/common.h"
#include "kernels/elementwise.h"

namespace dpt::cpu {

namespace {

struct Geometry {
  int64_t N, Cin, H, W, Cout, k, Ho, Wo, P, K;
  int s, p;
  bool pointwise() const { return k == 1 && s == 1 && p == 0; }
};

Geometry geometry(const Tensor& x, const Tensor& w, const Conv2dParams& prm) {
  DPT_ASSERT(x.ndim() == 4 && w.ndim() == 4 && w.dim(1) == x.dim(1) && w.dim(2) == w.dim(3),
             "conv2d: x ", shape_str(x.shape()), " does not fit weight ", shape_str(w.shape()));
  Geometry g{};
  g.N = x.dim(0), g.Cin = x.dim(1), g.H = x.dim(2), g.W = x.dim(3);
  g.Cout = w.dim(0), g.k = w.dim(2), g.s = prm.stride, g.p = prm.pad;
  g.Ho = conv_out_size(g.H, g.k, g.s, g.p), g.Wo = conv_out_size(g.W, g.k, g.s, g.p);
  DPT_CHECK(g.Ho > 0 && g.Wo > 0, ConfigError, "conv2d: input ", g.H, "x", g.W,
            " is too small for a ", g.k, "x", g.k, " kernel with stride ", g.s);
  g.P = g.Ho * g.Wo;
  g.K = g.Cin * g.k * g.k;
  return g;
}

// Output columns j whose input column j*s - p + b lies inside [0, W): [lo, hi).
struct ColRange {
  int64_t lo, hi;
};
ColRange valid_cols(const Geometry& g, int64_t b) {
  const int64_t off = g.p - b;  // input column = j*s - off
  int64_t lo = off > 0 ? (off + g.s - 1) / g.s : 0;
  int64_t hi = (g.W - 1 + off) >= 0 ? (g.W - 1 + off) / g.s + 1 : 0;
  lo = std::min(lo, g.Wo);
  hi = std::max(lo, std::min(hi, g.Wo));
  return {lo, hi};
}

// col[(ci*k + a)*k + b][n*P + i*Wo + j] = x[n, ci, i*s - p + a, j*s - p + b] (0 outside).
void im2col(const float* x, const Geometry& g, float* col) {
  const int64_t NP = g.N * g.P;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t r = 0; r < g.K; ++r) {
    for (int64_t n = 0; n < g.N; ++n) {
      const int64_t ci = r / (g.k * g.k), a = (r / g.k) % g.k, b = r % g.k;
      const ColRange c = valid_cols(g, b);
      const float* plane = x + (n * g.Cin + ci) * g.H * g.W;
      float* out = col + r * NP + n * g.P;
      for (int64_t i = 0; i < g.Ho; ++i) {
        const int64_t h = i * g.s - g.p + a;
        float* row = out + i * g.Wo;
        if (h < 0 || h >= g.H) {
          std::memset(row, 0, size_t(g.Wo) * 4);
          continue;
        }
        const float* src = plane + h * g.W + b - g.p;  // src[j*s] is input column j*s - p + b
        for (int64_t j = 0; j < c.lo; ++j) row[j] = 0.0f;
        if (g.s == 1)
          std::memcpy(row + c.lo, src + c.lo, size_t(c.hi - c.lo) * 4);
        else
          for (int64_t j = c.lo; j < c.hi; ++j) row[j] = src[j * g.s];
        for (int64_t j = c.hi; j < g.Wo; ++j) row[j] = 0.0f;
      }
    }
  }
}

// dx[n, ci, h, w] = sum of dcol entries that im2col read from (h, w); dx is overwritten.
void col2im(const float* dcol, const Geometry& g, float* dx) {
  const int64_t NP = g.N * g.P;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t ci = 0; ci < g.Cin; ++ci) {
      float* plane = dx + (n * g.Cin + ci) * g.H * g.W;
      std::memset(plane, 0, size_t(g.H * g.W) * 4);
      for (int64_t a = 0; a < g.k; ++a) {
        for (int64_t b = 0; b < g.k; ++b) {
          const ColRange c = valid_cols(g, b);
          const float* in = dcol + ((ci * g.k + a) * g.k + b) * NP + n * g.P;
          for (int64_t i = 0; i < g.Ho; ++i) {
            const int64_t h = i * g.s - g.p + a;
            if (h < 0 || h >= g.H) continue;
            float* dst = plane + h * g.W + b - g.p;
            const float* row = in + i * g.Wo;
            for (int64_t j = c.lo; j < c.hi; ++j) dst[j * g.s] += row[j];
          }
        }
      }
    }
  }
}

// The unfolded input as a [K, N*P] matrix: x itself for a pointwise conv on one image.
const float* unfold(const float* xp, const Geometry& g, int slot) {
  if (g.pointwise() && g.N == 1) return xp;
  float* col = scratch(slot, g.K * g.N * g.P);
  if (g.pointwise())
    nchw_to_cnp(xp, g.N, g.Cin, g.P, col);
  else
    im2col(xp, g, col);
  return col;
}

// Operand t as precision `pr` takes it (kernels/conv.h), plain (on_float32): t itself when it is
// plain and in fp32, else a copy, rounded unless its values are in the precision's format already
// (16-bit ones in their own format, or in TF32, which holds both 16-bit formats exactly).
Tensor operand(const Tensor& t, Precision pr) {
  if (pr == Precision::FP32 ||
      (t.dtype() != DType::F32 && (pr == Precision::TF32 || rounding_of(pr) == t.dtype())))
    return float32_of(t);
  Tensor r = plain(t) ? t.clone() : float32_of(t);
  if (pr != Precision::TF32) {
    cpu::round_(r, rounding_of(pr));
    return r;
  }
  float* p = r.data<float>();
  const int64_t n = r.numel();
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) p[i] = round_to_tf32(p[i]);
  return r;
}

// Where the plain result for output t is computed: t itself, or a buffer that finish() converts
// into t. finish() first rounds the result to pr's 16-bit format, if it has one.
Tensor result_for(const Tensor& t) {
  return plain(t) ? t.share() : Tensor(t.shape());
}
void finish(Tensor& r, Tensor& t, Precision pr) {
  if (pr == Precision::FP16 || pr == Precision::BF16) cpu::round_(r, rounding_of(pr));
  if (!plain(t)) cpu::cast(r, t);
}

Conv2dParams in_fp32(Conv2dParams p) {
  p.precision = Precision::FP32;
  return p;
}

bool all_plain(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t && !plain(*t)) return false;
  return true;
}

}  // namespace

void conv2d_forward(const Tensor& x, const Tensor& w, Tensor& y, const Conv2dParams& prm) {
  if (const Precision pr = prm.precision; pr != Precision::FP32 || !all_plain({&x, &y})) {
    Tensor r = result_for(y);
    cpu::conv2d_forward(operand(x, pr), operand(w, pr), r, in_fp32(prm));
    finish(r, y, pr);
    return;
  }
  check_f32_cpu(x, "conv2d x");
  check_f32_cpu(w, "conv2d w");
  const Geometry g = geometry(x, w, prm);
  DPT_ASSERT(y.shape() == Shape({g.N, g.Cout, g.Ho, g.Wo}), "conv2d: bad output shape ",
             shape_str(y.shape()));
  ConstMatMap W(w.data<float>(), g.Cout, g.K);
  ConstMatMap C(unfold(x.data<float>(), g, 0), g.K, g.N * g.P);
  if (g.N == 1) {
    MatMap(y.data<float>(), g.Cout, g.P).noalias() = W * C;
    return;
  }
  float* tmp = scratch(1, g.Cout * g.N * g.P);
  MatMap(tmp, g.Cout, g.N * g.P).noalias() = W * C;
  cnp_to_nchw(tmp, g.N, g.Cout, g.P, y.data<float>());
}

void conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx, Tensor& dw,
                     const Conv2dParams& prm) {
  if (const Precision pr = prm.precision; pr != Precision::FP32 || !all_plain({&dy, &x, dx})) {
    // dw's part from this call, rounded to the format before it is added.
    Tensor part = Tensor::zeros(dw.shape(), DType::F32, dw.device()), r;
    if (dx) r = result_for(*dx);
    cpu::conv2d_backward(operand(dy, pr), operand(x, pr), operand(w, pr), dx ? &r : nullptr, part,
                         in_fp32(prm));
    if (dx) finish(r, *dx, pr);
    finish(part, part, pr);
    cpu::add_(dw, part);
    return;
  }
  check_f32_cpu(dy, "conv2d dy");
  check_f32_cpu(dw, "conv2d dw");
  const Geometry g = geometry(x, w, prm);
  DPT_ASSERT(dy.shape() == Shape({g.N, g.Cout, g.Ho, g.Wo}) && dw.shape() == w.shape(),
             "conv2d backward: bad shapes");
  DPT_ASSERT(!dx || dx->shape() == x.shape(), "conv2d backward: dx shape");
  const int64_t NP = g.N * g.P;
  const float* dyp = dy.data<float>();
  if (g.N > 1) {
    float* t = scratch(1, g.Cout * NP);
    nchw_to_cnp(dyp, g.N, g.Cout, g.P, t);
    dyp = t;
  }
  ConstMatMap dY(dyp, g.Cout, NP);
  const float* col = unfold(x.data<float>(), g, 0);
  MatMap(dw.data<float>(), g.Cout, g.K).noalias() += dY * ConstMatMap(col, g.K, NP).transpose();
  if (!dx) return;
  ConstMatMap W(w.data<float>(), g.Cout, g.K);
  if (g.pointwise() && g.N == 1) {
    MatMap(dx->data<float>(), g.K, NP).noalias() = W.transpose() * dY;
    return;
  }
  float* dcol = scratch(0, g.K * NP);
  MatMap(dcol, g.K, NP).noalias() = W.transpose() * dY;
  if (g.pointwise())
    cnp_to_nchw(dcol, g.N, g.Cin, g.P, dx->data<float>());
  else
    col2im(dcol, g, dx->data<float>());
}

}  // namespace dpt::cpu

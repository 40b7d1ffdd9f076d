// CPU mixed-precision helpers (math in kernels/amp.h): in place, split over threads. Conversions
// run in blocks; float16 ones use the F16C instructions where the build targets them (the same
// IEEE rounding as float_to_f16 and f16_to_float, 8 values an instruction).
#include "kernels/amp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#ifdef __F16C__
#include <immintrin.h>
#endif

#include "kernels/cpu/common.h"

namespace dpt::cpu {

namespace {

constexpr int64_t kBlock = 4096;

void to_f32(DType from, const void* src, float* d, int64_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  int64_t i = 0;
  if (from == DType::BF16) {
    for (; i < n; ++i) d[i] = bf16_to_float(s[i]);
    return;
  }
#ifdef __F16C__
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(d + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
  for (; i < n; ++i) d[i] = f16_to_float(s[i]);
}

void from_f32(DType to, const float* s, void* dst, int64_t n) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  int64_t i = 0;
  if (to == DType::BF16) {
    for (; i < n; ++i) d[i] = float_to_bf16(s[i]);
    return;
  }
#ifdef __F16C__
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) d[i] = float_to_f16(s[i]);
}

// f(first, count) over [0, n) in blocks of kBlock, the blocks split over threads.
template <typename F>
void in_blocks(int64_t n, F f) {
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t b = 0; b < (n + kBlock - 1) / kBlock; ++b)
    f(b * kBlock, std::min(kBlock, n - b * kBlock));
}

bool is_float(DType t) {
  return t == DType::F32 || t == DType::F16 || t == DType::BF16;
}

}  // namespace

void round_(Tensor& x, DType t) {
  check_f32_cpu(x, "round_ operand");
  DPT_ASSERT(t == DType::F16 || t == DType::BF16, "round_ to ", dtype_name(t));
  float* p = x.data<float>();
  in_blocks(x.numel(), [&](int64_t first, int64_t count) {
    uint16_t h[kBlock];
    from_f32(t, p + first, h, count);
    to_f32(t, h, p + first, count);
  });
}

void cast(const Tensor& src, Tensor& dst) {
  const DType from = src.dtype(), to = dst.dtype();
  DPT_ASSERT(src.shape() == dst.shape() && src.device().is_cpu() && dst.device().is_cpu() &&
                 is_float(from) && is_float(to),
             "cast from ", dtype_name(from), " to ", dtype_name(to));
  if (src.channels_last() != dst.channels_last()) {  // through float32, transposed in between
    const int64_t N = src.dim(0), C = src.dim(1), P = src.dim(2) * src.dim(3);
    Tensor a(src.shape()), b(src.shape());
    cpu::cast(src.share().set_channels_last(false), a);
    const float* in = a.data<float>();
    float* out = b.data<float>();
    const bool to_last = dst.channels_last();
#pragma omp parallel for collapse(2) schedule(static) if (src.numel() > kParallelMin)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = 0; p < P; ++p) {
          const int64_t first = (n * C + c) * P + p, last = (n * P + p) * C + c;
          out[to_last ? last : first] = in[to_last ? first : last];
        }
    Tensor d = dst.share();
    d.set_channels_last(false);
    cpu::cast(b, d);
    return;
  }
  const size_t in = dtype_size(from), out = dtype_size(to);
  const char* s = static_cast<const char*>(src.raw());
  char* d = static_cast<char*>(dst.raw());
  in_blocks(src.numel(), [&](int64_t first, int64_t count) {
    const void* from_p = s + size_t(first) * in;
    void* to_p = d + size_t(first) * out;
    if (from == to) {
      std::memcpy(to_p, from_p, size_t(count) * in);
    } else if (from == DType::F32) {
      from_f32(to, static_cast<const float*>(from_p), to_p, count);
    } else if (to == DType::F32) {
      to_f32(from, from_p, static_cast<float*>(to_p), count);
    } else {  // between the two 16-bit formats, through float32
      float f[kBlock];
      to_f32(from, from_p, f, count);
      from_f32(to, f, to_p, count);
    }
  });
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

#include "kernels/cpu/common.h"

#include <cstdlib>
#include <cstring>
#include <memory>

namespace dpt::cpu {

namespace {
struct Slot {
  float* data = nullptr;
  int64_t size = 0;
  ~Slot() { std::free(data); }
};
}  // namespace

float* scratch(int slot, int64_t floats) {
  thread_local Slot slots[4];
  DPT_ASSERT(slot >= 0 && slot < 4, "bad scratch slot ", slot);
  Slot& s = slots[slot];
  if (s.size < floats) {
    std::free(s.data);
    size_t bytes = (size_t(floats) * 4 + 63) / 64 * 64;
    s.data = static_cast<float*>(std::aligned_alloc(64, bytes));
    DPT_CHECK(s.data, Error, "out of memory for ", bytes, " bytes of scratch");
    s.size = floats;
  }
  return s.data;
}

void nchw_to_cnp(const float* in, int64_t N, int64_t C, int64_t P, float* out) {
#pragma omp parallel for collapse(2) schedule(static) if (N * C * P > kParallelMin)
  for (int64_t c = 0; c < C; ++c)
    for (int64_t n = 0; n < N; ++n)
      std::memcpy(out + (c * N + n) * P, in + (n * C + c) * P, size_t(P) * 4);
}

void cnp_to_nchw(const float* in, int64_t N, int64_t C, int64_t P, float* out) {
#pragma omp parallel for collapse(2) schedule(static) if (N * C * P > kParallelMin)
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      std::memcpy(out + (n * C + c) * P, in + (c * N + n) * P, size_t(P) * 4);
}

}  // namespace dpt::cpu

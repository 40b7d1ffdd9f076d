#include "core/rng.h"

#include <cmath>

namespace dpt {

std::array<uint32_t, 4> philox4x32(uint64_t key, uint64_t counter_lo, uint64_t counter_hi) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint32_t c0 = uint32_t(counter_lo), c1 = uint32_t(counter_lo >> 32), c2 = uint32_t(counter_hi),
           c3 = uint32_t(counter_hi >> 32);
  uint32_t k0 = uint32_t(key), k1 = uint32_t(key >> 32);
  for (int round = 0; round < 10; ++round) {
    uint64_t p0 = uint64_t(kM0) * c0, p1 = uint64_t(kM1) * c2;
    uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += kW0;
    k1 += kW1;
  }
  return {c0, c1, c2, c3};
}

uint32_t Rng::next_u32() {
  uint64_t blk = s_.offset / 4;
  if (blk != block_index_) {
    block_ = philox4x32(s_.seed, blk, s_.stream);
    block_index_ = blk;
  }
  return block_[s_.offset++ % 4];
}

float Rng::uniform() {
  return float(next_u32() >> 8) * (1.0f / 16777216.0f);
}

float Rng::uniform(float lo, float hi) {
  return lo + (hi - lo) * uniform();
}

float Rng::normal() {
  // Two uniforms per value keeps the stream position independent of any cached second value.
  double u1 = (double(next_u32()) + 1.0) / 4294967296.0;  // (0, 1]
  double u2 = double(next_u32()) / 4294967296.0;
  return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

uint64_t Rng::below(uint64_t n) {
  if (n <= 1) return 0;
  uint64_t limit = (~uint64_t(0) / n) * n;  // reject the tail so every residue is equally likely
  for (;;) {
    uint64_t v = (uint64_t(next_u32()) << 32) | next_u32();
    if (v < limit) return v % n;
  }
}

}  // namespace dpt

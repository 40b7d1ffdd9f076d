// Counter-based random numbers (Philox-4x32-10, Salmon et al. 2011).
//
// The n-th 128-bit block of a stream is philox(key = seed, counter = {n, stream}), so a value
// depends only on (seed, stream, position): runs are reproducible whatever the thread count, and
// the whole generator state is three integers that checkpoints can store for bit-exact resume.
#pragma once

#include <array>
#include <cstdint>

namespace dpt {

std::array<uint32_t, 4> philox4x32(uint64_t key, uint64_t counter_lo, uint64_t counter_hi);

struct RngState {
  uint64_t seed = 0;
  uint64_t stream = 0;
  uint64_t offset = 0;  // number of 32-bit values drawn so far
};

class Rng {
 public:
  explicit Rng(uint64_t seed = 0, uint64_t stream = 0) : s_{seed, stream, 0} {}
  explicit Rng(const RngState& s) : s_(s) {}
  const RngState& state() const { return s_; }

  uint32_t next_u32();
  float uniform();                    // [0, 1)
  float uniform(float lo, float hi);  // [lo, hi)
  float normal();                     // standard normal (Box-Muller)
  uint64_t below(uint64_t n);         // uniform integer in [0, n), unbiased
  // Skips n 32-bit values: normal() uses 2, uniform() 1, so a parallel fill can give every thread
  // its own Rng at the right offset and still produce the serial sequence.
  void advance(uint64_t n) { s_.offset += n; }

 private:
  RngState s_;
  std::array<uint32_t, 4> block_{};
  uint64_t block_index_ = ~uint64_t(0);
};

}  // namespace dpt

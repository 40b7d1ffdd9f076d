// Shared helpers of the CPU engine: Eigen matrix views, per-thread scratch memory and checks.
// Threads come from OpenMP; each calling thread's omp_set_num_threads() sets its own share, so
// CPU replicas in DataParallel each use their part of the cores.
#pragma once

#include <Eigen/Core>
#include <array>
#include <cstdint>
#include <tuple>

#include "core/tensor.h"
#include "kernels/amp.h"

namespace dpt::cpu {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatMap = Eigen::Map<RowMat, Eigen::Aligned64>;
using ConstMatMap = Eigen::Map<const RowMat, Eigen::Aligned64>;
using VecMap = Eigen::Map<Eigen::VectorXf>;
using ConstVecMap = Eigen::Map<const Eigen::VectorXf>;

// Below this many elements a loop runs on the calling thread: waking the team costs more.
inline constexpr int64_t kParallelMin = 32768;

// Per-thread growable scratch buffer; slot 0..3. Valid until the next call with the same slot.
float* scratch(int slot, int64_t floats);

inline void check_f32_cpu(const Tensor& t, const char* what) {
  DPT_ASSERT(t.defined() && t.dtype() == DType::F32 && t.device().is_cpu(), what,
             " must be a defined float32 cpu tensor");
}

// fp16/bf16 training stores activations in 16 bits (kernels/amp.h); the CPU kernels compute in
// float32. When any of ts is 16-bit, on_float32 runs f on float32 stand-ins (a float32 tensor
// itself, a widened copy of a 16-bit one), rounds each stand-in of a 16-bit non-const argument
// back into it and returns true; otherwise it runs nothing and returns false, and the caller goes
// on with its float32 code.
inline Tensor float32_of(const Tensor& t) {
  if (t.dtype() == DType::F32) return t.share();
  Tensor f(t.shape(), DType::F32, t.device());
  cpu::cast(t, f);
  return f;
}
inline void store_back(const Tensor&, const Tensor&) {}  // an input: nothing to write back
inline void store_back(const Tensor& f, Tensor& t) {
  if (t.dtype() != DType::F32) cpu::cast(f, t);
}
template <typename F, typename... Ts>
bool on_float32(F&& f, Ts&... ts) {
  if (((ts.dtype() == DType::F32) && ...)) return false;
  std::array<Tensor, sizeof...(Ts)> s{float32_of(ts)...};
  std::apply(f, s);
  size_t i = 0;
  (store_back(s[i++], ts), ...);
  return true;
}

// out[c][n*P + p] = in[n][c][p] and its inverse.
void nchw_to_cnp(const float* in, int64_t N, int64_t C, int64_t P, float* out);
void cnp_to_nchw(const float* in, int64_t N, int64_t C, int64_t P, float* out);

}  // namespace dpt::cpu

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

// The CPU kernels compute on plain tensors: float32, not channels-last. Activations may be 16-bit
// (fp16/bf16 training, kernels/amp.h) or channels-last (Tensor::channels_last). When any of ts is
// not plain, on_float32 runs f on plain stand-ins (a plain tensor itself, else a converted copy),
// converts each stand-in of a non-plain non-const argument back into it (rounding, reordering)
// and returns true; otherwise it runs nothing and returns false, and the caller goes on with its
// plain code.
inline bool plain(const Tensor& t) {
  return t.dtype() == DType::F32 && !t.channels_last();
}
inline Tensor float32_of(const Tensor& t) {
  if (plain(t)) return t.share();
  Tensor f(t.shape(), DType::F32, t.device());
  cpu::cast(t, f);
  return f;
}
inline void store_back(const Tensor&, const Tensor&) {}  // an input: nothing to write back
inline void store_back(const Tensor& f, Tensor& t) {
  if (!plain(t)) cpu::cast(f, t);
}
// The activation operands of one op share one layout, as the CUDA kernels require (the CPU
// would convert any mix, which would hide a layer that set the wrong one).
inline void check_layouts(const char* op, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    DPT_ASSERT(t->channels_last() == (*ts.begin())->channels_last(), op,
               ": operands in two memory formats");
}
template <typename F, typename... Ts>
bool on_float32(F&& f, Ts&... ts) {
  if ((plain(ts) && ...)) return false;
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

// Shared helpers of the CPU engine: Eigen matrix views, per-thread scratch memory and checks.
// Threads come from OpenMP; each calling thread's omp_set_num_threads() sets its own share, so
// CPU replicas in DataParallel each use their part of the cores.
#pragma once

#include <Eigen/Core>
#include <cstdint>

#include "core/tensor.h"

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

// out[c][n*P + p] = in[n][c][p] and its inverse.
void nchw_to_cnp(const float* in, int64_t N, int64_t C, int64_t P, float* out);
void cnp_to_nchw(const float* in, int64_t N, int64_t C, int64_t P, float* out);

}  // namespace dpt::cpu

// CPU softmax cross-entropy (math in kernels/loss.h); log-sum-exp in double for stability.
#include "kernels/loss.h"

#include <cmath>

#include "kernels/cpu/common.h"

namespace dpt::cpu {

float softmax_cross_entropy(const Tensor& logits, const Tensor& targets, Tensor* dlogits,
                            float scale, int64_t* correct) {
  check_f32_cpu(logits, "logits");
  DPT_ASSERT(
      logits.ndim() == 2 && targets.dtype() == DType::I64 && targets.numel() == logits.dim(0),
      "cross entropy: logits ", shape_str(logits.shape()), " vs targets ",
      shape_str(targets.shape()));
  const int64_t N = logits.dim(0), K = logits.dim(1);
  const float* z = logits.data<float>();
  const int64_t* t = targets.data<int64_t>();
  float* dz = dlogits ? dlogits->data<float>() : nullptr;
  double total = 0;
  int64_t hits = 0;
  for (int64_t n = 0; n < N; ++n) {
    DPT_CHECK(t[n] >= 0 && t[n] < K, ConfigError, "label ", t[n], " at batch row ", n,
              " is outside [0, ", K, "): does --num-classes match the data?");
    const float* row = z + n * K;
    int64_t arg = 0;
    for (int64_t k = 1; k < K; ++k)
      if (row[k] > row[arg]) arg = k;
    hits += arg == t[n];
    double lse = 0;
    for (int64_t k = 0; k < K; ++k) lse += std::exp(double(row[k]) - row[arg]);
    lse = std::log(lse) + row[arg];
    total += lse - row[t[n]];
    if (dz) {
      for (int64_t k = 0; k < K; ++k) {
        double pk = std::exp(double(row[k]) - lse);
        dz[n * K + k] = float(scale * (pk - (k == t[n])) / double(N));
      }
    }
  }
  if (correct) *correct = hits;
  return float(total / double(N));
}

}  // namespace dpt::cpu

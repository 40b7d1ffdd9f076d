// Mixed-precision helpers on float32 tensors, in place on their first argument.
//
//   round_(x, t):              x = x rounded to the nearest value of dtype t (round to nearest
//                              even; float16 overflows to +-inf past 65504 and keeps subnormals,
//                              as IEEE half does); t == F32 leaves x alone
//   scale_check_(ts, factor):  t = t * factor for every t in ts; returns whether any value of any
//                              t was inf or NaN before scaling (GradScaler's found_inf)
//   cast(src, dst):            dst = src in dst's dtype, between any of F32, F16 and BF16
//                              (rounding as round_; exact from 16 bits to 32), and in dst's
//                              memory format (channels-last or not: Tensor::channels_last),
//                              same shape and device
//
// fp16 and bf16 training stores the activations in 16 bits from the first convolution's output
// to the global average pool's input (the kernels take them in either format and compute in
// float32), keeps float32 master weights and gradients, and rounds at the boundaries of the
// linear layer (models/layers.cpp); these ops are the rounding, the conversions and the loss
// scaling.
#pragma once

#include <string>
#include <vector>

#include "core/tensor.h"
#include "kernels/dispatch.h"

namespace dpt {

// How a model's convolutions and linear layers compute (dptrain train --precision):
//   FP32  float32 throughout;
//   TF32  convolutions multiply TF32 operands (kernels/conv.h), sums and storage float32;
//   FP16, BF16  inputs, weights, outputs and gradients rounded to 16 bits (round_ below); the
//         activations stored in 16 bits, arithmetic, weights and weight gradients float32.
enum class Precision { FP32, TF32, FP16, BF16 };

// "fp32", "tf32", "fp16", "bf16"; UsageError otherwise.
inline Precision parse_precision(const std::string& name) {
  if (name == "fp32") return Precision::FP32;
  if (name == "tf32") return Precision::TF32;
  if (name == "fp16") return Precision::FP16;
  if (name == "bf16") return Precision::BF16;
  DPT_THROW(UsageError, "unknown --precision '", name, "': expected fp32, tf32, fp16 or bf16");
}
// The dtype round_ rounds to at the layers' boundaries: F16, BF16, or F32 (no rounding).
inline DType rounding_of(Precision p) {
  return p == Precision::FP16 ? DType::F16 : p == Precision::BF16 ? DType::BF16 : DType::F32;
}

// Declared once, for the CPU engine and for the CUDA backend.
#define DPT_AMP_KERNELS                                            \
  void round_(Tensor& x, DType t);                                 \
  bool scale_check_(const std::vector<Tensor*>& ts, float factor); \
  void cast(const Tensor& src, Tensor& dst);

namespace cpu {
DPT_AMP_KERNELS
}  // namespace cpu
namespace cuda {
DPT_AMP_KERNELS
}  // namespace cuda

inline void round_(Tensor& x, DType t) {
  if (t == DType::F32) return;
  DPT_ON_DEVICE(x.device(), round_, x, t);
}
inline bool scale_check_(const std::vector<Tensor*>& ts, float factor) {
  if (ts.empty()) return false;
  DPT_ON_DEVICE(ts[0]->device(), scale_check_, ts, factor);
}
inline void cast(const Tensor& src, Tensor& dst) {
  DPT_ON_DEVICE(src.device(), cast, src, dst);
}
// A copy of t in dtype d (F32, F16 or BF16) and in channels-last order or not, on t's device.
inline Tensor cast_to(const Tensor& t, DType d, bool channels_last = false) {
  Tensor out(t.shape(), d, t.device());
  out.set_channels_last(channels_last);
  cast(t, out);
  return out;
}

}  // namespace dpt

// Element types and the scalar conversions between them (float16/bfloat16 round to nearest even).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace dpt {

enum class DType : uint8_t { F32, F16, BF16, I64 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32:
      return 4;
    case DType::F16:
      return 2;
    case DType::BF16:
      return 2;
    case DType::I64:
      return 8;
  }
  return 0;
}
std::string_view dtype_name(DType t);
DType parse_dtype(std::string_view name);  // "float32", "float16", "bfloat16", "int64"

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float bf16_to_float(uint16_t h) {
  return bits_float(uint32_t(h) << 16);
}
// f rounded to TF32 (float32's exponent, 10 mantissa bits; to nearest even), the operand format
// of tensor-core float32 convolutions. Infinities and NaN stay as they are.
inline float round_to_tf32(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return f;
  u += 0xfffu + ((u >> 13) & 1u);
  return bits_float(u & ~0x1fffu);
}
uint16_t float_to_f16(float f);
float f16_to_float(uint16_t h);

}  // namespace dpt

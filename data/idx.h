// IDX files (the MNIST container format): a big-endian header, then raw values.
//
// The header is the magic 0x0000TTDD (TT = element type, 0x08 for uint8; DD = number of dims),
// then DD big-endian uint32 dimensions, then the values in row-major order. Files may be gzip
// compressed or plain; zlib reads both. Only uint8 files are supported. Every problem with a file
// (missing, unreadable, bad header, truncated, trailing bytes, corrupt gzip) throws FileError whose
// message names the path; the header is validated before any large allocation.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dpt {

struct IdxArray {
  std::vector<int64_t> dims;  // e.g. {N, rows, cols} for images, {N} for labels
  std::vector<uint8_t> data;  // product(dims) values, row-major
};

// Limits enforced on the header (beyond them the file is considered malformed).
inline constexpr int64_t kIdxMaxItems = 100'000'000;       // first dimension
inline constexpr int64_t kIdxMaxSide = 4096;               // every other dimension
inline constexpr int64_t kIdxMaxBytes = int64_t(1) << 34;  // 16 GiB of payload

// Images: magic 0x00000803, dims {N, rows, cols} with N <= kIdxMaxItems, rows/cols in
// 1..kIdxMaxSide.
IdxArray read_idx_images(const std::string& path);
// Labels: magic 0x00000801, dims {N} with N <= kIdxMaxItems.
IdxArray read_idx_labels(const std::string& path);

}  // namespace dpt

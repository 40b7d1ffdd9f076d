// Image files (JPEG through libjpeg-turbo, PNG through libpng) decoded to 8-bit RGB, exactly as
// Pillow's Image.open(...).convert("RGB") gives them: grayscale replicated, alpha and palette
// transparency dropped (not composited), 16-bit samples reduced to their high byte, Adobe CMYK
// JPEGs converted with Pillow's formula. The format comes from the bytes, not the file name.
//
// A JPEG can be decoded in part: only the rows and columns of a window are decompressed
// (jpeg_skip_scanlines / jpeg_crop_scanline), and the window's pixels are bit-identical to those
// of a full decode. A random resized crop that keeps half the image then costs about half a decode.
//
// Every problem (unknown format, truncated or corrupt data, absurd sizes) throws FileError naming
// the file; sizes are checked before any allocation.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dpt {

inline constexpr int64_t kMaxImagePixels = int64_t(1) << 28;  // 268 Mpx: larger is refused

struct ImageSize {
  int64_t height = 0, width = 0;
};

// A rectangle of an image: rows [top, top + height), columns [left, left + width).
struct Window {
  int64_t top = 0, left = 0, height = 0, width = 0;
};

// Rows of width * 3 bytes, RGB.
struct Image {
  int64_t height = 0, width = 0;
  std::vector<uint8_t> rgb;
};

// The image's size from its header (cheap). `path` names the file in errors.
ImageSize image_size(const std::vector<uint8_t>& bytes, const std::string& path);
// The pixels of `window` (which must lie inside the image).
Image decode_image(const std::vector<uint8_t>& bytes, const std::string& path,
                   const Window& window);
// The whole image.
Image decode_image(const std::vector<uint8_t>& bytes, const std::string& path);

// Reads a whole file (at most 1 GiB); FileError naming it when missing, unreadable or too large.
std::vector<uint8_t> read_file_bytes(const std::string& path);

}  // namespace dpt

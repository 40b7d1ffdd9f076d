// Crop geometry after torchvision 0.14 (transforms.RandomResizedCrop.get_params, F.resize with an
// int size, F.center_crop) and Pillow 9's Resample.c bilinear filter: for each output pixel a
// triangle filter of support max(1, in/out) input pixels, weights normalised, converted to 22-bit
// fixed point, accumulated with a rounding half and clipped to a byte; rows first, then columns,
// with the intermediate image stored as bytes.
#include "data/transforms.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace dpt {
namespace {

constexpr int kPrecisionBits = 32 - 8 - 2;

// Python's round(): half to even (the default rounding mode).
int64_t round_half_even(double v) {
  return int64_t(std::nearbyint(v));
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for in_size -> out_size: taps per output
// (ksize), the first input index and tap count of each output, and fixed-point weights.
struct Coeffs {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<int32_t> k;  // out_size * ksize
};

Coeffs coefficients(int64_t in_size, int64_t out_size) {
  const double scale = double(in_size) / double(out_size);
  const double filterscale = std::max(scale, 1.0);
  const double support = 1.0 * filterscale;  // bilinear: support 1
  Coeffs c;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.first.resize(size_t(out_size));
  c.count.resize(size_t(out_size));
  c.k.assign(size_t(out_size) * size_t(c.ksize), 0);
  std::vector<double> w(size_t(c.ksize));
  for (int64_t xx = 0; xx < out_size; ++xx) {
    const double center = (double(xx) + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = int(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in_size) xmax = int(in_size);
    xmax -= xmin;
    double total = 0;
    for (int x = 0; x < xmax; ++x) {
      double t = (x + xmin - center + 0.5) * ss;
      if (t < 0) t = -t;
      w[size_t(x)] = t < 1.0 ? 1.0 - t : 0.0;
      total += w[size_t(x)];
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = total != 0.0 ? w[size_t(x)] / total : w[size_t(x)];
      c.k[size_t(xx) * size_t(c.ksize) + size_t(x)] =
          v < 0 ? int(-0.5 + v * (1 << kPrecisionBits)) : int(0.5 + v * (1 << kPrecisionBits));
    }
    c.first[size_t(xx)] = xmin;
    c.count[size_t(xx)] = xmax;
  }
  return c;
}

inline uint8_t clip8(int32_t v) {
  if (v >= (1 << kPrecisionBits << 8)) return 255;
  if (v <= 0) return 0;
  return uint8_t(v >> kPrecisionBits);
}

}  // namespace

Window random_resized_crop(ImageSize image, const CropScale& p, Rng& rng) {
  const int64_t height = image.height, width = image.width;
  const double area = double(height) * double(width);
  const double log_lo = std::log(double(p.ratio_lo)), log_hi = std::log(double(p.ratio_hi));
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double target = area * (p.scale_lo + (p.scale_hi - p.scale_lo) * double(rng.uniform()));
    const double aspect = std::exp(log_lo + (log_hi - log_lo) * double(rng.uniform()));
    const int64_t w = round_half_even(std::sqrt(target * aspect));
    const int64_t h = round_half_even(std::sqrt(target / aspect));
    if (0 < w && w <= width && 0 < h && h <= height) {
      const int64_t i = int64_t(rng.below(uint64_t(height - h + 1)));
      const int64_t j = int64_t(rng.below(uint64_t(width - w + 1)));
      return Window{i, j, h, w};
    }
  }
  const double in_ratio = double(width) / double(height);
  int64_t w = width, h = height;
  if (in_ratio < p.ratio_lo) {
    h = round_half_even(double(w) / p.ratio_lo);
  } else if (in_ratio > p.ratio_hi) {
    w = round_half_even(double(h) * p.ratio_hi);
  }
  h = std::clamp<int64_t>(h, 1, height);
  w = std::clamp<int64_t>(w, 1, width);
  return Window{(height - h) / 2, (width - w) / 2, h, w};
}

ResizeCrop resize_center_crop(ImageSize image, int64_t resize, int64_t crop) {
  const int64_t h = image.height, w = image.width;
  const int64_t shorter = std::min(h, w), longer = std::max(h, w);
  const auto scaled = int64_t(double(resize) * double(longer) / double(shorter));
  ResizeCrop r;
  r.resized = w <= h ? ImageSize{scaled, resize} : ImageSize{resize, scaled};
  DPT_ASSERT(crop <= r.resized.height && crop <= r.resized.width, "center crop ", crop,
             " larger than the resized image");
  r.crop = Window{round_half_even(double(r.resized.height - crop) / 2.0),
                  round_half_even(double(r.resized.width - crop) / 2.0), crop, crop};
  return r;
}

Window resize_source_window(ImageSize source, ImageSize out, const Window& region) {
  const Coeffs ch = coefficients(source.width, out.width);
  const Coeffs cv = coefficients(source.height, out.height);
  const size_t r0 = size_t(region.top), r1 = size_t(region.top + region.height - 1);
  const size_t c0 = size_t(region.left), c1 = size_t(region.left + region.width - 1);
  return Window{cv.first[r0], ch.first[c0], cv.first[r1] + cv.count[r1] - cv.first[r0],
                ch.first[c1] + ch.count[c1] - ch.first[c0]};
}

void resize_bilinear(const Image& img, const Window& img_at, ImageSize source, ImageSize out,
                     const Window& region, uint8_t* dst) {
  DPT_ASSERT(region.top >= 0 && region.left >= 0 && region.top + region.height <= out.height &&
                 region.left + region.width <= out.width && img.height == img_at.height &&
                 img.width == img_at.width,
             "resize region outside the output");
  const Coeffs ch = coefficients(source.width, out.width);
  const Coeffs cv = coefficients(source.height, out.height);
  const Window need = resize_source_window(source, out, region);
  DPT_ASSERT(need.top >= img_at.top && need.left >= img_at.left &&
                 need.top + need.height <= img_at.top + img_at.height &&
                 need.left + need.width <= img_at.left + img_at.width,
             "resize reads outside the decoded part of the image");
  const int64_t y_first = need.top, y_last = need.top + need.height;
  const int64_t rw = region.width;
  thread_local std::vector<uint8_t> tmp;
  tmp.resize(size_t(need.height) * size_t(rw) * 3);
  const int32_t half = 1 << (kPrecisionBits - 1);
  for (int64_t y = y_first; y < y_last; ++y) {  // horizontal pass, region columns only
    const uint8_t* src = img.rgb.data() + size_t(y - img_at.top) * size_t(img.width) * 3;
    uint8_t* t = tmp.data() + size_t(y - y_first) * size_t(rw) * 3;
    for (int64_t x = 0; x < rw; ++x) {
      const size_t xx = size_t(region.left + x);
      const int32_t* k = ch.k.data() + xx * size_t(ch.ksize);
      const uint8_t* s = src + size_t(ch.first[xx] - img_at.left) * 3;
      int32_t s0 = half, s1 = half, s2 = half;
      for (int i = 0; i < ch.count[xx]; ++i, s += 3) {
        s0 += s[0] * k[i];
        s1 += s[1] * k[i];
        s2 += s[2] * k[i];
      }
      t[3 * x] = clip8(s0);
      t[3 * x + 1] = clip8(s1);
      t[3 * x + 2] = clip8(s2);
    }
  }
  thread_local std::vector<int32_t> acc;
  acc.resize(size_t(rw) * 3);
  for (int64_t y = 0; y < region.height; ++y) {  // vertical pass
    const size_t yy = size_t(region.top + y);
    const int32_t* k = cv.k.data() + yy * size_t(cv.ksize);
    std::fill(acc.begin(), acc.end(), half);
    for (int i = 0; i < cv.count[yy]; ++i) {
      const uint8_t* t = tmp.data() + size_t(cv.first[yy] + i - y_first) * size_t(rw) * 3;
      const int32_t ki = k[i];
      for (size_t q = 0; q < acc.size(); ++q) acc[q] += t[q] * ki;
    }
    uint8_t* o = dst + size_t(y) * size_t(rw) * 3;
    for (size_t q = 0; q < acc.size(); ++q) o[q] = clip8(acc[q]);
  }
}

const float* unit_scale() {
  static const auto table = [] {
    std::array<float, 256> t{};
    for (int v = 0; v < 256; ++v) t[size_t(v)] = float(v) / 255.0f;
    return t;
  }();
  return table.data();
}

void to_chw_float(const uint8_t* rgb, int64_t h, int64_t w, bool flip, float* out) {
  const float* kScale = unit_scale();
  const int64_t hw = h * w;
  for (int64_t y = 0; y < h; ++y) {
    const uint8_t* row = rgb + y * w * 3;
    float* r = out + y * w;
    float* g = r + hw;
    float* b = g + hw;
    if (flip) {
      for (int64_t x = 0; x < w; ++x) {
        const uint8_t* px = row + (w - 1 - x) * 3;
        r[x] = kScale[px[0]], g[x] = kScale[px[1]], b[x] = kScale[px[2]];
      }
    } else {
      for (int64_t x = 0; x < w; ++x) {
        const uint8_t* px = row + x * 3;
        r[x] = kScale[px[0]], g[x] = kScale[px[1]], b[x] = kScale[px[2]];
      }
    }
  }
}

}  // namespace dpt

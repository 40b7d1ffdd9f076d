// ImageNet-style transforms with torchvision's geometry and Pillow's pixels.
//
// Training: RandomResizedCrop(size, scale, ratio) then RandomHorizontalFlip; evaluation:
// Resize(resize) then CenterCrop(crop). The crop parameters follow torchvision's algorithm (ten
// tries, then a central crop with the ratio clamped), drawn from our counter-based RNG instead of
// torch's, so for the same parameters the output equals torchvision's: resize_bilinear is
// Pillow's antialiased bilinear filter in its fixed-point 8-bit arithmetic, bit for bit.
#pragma once

#include <cstdint>

#include "core/rng.h"
#include "data/image.h"

namespace dpt {

struct CropScale {
  float scale_lo = 0.08f, scale_hi = 1.0f;         // fraction of the image area
  float ratio_lo = 3.0f / 4, ratio_hi = 4.0f / 3;  // width / height
};

// torchvision's RandomResizedCrop.get_params: the window of the image to crop.
Window random_resized_crop(ImageSize image, const CropScale& p, Rng& rng);

// torchvision's Resize(resize) (shorter side to `resize`, the longer one scaled and truncated)
// followed by CenterCrop(crop): the resized size and the window of it that is kept.
struct ResizeCrop {
  ImageSize resized;
  Window crop;
};
ResizeCrop resize_center_crop(ImageSize image, int64_t resize, int64_t crop);

// Pillow's Image.resize((out.width, out.height), BILINEAR) of an image of size `source`, but only
// the pixels of `region` of the result (RGB, region.height * region.width * 3 bytes to dst). img
// holds the part `img_at` of the source, which must cover resize_source_window(...).
void resize_bilinear(const Image& img, const Window& img_at, ImageSize source, ImageSize out,
                     const Window& region, uint8_t* dst);
// The part of the source that the pixels of `region` of the resized image read.
Window resize_source_window(ImageSize source, ImageSize out, const Window& region);

// v / 255 for every byte v, as torchvision's ToTensor computes it (a float division).
const float* unit_scale();
// HWC RGB bytes to CHW floats v / 255 (torchvision's ToTensor), optionally mirrored left-right.
void to_chw_float(const uint8_t* rgb, int64_t h, int64_t w, bool flip, float* out);

}  // namespace dpt

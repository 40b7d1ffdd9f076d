// Image-folder loading throughput: decode + RandomResizedCrop + flip + normalise through the
// Loader with W workers, batches of B, one epoch (after a warm-up of 2 batches). Prints
// {"images": N, "seconds": S, "images_per_second": R} (driven by data_loader.py, which times
// torchvision's ImageFolder + DataLoader beside it).
//
//   bench_data DIR WORKERS [BATCH] [CROP]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/dataset.h"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: bench_data DIR WORKERS [BATCH] [CROP]\n");
    return 2;
  }
  try {
    dpt::ImageFolderOptions fo;
    fo.crop = argc > 4 ? std::atoll(argv[4]) : 224;
    auto ds = dpt::load_image_folder(argv[1], fo);
    dpt::LoaderOptions lo;
    lo.batch_size = argc > 3 ? std::atoll(argv[3]) : 64;
    lo.workers = std::atoi(argv[2]);
    lo.prefetch = 2 * lo.workers;
    lo.mean = {0.485f, 0.456f, 0.406f};
    lo.std = {0.229f, 0.224f, 0.225f};
    dpt::Loader loader(*ds, lo);
    loader.start_epoch(0);
    dpt::Batch b;
    for (int k = 0; k < 2 && loader.next(b); ++k) {
    }
    const auto t0 = std::chrono::steady_clock::now();
    int64_t images = 0;
    while (loader.next(b)) images += b.labels.numel();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("%s\n",
                nlohmann::json{
                    {"images", images}, {"seconds", s}, {"images_per_second", double(images) / s}}
                    .dump()
                    .c_str());
  } catch (const dpt::Error& e) {
    std::fprintf(stderr, "bench_data: %s\n", e.what());
    return 1;
  }
  return 0;
}

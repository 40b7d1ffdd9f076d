// Datasets and the batch loader.
//
// A Dataset hands out single samples as float32 CHW images (values in [0, 1] before
// normalisation) with an int64 label. The Loader turns a dataset into batches: a seeded shuffle per
// epoch, per-sample augmentation (random crop after zero padding, horizontal flip) drawn from a
// counter-based RNG keyed by (seed, epoch, sample index) so results do not depend on threads,
// normalisation, and a background thread that prefetches the next batches.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace dpt {

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual std::string name() const = 0;
  virtual int64_t size() const = 0;
  virtual int64_t channels() const = 0;
  virtual int64_t height() const = 0;
  virtual int64_t width() const = 0;
  virtual int64_t num_classes() const = 0;
  // Writes sample i as channels()*height()*width() floats in [0, 1] and returns its label.
  virtual int64_t get(int64_t i, float* image) const = 0;
};

// Fashion-MNIST from IDX files (gzip-compressed *.gz or plain) in dir:
// train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-*. A missing or malformed file
// throws FileError naming it. limit >= 0 keeps only the first `limit` samples.
std::unique_ptr<Dataset> load_fashion_mnist(const std::string& dir, bool train, int64_t limit = -1);

// Deterministic synthetic images: each class has its own random mean pattern plus noise, so the
// task is learnable; sample i depends only on (seed, i).
std::unique_ptr<Dataset> make_synthetic(int64_t size, int64_t channels, int64_t image_size,
                                        int64_t num_classes, uint64_t seed);

struct Augment {
  int crop_pad = 0;    // > 0: pad by this many zero pixels, then crop back at a random offset
  bool hflip = false;  // flip horizontally with probability 1/2
};

struct Batch {
  Tensor images;      // [B, C, H, W] float32, normalised
  Tensor labels;      // [B] int64
  int64_t index = 0;  // batch index within the epoch
};

struct LoaderOptions {
  int64_t batch_size = 64;
  bool shuffle = true;
  bool drop_last = true;
  uint64_t seed = 0;
  Augment augment;
  std::vector<float> mean;  // per channel; empty = no normalisation
  std::vector<float> std;
  int prefetch = 2;  // batches prepared ahead by the background thread
};

class Loader {
 public:
  Loader(const Dataset& data, LoaderOptions opt);  // validates options: UsageError
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;
  // Starts epoch `epoch`, skipping its first `skip` batches (to resume mid-epoch).
  void start_epoch(int64_t epoch, int64_t skip = 0);
  // Next batch of the current epoch; false at its end.
  bool next(Batch& out);
  int64_t batches_per_epoch() const;
  // The sample order of an epoch (exposed for tests).
  std::vector<int64_t> epoch_order(int64_t epoch) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dpt

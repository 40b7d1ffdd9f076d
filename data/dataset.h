// Datasets and the batch loader.
//
// A Dataset hands out single samples as float32 CHW images (values in [0, 1] before
// normalisation) with an int64 label. The Loader turns a dataset into batches: a seeded shuffle per
// epoch, per-sample augmentation (random crop after zero padding, horizontal flip) drawn from a
// counter-based RNG keyed by (seed, epoch, sample index) so results do not depend on threads,
// normalisation, and a pool of worker threads that prepares the next batches.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "core/rng.h"
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
  // The label of sample i, without decoding it.
  virtual int64_t label(int64_t i) const = 0;
  // Datasets whose augmentation chooses what to decode (image folders in training mode: the random
  // resized crop) return true and draw it in get_augmented from rng, which the loader keys by
  // (seed, epoch, sample) as it does its own augmentation.
  virtual bool augments() const { return false; }
  virtual int64_t get_augmented(int64_t i, Rng& /*rng*/, float* image) const {
    return get(i, image);
  }
};

// Fashion-MNIST from IDX files (gzip-compressed *.gz or plain) in dir:
// train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-*. A missing or malformed file
// throws FileError naming it. limit >= 0 keeps only the first `limit` samples.
std::unique_ptr<Dataset> load_fashion_mnist(const std::string& dir, bool train, int64_t limit = -1);

// CIFAR-10 or CIFAR-100 (classes 10 or 100) in the binary distribution: records of a label byte
// (CIFAR-100: coarse then fine label; the fine one is used) and 3x32x32 pixel bytes, in
// data_batch_1..5.bin + test_batch.bin (CIFAR-10) or train.bin + test.bin (CIFAR-100), found in
// dir or its cifar-10-batches-bin / cifar-100-binary subdirectory. FileError names a missing,
// truncated or out-of-range file.
std::unique_ptr<Dataset> load_cifar(const std::string& dir, int classes, bool train,
                                    int64_t limit = -1);

// Image folders in torchvision's layout: root/<class>/**/<image>, classes sorted by name and
// numbered from 0, files of each class in sorted os.walk order, kept when their extension (any
// case) is one of torchvision's IMG_EXTENSIONS; JPEG and PNG are decoded (by content).
struct ImageFolderOptions {
  bool train = true;  // RandomResizedCrop(crop) + horizontal flip; else Resize(resize) + CenterCrop
  int64_t crop = 224, resize = 256;
  float scale_lo = 0.08f, scale_hi = 1.0f, ratio_lo = 3.0f / 4, ratio_hi = 4.0f / 3;
  bool skip_bad = false;  // check every file when loading; bad ones are left out and counted
  int threads = 2;        // for that check
};
struct ImageFolderIndex {
  std::vector<std::string> classes;
  std::vector<std::string> files;  // paths, in sample order
  std::vector<int64_t> labels;
};
// The listing alone (torchvision's ImageFolder.find_classes + make_dataset). FileError for a
// missing root, no class folder, or a class folder without images.
ImageFolderIndex scan_image_folder(const std::string& root);
// With skip_bad, the files left out: those whose header cannot be read are found when loading and
// dropped; one whose data turns out corrupt while decoding is replaced by the next good sample.
class BadImages {
 public:
  void add(const std::string& path, const std::string& why);  // once per path
  std::vector<std::string> list() const;                      // "path: why", in order found
 private:
  mutable std::mutex mu_;
  std::vector<std::string> items_;
  std::set<std::string> seen_;
};
std::unique_ptr<Dataset> load_image_folder(const std::string& root, const ImageFolderOptions& opt,
                                           std::shared_ptr<BadImages> bad = nullptr);

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
  int prefetch = 2;                // batches prepared ahead
  int workers = 1;                 // threads decoding and augmenting samples
  Device pin_for = Device::cpu();  // a GPU: batches in page-locked memory for it (Tensor::pinned)
  // When set: the rows [first, second) of a batch of n rows that this process uses (its share
  // under MPI); the other rows' images are left zero, undecoded. Labels are always complete.
  std::function<std::pair<int64_t, int64_t>(int64_t n)> rows;
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

// The in-memory datasets: Fashion-MNIST (IDX files) and CIFAR (binary batches), kept as bytes and
// converted to floats in get(), and a deterministic synthetic dataset whose sample i depends only
// on (seed, i). Image folders are in image_folder.cpp.
#include "data/dataset.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "core/rng.h"
#include "data/idx.h"
#include "data/image.h"
#include "data/transforms.h"

namespace dpt {
namespace {

namespace fs = std::filesystem;

// Images kept as bytes (CHW per sample), converted to floats in get(): Fashion-MNIST, CIFAR.
class ByteImages final : public Dataset {
 public:
  ByteImages(std::string name, int64_t n, int64_t c, int64_t h, int64_t w, int64_t classes,
             std::vector<uint8_t> images, std::vector<uint8_t> labels)
      : name_(std::move(name)),
        n_(n),
        c_(c),
        h_(h),
        w_(w),
        classes_(classes),
        images_(std::move(images)),
        labels_(std::move(labels)) {}

  std::string name() const override { return name_; }
  int64_t size() const override { return n_; }
  int64_t channels() const override { return c_; }
  int64_t height() const override { return h_; }
  int64_t width() const override { return w_; }
  int64_t num_classes() const override { return classes_; }

  int64_t get(int64_t i, float* image) const override {
    DPT_ASSERT(i >= 0 && i < n_, "sample ", i, " out of range for ", name_, " (", n_, ")");
    const int64_t px = c_ * h_ * w_;
    const uint8_t* src = images_.data() + i * px;
    const float* scale = unit_scale();  // torchvision's ToTensor values
    for (int64_t k = 0; k < px; ++k) image[k] = scale[src[k]];
    return labels_[size_t(i)];
  }
  int64_t label(int64_t i) const override { return labels_[size_t(i)]; }

 private:
  std::string name_;
  int64_t n_, c_, h_, w_, classes_;
  std::vector<uint8_t> images_;  // [n, c, h, w]
  std::vector<uint8_t> labels_;  // [n]
};

// dir/base.gz if present, else dir/base; throws FileError naming both when neither exists.
std::string find_idx_file(const fs::path& dir, const std::string& base) {
  std::error_code ec;
  const fs::path gz = dir / (base + ".gz");
  const fs::path plain = dir / base;
  if (fs::exists(gz, ec)) return gz.string();
  if (fs::exists(plain, ec)) return plain.string();
  DPT_THROW(FileError, "missing data file ", gz.string(), " (or uncompressed ", plain.string(),
            ")");
}

class Synthetic final : public Dataset {
 public:
  Synthetic(int64_t size, int64_t channels, int64_t image_size, int64_t num_classes, uint64_t seed)
      : size_(size), c_(channels), hw_(image_size), classes_(num_classes), seed_(seed) {
    const int64_t n = c_ * hw_ * hw_;
    patterns_.resize(size_t(classes_ * n));
    for (int64_t k = 0; k < classes_; ++k) {
      Rng rng(seed_, kPatternStream + uint64_t(k));
      for (int64_t j = 0; j < n; ++j) patterns_[size_t(k * n + j)] = rng.uniform();
    }
  }

  std::string name() const override { return "synthetic"; }
  int64_t size() const override { return size_; }
  int64_t channels() const override { return c_; }
  int64_t height() const override { return hw_; }
  int64_t width() const override { return hw_; }
  int64_t num_classes() const override { return classes_; }

  int64_t get(int64_t i, float* image) const override {
    DPT_ASSERT(i >= 0 && i < size_, "sample ", i, " out of range for synthetic (", size_, ")");
    const int64_t label = i % classes_;
    const int64_t n = c_ * hw_ * hw_;
    const float* pattern = patterns_.data() + label * n;
    Rng rng(seed_, uint64_t(i));
    for (int64_t j = 0; j < n; ++j) {
      const float v = 0.25f + 0.5f * pattern[j] + 0.1f * rng.normal();
      image[j] = std::clamp(v, 0.0f, 1.0f);
    }
    return label;
  }
  int64_t label(int64_t i) const override { return i % classes_; }

 private:
  // Pattern streams sit far above any sample index, so they never share a stream with a sample.
  static constexpr uint64_t kPatternStream = uint64_t(1) << 62;
  int64_t size_, c_, hw_, classes_;
  uint64_t seed_;
  std::vector<float> patterns_;  // [classes, c, hw, hw]
};

}  // namespace

std::unique_ptr<Dataset> load_fashion_mnist(const std::string& dir, bool train, int64_t limit) {
  DPT_CHECK(limit != 0, UsageError,
            "sample limit must be positive (or negative for the whole dataset), got 0");
  std::error_code ec;
  const fs::path d(dir);
  DPT_CHECK(fs::exists(d, ec), FileError, "data directory ", dir,
            " does not exist (install Debian's dataset-fashion-mnist or pass --data-dir)");
  DPT_CHECK(fs::is_directory(d, ec), FileError, "data directory ", dir, " is not a directory");

  const std::string prefix = train ? "train" : "t10k";
  const std::string images_path = find_idx_file(d, prefix + "-images-idx3-ubyte");
  const std::string labels_path = find_idx_file(d, prefix + "-labels-idx1-ubyte");
  IdxArray images = read_idx_images(images_path);
  IdxArray labels = read_idx_labels(labels_path);

  const int64_t n = images.dims[0];
  DPT_CHECK(n > 0, FileError, images_path, ": holds no images");
  DPT_CHECK(labels.dims[0] == n, FileError, images_path, " holds ", n, " images but ", labels_path,
            " holds ", labels.dims[0], " labels");
  for (size_t i = 0; i < labels.data.size(); ++i) {
    DPT_CHECK(labels.data[i] < 10, FileError, labels_path, ": label ", int(labels.data[i]),
              " of item ", i, " is out of range (Fashion-MNIST has classes 0..9)");
  }

  const int64_t rows = images.dims[1], cols = images.dims[2];
  int64_t keep = n;
  if (limit > 0 && limit < n) {
    keep = limit;
    images.data.resize(size_t(keep * rows * cols));
    images.data.shrink_to_fit();
    labels.data.resize(size_t(keep));
    labels.data.shrink_to_fit();
  }
  return std::make_unique<ByteImages>(std::string("fashion-mnist-") + (train ? "train" : "test"),
                                      keep, 1, rows, cols, 10, std::move(images.data),
                                      std::move(labels.data));
}

std::unique_ptr<Dataset> load_cifar(const std::string& dir, int classes, bool train,
                                    int64_t limit) {
  DPT_CHECK(classes == 10 || classes == 100, UsageError, "CIFAR has 10 or 100 classes, not ",
            classes);
  DPT_CHECK(limit != 0, UsageError,
            "sample limit must be positive (or negative for the whole dataset), got 0");
  const std::string sub = classes == 10 ? "cifar-10-batches-bin" : "cifar-100-binary";
  std::vector<std::string> names;
  if (classes == 10 && train)
    for (int k = 1; k <= 5; ++k) names.push_back("data_batch_" + std::to_string(k) + ".bin");
  else
    names.push_back(classes == 10 ? "test_batch.bin" : train ? "train.bin" : "test.bin");
  std::error_code ec;
  fs::path base(dir);
  DPT_CHECK(fs::is_directory(base, ec), FileError, "data directory ", dir,
            " does not exist or is not a directory");
  if (!fs::exists(base / names[0], ec) && fs::exists(base / sub / names[0], ec)) base /= sub;
  const int64_t label_bytes = classes == 10 ? 1 : 2, px = 3 * 32 * 32, record = label_bytes + px;
  std::vector<uint8_t> images, labels;
  for (const std::string& name : names) {
    const std::string path = (base / name).string();
    DPT_CHECK(fs::is_regular_file(path, ec), FileError, "missing CIFAR-", classes, " file ", path,
              " (the binary version, from https://www.cs.toronto.edu/~kriz/cifar.html)");
    const std::vector<uint8_t> bytes = read_file_bytes(path);
    const auto size = int64_t(bytes.size());
    DPT_CHECK(size > 0 && size % record == 0 && size / record <= 1'000'000, FileError, path, ": ",
              size, " bytes is not a whole number of ", record, "-byte CIFAR-", classes,
              " records");
    for (int64_t r = 0; r < size / record; ++r) {
      const uint8_t* rec = bytes.data() + r * record;
      const uint8_t y = rec[label_bytes - 1];
      DPT_CHECK(y < classes, FileError, path, ": label ", int(y), " of record ", r,
                " is out of range (CIFAR-", classes, " has classes 0..", classes - 1, ")");
      labels.push_back(y);
      images.insert(images.end(), rec + label_bytes, rec + record);
    }
  }
  auto n = int64_t(labels.size());
  if (limit > 0 && limit < n) {
    n = limit;
    labels.resize(size_t(n));
    images.resize(size_t(n * px));
  }
  return std::make_unique<ByteImages>(
      "cifar" + std::to_string(classes) + (train ? "-train" : "-test"), n, 3, 32, 32, classes,
      std::move(images), std::move(labels));
}

std::unique_ptr<Dataset> make_synthetic(int64_t size, int64_t channels, int64_t image_size,
                                        int64_t num_classes, uint64_t seed) {
  DPT_CHECK(size >= 1, UsageError, "synthetic dataset size must be at least 1, got ", size);
  DPT_CHECK(channels >= 1, UsageError, "synthetic channels must be at least 1, got ", channels);
  DPT_CHECK(image_size >= 1, UsageError, "synthetic image size must be at least 1, got ",
            image_size);
  DPT_CHECK(num_classes >= 1, UsageError, "synthetic number of classes must be at least 1, got ",
            num_classes);
  constexpr int64_t kMax = 1'000'000'000;
  // Checked step by step so that no product can overflow.
  DPT_CHECK(channels <= kMax && image_size <= kMax / image_size &&
                image_size * image_size <= kMax / channels,
            UsageError, "synthetic image ", channels, "x", image_size, "x", image_size,
            " is too large (more than ", kMax, " values)");
  const int64_t per_sample = channels * image_size * image_size;
  DPT_CHECK(size <= kMax / per_sample, UsageError, "synthetic dataset of ", size, " samples of ",
            channels, "x", image_size, "x", image_size, " is too large (more than ", kMax,
            " values in total)");
  constexpr int64_t kMaxPatterns = 100'000'000;  // the class patterns are kept in memory
  DPT_CHECK(num_classes <= kMaxPatterns / per_sample, UsageError, "synthetic dataset with ",
            num_classes, " classes of ", channels, "x", image_size, "x", image_size,
            " patterns is too large (more than ", kMaxPatterns, " pattern values)");
  return std::make_unique<Synthetic>(size, channels, image_size, num_classes, seed);
}

}  // namespace dpt

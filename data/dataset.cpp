// The concrete datasets: Fashion-MNIST read from IDX files (kept as uint8, converted to float in
// get()) and a deterministic synthetic dataset whose sample i depends only on (seed, i).
#include "data/dataset.h"

#include <algorithm>
#include <filesystem>

#include "core/error.h"
#include "core/rng.h"
#include "data/idx.h"

namespace dpt {
namespace {

namespace fs = std::filesystem;

class FashionMnist final : public Dataset {
 public:
  FashionMnist(std::string name, int64_t n, int64_t rows, int64_t cols, std::vector<uint8_t> images,
               std::vector<uint8_t> labels)
      : name_(std::move(name)),
        n_(n),
        rows_(rows),
        cols_(cols),
        images_(std::move(images)),
        labels_(std::move(labels)) {}

  std::string name() const override { return name_; }
  int64_t size() const override { return n_; }
  int64_t channels() const override { return 1; }
  int64_t height() const override { return rows_; }
  int64_t width() const override { return cols_; }
  int64_t num_classes() const override { return 10; }

  int64_t get(int64_t i, float* image) const override {
    DPT_ASSERT(i >= 0 && i < n_, "sample ", i, " out of range for ", name_, " (", n_, ")");
    const int64_t px = rows_ * cols_;
    const uint8_t* src = images_.data() + i * px;
    for (int64_t k = 0; k < px; ++k) image[k] = float(src[k]) * (1.0f / 255.0f);
    return labels_[size_t(i)];
  }

 private:
  std::string name_;
  int64_t n_, rows_, cols_;
  std::vector<uint8_t> images_;  // [n, rows, cols]
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
  return std::make_unique<FashionMnist>(std::string("fashion-mnist-") + (train ? "train" : "test"),
                                        keep, rows, cols, std::move(images.data),
                                        std::move(labels.data));
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

// Tests for data/: the IDX reader (gzip and plain files, and every malformed-file error), the
// Fashion-MNIST and synthetic datasets, and the Loader (epoch order, drop_last, resume by skipping,
// augmentation, normalisation, prefetch bound, error transport and shutdown).
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <iostream>
#include <map>
#include <numeric>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "data/dataset.h"
#include "data/idx.h"

namespace fs = std::filesystem;
using namespace dpt;

namespace {

// ---------------------------------------------------------------------------------------------
// Helpers: temporary directories and IDX writers (independent of the reader under test).

class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    path_ = fs::temp_directory_path() /
            ("dpt_test_data_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

using Bytes = std::vector<uint8_t>;

void put_be32(Bytes& b, uint32_t v) {
  b.push_back(uint8_t(v >> 24));
  b.push_back(uint8_t(v >> 16));
  b.push_back(uint8_t(v >> 8));
  b.push_back(uint8_t(v));
}

uint8_t pixel_value(int64_t i, int64_t y, int64_t x) {
  return uint8_t((i * 31 + y * 7 + x) % 256);
}

// An IDX images file: magic, dims, then `n_data` images worth of pixels (default: n).
Bytes images_idx(uint32_t n, uint32_t rows, uint32_t cols, int64_t n_data = -1,
                 uint32_t magic = 0x00000803) {
  Bytes b;
  put_be32(b, magic);
  put_be32(b, n);
  put_be32(b, rows);
  put_be32(b, cols);
  if (n_data < 0) n_data = n;
  for (int64_t i = 0; i < n_data; ++i)
    for (uint32_t y = 0; y < rows; ++y)
      for (uint32_t x = 0; x < cols; ++x) b.push_back(pixel_value(i, y, x));
  return b;
}

Bytes labels_idx(const std::vector<uint8_t>& labels, uint32_t magic = 0x00000801) {
  Bytes b;
  put_be32(b, magic);
  put_be32(b, uint32_t(labels.size()));
  b.insert(b.end(), labels.begin(), labels.end());
  return b;
}

void write_plain(const std::string& path, const Bytes& b) {
  std::ofstream f(path, std::ios::binary);
  ASSERT_TRUE(f) << path;
  f.write(reinterpret_cast<const char*>(b.data()), std::streamsize(b.size()));
  ASSERT_TRUE(f.good()) << path;
}

void write_gz(const std::string& path, const Bytes& b) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  if (!b.empty()) {
    ASSERT_EQ(gzwrite(f, b.data(), unsigned(b.size())), int(b.size())) << path;
  }
  ASSERT_EQ(gzclose(f), Z_OK) << path;
}

Bytes read_raw(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

std::vector<uint8_t> cyclic_labels(size_t n) {
  std::vector<uint8_t> l(n);
  for (size_t i = 0; i < n; ++i) l[i] = uint8_t((i * 3) % 10);
  return l;
}

// Runs fn and returns the message of the FileError it must throw.
std::string file_error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const FileError& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected FileError, got another exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected FileError, nothing was thrown";
  return "";
}

#define EXPECT_CONTAINS(haystack, needle)                          \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) \
      << "message: \"" << (haystack) << "\"\n does not contain \"" << (needle) << "\""

// ---------------------------------------------------------------------------------------------
// IDX reader

TEST(Idx, ReadsGzipAndPlainImagesAndLabels) {
  TempDir dir;
  const Bytes img = images_idx(3, 4, 5);
  const std::vector<uint8_t> lab = {7, 0, 9};
  write_gz(dir.file("img.gz"), img);
  write_plain(dir.file("img"), img);
  write_gz(dir.file("lab.gz"), labels_idx(lab));
  write_plain(dir.file("lab"), labels_idx(lab));
  // The .gz file really is compressed (the reader must decompress, not copy).
  ASSERT_EQ(read_raw(dir.file("img.gz"))[0], 0x1f);

  for (const char* name : {"img.gz", "img"}) {
    IdxArray a = read_idx_images(dir.file(name));
    ASSERT_EQ(a.dims, (std::vector<int64_t>{3, 4, 5})) << name;
    ASSERT_EQ(a.data.size(), 60u) << name;
    for (int i = 0; i < 3; ++i)
      for (int y = 0; y < 4; ++y)
        for (int x = 0; x < 5; ++x)
          ASSERT_EQ(a.data[size_t(i * 20 + y * 5 + x)], pixel_value(i, y, x)) << name;
  }
  for (const char* name : {"lab.gz", "lab"}) {
    IdxArray a = read_idx_labels(dir.file(name));
    EXPECT_EQ(a.dims, (std::vector<int64_t>{3})) << name;
    EXPECT_EQ(a.data, lab) << name;
  }
}

TEST(Idx, LargerGzipFileRoundTrips) {
  // Bigger than the reader's internal buffers, so several gzread calls are needed.
  TempDir dir;
  const Bytes img = images_idx(3000, 28, 28);
  write_gz(dir.file("big.gz"), img);
  IdxArray a = read_idx_images(dir.file("big.gz"));
  ASSERT_EQ(a.dims, (std::vector<int64_t>{3000, 28, 28}));
  EXPECT_TRUE(std::equal(a.data.begin(), a.data.end(), img.begin() + 16));
}

TEST(Idx, BadMagicNamesFileAndMagic) {
  TempDir dir;
  const std::string p = dir.file("train-images-idx3-ubyte.gz");
  write_gz(p, images_idx(2, 3, 3, -1, 0x1234));
  std::string msg = file_error_of([&] { read_idx_images(p); });
  EXPECT_CONTAINS(msg, p);
  EXPECT_CONTAINS(msg, "bad magic 0x00001234");
  EXPECT_CONTAINS(msg, "0x00000803");

  // A labels file passed where images are expected (and vice versa) is also a bad magic.
  const std::string lp = dir.file("labels");
  write_plain(lp, labels_idx({1, 2}));
  msg = file_error_of([&] { read_idx_images(lp); });
  EXPECT_CONTAINS(msg, lp);
  EXPECT_CONTAINS(msg, "0x00000801");
  msg = file_error_of([&] { read_idx_labels(p); });
  EXPECT_CONTAINS(msg, p);
  EXPECT_CONTAINS(msg, "bad magic");
}

TEST(Idx, TruncatedPayloadIsAnError) {
  TempDir dir;
  for (bool gz : {true, false}) {
    const std::string p = dir.file(gz ? "trunc.gz" : "trunc");
    const Bytes b = images_idx(5, 4, 4, /*n_data=*/4);  // header says 5 images, data for 4
    gz ? write_gz(p, b) : write_plain(p, b);
    const std::string msg = file_error_of([&] { read_idx_images(p); });
    EXPECT_CONTAINS(msg, p);
    EXPECT_CONTAINS(msg, "truncated");
  }
  // Labels too.
  Bytes lb = labels_idx({1, 2, 3});
  lb.pop_back();
  write_gz(dir.file("lab.gz"), lb);
  EXPECT_CONTAINS(file_error_of([&] { read_idx_labels(dir.file("lab.gz")); }), "truncated");
}

TEST(Idx, TruncatedHeaderAndTinyFiles) {
  TempDir dir;
  const std::string p = dir.file("short");
  write_plain(p, Bytes{0, 0});
  std::string msg = file_error_of([&] { read_idx_images(p); });
  EXPECT_CONTAINS(msg, p);
  EXPECT_CONTAINS(msg, "too short");

  const std::string e = dir.file("empty.gz");
  write_gz(e, {});
  EXPECT_CONTAINS(file_error_of([&] { read_idx_labels(e); }), e);

  Bytes head = images_idx(2, 3, 3);
  head.resize(10);  // magic + part of the dims
  const std::string h = dir.file("head.gz");
  write_gz(h, head);
  msg = file_error_of([&] { read_idx_images(h); });
  EXPECT_CONTAINS(msg, h);
  EXPECT_CONTAINS(msg, "header");
}

TEST(Idx, CutGzipStreamIsAnError) {
  // The compressed bytes themselves end early (a partial download).
  TempDir dir;
  const std::string full = dir.file("full.gz");
  write_gz(full, images_idx(200, 28, 28));
  Bytes raw = read_raw(full);
  ASSERT_GT(raw.size(), 100u);
  for (size_t cut : {raw.size() / 2, raw.size() - 4}) {  // mid-stream, and inside the trailer
    const std::string p = dir.file("cut" + std::to_string(cut) + ".gz");
    write_plain(p, Bytes(raw.begin(), raw.begin() + std::ptrdiff_t(cut)));
    EXPECT_CONTAINS(file_error_of([&] { read_idx_images(p); }), p);
  }
}

TEST(Idx, CorruptGzipDataIsAnError) {
  TempDir dir;
  const std::string full = dir.file("full.gz");
  write_gz(full, images_idx(200, 28, 28));
  Bytes raw = read_raw(full);
  // Damage the CRC in the trailer (the payload still inflates to the right length)...
  Bytes crc = raw;
  crc[crc.size() - 6] ^= 0xff;
  const std::string pc = dir.file("crc.gz");
  write_plain(pc, crc);
  EXPECT_CONTAINS(file_error_of([&] { read_idx_images(pc); }), pc);
  // ...and the deflate data itself.
  Bytes body = raw;
  for (size_t k = 20; k < 60; ++k) body[k] ^= 0x5a;
  const std::string pb = dir.file("body.gz");
  write_plain(pb, body);
  EXPECT_CONTAINS(file_error_of([&] { read_idx_images(pb); }), pb);
}

TEST(Idx, TrailingBytesAreAnError) {
  TempDir dir;
  for (bool gz : {true, false}) {
    const std::string p = dir.file(gz ? "trail.gz" : "trail");
    Bytes b = images_idx(2, 3, 3);
    b.push_back(42);
    gz ? write_gz(p, b) : write_plain(p, b);
    const std::string msg = file_error_of([&] { read_idx_images(p); });
    EXPECT_CONTAINS(msg, p);
    EXPECT_CONTAINS(msg, "trailing");
  }
  const std::string lp = dir.file("lab.gz");
  Bytes lb = labels_idx({1, 2});
  lb.push_back(0);
  write_gz(lp, lb);
  EXPECT_CONTAINS(file_error_of([&] { read_idx_labels(lp); }), "trailing");
}

TEST(Idx, ImplausibleHeadersAreRejectedBeforeAllocating) {
  TempDir dir;
  struct Case {
    uint32_t n, rows, cols;
    const char* expect;
  };
  const Case cases[] = {
      {100'000'001, 28, 28, "items"},          // N over the limit
      {10, 0, 28, "dimension 1"},              // rows 0
      {10, 28, 4097, "dimension 2"},           // cols over the limit
      {100'000'000, 4096, 4096, "more than"},  // 1.6e15 bytes
  };
  for (const Case& c : cases) {
    const std::string p = dir.file("hdr.gz");
    write_gz(p, images_idx(c.n, c.rows, c.cols, /*n_data=*/0));
    const std::string msg = file_error_of([&] { read_idx_images(p); });
    EXPECT_CONTAINS(msg, p);
    EXPECT_CONTAINS(msg, c.expect);
  }
  // A plausible but lying header (10^7 images = 7.8 GB) over a tiny file must fail quickly as
  // truncated, without reserving gigabytes first.
  for (bool gz : {true, false}) {
    const std::string p = dir.file(gz ? "liar.gz" : "liar");
    gz ? write_gz(p, images_idx(10'000'000, 28, 28, 2))
       : write_plain(p, images_idx(10'000'000, 28, 28, 2));
    const auto t0 = std::chrono::steady_clock::now();
    EXPECT_CONTAINS(file_error_of([&] { read_idx_images(p); }), "truncated");
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  }
  // Labels: N over the limit.
  Bytes lb;
  put_be32(lb, 0x801);
  put_be32(lb, 200'000'000);
  write_gz(dir.file("l.gz"), lb);
  EXPECT_CONTAINS(file_error_of([&] { read_idx_labels(dir.file("l.gz")); }), "items");
}

TEST(Idx, MissingFileAndDirectory) {
  TempDir dir;
  const std::string p = dir.file("nope.gz");
  std::string msg = file_error_of([&] { read_idx_images(p); });
  EXPECT_CONTAINS(msg, p);
  msg = file_error_of([&] { read_idx_labels(dir.str()); });  // a directory, not a file
  EXPECT_CONTAINS(msg, dir.str());
}

// ---------------------------------------------------------------------------------------------
// Fashion-MNIST loading from a directory

// Writes a small dataset in Fashion-MNIST layout: train as .gz, t10k uncompressed.
void write_mini_mnist(const TempDir& dir, uint32_t n_train, uint32_t n_test) {
  write_gz(dir.file("train-images-idx3-ubyte.gz"), images_idx(n_train, 28, 28));
  write_gz(dir.file("train-labels-idx1-ubyte.gz"), labels_idx(cyclic_labels(n_train)));
  write_plain(dir.file("t10k-images-idx3-ubyte"), images_idx(n_test, 28, 28));
  write_plain(dir.file("t10k-labels-idx1-ubyte"), labels_idx(cyclic_labels(n_test)));
}

TEST(FashionMnist, LoadsGzipAndPlainLayouts) {
  TempDir dir;
  write_mini_mnist(dir, 12, 7);
  for (bool train : {true, false}) {
    auto ds = load_fashion_mnist(dir.str(), train);
    const int64_t n = train ? 12 : 7;
    ASSERT_EQ(ds->size(), n);
    EXPECT_EQ(ds->channels(), 1);
    EXPECT_EQ(ds->height(), 28);
    EXPECT_EQ(ds->width(), 28);
    EXPECT_EQ(ds->num_classes(), 10);
    std::vector<float> img(28 * 28);
    const auto labels = cyclic_labels(size_t(n));
    for (int64_t i = 0; i < n; ++i) {
      EXPECT_EQ(ds->get(i, img.data()), labels[size_t(i)]);
      for (int y = 0; y < 28; ++y)
        for (int x = 0; x < 28; ++x)
          ASSERT_FLOAT_EQ(img[size_t(y * 28 + x)], float(pixel_value(i, y, x)) / 255.0f);
    }
  }
}

TEST(FashionMnist, PrefersGzipOverPlain) {
  TempDir dir;
  write_mini_mnist(dir, 4, 4);
  // An uncompressed copy with different labels must be ignored while the .gz exists.
  write_plain(dir.file("train-images-idx3-ubyte"), images_idx(4, 28, 28));
  write_plain(dir.file("train-labels-idx1-ubyte"), labels_idx({9, 9, 9, 9}));
  auto ds = load_fashion_mnist(dir.str(), true);
  std::vector<float> img(28 * 28);
  EXPECT_EQ(ds->get(1, img.data()), 3);
}

TEST(FashionMnist, LimitKeepsFirstSamples) {
  TempDir dir;
  write_mini_mnist(dir, 12, 7);
  auto ds = load_fashion_mnist(dir.str(), true, 5);
  ASSERT_EQ(ds->size(), 5);
  std::vector<float> img(28 * 28);
  EXPECT_EQ(ds->get(4, img.data()), cyclic_labels(5)[4]);
  EXPECT_FLOAT_EQ(img[3], float(pixel_value(4, 0, 3)) / 255.0f);
  EXPECT_EQ(load_fashion_mnist(dir.str(), true, 1000)->size(), 12);  // limit above size: all
  EXPECT_EQ(load_fashion_mnist(dir.str(), true, -1)->size(), 12);
  EXPECT_THROW(load_fashion_mnist(dir.str(), true, 0), UsageError);
}

TEST(FashionMnist, CountMismatchNamesBothFiles) {
  TempDir dir;
  write_mini_mnist(dir, 12, 7);
  write_gz(dir.file("train-labels-idx1-ubyte.gz"), labels_idx(cyclic_labels(11)));
  const std::string msg = file_error_of([&] { load_fashion_mnist(dir.str(), true); });
  EXPECT_CONTAINS(msg, "train-images-idx3-ubyte.gz");
  EXPECT_CONTAINS(msg, "train-labels-idx1-ubyte.gz");
  EXPECT_CONTAINS(msg, "12");
  EXPECT_CONTAINS(msg, "11");
}

TEST(FashionMnist, LabelOutOfRange) {
  TempDir dir;
  write_mini_mnist(dir, 12, 7);
  std::vector<uint8_t> l = cyclic_labels(7);
  l[5] = 10;
  write_plain(dir.file("t10k-labels-idx1-ubyte"), labels_idx(l));
  const std::string msg = file_error_of([&] { load_fashion_mnist(dir.str(), false); });
  EXPECT_CONTAINS(msg, dir.file("t10k-labels-idx1-ubyte"));
  EXPECT_CONTAINS(msg, "label 10");
  EXPECT_NO_THROW(load_fashion_mnist(dir.str(), true));  // train is still fine
}

TEST(FashionMnist, MalformedFileInDirectoryNamesIt) {
  TempDir dir;
  write_mini_mnist(dir, 12, 7);
  write_gz(dir.file("train-images-idx3-ubyte.gz"), images_idx(12, 28, 28, 11));
  const std::string msg = file_error_of([&] { load_fashion_mnist(dir.str(), true); });
  EXPECT_CONTAINS(msg, dir.file("train-images-idx3-ubyte.gz"));
  EXPECT_CONTAINS(msg, "truncated");
}

TEST(FashionMnist, MissingFileAndDirectory) {
  TempDir dir;
  write_mini_mnist(dir, 12, 7);
  fs::remove(dir.file("t10k-labels-idx1-ubyte"));
  std::string msg = file_error_of([&] { load_fashion_mnist(dir.str(), false); });
  EXPECT_CONTAINS(msg, "t10k-labels-idx1-ubyte");
  EXPECT_CONTAINS(msg, dir.str());

  const std::string missing = dir.file("no-such-dir");
  msg = file_error_of([&] { load_fashion_mnist(missing, true); });
  EXPECT_CONTAINS(msg, "data directory " + missing + " does not exist");
  EXPECT_CONTAINS(msg, "dataset-fashion-mnist");
  EXPECT_CONTAINS(msg, "--data-dir");
}

class RealFashionMnist : public ::testing::Test {
 protected:
  static constexpr const char* kDir = "/usr/share/datasets/fashion-mnist";
  void SetUp() override {
    if (!fs::is_directory(kDir))
      GTEST_SKIP() << kDir << " is absent (install Debian's dataset-fashion-mnist to run this)";
  }
  static void check(bool train, int64_t n) {
    auto ds = load_fashion_mnist(kDir, train);
    ASSERT_EQ(ds->size(), n);
    EXPECT_EQ(ds->channels(), 1);
    EXPECT_EQ(ds->height(), 28);
    EXPECT_EQ(ds->width(), 28);
    EXPECT_EQ(ds->num_classes(), 10);
    std::vector<int64_t> hist(10, 0);
    std::vector<float> img(28 * 28);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t label = ds->get(i, img.data());
      ASSERT_TRUE(label >= 0 && label < 10) << label;
      ++hist[size_t(label)];
      for (float v : img) {
        ASSERT_TRUE(v >= 0.0f && v <= 1.0f) << v;
        sum += v;
      }
      if (i == 0) {
        EXPECT_EQ(label, 9);  // both splits start with an ankle boot
      }
    }
    for (int k = 0; k < 10; ++k) EXPECT_EQ(hist[size_t(k)], n / 10) << "class " << k;
    const double mean = sum / double(n * 28 * 28);
    EXPECT_NEAR(mean, 0.286, 0.01);  // the well-known Fashion-MNIST pixel mean
  }
};

TEST_F(RealFashionMnist, Train) {
  check(true, 60000);
}
TEST_F(RealFashionMnist, Test) {
  check(false, 10000);
}

// ---------------------------------------------------------------------------------------------
// Synthetic data

std::vector<float> sample(const Dataset& ds, int64_t i, int64_t* label = nullptr) {
  std::vector<float> img(size_t(ds.channels() * ds.height() * ds.width()));
  const int64_t l = ds.get(i, img.data());
  if (label) *label = l;
  return img;
}

TEST(Synthetic, DeterministicPerSeedAndIndex) {
  auto a = make_synthetic(50, 3, 8, 5, 42);
  auto b = make_synthetic(50, 3, 8, 5, 42);
  auto c = make_synthetic(50, 3, 8, 5, 43);
  auto bigger = make_synthetic(5000, 3, 8, 5, 42);  // sample i does not depend on the size
  EXPECT_EQ(a->size(), 50);
  EXPECT_EQ(a->channels(), 3);
  EXPECT_EQ(a->height(), 8);
  EXPECT_EQ(a->width(), 8);
  EXPECT_EQ(a->num_classes(), 5);
  const auto late = sample(*a, 17);  // access order must not matter
  for (int64_t i = 0; i < 50; ++i) {
    int64_t la = -1, lb = -1, lc = -1;
    const auto xa = sample(*a, i, &la);
    EXPECT_EQ(xa, sample(*b, i, &lb)) << i;
    EXPECT_EQ(xa, sample(*bigger, i)) << i;
    EXPECT_NE(xa, sample(*c, i, &lc)) << i;
    EXPECT_EQ(la, lb);
    EXPECT_EQ(la, i % 5);
    for (float v : xa) ASSERT_TRUE(v >= 0.0f && v <= 1.0f) << v;
  }
  EXPECT_EQ(late, sample(*a, 17));
  EXPECT_NE(sample(*a, 3), sample(*a, 8));  // same class, different noise
}

TEST(Synthetic, IsLearnableByNearestClassMean) {
  const int64_t k = 10;
  auto ds = make_synthetic(400, 1, 12, k, 7);
  const size_t d = 144;
  std::vector<std::vector<double>> means(size_t(k), std::vector<double>(d, 0.0));
  std::vector<int> counts(size_t(k), 0);
  for (int64_t i = 0; i < 200; ++i) {
    int64_t l;
    const auto x = sample(*ds, i, &l);
    for (size_t j = 0; j < d; ++j) means[size_t(l)][j] += x[j];
    ++counts[size_t(l)];
  }
  for (int64_t c = 0; c < k; ++c)
    for (double& v : means[size_t(c)]) v /= counts[size_t(c)];
  int correct = 0;
  for (int64_t i = 200; i < 400; ++i) {
    int64_t l;
    const auto x = sample(*ds, i, &l);
    int64_t best = -1;
    double best_d = 1e300;
    for (int64_t c = 0; c < k; ++c) {
      double dist = 0;
      for (size_t j = 0; j < d; ++j)
        dist += (x[j] - means[size_t(c)][j]) * (x[j] - means[size_t(c)][j]);
      if (dist < best_d) best_d = dist, best = c;
    }
    correct += best == l;
  }
  EXPECT_GE(correct, 190);
}

TEST(Synthetic, RejectsBadArguments) {
  EXPECT_THROW(make_synthetic(0, 1, 8, 10, 0), UsageError);
  EXPECT_THROW(make_synthetic(10, 0, 8, 10, 0), UsageError);
  EXPECT_THROW(make_synthetic(10, 1, 0, 10, 0), UsageError);
  EXPECT_THROW(make_synthetic(10, 1, 8, 0, 0), UsageError);
  EXPECT_THROW(make_synthetic(-5, 1, 8, 10, 0), UsageError);
  EXPECT_THROW(make_synthetic(1'000'000'000, 3, 32, 10, 0), UsageError);     // 3e12 values
  EXPECT_THROW(make_synthetic(10, 1, int64_t(1) << 40, 10, 0), UsageError);  // would overflow
  EXPECT_THROW(make_synthetic(10, int64_t(1) << 62, 2, 10, 0), UsageError);
  EXPECT_NO_THROW(make_synthetic(1, 1, 1, 1, 0));
}

// ---------------------------------------------------------------------------------------------
// Loader

// A dataset with known pixels: label = index (so batches reveal which samples they hold), and
// every pixel is nonzero and distinct within an image, so crops and flips can be recovered.
class KnownDataset : public Dataset {
 public:
  KnownDataset(int64_t n, int64_t c, int64_t h, int64_t w) : n_(n), c_(c), h_(h), w_(w) {}
  std::string name() const override { return "known"; }
  int64_t size() const override { return n_; }
  int64_t channels() const override { return c_; }
  int64_t height() const override { return h_; }
  int64_t width() const override { return w_; }
  int64_t num_classes() const override { return n_; }
  static float value(int64_t i, int64_t k) { return float(1 + (i * 7 + k) % 250) / 255.0f; }
  int64_t get(int64_t i, float* image) const override {
    gets.fetch_add(1);
    for (int64_t k = 0; k < c_ * h_ * w_; ++k) image[k] = value(i, k);
    return i;
  }
  int64_t label(int64_t i) const override { return i; }
  mutable std::atomic<int64_t> gets{0};

 private:
  int64_t n_, c_, h_, w_;
};

struct Epoch {
  std::vector<std::vector<float>> images;  // per batch
  std::vector<std::vector<int64_t>> labels;
  std::vector<int64_t> indices;
};

Epoch run_epoch(Loader& loader, int64_t epoch, int64_t skip = 0) {
  Epoch e;
  loader.start_epoch(epoch, skip);
  Batch b;
  while (loader.next(b)) {
    EXPECT_EQ(b.images.dtype(), DType::F32);
    EXPECT_TRUE(b.images.device().is_cpu());
    EXPECT_EQ(b.labels.dtype(), DType::I64);
    EXPECT_EQ(b.images.ndim(), 4);
    EXPECT_EQ(b.labels.ndim(), 1);
    EXPECT_EQ(b.images.dim(0), b.labels.dim(0));
    e.images.push_back(b.images.to_vector());
    const int64_t* l = b.labels.data<int64_t>();
    e.labels.emplace_back(l, l + b.labels.numel());
    e.indices.push_back(b.index);
  }
  return e;
}

std::vector<int64_t> flat(const std::vector<std::vector<int64_t>>& v) {
  std::vector<int64_t> out;
  for (const auto& x : v) out.insert(out.end(), x.begin(), x.end());
  return out;
}

LoaderOptions opts(int64_t batch, bool shuffle, bool drop_last, uint64_t seed = 1) {
  LoaderOptions o;
  o.batch_size = batch;
  o.shuffle = shuffle;
  o.drop_last = drop_last;
  o.seed = seed;
  return o;
}

TEST(Loader, EverySampleOncePerEpochKeepingLastBatch) {
  KnownDataset ds(103, 2, 5, 4);
  Loader loader(ds, opts(10, true, false));
  EXPECT_EQ(loader.batches_per_epoch(), 11);
  for (int64_t epoch : {0, 1}) {
    Epoch e = run_epoch(loader, epoch);
    ASSERT_EQ(e.labels.size(), 11u);
    for (size_t b = 0; b < 11; ++b) {
      EXPECT_EQ(e.indices[b], int64_t(b));
      EXPECT_EQ(e.labels[b].size(), b < 10 ? 10u : 3u);
    }
    const std::vector<int64_t> order = flat(e.labels);
    EXPECT_EQ(order, loader.epoch_order(epoch));  // batches follow the published order
    std::vector<int64_t> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int64_t> expect(103);
    std::iota(expect.begin(), expect.end(), 0);
    EXPECT_EQ(sorted, expect);
    // Images are the dataset's samples, untouched (no augmentation or normalisation).
    const size_t chw = 40;
    for (size_t b = 0; b < e.labels.size(); ++b)
      for (size_t j = 0; j < e.labels[b].size(); ++j)
        for (size_t k = 0; k < chw; ++k)
          ASSERT_EQ(e.images[b][j * chw + k], KnownDataset::value(e.labels[b][j], int64_t(k)));
  }
}

TEST(Loader, NoShuffleIsIdentityOrder) {
  KnownDataset ds(25, 1, 2, 2);
  Loader loader(ds, opts(4, false, false));
  std::vector<int64_t> expect(25);
  std::iota(expect.begin(), expect.end(), 0);
  EXPECT_EQ(loader.epoch_order(3), expect);
  EXPECT_EQ(flat(run_epoch(loader, 3).labels), expect);
}

TEST(Loader, DropLastDropsThePartialBatch) {
  KnownDataset ds(103, 1, 3, 3);
  Loader loader(ds, opts(10, true, true));
  EXPECT_EQ(loader.batches_per_epoch(), 10);
  Epoch e = run_epoch(loader, 2);
  ASSERT_EQ(e.labels.size(), 10u);
  for (const auto& l : e.labels) EXPECT_EQ(l.size(), 10u);
  const std::vector<int64_t> order = loader.epoch_order(2);
  EXPECT_EQ(flat(e.labels), std::vector<int64_t>(order.begin(), order.begin() + 100));

  // Exact multiple: nothing dropped; batch == dataset size: one batch.
  KnownDataset ds2(30, 1, 1, 1);
  Loader exact(ds2, opts(10, true, true));
  EXPECT_EQ(exact.batches_per_epoch(), 3);
  Loader whole(ds2, opts(30, true, true));
  EXPECT_EQ(whole.batches_per_epoch(), 1);
  Loader bigger(ds2, opts(64, true, false));  // larger than the dataset, partial batch kept
  EXPECT_EQ(bigger.batches_per_epoch(), 1);
  EXPECT_EQ(run_epoch(bigger, 0).labels.at(0).size(), 30u);
}

TEST(Loader, OrderDependsOnSeedAndEpochOnly) {
  KnownDataset ds(200, 1, 1, 1);
  Loader a(ds, opts(16, true, false, 5));
  Loader b(ds, opts(7, true, true, 5));  // batch size and drop_last do not change the order
  Loader c(ds, opts(16, true, false, 6));
  EXPECT_EQ(a.epoch_order(0), b.epoch_order(0));
  EXPECT_EQ(a.epoch_order(4), b.epoch_order(4));
  EXPECT_NE(a.epoch_order(0), c.epoch_order(0));
  EXPECT_NE(a.epoch_order(0), a.epoch_order(1));
  EXPECT_NE(a.epoch_order(1), a.epoch_order(2));
  std::vector<int64_t> identity(200);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_NE(a.epoch_order(0), identity);
  // Running an epoch twice (in another loader too) gives the same batches.
  EXPECT_EQ(flat(run_epoch(a, 3).labels), flat(run_epoch(a, 3).labels));
  Loader a2(ds, opts(16, true, false, 5));
  EXPECT_EQ(flat(run_epoch(a, 1).labels), flat(run_epoch(a2, 1).labels));
}

LoaderOptions augmented(int64_t batch, uint64_t seed = 3) {
  LoaderOptions o = opts(batch, true, false, seed);
  o.augment.crop_pad = 2;
  o.augment.hflip = true;
  o.mean = {0.5f, 0.25f};
  o.std = {0.25f, 2.0f};
  return o;
}

TEST(Loader, SkipResumesTheSameBatches) {
  KnownDataset ds(57, 2, 6, 6);
  Loader full(ds, augmented(5));
  Loader resumed(ds, augmented(5));
  const Epoch e = run_epoch(full, 4);
  ASSERT_EQ(e.labels.size(), 12u);
  for (int64_t skip : {0, 1, 7, 11, 12}) {
    const Epoch r = run_epoch(resumed, 4, skip);
    ASSERT_EQ(r.labels.size(), size_t(12 - skip)) << skip;
    for (size_t b = 0; b < r.labels.size(); ++b) {
      EXPECT_EQ(r.indices[b], int64_t(b) + skip);
      EXPECT_EQ(r.labels[b], e.labels[b + size_t(skip)]);
      EXPECT_EQ(r.images[b], e.images[b + size_t(skip)]);
    }
  }
}

TEST(Loader, AugmentationDependsOnSampleNotOnBatchingOrPrefetch) {
  KnownDataset ds(40, 2, 6, 6);
  LoaderOptions o1 = augmented(1);
  o1.prefetch = 1;
  LoaderOptions o2 = augmented(7);
  o2.prefetch = 5;
  o2.shuffle = false;  // a different order must not change a sample's augmentation either
  Loader l1(ds, o1), l2(ds, o2);
  const size_t chw = 72;
  auto by_sample = [&](const Epoch& e) {
    std::map<int64_t, std::vector<float>> m;
    for (size_t b = 0; b < e.labels.size(); ++b)
      for (size_t j = 0; j < e.labels[b].size(); ++j)
        m[e.labels[b][j]] = std::vector<float>(e.images[b].begin() + std::ptrdiff_t(j * chw),
                                               e.images[b].begin() + std::ptrdiff_t((j + 1) * chw));
    return m;
  };
  const auto m1 = by_sample(run_epoch(l1, 2));
  const auto m2 = by_sample(run_epoch(l2, 2));
  ASSERT_EQ(m1.size(), 40u);
  EXPECT_EQ(m1, m2);
  // A different epoch augments differently.
  const auto m3 = by_sample(run_epoch(l1, 3));
  int same = 0;
  for (const auto& [k, v] : m1) same += v == m3.at(k);
  EXPECT_LT(same, 10);
}

// Finds the crop offset (oy, ox in [0, 2*pad]) and flip that turn sample i into `out`, or
// returns false. The reference is crop-then-flip: out(y, x) = in(y + oy - pad, x' + ox - pad) with
// x' = w-1-x when flipped, and 0 outside the image.
bool recover(const std::vector<float>& out, size_t offset, int64_t i, int64_t c, int64_t h,
             int64_t w, int pad, int* oy_out, int* ox_out, bool* flip_out) {
  for (int flip = 0; flip < 2; ++flip)
    for (int oy = 0; oy <= 2 * pad; ++oy)
      for (int ox = 0; ox <= 2 * pad; ++ox) {
        bool ok = true;
        for (int64_t ch = 0; ch < c && ok; ++ch)
          for (int64_t y = 0; y < h && ok; ++y)
            for (int64_t x = 0; x < w && ok; ++x) {
              const int64_t sy = y + oy - pad, sx = (flip ? w - 1 - x : x) + ox - pad;
              const float expect = (sy >= 0 && sy < h && sx >= 0 && sx < w)
                                       ? KnownDataset::value(i, ch * h * w + sy * w + sx)
                                       : 0.0f;
              ok = out[offset + size_t(ch * h * w + y * w + x)] == expect;
            }
        if (ok) {
          *oy_out = oy, *ox_out = ox, *flip_out = flip;
          return true;
        }
      }
  return false;
}

TEST(Loader, RandomCropStaysWithinThePadding) {
  const int64_t c = 2, h = 6, w = 5;
  const int pad = 2;
  KnownDataset ds(300, c, h, w);
  LoaderOptions o = opts(32, true, false, 11);
  o.augment.crop_pad = pad;
  Loader loader(ds, o);
  const Epoch e = run_epoch(loader, 0);
  std::set<int> oys, oxs;
  int shifted = 0;
  for (size_t b = 0; b < e.labels.size(); ++b)
    for (size_t j = 0; j < e.labels[b].size(); ++j) {
      int oy, ox;
      bool flip;
      ASSERT_TRUE(recover(e.images[b], j * size_t(c * h * w), e.labels[b][j], c, h, w, pad, &oy,
                          &ox, &flip))
          << "sample " << e.labels[b][j] << " is not a crop of its padded image";
      EXPECT_FALSE(flip) << "hflip is off";
      oys.insert(oy);
      oxs.insert(ox);
      shifted += oy != pad || ox != pad;
    }
  // Offsets cover the whole range [0, 2*pad] in both directions.
  EXPECT_EQ(oys, (std::set<int>{0, 1, 2, 3, 4}));
  EXPECT_EQ(oxs, (std::set<int>{0, 1, 2, 3, 4}));
  EXPECT_GT(shifted, 200);
}

TEST(Loader, HorizontalFlipMirrorsExactlyAboutHalfTheTime) {
  const int64_t c = 2, h = 4, w = 7;
  KnownDataset ds(400, c, h, w);
  LoaderOptions o = opts(50, true, false, 12);
  o.augment.hflip = true;
  Loader loader(ds, o);
  const Epoch e = run_epoch(loader, 1);
  int flips = 0;
  for (size_t b = 0; b < e.labels.size(); ++b)
    for (size_t j = 0; j < e.labels[b].size(); ++j) {
      const int64_t i = e.labels[b][j];
      const size_t off = j * size_t(c * h * w);
      bool same = true, mirrored = true;
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t y = 0; y < h; ++y)
          for (int64_t x = 0; x < w; ++x) {
            const float v = e.images[b][off + size_t(ch * h * w + y * w + x)];
            same &= v == KnownDataset::value(i, ch * h * w + y * w + x);
            mirrored &= v == KnownDataset::value(i, ch * h * w + y * w + (w - 1 - x));
          }
      ASSERT_TRUE(same || mirrored) << "sample " << i;
      flips += mirrored;
    }
  EXPECT_GT(flips, 150);
  EXPECT_LT(flips, 250);
}

TEST(Loader, CropThenFlipIsConsistent) {
  const int64_t c = 2, h = 6, w = 6;
  KnownDataset ds(200, c, h, w);
  LoaderOptions o = opts(16, true, false, 13);
  o.augment.crop_pad = 1;
  o.augment.hflip = true;
  Loader loader(ds, o);
  const Epoch e = run_epoch(loader, 0);
  int flips = 0;
  for (size_t b = 0; b < e.labels.size(); ++b)
    for (size_t j = 0; j < e.labels[b].size(); ++j) {
      int oy, ox;
      bool flip;
      ASSERT_TRUE(
          recover(e.images[b], j * size_t(c * h * w), e.labels[b][j], c, h, w, 1, &oy, &ox, &flip));
      flips += flip;
    }
  EXPECT_GT(flips, 60);
  EXPECT_LT(flips, 140);
}

TEST(Loader, NormalisesPerChannel) {
  const int64_t c = 2, h = 3, w = 3;
  KnownDataset ds(10, c, h, w);
  LoaderOptions o = opts(4, false, false);
  o.mean = {0.5f, 0.25f};
  o.std = {0.25f, 2.0f};
  Loader loader(ds, o);
  const Epoch e = run_epoch(loader, 0);
  for (size_t b = 0; b < e.labels.size(); ++b)
    for (size_t j = 0; j < e.labels[b].size(); ++j)
      for (int64_t k = 0; k < c * h * w; ++k) {
        const int64_t ch = k / (h * w);
        const float x = KnownDataset::value(e.labels[b][j], k);
        const float expect = (x - o.mean[size_t(ch)]) / o.std[size_t(ch)];
        ASSERT_NEAR(e.images[b][j * size_t(c * h * w) + size_t(k)], expect, 1e-6f);
      }

  // With cropping, the zero padding is normalised too (as padding before ToTensor/Normalize).
  o.augment.crop_pad = 3;
  o.shuffle = true;
  Loader padded(ds, o);
  const Epoch p = run_epoch(padded, 0);
  std::set<float> values;
  for (const auto& img : p.images) values.insert(img.begin(), img.end());
  EXPECT_TRUE(values.count((0.0f - 0.5f) / 0.25f) || values.count((0.0f - 0.25f) / 2.0f));
}

TEST(Loader, PrefetchIsBounded) {
  KnownDataset ds(1000, 1, 2, 2);
  LoaderOptions o = opts(10, false, false);
  o.prefetch = 3;
  Loader loader(ds, o);
  loader.start_epoch(0);
  // The producer fills the queue, then waits: at most prefetch batches queued plus one built.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (ds.gets.load() < 30 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_GE(ds.gets.load(), 30);
  EXPECT_LE(ds.gets.load(), 40);
  Batch b;
  ASSERT_TRUE(loader.next(b));
  EXPECT_EQ(b.index, 0);
}

// Runs fn on another thread; fails (and ends the process rather than hanging) after 30 s.
void finishes_in_time(const std::function<void()>& fn, const char* what) {
  std::promise<void> done;
  std::future<void> f = done.get_future();
  std::thread t([&] {
    fn();
    done.set_value();
  });
  if (f.wait_for(std::chrono::seconds(30)) == std::future_status::timeout) {
    std::cerr << "FATAL: " << what << " did not finish within 30 s (deadlock?)" << std::endl;
    std::_Exit(1);
  }
  t.join();
}

TEST(Loader, DestroyingMidEpochDoesNotHang) {
  auto ds = make_synthetic(5000, 3, 16, 10, 1);
  for (int consumed : {0, 1, 3}) {
    finishes_in_time(
        [&] {
          LoaderOptions o = opts(8, true, false);
          o.prefetch = 2;
          o.augment.crop_pad = 2;
          auto loader = std::make_unique<Loader>(*ds, o);
          loader->start_epoch(0);
          Batch b;
          for (int k = 0; k < consumed; ++k) ASSERT_TRUE(loader->next(b));
          loader.reset();  // producer is blocked on a full queue or mid-batch
        },
        "destroying a loader mid-epoch");
  }
  finishes_in_time([&] { Loader never_started(*ds, opts(8, true, false)); },
                   "destroying a loader that never started");
}

TEST(Loader, RestartingMidEpochGivesTheNewEpoch) {
  KnownDataset ds(64, 2, 3, 3);
  Loader loader(ds, augmented(8));
  loader.start_epoch(0);
  Batch b;
  ASSERT_TRUE(loader.next(b));
  ASSERT_TRUE(loader.next(b));
  // Abandon epoch 0 and run epoch 1 on the same loader; compare with a fresh loader.
  const Epoch e = run_epoch(loader, 1);
  Loader fresh(ds, augmented(8));
  const Epoch f = run_epoch(fresh, 1);
  EXPECT_EQ(e.labels, f.labels);
  EXPECT_EQ(e.images, f.images);
  EXPECT_EQ(e.indices, f.indices);
  // After the end, next() keeps returning false.
  EXPECT_FALSE(loader.next(b));
  EXPECT_FALSE(loader.next(b));
}

// A dataset whose sample 13 cannot be read.
class FailingDataset : public KnownDataset {
 public:
  FailingDataset() : KnownDataset(40, 1, 2, 2) {}
  int64_t get(int64_t i, float* image) const override {
    if (i == 13) DPT_THROW(FileError, "sample 13 is unreadable");
    return KnownDataset::get(i, image);
  }
};

TEST(Loader, ProducerExceptionReachesTheConsumer) {
  FailingDataset ds;
  Loader loader(ds, opts(4, false, false));
  loader.start_epoch(0);
  Batch b;
  for (int k = 0; k < 3; ++k) {  // samples 0..11 arrive first
    ASSERT_TRUE(loader.next(b));
    EXPECT_EQ(b.index, k);
  }
  try {
    loader.next(b);
    FAIL() << "the producer's FileError was not rethrown";
  } catch (const FileError& e) {
    EXPECT_CONTAINS(e.what(), "sample 13 is unreadable");
  }
  EXPECT_FALSE(loader.next(b));
  // The loader is still usable: a new epoch from batch 4 on works.
  const Epoch e = run_epoch(loader, 0, 4);
  EXPECT_EQ(e.labels.size(), 6u);
}

// Any number of workers gives the same batches as one (augmentation keyed by sample, not thread).
TEST(Loader, WorkersDoNotChangeTheBatches) {
  KnownDataset ds(77, 2, 6, 6);
  Loader one(ds, augmented(6));
  const Epoch ref = run_epoch(one, 2);
  for (int workers : {2, 3, 8}) {
    LoaderOptions o = augmented(6);
    o.workers = workers;
    o.prefetch = 3;
    Loader many(ds, o);
    const Epoch e = run_epoch(many, 2);
    EXPECT_EQ(e.labels, ref.labels) << workers;
    EXPECT_EQ(e.images, ref.images) << workers;
    const Epoch resumed = run_epoch(many, 2, 5);  // and resuming mid-epoch
    EXPECT_EQ(resumed.labels,
              std::vector<std::vector<int64_t>>(ref.labels.begin() + 5, ref.labels.end()));
  }
}

// Batches bound for a GPU come in page-locked memory (LoaderOptions::pin_for) when a GPU is
// usable; either way they hold the same values. Without a GPU, Tensor::pinned is ordinary memory.
TEST(Loader, PinnedBatchesAreTheSameBatches) {
  KnownDataset ds(77, 2, 6, 6);
  Loader plain(ds, augmented(6));
  const Epoch ref = run_epoch(plain, 1);
  LoaderOptions o = augmented(6);
  o.pin_for = Device::cuda(0);
  o.workers = 2;
  Loader pinned(ds, o);
  const Epoch e = run_epoch(pinned, 1);
  EXPECT_EQ(e.labels, ref.labels);
  EXPECT_EQ(e.images, ref.images);
  Tensor t = Tensor::pinned({3, 4}, Device::cuda(0));
  EXPECT_TRUE(t.device().is_cpu());
  EXPECT_EQ(t.is_pinned(), cuda_device_count() > 0);
  t.zero_();
  EXPECT_EQ(t.to_vector(), std::vector<float>(12, 0.0f));
  EXPECT_FALSE(Tensor({2}).is_pinned());
}

// torch.chunk rows of replica r among `replicas` for a batch of n (DataParallel's split).
std::pair<int64_t, int64_t> chunk_rows(int64_t n, int replicas, int r) {
  const int64_t chunk = (n + replicas - 1) / replicas;
  return {std::min(n, r * chunk), std::min(n, (r + 1) * chunk)};
}

// Sharding as under MPI: each process decodes only its rows of every batch. Across 1, 2 and 3
// processes every sample of the epoch is decoded exactly once (the last, partial batch kept or
// dropped), the labels are always whole, and the rows a process does not use stay zero.
TEST(Loader, ShardsCoverEverySampleExactlyOnce) {
  for (bool drop_last : {false, true}) {
    for (int replicas : {1, 2, 3}) {
      SCOPED_TRACE(std::to_string(replicas) + (drop_last ? " drop_last" : " keep last"));
      KnownDataset ds(53, 1, 2, 2);
      std::vector<int> seen(53, 0);
      std::vector<std::vector<int64_t>> labels;
      for (int r = 0; r < replicas; ++r) {
        LoaderOptions o = opts(8, true, drop_last, 5);
        o.workers = 2;
        o.rows = [replicas, r](int64_t n) { return chunk_rows(n, replicas, r); };
        Loader loader(ds, o);
        const int64_t before = ds.gets.load();
        const Epoch e = run_epoch(loader, 1);
        if (r == 0) labels = e.labels;
        EXPECT_EQ(e.labels, labels);
        int64_t decoded = 0;
        for (size_t b = 0; b < e.labels.size(); ++b) {
          const auto [first, last] = chunk_rows(int64_t(e.labels[b].size()), replicas, r);
          for (int64_t j = 0; j < int64_t(e.labels[b].size()); ++j) {
            const bool mine = j >= first && j < last;
            const float v = e.images[b][size_t(j * 4)];
            EXPECT_EQ(v != 0.0f, mine) << "batch " << b << " row " << j;
            if (mine) ++seen[size_t(e.labels[b][size_t(j)])], ++decoded;
          }
        }
        EXPECT_EQ(ds.gets.load() - before, decoded);
      }
      const int expected_total = drop_last ? 48 : 53;
      int total = 0;
      for (int v : seen) {
        EXPECT_LE(v, 1);
        total += v;
      }
      EXPECT_EQ(total, expected_total);
    }
  }
}

TEST(Loader, BadOptionsThrowUsageError) {
  KnownDataset ds(20, 2, 4, 4);
  auto msg_of = [&](LoaderOptions o) -> std::string {
    try {
      Loader l(ds, o);
    } catch (const UsageError& e) {
      return e.what();
    }
    ADD_FAILURE() << "expected UsageError";
    return "";
  };
  EXPECT_CONTAINS(msg_of(opts(0, true, true)), "batch size must be at least 1, got 0");
  EXPECT_CONTAINS(msg_of(opts(-3, true, false)), "got -3");
  EXPECT_CONTAINS(msg_of(opts(21, true, true)), "21");  // whole epoch would be dropped
  LoaderOptions o = opts(4, true, true);
  o.prefetch = 0;
  EXPECT_CONTAINS(msg_of(o), "prefetch");
  o = opts(4, true, true);
  o.mean = {0.5f};
  o.std = {0.25f};  // 1 value for 2 channels
  EXPECT_CONTAINS(msg_of(o), "channel");
  o.mean = {0.5f, 0.5f};
  o.std = {0.25f, 0.0f};
  EXPECT_CONTAINS(msg_of(o), "std");
  o.std = {0.25f, -1.0f};
  msg_of(o);
  o.std = {};
  msg_of(o);  // mean without std
  o = opts(4, true, true);
  o.augment.crop_pad = -1;
  EXPECT_CONTAINS(msg_of(o), "crop");

  Loader ok(ds, opts(4, true, true));
  EXPECT_THROW(ok.start_epoch(0, 6), UsageError);  // only 5 batches
  EXPECT_THROW(ok.start_epoch(0, -1), UsageError);
  EXPECT_THROW(ok.start_epoch(-1), UsageError);
  EXPECT_NO_THROW(ok.start_epoch(0, 5));  // skipping everything is an empty epoch
  Batch b;
  EXPECT_FALSE(ok.next(b));

  Loader unstarted(ds, opts(4, true, true));
  EXPECT_THROW(unstarted.next(b), Error);
}

}  // namespace

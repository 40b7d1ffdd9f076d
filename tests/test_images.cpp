// data/: image folders and CIFAR. tests/data/image_oracle.py (Debian's /usr/bin/python3 with
// python3-torchvision and python3-pil) writes a tree and torchvision's listing of it, real JPEG
// and PNG files in every variant, and Pillow/torchvision's pixels for fixed crop parameters: our
// listing, decoding, random resized crop and Resize + CenterCrop must equal them byte for byte.
// Without the oracle those tests skip with the reason; the CIFAR tests need nothing.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/dataset.h"
#include "data/image.h"
#include "data/transforms.h"

using namespace dpt;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const std::string kOracle = std::string(DPT_SOURCE_DIR) + "/tests/data/image_oracle.py";

struct Oracle {
  std::string dir, skip;
  json j;
};

// Made once and shared by the test processes (CTest runs each test in its own): the directory
// is named after the oracle script's contents, written under a temporary name and renamed.
const Oracle& oracle() {
  static const Oracle o = [] {
    Oracle m;
    if (std::system("/usr/bin/python3 -c 'import torchvision, PIL' >/dev/null 2>&1") != 0) {
      m.skip = "Debian's python3-torchvision / python3-pil are not installed";
      return m;
    }
    std::ifstream script(kOracle);
    const std::string text((std::istreambuf_iterator<char>(script)), {});
    m.dir =
        ::testing::TempDir() + "/image-oracle-" + std::to_string(std::hash<std::string>()(text));
    if (!fs::exists(m.dir + "/oracle.json")) {
      const std::string tmp = m.dir + ".tmp-" + std::to_string(getpid());
      fs::remove_all(tmp);
      if (std::system(("/usr/bin/python3 " + kOracle + " make " + tmp).c_str()) != 0) {
        m.skip = "image_oracle.py make failed";
        return m;
      }
      std::error_code ec;
      fs::rename(tmp, m.dir, ec);  // another process may have won: then its copy is used
      if (ec) fs::remove_all(tmp);
    }
    std::ifstream in(m.dir + "/oracle.json");
    m.j = json::parse(in);
    return m;
  }();
  return o;
}

#define NEED_ORACLE()         \
  const Oracle& o = oracle(); \
  if (!o.skip.empty()) GTEST_SKIP() << o.skip;

std::vector<uint8_t> raw(const std::string& name) {
  return read_file_bytes(oracle().dir + "/" + name);
}

std::string pixels(const std::string& rel) {
  return oracle().dir + "/pixels/" + rel;
}

// Index of the first byte that differs, -1 when equal.
int64_t first_difference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  if (a.size() != b.size()) return int64_t(std::min(a.size(), b.size()));
  for (size_t k = 0; k < a.size(); ++k)
    if (a[k] != b[k]) return int64_t(k);
  return -1;
}

}  // namespace

TEST(ImageFolder, ListingMatchesTorchvision) {
  NEED_ORACLE();
  const std::string root = o.dir + "/index";
  ImageFolderIndex idx = scan_image_folder(root);
  EXPECT_EQ(idx.classes, o.j["index"]["classes"].get<std::vector<std::string>>());
  const auto& samples = o.j["index"]["samples"];
  ASSERT_EQ(idx.files.size(), samples.size());
  for (size_t k = 0; k < samples.size(); ++k) {
    EXPECT_EQ(fs::relative(idx.files[k], root).string(), samples[k][0].get<std::string>()) << k;
    EXPECT_EQ(idx.labels[k], samples[k][1].get<int64_t>()) << k;
  }
}

TEST(ImageFolder, DecodingMatchesPillow) {
  NEED_ORACLE();
  for (const auto& im : o.j["images"]) {
    const std::string rel = im["file"];
    SCOPED_TRACE(rel);
    const std::vector<uint8_t> bytes = read_file_bytes(pixels(rel));
    const ImageSize s = image_size(bytes, rel);
    EXPECT_EQ(s.height, im["height"].get<int64_t>());
    EXPECT_EQ(s.width, im["width"].get<int64_t>());
    const Image img = decode_image(bytes, rel);
    EXPECT_EQ(first_difference(img.rgb, raw(im["expect"])), -1);
  }
}

// Decoding a window gives exactly the window of the full decode (JPEG decodes only that part).
TEST(ImageFolder, WindowedDecodingEqualsTheFullDecode) {
  NEED_ORACLE();
  for (const auto& im : o.j["images"]) {
    const std::string rel = im["file"];
    const std::vector<uint8_t> bytes = read_file_bytes(pixels(rel));
    const Image full = decode_image(bytes, rel);
    Rng rng(1);
    for (int t = 0; t < 12; ++t) {
      Window w = random_resized_crop({full.height, full.width}, {}, rng);
      if (t == 0) w = {full.height - 1, full.width - 1, 1, 1};
      if (t == 1) w = {0, 0, 1, full.width};
      SCOPED_TRACE(rel + " window " + std::to_string(w.left) + "," + std::to_string(w.top) + " " +
                   std::to_string(w.width) + "x" + std::to_string(w.height));
      const Image part = decode_image(bytes, rel, w);
      std::vector<uint8_t> expect;
      for (int64_t y = 0; y < w.height; ++y) {
        const uint8_t* row = full.rgb.data() + ((w.top + y) * full.width + w.left) * 3;
        expect.insert(expect.end(), row, row + w.width * 3);
      }
      ASSERT_EQ(first_difference(part.rgb, expect), -1);
    }
  }
}

// torchvision's F.resized_crop + F.hflip + ToTensor, for the same crop parameters.
TEST(ImageFolder, ResizedCropMatchesTorchvision) {
  NEED_ORACLE();
  for (const auto& c : o.j["crops"]) {
    const std::string rel = c["file"];
    const Window w{c["top"], c["left"], c["height"], c["width"]};
    const int64_t size = c["size"];
    SCOPED_TRACE(c.dump());
    const Image part = decode_image(read_file_bytes(pixels(rel)), rel, w);
    std::vector<uint8_t> px(size_t(size * size * 3));
    resize_bilinear(part, {0, 0, w.height, w.width}, {w.height, w.width}, {size, size},
                    {0, 0, size, size}, px.data());
    const std::vector<uint8_t> expect = raw(c["expect"]);
    std::vector<float> ours(px.size());
    to_chw_float(px.data(), size, size, c["flip"], ours.data());
    size_t bad = 0;
    for (int64_t ch = 0; ch < 3; ++ch)
      for (int64_t y = 0; y < size; ++y)
        for (int64_t x = 0; x < size; ++x)
          bad += ours[size_t((ch * size + y) * size + x)] !=
                 float(expect[size_t((y * size + x) * 3 + ch)]) / 255.0f;
    EXPECT_EQ(bad, 0u);
  }
}

// Resize + CenterCrop through the dataset (evaluation mode), which decodes only what it reads.
TEST(ImageFolder, EvaluationTransformMatchesTorchvision) {
  NEED_ORACLE();
  const ImageFolderIndex idx = scan_image_folder(o.dir + "/pixels");
  for (const auto& e : o.j["evals"]) {
    SCOPED_TRACE(e.dump());
    ImageFolderOptions opt;
    opt.train = false;
    opt.resize = e["resize"];
    opt.crop = e["crop"];
    auto ds = load_image_folder(o.dir + "/pixels", opt);
    const auto it = std::find(idx.files.begin(), idx.files.end(), pixels(e["file"]));
    ASSERT_NE(it, idx.files.end());
    const int64_t k = it - idx.files.begin(), crop = opt.crop;
    std::vector<float> ours(size_t(3 * crop * crop));
    EXPECT_EQ(ds->get(k, ours.data()), idx.labels[size_t(k)]);
    const std::vector<uint8_t> expect = raw(e["expect"]);
    size_t bad = 0;
    for (int64_t ch = 0; ch < 3; ++ch)
      for (int64_t p = 0; p < crop * crop; ++p)
        bad += ours[size_t(ch * crop * crop + p)] != float(expect[size_t(p * 3 + ch)]) / 255.0f;
    EXPECT_EQ(bad, 0u);
  }
}

// Our crop parameters follow torchvision's distribution (different random numbers, same law).
TEST(ImageFolder, CropParametersHaveTorchvisionsStatistics) {
  NEED_ORACLE();
  for (const auto& s : o.j["crop_stats"]) {
    const ImageSize size{s["height"], s["width"]};
    SCOPED_TRACE(s.dump());
    Rng rng(9);
    const int n = 20000;
    double a = 0, a2 = 0, r = 0, r2 = 0, top = 0;
    for (int k = 0; k < n; ++k) {
      const Window w = random_resized_crop(size, {}, rng);
      ASSERT_TRUE(w.top >= 0 && w.left >= 0 && w.height >= 1 && w.width >= 1 &&
                  w.top + w.height <= size.height && w.left + w.width <= size.width);
      const double area = double(w.height * w.width) / double(size.height * size.width);
      const double lr = std::log(double(w.width) / double(w.height));
      a += area, a2 += area * area, r += lr, r2 += lr * lr;
      top += (double(w.top) + 0.5) / double(size.height - w.height + 1);
    }
    a /= n, a2 /= n, r /= n, r2 /= n, top /= n;
    EXPECT_NEAR(a, s["area_mean"].get<double>(), 0.006);
    EXPECT_NEAR(std::sqrt(a2 - a * a), s["area_std"].get<double>(), 0.006);
    EXPECT_NEAR(r, s["log_ratio_mean"].get<double>(), 0.006);
    EXPECT_NEAR(std::sqrt(r2 - r * r), s["log_ratio_std"].get<double>(), 0.006);
    EXPECT_NEAR(top, s["top_mean"].get<double>(), 0.01);
  }
}

namespace {

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

std::vector<uint8_t> head(std::vector<uint8_t> v, double fraction) {
  v.resize(size_t(double(v.size()) * fraction));
  return v;
}

// The message of the FileError fn throws ("" and a failure when it throws nothing).
template <typename Fn>
std::string file_error(Fn fn) {
  try {
    fn();
  } catch (const FileError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no FileError";
  return "";
}

}  // namespace

// Zero-byte files, text named .jpg, a BMP, truncated JPEG and PNG files: each a FileError naming
// the file when it is decoded; with skip_bad the unreadable headers are dropped when loading, the
// truncated files when they are decoded (replaced by the next sample), and all are listed.
TEST(ImageFolder, BadFilesAreNamedOrSkipped) {
  NEED_ORACLE();
  const std::string root = ::testing::TempDir() + "/bad-images";
  fs::remove_all(root);
  const std::vector<uint8_t> jpg = read_file_bytes(pixels("jpeg/rgb420.jpg"));
  const std::vector<uint8_t> png = read_file_bytes(pixels("png/rgb.png"));
  write_bytes(root + "/a/good.jpg", jpg);
  write_bytes(root + "/a/text.jpg", {'h', 'e', 'l', 'l', 'o', '\n'});
  write_bytes(root + "/a/zero.jpg", {});
  write_bytes(root + "/b/good.png", png);
  write_bytes(root + "/b/picture.bmp", {'B', 'M', 0x36, 0, 0, 0, 0, 0, 0, 0});
  write_bytes(root + "/b/trunc.jpg", head(jpg, 0.6));
  write_bytes(root + "/b/trunc.png", head(png, 0.5));
  const ImageFolderIndex idx = scan_image_folder(root);
  ASSERT_EQ(idx.files.size(), 7u);
  ImageFolderOptions opt;
  opt.train = false;
  opt.crop = opt.resize = 64;  // the whole height is read: truncation is always met
  auto strict = load_image_folder(root, opt);
  std::vector<float> out(3 * 64 * 64);
  for (size_t k = 0; k < idx.files.size(); ++k) {
    const std::string name = fs::path(idx.files[k]).filename();
    SCOPED_TRACE(name);
    if (name.rfind("good", 0) == 0) {
      EXPECT_EQ(strict->get(int64_t(k), out.data()), idx.labels[k]);
      continue;
    }
    const std::string msg = file_error([&] { strict->get(int64_t(k), out.data()); });
    EXPECT_NE(msg.find(idx.files[k]), std::string::npos) << msg;
  }
  opt.skip_bad = true;
  auto bad = std::make_shared<BadImages>();
  auto lenient = load_image_folder(root, opt, bad);
  EXPECT_EQ(lenient->size(), 4);  // good.jpg, good.png and the two truncated files
  EXPECT_EQ(bad->list().size(), 3u);
  for (int64_t k = 0; k < lenient->size(); ++k) EXPECT_GE(lenient->get(k, out.data()), 0);
  const std::vector<std::string> listed = bad->list();
  ASSERT_EQ(listed.size(), 5u);
  for (const char* f : {"text.jpg", "zero.jpg", "picture.bmp", "trunc.jpg", "trunc.png"})
    EXPECT_EQ(std::count_if(listed.begin(), listed.end(),
                            [&](const std::string& s) { return s.find(f) != std::string::npos; }),
              1)
        << f;
  // Training mode (random windows) through the CLI: one clear line, or the skip report.
  const std::string cli = std::string(DPT_BINARY_DIR) +
                          "/dptrain train --data imagefolder --data-dir " + root +
                          " --model resnet18 --crop-size 32 --batch-size 4 --max-steps 2 "
                          "--threads 1 --workers 2 ";
  EXPECT_EQ(std::system((cli + "2>" + root + "/err.txt >/dev/null").c_str()) >> 8, 1);
  std::ifstream err_in(root + "/err.txt");
  const std::string err((std::istreambuf_iterator<char>(err_in)), {});
  EXPECT_NE(err.find("dptrain: error: "), std::string::npos) << err;
  EXPECT_NE(err.find(root), std::string::npos) << err;
  EXPECT_EQ(std::system((cli + "--skip-bad-images 2>" + root + "/err.txt >/dev/null").c_str()), 0);
  std::ifstream skip_in(root + "/err.txt");
  const std::string skipped((std::istreambuf_iterator<char>(skip_in)), {});
  EXPECT_NE(skipped.find("skipped "), std::string::npos) << skipped;
  // An empty class folder, no class folder, no folder: one FileError each.
  fs::create_directories(root + "/c");
  EXPECT_NE(file_error([&] { scan_image_folder(root); }).find("class folder(s) c"),
            std::string::npos);
  fs::remove_all(root + "/c");
  fs::create_directories(root + "-flat");
  EXPECT_NE(file_error([&] { scan_image_folder(root + "-flat"); }).find("no class folders"),
            std::string::npos);
  EXPECT_NE(file_error([&] { scan_image_folder(root + "-none"); }).find("does not exist"),
            std::string::npos);
}

// ---- CIFAR (no oracle needed) ----

namespace {

// A CIFAR file of `n` records: label bytes (CIFAR-100: coarse then fine) and pixels p(r, k).
std::vector<uint8_t> cifar_records(int n, int label_bytes, int first, int classes) {
  std::vector<uint8_t> out;
  for (int r = 0; r < n; ++r) {
    if (label_bytes == 2) out.push_back(uint8_t((first + r) % 20));
    out.push_back(uint8_t((first + r) % classes));
    for (int k = 0; k < 3072; ++k) out.push_back(uint8_t((first + r) * 31 + k));
  }
  return out;
}

}  // namespace

TEST(Cifar, LoadsBothDistributions) {
  const std::string dir = ::testing::TempDir() + "/cifar";
  fs::remove_all(dir);
  for (int b = 1; b <= 5; ++b)
    write_bytes(dir + "/cifar-10-batches-bin/data_batch_" + std::to_string(b) + ".bin",
                cifar_records(3, 1, (b - 1) * 3, 10));
  write_bytes(dir + "/cifar-10-batches-bin/test_batch.bin", cifar_records(4, 1, 100, 10));
  write_bytes(dir + "/c100/train.bin", cifar_records(6, 2, 0, 100));
  write_bytes(dir + "/c100/test.bin", cifar_records(2, 2, 50, 100));
  auto train = load_cifar(dir, 10, true);  // found in the cifar-10-batches-bin subdirectory
  ASSERT_EQ(train->size(), 15);
  EXPECT_EQ(train->num_classes(), 10);
  EXPECT_EQ(train->channels(), 3);
  EXPECT_EQ(train->height(), 32);
  std::vector<float> img(3072);
  for (int r = 0; r < 15; ++r) {
    EXPECT_EQ(train->get(r, img.data()), r % 10);
    EXPECT_EQ(train->label(r), r % 10);
    EXPECT_EQ(img[5], float(uint8_t(r * 31 + 5)) / 255.0f);
    EXPECT_EQ(img[2000], float(uint8_t(r * 31 + 2000)) / 255.0f);  // CHW, as stored
  }
  EXPECT_EQ(load_cifar(dir, 10, false)->size(), 4);
  EXPECT_EQ(load_cifar(dir, 10, true, 7)->size(), 7);
  auto c100 = load_cifar(dir + "/c100", 100, true);
  ASSERT_EQ(c100->size(), 6);
  for (int r = 0; r < 6; ++r) EXPECT_EQ(c100->label(r), r % 100);  // the fine label
  EXPECT_EQ(load_cifar(dir + "/c100", 100, false)->size(), 2);
}

TEST(Cifar, BadFilesAreNamed) {
  const std::string dir = ::testing::TempDir() + "/cifar-bad";
  fs::remove_all(dir);
  write_bytes(dir + "/train.bin", cifar_records(2, 2, 0, 100));
  write_bytes(dir + "/test.bin", head(cifar_records(2, 2, 0, 100), 0.7));
  EXPECT_NE(file_error([&] { load_cifar(dir, 100, false); }).find("not a whole number"),
            std::string::npos);
  write_bytes(dir + "/test.bin", cifar_records(2, 1, 0, 10));  // CIFAR-10 records: wrong size
  EXPECT_NE(file_error([&] { load_cifar(dir, 100, false); }).find(dir + "/test.bin"),
            std::string::npos);
  std::vector<uint8_t> bad_label = cifar_records(1, 1, 0, 10);
  bad_label[0] = 10;
  write_bytes(dir + "/test_batch.bin", bad_label);
  EXPECT_NE(file_error([&] { load_cifar(dir, 10, false); }).find("label 10"), std::string::npos);
  EXPECT_NE(file_error([&] { load_cifar(dir, 10, true); }).find("data_batch_1.bin"),
            std::string::npos);
  write_bytes(dir + "/empty/test_batch.bin", {});
  EXPECT_NE(file_error([&] { load_cifar(dir + "/empty", 10, false); }).find("0 bytes"),
            std::string::npos);
  EXPECT_NE(file_error([&] { load_cifar(dir + "/none", 10, false); }).find("does not exist"),
            std::string::npos);
}

namespace {

// `dptrain ckpt diff` of two checkpoints: the largest |a - b|; both must hold the same keys.
double checkpoint_diff(const std::string& a, const std::string& b) {
  const std::string out = a + ".diff.json";
  EXPECT_EQ(std::system((std::string(DPT_BINARY_DIR) + "/dptrain ckpt diff --json " + a + " " + b +
                         " >" + out)
                            .c_str()),
            0);
  std::ifstream in(out);
  const json d = json::parse(in);
  EXPECT_TRUE(d.at("only_in_a").empty() && d.at("only_in_b").empty());
  return d.at("max_abs_diff").get<double>();
}

}  // namespace

// Training on an image folder resumes bit for bit: same sample order, same random crops.
TEST(ImageFolder, TrainingResumesExactly) {
  NEED_ORACLE();
  const std::string dir = ::testing::TempDir() + "/folder-resume";
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string bin = std::string(DPT_BINARY_DIR) + "/dptrain";
  auto train = [&](const std::string& save, const std::string& extra) {
    return std::system((bin + " train --data imagefolder --data-dir " + o.dir +
                        "/pixels --val-dir " + o.dir +
                        "/pixels --model resnet18 --stem small --crop-size 24 --resize-size 28 "
                        "--batch-size 4 --epochs 2 --threads 1 --workers 3 --lr 0.05 --save " +
                        save + " " + extra + " 2>/dev/null >/dev/null")
                           .c_str());
  };
  ASSERT_EQ(train(dir + "/full.h5", "--save-every 2 --keep 3"), 0);
  ASSERT_TRUE(fs::exists(dir + "/full-step4.h5"));
  fs::copy_file(dir + "/full-step4.h5", dir + "/resumed.h5");
  ASSERT_EQ(train(dir + "/resumed.h5", "--resume " + dir + "/resumed.h5"), 0);
  EXPECT_EQ(checkpoint_diff(dir + "/full.h5", dir + "/resumed.h5"), 0.0);
}

// Under mpirun each process decodes only its rows of every batch; the job must train exactly as
// the same two replicas in one process, which decode every row (up to summation order).
TEST(ImageFolder, MpiProcessesDecodeTheirShareAndTrainAsOne) {
  NEED_ORACLE();
  if (std::string(DPT_MPIEXEC).empty()) GTEST_SKIP() << "built without MPI (libopenmpi-dev)";
  const std::string dir = ::testing::TempDir() + "/folder-mpi";
  fs::remove_all(dir);
  fs::create_directories(dir);
  setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
  setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
  const std::string bin = std::string(DPT_BINARY_DIR) + "/dptrain";
  const std::string args = " train --data imagefolder --data-dir " + o.dir +
                           "/pixels --model resnet18 --stem small --crop-size 24 --batch-size 5 "
                           "--max-steps 4 --threads 1 --workers 2 --lr 0.05 --bn sync --save ";
  ASSERT_EQ(std::system((std::string(DPT_MPIEXEC) + " -np 2 --oversubscribe --bind-to none " + bin +
                         args + dir + "/mpi.h5 2>/dev/null >/dev/null")
                            .c_str()),
            0);
  ASSERT_EQ(std::system(
                (bin + args + dir + "/threads.h5 --devices cpu*2 2>/dev/null >/dev/null").c_str()),
            0);
  EXPECT_LT(checkpoint_diff(dir + "/mpi.h5", dir + "/threads.h5"), 1e-4);
}

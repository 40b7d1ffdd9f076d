// Image folders in torchvision's layout (see dataset.h), decoded per sample: in training mode the
// random resized crop is drawn from the image's header, only its window is decoded, then resized
// and maybe mirrored; in evaluation mode Resize + CenterCrop. Samples are 3 x crop x crop floats
// in [0, 1] (torchvision's ToTensor); the loader normalises them.
#include <algorithm>
#include <atomic>
#include <filesystem>
#include <set>
#include <thread>

#include "core/error.h"
#include "data/dataset.h"
#include "data/image.h"
#include "data/transforms.h"

namespace dpt {
namespace {

namespace fs = std::filesystem;

// torchvision.datasets.folder.IMG_EXTENSIONS, compared with the lower-cased name.
bool has_image_extension(const std::string& name) {
  static const char* const kExt[] = {".jpg", ".jpeg", ".png",  ".ppm", ".bmp",
                                     ".pgm", ".tif",  ".tiff", ".webp"};
  std::string lower = name;
  for (char& ch : lower) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  for (const char* e : kExt) {
    const std::string ext(e);
    if (lower.size() >= ext.size() &&
        lower.compare(lower.size() - ext.size(), ext.size(), ext) == 0)
      return true;
  }
  return false;
}

// os.walk(dir, followlinks=True): every directory below dir (dir included), each with its file
// names; a symlink loop is followed once (canonical paths are remembered).
void walk(const fs::path& dir, std::set<fs::path>& visited,
          std::vector<std::pair<std::string, std::vector<std::string>>>& out) {
  std::error_code ec;
  const fs::path canon = fs::canonical(dir, ec);
  if (ec || !visited.insert(canon).second) return;
  std::vector<std::string> files;
  std::vector<fs::path> subdirs;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code e2;
    if (it->is_directory(e2))  // follows symlinks, as os.scandir's is_dir()
      subdirs.push_back(it->path());
    else
      files.push_back(it->path().filename().string());
  }
  DPT_CHECK(!ec, FileError, "cannot list ", dir.string(), ": ", ec.message());
  out.emplace_back(dir.string(), std::move(files));
  for (const fs::path& s : subdirs) walk(s, visited, out);
}

class ImageFolder final : public Dataset {
 public:
  ImageFolder(std::string root, ImageFolderIndex index, ImageFolderOptions opt,
              std::shared_ptr<BadImages> bad)
      : root_(std::move(root)), idx_(std::move(index)), opt_(opt), bad_(std::move(bad)) {}

  std::string name() const override { return "image folder " + root_; }
  int64_t size() const override { return int64_t(idx_.files.size()); }
  int64_t channels() const override { return 3; }
  int64_t height() const override { return opt_.crop; }
  int64_t width() const override { return opt_.crop; }
  int64_t num_classes() const override { return int64_t(idx_.classes.size()); }
  int64_t label(int64_t i) const override { return idx_.labels[size_t(i)]; }
  bool augments() const override { return opt_.train; }

  int64_t get(int64_t i, float* image) const override {
    return with_fallback(i, [&](int64_t k) {
      const std::string& path = idx_.files[size_t(k)];
      const std::vector<uint8_t> bytes = read_file_bytes(path);
      const ImageSize s = image_size(bytes, path);
      const ResizeCrop rc = resize_center_crop(s, opt_.resize, opt_.crop);
      const Window in = resize_source_window(s, rc.resized, rc.crop);  // only what the crop reads
      const Image img = decode_image(bytes, path, in);
      thread_local std::vector<uint8_t> px;
      px.resize(size_t(opt_.crop * opt_.crop * 3));
      resize_bilinear(img, in, s, rc.resized, rc.crop, px.data());
      to_chw_float(px.data(), opt_.crop, opt_.crop, false, image);
      return idx_.labels[size_t(k)];
    });
  }

  int64_t get_augmented(int64_t i, Rng& rng, float* image) const override {
    return with_fallback(i, [&](int64_t k) {
      Rng r = rng;  // a replacement sample draws the same parameters as the first try
      const std::string& path = idx_.files[size_t(k)];
      const std::vector<uint8_t> bytes = read_file_bytes(path);
      const ImageSize s = image_size(bytes, path);
      const Window win =
          random_resized_crop(s, {opt_.scale_lo, opt_.scale_hi, opt_.ratio_lo, opt_.ratio_hi}, r);
      const bool flip = r.next_u32() & 1u;
      const Image img = decode_image(bytes, path, win);
      thread_local std::vector<uint8_t> px;
      px.resize(size_t(opt_.crop * opt_.crop * 3));
      const ImageSize out{opt_.crop, opt_.crop};
      resize_bilinear(img, {0, 0, win.height, win.width}, {win.height, win.width}, out,
                      {0, 0, opt_.crop, opt_.crop}, px.data());
      to_chw_float(px.data(), opt_.crop, opt_.crop, flip, image);
      return idx_.labels[size_t(k)];
    });
  }

 private:
  // Runs fn(i); with skip_bad, a FileError records the file and tries the next samples.
  template <typename Fn>
  int64_t with_fallback(int64_t i, Fn fn) const {
    if (!opt_.skip_bad) return fn(i);
    const int64_t n = size();
    for (int64_t t = 0; t < std::min<int64_t>(n, 64); ++t) {
      const int64_t k = (i + t) % n;
      try {
        return fn(k);
      } catch (const FileError& e) {
        bad_->add(idx_.files[size_t(k)], e.what());
      }
    }
    DPT_THROW(FileError, name(), ": 64 images in a row from ", idx_.files[size_t(i)],
              " on cannot be decoded; is this an image folder?");
  }

  std::string root_;
  ImageFolderIndex idx_;
  ImageFolderOptions opt_;
  std::shared_ptr<BadImages> bad_;
};

}  // namespace

void BadImages::add(const std::string& path, const std::string& why) {
  std::lock_guard<std::mutex> lk(mu_);
  if (seen_.insert(path).second) items_.push_back(path + ": " + why);
}

std::vector<std::string> BadImages::list() const {
  std::lock_guard<std::mutex> lk(mu_);
  return items_;
}

ImageFolderIndex scan_image_folder(const std::string& root) {
  std::error_code ec;
  DPT_CHECK(fs::is_directory(root, ec), FileError, "image folder ", root,
            " does not exist or is not a directory");
  ImageFolderIndex idx;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec)) {
    std::error_code e2;
    if (it->is_directory(e2)) idx.classes.push_back(it->path().filename().string());
  }
  DPT_CHECK(!ec, FileError, "cannot list ", root, ": ", ec.message());
  DPT_CHECK(!idx.classes.empty(), FileError, "image folder ", root,
            " has no class folders (expected ", root, "/<class>/<image>)");
  std::sort(idx.classes.begin(), idx.classes.end());
  std::vector<std::string> empty;
  for (size_t c = 0; c < idx.classes.size(); ++c) {
    std::vector<std::pair<std::string, std::vector<std::string>>> dirs;
    std::set<fs::path> visited;
    walk(fs::path(root) / idx.classes[c], visited, dirs);
    std::sort(dirs.begin(), dirs.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    const size_t before = idx.files.size();
    for (auto& d : dirs) {
      std::sort(d.second.begin(), d.second.end());
      for (const std::string& f : d.second) {
        if (!has_image_extension(f)) continue;
        idx.files.push_back((fs::path(d.first) / f).string());
        idx.labels.push_back(int64_t(c));
      }
    }
    if (idx.files.size() == before) empty.push_back(idx.classes[c]);
  }
  if (!empty.empty()) {
    std::string names;
    for (const std::string& e : empty) names += (names.empty() ? "" : ", ") + e;
    DPT_THROW(FileError, "image folder ", root, ": no image files in the class folder(s) ", names,
              " (torchvision refuses them too)");
  }
  return idx;
}

std::unique_ptr<Dataset> load_image_folder(const std::string& root, const ImageFolderOptions& opt,
                                           std::shared_ptr<BadImages> bad) {
  DPT_CHECK(opt.crop >= 1 && opt.crop <= 4096, UsageError, "crop size must be in 1..4096, got ",
            opt.crop);
  DPT_CHECK(opt.train || (opt.resize >= opt.crop && opt.resize <= 8192), UsageError,
            "resize size must be in crop size (", opt.crop, ")..8192, got ", opt.resize);
  DPT_CHECK(opt.scale_lo > 0 && opt.scale_lo <= opt.scale_hi && opt.scale_hi <= 1, UsageError,
            "crop scale must satisfy 0 < min <= max <= 1, got ", opt.scale_lo, "..", opt.scale_hi);
  DPT_CHECK(opt.ratio_lo > 0 && opt.ratio_lo <= opt.ratio_hi && opt.ratio_hi < 1e4, UsageError,
            "crop aspect ratio must satisfy 0 < min <= max, got ", opt.ratio_lo, "..",
            opt.ratio_hi);
  ImageFolderIndex idx = scan_image_folder(root);
  if (opt.skip_bad) {
    if (!bad) bad = std::make_shared<BadImages>();
    // Every file's header is read once now; files that fail are dropped.
    std::vector<char> ok(idx.files.size(), 0);
    std::atomic<size_t> next{0};
    auto check = [&] {
      for (size_t k; (k = next.fetch_add(1)) < idx.files.size();) {
        try {
          image_size(read_file_bytes(idx.files[k]), idx.files[k]);
          ok[k] = 1;
        } catch (const FileError& e) {
          bad->add(idx.files[k], e.what());
        }
      }
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < std::max(1, opt.threads); ++t) pool.emplace_back(check);
    check();
    for (auto& t : pool) t.join();
    ImageFolderIndex kept{idx.classes, {}, {}};
    for (size_t k = 0; k < idx.files.size(); ++k)
      if (ok[k]) kept.files.push_back(idx.files[k]), kept.labels.push_back(idx.labels[k]);
    DPT_CHECK(!kept.files.empty(), FileError, "image folder ", root,
              ": none of its files is a readable JPEG or PNG image");
    idx = std::move(kept);
  }
  return std::make_unique<ImageFolder>(root, std::move(idx), opt, std::move(bad));
}

}  // namespace dpt

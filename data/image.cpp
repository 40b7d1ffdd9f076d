// JPEG and PNG decoding to 8-bit RGB with Pillow's conversions (see image.h). libjpeg and libpng
// report errors through longjmp, so each decoder runs in a function whose frame holds no C++
// object with a destructor; everything it allocates lives in the caller's Job.
#include "data/image.h"

#include <jerror.h>
#include <png.h>

#include <algorithm>
#include <csetjmp>
#include <cstdio>
#include <cstring>
// clang-format off
#include <jpeglib.h>  // needs <cstdio> first
// clang-format on

#include "core/error.h"

namespace dpt {
namespace {

constexpr int64_t kMaxFileBytes = int64_t(1) << 30;

bool is_jpeg(const std::vector<uint8_t>& b) {
  return b.size() >= 3 && b[0] == 0xFF && b[1] == 0xD8 && b[2] == 0xFF;
}
bool is_png(const std::vector<uint8_t>& b) {
  static const uint8_t sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  return b.size() >= 8 && std::memcmp(b.data(), sig, 8) == 0;
}

void check_size(int64_t h, int64_t w, const std::string& path) {
  DPT_CHECK(h >= 1 && w >= 1 && h <= kMaxImagePixels / w, FileError, path, ": image of ", w, "x", h,
            " pixels is empty or larger than ", kMaxImagePixels, " pixels");
}

void check_window(const Window& win, int64_t h, int64_t w, const std::string& path) {
  DPT_ASSERT(win.top >= 0 && win.left >= 0 && win.height >= 1 && win.width >= 1 &&
                 win.top + win.height <= h && win.left + win.width <= w,
             "window ", win.left, ",", win.top, " ", win.width, "x", win.height, " outside ", path,
             " (", w, "x", h, ")");
}

// Pillow's CMYK -> RGB (Convert.c): channel = nk - nk * c / 255 (rounded), nk = 255 - k.
inline uint8_t cmyk_channel(int c, int nk) {
  const int t = c * nk + 128;
  const int v = nk - (((t >> 8) + t) >> 8);
  return uint8_t(v < 0 ? 0 : v > 255 ? 255 : v);
}

// ---- JPEG ----

struct JpegError {
  jpeg_error_mgr pub;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

void jpeg_fail(j_common_ptr c) {
  auto* e = reinterpret_cast<JpegError*>(c->err);
  (*c->err->format_message)(c, e->message);
  std::longjmp(e->jump, 1);
}

// Warnings that mean the pixels are wrong (truncated or corrupt entropy-coded data) are errors;
// the rest (extraneous bytes between markers and the like) are ignored, as Pillow does.
void jpeg_message(j_common_ptr c, int level) {
  if (level >= 0) return;
  const int code = c->err->msg_code;
  if (code == JWRN_JPEG_EOF || code == JWRN_HUFF_BAD_CODE || code == JWRN_HIT_MARKER ||
      code == JWRN_MUST_RESYNC)
    jpeg_fail(c);
}

struct JpegJob {
  const uint8_t* data = nullptr;
  unsigned long size = 0;
  Window window;  // ignored when header_only
  bool header_only = false;
  int64_t height = 0, width = 0;
  std::vector<uint8_t>* out = nullptr;  // window.height * window.width * 3
  std::vector<uint8_t>* row = nullptr;  // scratch: one decoded row
  JpegError err;
};

bool run_jpeg(JpegJob& job) {
  jpeg_decompress_struct cinfo;
  cinfo.err = jpeg_std_error(&job.err.pub);
  job.err.pub.error_exit = jpeg_fail;
  job.err.pub.emit_message = jpeg_message;
  if (setjmp(job.err.jump)) {
    jpeg_destroy_decompress(&cinfo);
    return false;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, job.data, job.size);
  jpeg_read_header(&cinfo, TRUE);
  job.height = cinfo.image_height;
  job.width = cinfo.image_width;
  if (job.header_only) {  // the caller checks the window against the size before decoding
    jpeg_destroy_decompress(&cinfo);
    return true;
  }
  const bool cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
  cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  // Chroma upsampling at the edge of a partial decode reads neighbours that the partial decode
  // did not produce, so one iMCU more is decoded on the left and above (and on the right, where
  // jpeg_crop_scanline ends the decoded columns) and dropped.
  const Window& win = job.window;
  const int64_t m = 8 * std::max(cinfo.max_h_samp_factor, cinfo.max_v_samp_factor);
  const int64_t top = std::max<int64_t>(0, win.top - m);
  const int64_t left = std::max<int64_t>(0, win.left - m);
  const int64_t right = std::min<int64_t>(job.width, win.left + win.width + m);
  JDIMENSION x0 = JDIMENSION(left), cw = JDIMENSION(right - left);
  if (right - left < job.width) jpeg_crop_scanline(&cinfo, &x0, &cw);  // x0 moves to an iMCU edge
  if (top > 0) jpeg_skip_scanlines(&cinfo, JDIMENSION(top));
  const int comps = cinfo.output_components;
  job.row->resize(size_t(cinfo.output_width) * size_t(comps));
  job.out->resize(size_t(win.height) * size_t(win.width) * 3);
  JSAMPROW rp = job.row->data();
  const size_t skip = size_t(win.left - int64_t(x0)) * size_t(comps);
  for (int64_t y = top; y < win.top + win.height; ++y) {
    jpeg_read_scanlines(&cinfo, &rp, 1);
    if (y < win.top) continue;
    const uint8_t* src = rp + skip;
    uint8_t* dst = job.out->data() + size_t(y - win.top) * size_t(win.width) * 3;
    if (!cmyk) {
      std::memcpy(dst, src, size_t(win.width) * 3);
    } else {
      // Adobe files store inverted CMYK (Pillow reads them as "CMYK;I").
      const int inv = cinfo.saw_Adobe_marker ? 255 : 0;
      for (int64_t x = 0; x < win.width; ++x, src += 4, dst += 3) {
        const int nk = 255 - (src[3] ^ inv);
        for (int ch = 0; ch < 3; ++ch) dst[ch] = cmyk_channel(src[ch] ^ inv, nk);
      }
    }
  }
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return true;
}

// ---- PNG ----

struct PngJob {
  const uint8_t* data = nullptr;
  size_t size = 0, pos = 0;
  bool header_only = false;
  int64_t height = 0, width = 0;
  bool gray16 = false;                      // 16-bit grayscale: Pillow clips (mode "I")
  std::vector<uint8_t>* out = nullptr;      // the whole image, width * 3 bytes per row
  std::vector<uint8_t>* scratch = nullptr;  // 16-bit grayscale samples
  std::vector<png_bytep>* rows = nullptr;
  char message[256] = {0};
};

void png_fail(png_structp png, png_const_charp msg) {
  auto* job = static_cast<PngJob*>(png_get_error_ptr(png));
  std::snprintf(job->message, sizeof job->message, "%s", msg);
  png_longjmp(png, 1);
}
void png_warn(png_structp, png_const_charp) {}

void png_read(png_structp png, png_bytep dst, size_t n) {
  auto* job = static_cast<PngJob*>(png_get_io_ptr(png));
  if (n > job->size - job->pos) png_error(png, "file is truncated");
  std::memcpy(dst, job->data + job->pos, n);
  job->pos += n;
}

bool run_png(PngJob& job) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &job, png_fail, png_warn);
  if (!png) return false;
  png_infop info = png_create_info_struct(png);
  if (!info || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, info ? &info : nullptr, nullptr);
    return false;
  }
  png_set_read_fn(png, &job, png_read);
  png_set_user_limits(png, 1u << 20, 1u << 20);
  png_read_info(png, info);
  job.height = png_get_image_height(png, info);
  job.width = png_get_image_width(png, info);
  const int type = png_get_color_type(png, info), depth = png_get_bit_depth(png, info);
  if (job.header_only || job.height < 1 || job.width < 1 ||
      job.height > kMaxImagePixels / job.width) {
    png_destroy_read_struct(&png, &info, nullptr);
    return true;
  }
  job.gray16 = depth == 16 && type == PNG_COLOR_TYPE_GRAY;
  png_set_expand(png);  // palette -> RGB, gray below 8 bits -> 8 bits, tRNS -> alpha
  if (!job.gray16) png_set_strip_16(png);
  png_set_strip_alpha(png);
  if (!job.gray16) png_set_gray_to_rgb(png);
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  const size_t row_bytes = png_get_rowbytes(png, info);
  const size_t h = size_t(job.height), w = size_t(job.width);
  if (row_bytes != (job.gray16 ? 2 : 3) * w) png_error(png, "unexpected row layout");
  std::vector<uint8_t>& buf = job.gray16 ? *job.scratch : *job.out;
  buf.resize(h * row_bytes);
  job.rows->resize(h);
  for (size_t y = 0; y < h; ++y) (*job.rows)[y] = buf.data() + y * row_bytes;
  png_read_image(png, job.rows->data());
  png_destroy_read_struct(&png, &info, nullptr);
  return true;
}

ImageSize probe(const std::vector<uint8_t>& bytes, const std::string& path) {
  DPT_CHECK(!bytes.empty(), FileError, path, ": empty file, not an image");
  ImageSize s;
  if (is_jpeg(bytes)) {
    JpegJob job;
    job.data = bytes.data();
    job.size = static_cast<unsigned long>(bytes.size());
    job.header_only = true;
    DPT_CHECK(run_jpeg(job), FileError, path, ": not a valid JPEG: ", job.err.message);
    s = {job.height, job.width};
  } else if (is_png(bytes)) {
    PngJob job;
    job.data = bytes.data();
    job.size = bytes.size();
    job.header_only = true;
    DPT_CHECK(run_png(job), FileError, path, ": not a valid PNG: ", job.message);
    s = {job.height, job.width};
  } else {
    DPT_THROW(FileError, path, ": not a JPEG or PNG image (dptrain decodes those two formats)");
  }
  check_size(s.height, s.width, path);
  return s;
}

}  // namespace

ImageSize image_size(const std::vector<uint8_t>& bytes, const std::string& path) {
  return probe(bytes, path);
}

Image decode_image(const std::vector<uint8_t>& bytes, const std::string& path,
                   const Window& window) {
  const ImageSize s = probe(bytes, path);
  check_window(window, s.height, s.width, path);
  Image img;
  img.height = window.height;
  img.width = window.width;
  if (is_jpeg(bytes)) {
    std::vector<uint8_t> row;
    JpegJob job;
    job.data = bytes.data();
    job.size = static_cast<unsigned long>(bytes.size());
    job.window = window;
    job.out = &img.rgb;
    job.row = &row;
    DPT_CHECK(run_jpeg(job), FileError, path, ": corrupt JPEG: ", job.err.message);
    return img;
  }
  std::vector<uint8_t> full, scratch;
  std::vector<png_bytep> rows;
  PngJob job;
  job.data = bytes.data();
  job.size = bytes.size();
  job.out = &full;
  job.scratch = &scratch;
  job.rows = &rows;
  DPT_CHECK(run_png(job), FileError, path, ": corrupt PNG: ", job.message);
  const size_t w = size_t(s.width);
  if (job.gray16) {  // big-endian 16-bit samples, clipped to 255
    full.resize(size_t(s.height) * w * 3);
    for (size_t k = 0; k < size_t(s.height) * w; ++k) {
      const int v = (scratch[2 * k] << 8) | scratch[2 * k + 1];
      full[3 * k] = full[3 * k + 1] = full[3 * k + 2] = uint8_t(v > 255 ? 255 : v);
    }
  }
  img.rgb.resize(size_t(window.height) * size_t(window.width) * 3);
  for (int64_t y = 0; y < window.height; ++y)
    std::memcpy(img.rgb.data() + size_t(y) * size_t(window.width) * 3,
                full.data() + (size_t(window.top + y) * w + size_t(window.left)) * 3,
                size_t(window.width) * 3);
  return img;
}

Image decode_image(const std::vector<uint8_t>& bytes, const std::string& path) {
  const ImageSize s = probe(bytes, path);
  return decode_image(bytes, path, Window{0, 0, s.height, s.width});
}

std::vector<uint8_t> read_file_bytes(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  DPT_CHECK(f, FileError, "cannot open ", path, ": ", std::strerror(errno));
  std::vector<uint8_t> out;
  bool ok = std::fseek(f, 0, SEEK_END) == 0;
  const long n = ok ? std::ftell(f) : -1;
  ok = ok && n >= 0 && n <= kMaxFileBytes && std::fseek(f, 0, SEEK_SET) == 0;
  if (ok) {
    out.resize(size_t(n));
    ok = std::fread(out.data(), 1, out.size(), f) == out.size();
  }
  std::fclose(f);
  DPT_CHECK(n <= kMaxFileBytes, FileError, path, ": ", n, " bytes, larger than the ", kMaxFileBytes,
            " an image may have");
  DPT_CHECK(ok, FileError, "cannot read ", path, " (a directory, or changed while read)");
  return out;
}

}  // namespace dpt

// Reads uint8 IDX files (the MNIST format), gzip-compressed or plain, through zlib. The header is
// validated (magic, dimension limits, overflow-checked size) before anything large is allocated,
// the payload is read in bounded chunks so a lying header cannot make us reserve memory the file
// does not back, and a short or over-long payload is an error. Every failure is a FileError that
// names the path.
#include "data/idx.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "core/error.h"

namespace dpt {
namespace {

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

uint32_t be32(const uint8_t* p) {
  return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | uint32_t(p[3]);
}

// A gzFile that closes itself; reads transparently from gzip or plain files.
class GzReader {
 public:
  explicit GzReader(const std::string& path) : path_(path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::file_status st = fs::status(path, ec);
    DPT_CHECK(fs::exists(st), FileError, path, ": no such file");
    DPT_CHECK(fs::is_regular_file(st), FileError, path, ": not a regular file");
    errno = 0;
    file_ = gzopen(path.c_str(), "rb");
    DPT_CHECK(file_ != nullptr, FileError, path, ": cannot open (",
              errno ? std::strerror(errno) : "zlib could not allocate its state", ")");
    DPT_CHECK(gzbuffer(file_, 1u << 17) == 0, FileError, path, ": zlib refused the read buffer");
  }
  ~GzReader() {
    if (file_) gzclose(file_);  // error path only; finish() reports close errors
  }
  GzReader(const GzReader&) = delete;
  GzReader& operator=(const GzReader&) = delete;

  // Reads up to n bytes and returns how many arrived (fewer only at the end of the data). A read
  // error or corrupt gzip data throws; a gzip stream that simply stops early is left for the
  // caller to report as truncation (see pending_note()).
  size_t read(void* dst, size_t n) {
    size_t got = 0;
    while (got < n) {
      unsigned chunk = unsigned(std::min<size_t>(n - got, size_t(1) << 30));
      int r = gzread(file_, static_cast<char*>(dst) + got, chunk);
      if (r < 0) fail("read failed");
      if (r == 0) break;
      got += size_t(r);
    }
    if (got < n) {
      int errnum = Z_OK;
      gzerror(file_, &errnum);
      if (errnum != Z_OK && errnum != Z_BUF_ERROR) fail("read failed");
    }
    return got;
  }

  // zlib's note about an early end of a gzip stream, or "" when there is none.
  std::string pending_note() {
    int errnum = Z_OK;
    const char* msg = gzerror(file_, &errnum);
    if (errnum == Z_OK) return "";
    return " (zlib: " + zlib_message(msg) + ")";
  }

  bool is_plain() { return gzdirect(file_) == 1; }

  // Closes the file, turning any late zlib error (such as a gzip stream missing its CRC trailer)
  // into a FileError.
  void finish() {
    std::string note = pending_note();
    DPT_CHECK(note.empty(), FileError, path_, ": gzip stream is truncated", note);
    gzFile f = file_;
    file_ = nullptr;
    int rc = gzclose(f);
    DPT_CHECK(rc == Z_OK, FileError, path_, ": error closing the file (zlib code ", rc, ")");
  }

 private:
  // gzerror's text without the "path: " prefix zlib puts in front of it.
  std::string zlib_message(const char* msg) const {
    std::string m = msg && *msg ? msg : "unknown zlib error";
    const std::string prefix = path_ + ": ";
    if (m.compare(0, prefix.size(), prefix) == 0) m.erase(0, prefix.size());
    return m;
  }

  [[noreturn]] void fail(const char* what) {
    int errnum = Z_OK;
    const char* msg = gzerror(file_, &errnum);
    std::string why;
    if (errnum == Z_ERRNO)
      why = std::strerror(errno);
    else if (errnum == Z_DATA_ERROR)
      why = "corrupt gzip data: " + zlib_message(msg);
    else if (errnum == Z_MEM_ERROR)
      why = "zlib out of memory";
    else
      why = zlib_message(msg);
    DPT_THROW(FileError, path_, ": ", what, " (", why, ")");
  }

  std::string path_;
  gzFile file_ = nullptr;
};

// Reads a uint8 IDX file with `ndims` dimensions; `what` names the content for messages.
IdxArray read_idx_uint8(const std::string& path, int ndims, const char* what) {
  GzReader in(path);

  uint8_t head[4 + 4 * 3];
  const size_t head_bytes = 4 + 4 * size_t(ndims);
  size_t got = in.read(head, 4);
  DPT_CHECK(got == 4, FileError, path, ": file too short for an IDX header (", got, " bytes)",
            in.pending_note());
  const uint32_t magic = be32(head);
  const uint32_t expected = 0x0800u | uint32_t(ndims);
  if (magic != expected) {
    std::string hint;
    const uint32_t type = (magic >> 8) & 0xff;
    const bool idx_type = type == 0x08 || type == 0x09 || (type >= 0x0b && type <= 0x0e);
    if (magic == 0x0801u)
      hint = "; this looks like an IDX labels file";
    else if (magic == 0x0803u)
      hint = "; this looks like an IDX images file";
    else if ((magic >> 16) == 0 && idx_type && type != 0x08)
      hint = "; this is an IDX file of element type 0x" + hex32(type).substr(8) +
             ", only uint8 (0x08) is supported";
    else if ((magic >> 16) == 0x1f8b)
      hint = "; the data looks gzip-compressed twice";
    DPT_THROW(FileError, path, ": bad magic ", hex32(magic), ", expected ", hex32(expected),
              " (IDX uint8 ", what, ")", hint);
  }
  got = in.read(head + 4, head_bytes - 4);
  DPT_CHECK(got == head_bytes - 4, FileError, path, ": truncated IDX header (", 4 + got, " of ",
            head_bytes, " bytes)", in.pending_note());

  IdxArray out;
  int64_t total = 1;
  for (int d = 0; d < ndims; ++d) {
    const int64_t v = be32(head + 4 + 4 * d);
    if (d == 0) {
      DPT_CHECK(v <= kIdxMaxItems, FileError, path, ": header claims ", v, " items, more than ",
                kIdxMaxItems, " (corrupt header?)");
    } else {
      DPT_CHECK(v >= 1 && v <= kIdxMaxSide, FileError, path, ": header dimension ", d, " is ", v,
                ", expected 1..", kIdxMaxSide, " (corrupt header?)");
    }
    DPT_CHECK(v == 0 || total <= kIdxMaxBytes / v, FileError, path, ": header describes more than ",
              kIdxMaxBytes, " bytes of data (corrupt header?)");
    total *= v;
    out.dims.push_back(v);
  }
  DPT_CHECK(total <= kIdxMaxBytes, FileError, path, ": header describes ", total,
            " bytes of data, more than the limit of ", kIdxMaxBytes);

  auto dims_str = [&] {
    std::string s;
    for (size_t d = 0; d < out.dims.size(); ++d)
      s += (d ? " x " : "") + std::to_string(out.dims[d]);
    return s;
  };

  // Plain file: its size is known, so check it before allocating anything.
  if (in.is_plain()) {
    std::error_code ec;
    const auto fsize = std::filesystem::file_size(path, ec);
    DPT_CHECK(!ec, FileError, path, ": cannot get the file size (", ec.message(), ")");
    const uint64_t want = uint64_t(head_bytes) + uint64_t(total);
    DPT_CHECK(fsize >= want, FileError, path, ": file is truncated: header says ", dims_str(),
              " = ", total, " bytes of ", what, " data, file holds only ",
              fsize - std::min<uint64_t>(fsize, head_bytes));
    DPT_CHECK(fsize == want, FileError, path, ": ", fsize - want,
              " unexpected trailing bytes after the ", total, " bytes of ", what,
              " data the header describes (", dims_str(), ")");
  }

  // Read in bounded chunks: memory grows only as fast as the file actually delivers data.
  constexpr size_t kChunk = size_t(16) << 20;
  const size_t want = size_t(total);
  out.data.reserve(std::min(want, 4 * kChunk));
  size_t have = 0;
  while (have < want) {
    const size_t n = std::min(kChunk, want - have);
    out.data.resize(have + n);
    const size_t r = in.read(out.data.data() + have, n);
    have += r;
    if (r < n) break;
  }
  DPT_CHECK(have == want, FileError, path, ": file is truncated: header says ", dims_str(), " = ",
            want, " bytes of ", what, " data, file holds only ", have, in.pending_note());

  uint8_t extra[4096];
  size_t trailing = in.read(extra, sizeof extra);
  DPT_CHECK(trailing == 0, FileError, path, ": unexpected trailing bytes (", trailing,
            trailing == sizeof extra ? " or more" : "", ") after the ", want, " bytes of ", what,
            " data the header describes (", dims_str(), ")");
  in.finish();
  return out;
}

}  // namespace

IdxArray read_idx_images(const std::string& path) {
  return read_idx_uint8(path, 3, "images");
}

IdxArray read_idx_labels(const std::string& path) {
  return read_idx_uint8(path, 1, "labels");
}

}  // namespace dpt

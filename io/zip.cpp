#include "io/zip.h"

#include <libdeflate.h>
#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <set>

#include "core/error.h"

namespace dpt {

namespace {

constexpr uint32_t kLocalSig = 0x04034b50, kCentralSig = 0x02014b50, kEndSig = 0x06054b50;
constexpr uint32_t kEnd64Sig = 0x06064b50, kLocator64Sig = 0x07064b50;
constexpr uint64_t k32 = 0xffffffffu;
constexpr size_t kLocal = 30, kCentral = 46, kEnd = 22, kEnd64 = 56, kLocator64 = 20;
constexpr size_t kMaxName = 4096;
constexpr uint64_t kAlign = 64;

uint64_t get(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void put(std::string& s, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) s.push_back(char((v >> (8 * i)) & 0xff));
}

uint32_t crc32_of(const void* data, uint64_t n) {
  return libdeflate_crc32(0, data, size_t(n));
}

}  // namespace

ZipReader::ZipReader(const ReadFile& file) : file_(file) {
  const std::string& path = file.path();
  const int64_t size = file.size();
  DPT_CHECK(size >= int64_t(kEnd), FileError, path, " is not a ZIP archive (", size, " bytes)");
  // The end record is in the last 22 + 65535 (comment) bytes.
  const int64_t tail_len = std::min<int64_t>(size, int64_t(kEnd) + 0xffff);
  std::vector<unsigned char> tail(static_cast<size_t>(tail_len));
  file.read(size - tail_len, tail.data(), uint64_t(tail_len), "the end of the archive");
  int64_t end_at = -1;
  for (int64_t i = tail_len - int64_t(kEnd); i >= 0; --i) {
    const unsigned char* p = tail.data() + i;
    if (get(p, 4) == kEndSig && i + int64_t(kEnd) + int64_t(get(p + 20, 2)) == tail_len) {
      end_at = size - tail_len + i;
      break;
    }
  }
  DPT_CHECK(end_at >= 0, FileError, path,
            " is not a ZIP archive (no end-of-central-directory record): truncated, or not "
            "written by torch.save");
  const unsigned char* e = tail.data() + (end_at - (size - tail_len));
  DPT_CHECK(get(e + 4, 2) == 0 && get(e + 6, 2) == 0, FileError, path,
            ": multi-disk ZIP archives are not supported");
  uint64_t count = get(e + 10, 2), cd_size = get(e + 12, 4), cd_offset = get(e + 16, 4);
  int64_t cd_end = end_at;  // the central directory ends where the next record starts
  // A ZIP64 locator just before the end record (PyTorch always writes one) holds the real values.
  unsigned char loc[kLocator64] = {};
  if (end_at >= int64_t(kLocator64))
    file.read(end_at - int64_t(kLocator64), loc, kLocator64, "the ZIP64 locator");
  const bool saturated = count == 0xffff || cd_size == k32 || cd_offset == k32;
  DPT_CHECK(!saturated || get(loc, 4) == kLocator64Sig, FileError, path, ": ZIP64 locator missing");
  if (get(loc, 4) == kLocator64Sig) {
    const uint64_t at = get(loc + 8, 8);
    DPT_CHECK(at <= uint64_t(end_at) - kLocator64 && uint64_t(end_at) - kLocator64 - at >= kEnd64,
              FileError, path, ": ZIP64 end record out of place");
    unsigned char z[kEnd64];
    file.read(int64_t(at), z, kEnd64, "the ZIP64 end record");
    DPT_CHECK(get(z, 4) == kEnd64Sig, FileError, path, ": bad ZIP64 end record");
    count = get(z + 32, 8);
    cd_size = get(z + 40, 8);
    cd_offset = get(z + 48, 8);
    cd_end = int64_t(at);
  }
  DPT_CHECK(cd_offset <= uint64_t(cd_end) && cd_size == uint64_t(cd_end) - cd_offset, FileError,
            path, ": the central directory (", cd_size, " bytes at ", cd_offset,
            ") does not end where the archive's end record starts: truncated or corrupt");
  DPT_CHECK(count <= cd_size / kCentral, FileError, path, ": ", count,
            " entries cannot fit in a central directory of ", cd_size, " bytes");
  std::vector<unsigned char> cd(cd_size);
  file.read(int64_t(cd_offset), cd.data(), cd_size, "the central directory");
  std::set<std::string> names;
  size_t at = 0;
  for (uint64_t i = 0; i < count; ++i) {
    DPT_CHECK(cd_size - at >= kCentral && get(&cd[at], 4) == kCentralSig, FileError, path,
              ": central directory entry ", i, " is corrupt");
    const unsigned char* h = &cd[at];
    ZipEntry z;
    const uint64_t flags = get(h + 8, 2);
    z.method = uint16_t(get(h + 10, 2));
    z.crc = uint32_t(get(h + 16, 4));
    z.compressed = get(h + 20, 4);
    z.size = get(h + 24, 4);
    const size_t name_len = get(h + 28, 2), extra_len = get(h + 30, 2), comment = get(h + 32, 2);
    uint64_t local = get(h + 42, 4);
    DPT_CHECK(cd_size - at - kCentral >= name_len + extra_len + comment, FileError, path,
              ": central directory entry ", i, " runs past the directory");
    DPT_CHECK(name_len > 0 && name_len <= kMaxName, FileError, path, ": entry ", i,
              " has a name of ", name_len, " bytes");
    z.name.assign(reinterpret_cast<const char*>(h + kCentral), name_len);
    DPT_CHECK(z.name.find('\0') == std::string::npos, FileError, path, ": entry name with NUL");
    // ZIP64 extra field: the 64-bit values of the fields saturated at 0xffffffff, in order.
    const unsigned char* x = h + kCentral + name_len;
    for (size_t k = 0; k + 4 <= extra_len;) {
      const uint64_t id = get(x + k, 2), len = get(x + k + 2, 2);
      DPT_CHECK(k + 4 + len <= extra_len, FileError, path, ": entry ", z.name,
                " has a corrupt extra field");
      if (id == 1) {
        size_t f = k + 4;
        for (uint64_t* v : {&z.size, &z.compressed, &local}) {
          if (*v != k32) continue;
          DPT_CHECK(f + 8 <= k + 4 + len, FileError, path, ": entry ", z.name,
                    " has a short ZIP64 field");
          *v = get(x + f, 8);
          f += 8;
        }
      }
      k += 4 + len;
    }
    DPT_CHECK(!(flags & 1), FileError, path, ": entry ", z.name, " is encrypted");
    DPT_CHECK(z.method == 0 || z.method == 8, FileError, path, ": entry ", z.name,
              " uses compression method ", z.method, " (only stored and deflated are read)");
    DPT_CHECK(z.method != 0 || z.compressed == z.size, FileError, path, ": entry ", z.name,
              " is stored but its sizes differ");
    DPT_CHECK(names.insert(z.name).second, FileError, path, ": entry ", z.name, " appears twice");
    // Its local header must be inside the data area and agree on the name.
    DPT_CHECK(local <= cd_offset && cd_offset - local >= kLocal, FileError, path, ": entry ",
              z.name, " has its local header outside the archive's data");
    unsigned char lh[kLocal];
    file.read(int64_t(local), lh, kLocal, "the local header of " + z.name);
    const uint64_t lname = get(lh + 26, 2), lextra = get(lh + 28, 2);
    DPT_CHECK(get(lh, 4) == kLocalSig && lname == name_len, FileError, path,
              ": the local header of entry ", z.name, " is corrupt");
    DPT_CHECK(cd_offset - local - kLocal >= lname + lextra, FileError, path, ": entry ", z.name,
              " overlaps the central directory");
    std::string lname_bytes(lname, '\0');
    file.read(int64_t(local + kLocal), lname_bytes.data(), lname, "the name of " + z.name);
    DPT_CHECK(lname_bytes == z.name, FileError, path, ": entry ", z.name,
              " has another name in its local header ('", lname_bytes, "')");
    z.data_offset = local + kLocal + lname + lextra;
    DPT_CHECK(z.compressed <= cd_offset - z.data_offset, FileError, path, ": entry ", z.name, " (",
              z.compressed, " bytes) runs into the central directory: truncated or corrupt");
    entries_.push_back(std::move(z));
    at += kCentral + name_len + extra_len + comment;
  }
}

const ZipEntry* ZipReader::find(const std::string& name) const {
  for (const ZipEntry& e : entries_)
    if (e.name == name) return &e;
  return nullptr;
}

void ZipReader::read(const ZipEntry& e, void* dst) const {
  const std::string& path = file_.path();
  if (e.method == 0) {
    file_.read(int64_t(e.data_offset), dst, e.size, "entry " + e.name);
  } else {
    std::vector<unsigned char> in(e.compressed);
    file_.read(int64_t(e.data_offset), in.data(), e.compressed, "entry " + e.name);
    z_stream s{};
    DPT_CHECK(inflateInit2(&s, -15) == Z_OK, InternalError, "zlib inflateInit2 failed");
    s.next_in = in.data();
    uint64_t in_left = in.size();
    unsigned char* out = static_cast<unsigned char*>(dst);
    unsigned char spare;  // catches output beyond the declared size
    int r = Z_OK;
    while (r == Z_OK && s.total_out <= e.size) {
      if (s.avail_in == 0) {
        s.avail_in = uInt(std::min<uint64_t>(in_left, UINT32_MAX));
        in_left -= s.avail_in;
      }
      const uint64_t out_left = e.size - s.total_out;
      s.next_out = out_left ? out + s.total_out : &spare;
      s.avail_out = out_left ? uInt(std::min<uint64_t>(out_left, UINT32_MAX)) : 1;
      r = inflate(&s, Z_NO_FLUSH);
    }
    const uint64_t done = s.total_out;
    inflateEnd(&s);
    DPT_CHECK(r == Z_STREAM_END && done == e.size, FileError, path, ": entry ", e.name,
              " does not inflate to its declared ", e.size, " bytes: corrupt");
  }
  DPT_CHECK(crc32_of(dst, e.size) == e.crc, FileError, path, ": entry ", e.name,
            " is corrupt (CRC-32 mismatch)");
}

std::string ZipReader::read_string(const ZipEntry& e, uint64_t limit) const {
  DPT_CHECK(e.size <= limit, FileError, file_.path(), ": entry ", e.name, " is ", e.size,
            " bytes, more than the ", limit, " it can sensibly hold");
  std::string s(e.size, '\0');
  read(e, s.data());
  return s;
}

ZipWriter::ZipWriter(int fd, std::string path, bool force_zip64)
    : fd_(fd), path_(std::move(path)), zip64_(force_zip64) {}

void ZipWriter::add(const std::string& name, const void* data, uint64_t bytes) {
  DPT_ASSERT(!name.empty() && name.size() <= kMaxName, "bad entry name");
  ZipEntry z;
  z.name = name;
  z.size = z.compressed = bytes;
  z.data_offset = at_;  // of the local header, for now
  const bool big = zip64_ || bytes >= k32;
  // Local header: signature, version needed, flags, method (stored), time, date (1980-01-01),
  // CRC-32 (filled in by finish), sizes, name length, extra length; then name and extra.
  std::string h;
  put(h, kLocalSig, 4);
  put(h, big ? 45 : 20, 2);
  put(h, 0, 2);
  put(h, 0, 2);
  put(h, 0, 2);
  put(h, 0x21, 2);
  put(h, 0, 4);
  put(h, big ? k32 : bytes, 4);
  put(h, big ? k32 : bytes, 4);
  put(h, name.size(), 2);
  std::string extra;
  if (big) {
    put(extra, 1, 2);
    put(extra, 16, 2);
    put(extra, bytes, 8);
    put(extra, bytes, 8);
  }
  // Padding field ("FB", as PyTorch's writer uses) so that the data starts 64-byte aligned.
  const uint64_t base = at_ + kLocal + name.size() + extra.size() + 4;
  const uint64_t pad = (kAlign - base % kAlign) % kAlign;
  put(extra, 0x4246, 2);
  put(extra, pad, 2);
  extra.append(pad, 'Z');
  put(h, extra.size(), 2);
  h += name + extra;
  at_ += h.size() + bytes;
  entries_.push_back(std::move(z));
  pending_.push_back({std::move(h), data});
}

void ZipWriter::finish() {
  // Every entry's place is known: checksums and writes of several entries run at once.
  preallocate(fd_, at_);
  parallel_for(entries_.size(), [&](size_t i) {
    ZipEntry& z = entries_[i];
    std::string& h = pending_[i].header;
    z.crc = crc32_of(pending_[i].data, z.size);
    for (int k = 0; k < 4; ++k) h[14 + k] = char((z.crc >> (8 * k)) & 0xff);
    write_at(fd_, h.data(), h.size(), int64_t(z.data_offset), path_);
    write_at(fd_, pending_[i].data, z.size, int64_t(z.data_offset + h.size()), path_);
  });
  pending_.clear();
  const uint64_t cd_offset = at_;
  std::string cd;
  for (const ZipEntry& z : entries_) {
    const bool big = zip64_ || z.size >= k32 || z.data_offset >= k32;
    put(cd, kCentralSig, 4);
    put(cd, (3 << 8) | 45, 2);  // made by: Unix, spec 4.5
    put(cd, big ? 45 : 20, 2);
    put(cd, 0, 2);
    put(cd, 0, 2);
    put(cd, 0, 2);
    put(cd, 0x21, 2);
    put(cd, z.crc, 4);
    put(cd, big ? k32 : z.size, 4);
    put(cd, big ? k32 : z.size, 4);
    put(cd, z.name.size(), 2);
    put(cd, big ? 28 : 0, 2);  // extra
    put(cd, 0, 2);             // comment
    put(cd, 0, 2);             // disk
    put(cd, 0, 2);             // internal attributes
    put(cd, 0, 4);             // external attributes
    put(cd, big ? k32 : z.data_offset, 4);
    cd += z.name;
    if (big) {
      put(cd, 1, 2);
      put(cd, 24, 2);
      put(cd, z.size, 8);
      put(cd, z.size, 8);
      put(cd, z.data_offset, 8);
    }
  }
  const uint64_t n = entries_.size(), cd_size = cd.size();
  const bool big = zip64_ || n >= 0xffff || cd_offset >= k32 || cd_size >= k32;
  if (big) {
    const uint64_t end64_at = cd_offset + cd_size;
    put(cd, kEnd64Sig, 4);
    put(cd, kEnd64 - 12, 8);
    put(cd, (3 << 8) | 45, 2);
    put(cd, 45, 2);
    put(cd, 0, 4);
    put(cd, 0, 4);
    put(cd, n, 8);
    put(cd, n, 8);
    put(cd, cd_size, 8);
    put(cd, cd_offset, 8);
    put(cd, kLocator64Sig, 4);
    put(cd, 0, 4);
    put(cd, end64_at, 8);
    put(cd, 1, 4);
  }
  put(cd, kEndSig, 4);
  put(cd, 0, 2);
  put(cd, 0, 2);
  put(cd, big ? 0xffff : n, 2);
  put(cd, big ? 0xffff : n, 2);
  put(cd, big ? k32 : cd_size, 4);
  put(cd, big ? k32 : cd_offset, 4);
  put(cd, 0, 2);
  write_at(fd_, cd.data(), cd.size(), int64_t(at_), path_);
  at_ += cd.size();
}

}  // namespace dpt

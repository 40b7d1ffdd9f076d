// ZIP archives as torch.save writes them (PyTorch >= 1.6): entries stored uncompressed, each
// entry's data aligned to 64 bytes by padding in its local header's extra field, ZIP64 records
// once an offset or size passes 4 GiB.
//
// The reader trusts nothing: the central directory, every local header, name, size and offset is
// checked against the file's length before anything is allocated, and every entry's CRC-32 is
// verified when it is read. Stored and deflated entries are read; nothing else.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io/file.h"

namespace dpt {

struct ZipEntry {
  std::string name;
  uint64_t data_offset = 0;  // of its (possibly compressed) bytes in the file
  uint64_t size = 0;         // uncompressed
  uint64_t compressed = 0;
  uint32_t crc = 0;
  uint16_t method = 0;  // 0 stored, 8 deflated
};

class ZipReader {
 public:
  explicit ZipReader(const ReadFile& file);  // FileError unless a well-formed archive
  const std::vector<ZipEntry>& entries() const { return entries_; }
  const ZipEntry* find(const std::string& name) const;
  // Reads the whole entry into dst (e.size bytes) and checks its CRC-32.
  void read(const ZipEntry& e, void* dst) const;
  // The entry as a string; FileError when it is longer than `limit` bytes.
  std::string read_string(const ZipEntry& e, uint64_t limit) const;

 private:
  const ReadFile& file_;
  std::vector<ZipEntry> entries_;
};

class ZipWriter {
 public:
  // Appends entries to fd (an empty file); force_zip64 writes ZIP64 records even for small
  // archives (tests use it: real ones need them only past 4 GiB).
  ZipWriter(int fd, std::string path, bool force_zip64 = false);
  // Places an entry; data must stay valid until finish().
  void add(const std::string& name, const void* data, uint64_t bytes);
  // Writes every entry (several at once) and the central directory; the caller fsyncs.
  void finish();

 private:
  int fd_;
  std::string path_;
  bool zip64_;
  uint64_t at_ = 0;
  std::vector<ZipEntry> entries_;  // data_offset here is the local header's offset
  struct Pending {
    std::string header;  // local header, CRC-32 still zero
    const void* data;
  };
  std::vector<Pending> pending_;
};

}  // namespace dpt

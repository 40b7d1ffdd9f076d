// File plumbing shared by every checkpoint format in io/: bounded reads of untrusted files and
// atomic, durable saves (temporary file, fsync, rename, fsync of the directory).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace dpt {

std::string errno_str();

// Owns a file descriptor.
struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(Fd&& o) noexcept : fd(o.fd) { o.fd = -1; }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd();
};

// Creates `tmp` for writing (it must not exist); FileError naming `path` (the file being saved).
Fd create_file(const std::string& tmp, const std::string& path);
// Reserves the first `bytes` of a new file (a hint: about 10% off a large save here).
void preallocate(int fd, uint64_t bytes);
// fsync; FileError naming path.
void sync_file(int fd, const std::string& path);

// A file opened for reading whose every read is checked against its length.
class ReadFile {
 public:
  explicit ReadFile(const std::string& path);  // FileError when missing, a directory, unreadable
  ~ReadFile();
  ReadFile(const ReadFile&) = delete;
  ReadFile& operator=(const ReadFile&) = delete;
  int64_t size() const { return size_; }
  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  // Reads exactly n bytes at offset into dst; FileError naming `what` when [offset, offset + n)
  // is not inside the file.
  void read(int64_t offset, void* dst, uint64_t n, const std::string& what) const;

 private:
  std::string path_;
  int fd_ = -1;
  int64_t size_ = 0;
};

// Reads exactly n bytes at offset (no bounds check: for files we wrote); FileError naming path.
void read_at(int fd, void* dst, uint64_t n, int64_t offset, const std::string& path);
// Writes all n bytes at offset; FileError naming path on failure.
void write_at(int fd, const void* data, uint64_t n, int64_t offset, const std::string& path);

// Bytes of a file being written that are in memory: [offset, offset + bytes) comes from data.
struct Span {
  uint64_t offset;
  const void* data;
  size_t bytes;
};

// Completes the file `file` (open for reading and writing as fd, `size` bytes long, every byte
// outside the spans already written, e.g. libhdf5's metadata) with the spans' bytes, sorted and
// disjoint, and passes the whole file [0, size) in order through observe (a digest). The data goes
// to the disk in 16 MiB pieces by O_DIRECT where the file system allows, written by two threads
// while the caller copies and observes the next: fresh page-cache pages cost this VM more than the
// disk does, and a file bypassing the cache leaves little for the closing fsync. FileError naming
// path.
void write_streamed(int fd, const std::string& file, int64_t size, const std::vector<Span>& spans,
                    const std::function<void(const void*, size_t)>& observe,
                    const std::string& path);

// Calls fn(0..n-1) on up to 4 threads (the caller's included); the first exception thrown stops
// the others from starting new items and is rethrown. Reading several tensors at once overlaps
// one's copy and checks with another's page faults.
void parallel_for(size_t n, const std::function<void(size_t)>& fn);

// Saves `path` atomically and durably: checks there is room for about `bytes`, removes
// temporaries of earlier saves whose process is gone, calls write(tmp) to create and fill a
// temporary file beside path (write must fsync it), renames it over path and flushes the
// directory. On any failure the temporary is removed and path is untouched.
void atomic_save(const std::string& path, uint64_t bytes,
                 const std::function<void(const std::string& tmp)>& write);

}  // namespace dpt

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

// Writes all n bytes at offset; FileError naming path on failure.
void write_at(int fd, const void* data, uint64_t n, int64_t offset, const std::string& path);

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

#include "io/file.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <mutex>
#include <thread>
#include <vector>

#include "core/error.h"

namespace dpt {

namespace fs = std::filesystem;

std::string errno_str() {
  return std::strerror(errno);
}

Fd::~Fd() {
  if (fd >= 0) close(fd);
}

Fd create_file(const std::string& tmp, const std::string& path) {
  Fd f(open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  DPT_CHECK(f.fd >= 0, FileError, "cannot save ", path, ": cannot create ", tmp, ": ", errno_str());
  return f;
}

void preallocate(int fd, uint64_t bytes) {
  if (bytes > 0) posix_fallocate(fd, 0, off_t(bytes));  // unsupported file systems: no harm
}

void sync_file(int fd, const std::string& path) {
  DPT_CHECK(fsync(fd) == 0, FileError, "cannot flush ", path, " to disk: ", errno_str());
}

ReadFile::ReadFile(const std::string& path) : path_(path) {
  fd_ = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DPT_CHECK(fd_ >= 0, FileError, "cannot open ", path, ": ", errno_str());
  struct stat st {};
  if (fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd_);
    DPT_THROW(FileError, path, " is not a regular file");
  }
  size_ = int64_t(st.st_size);
}

ReadFile::~ReadFile() {
  if (fd_ >= 0) close(fd_);
}

void ReadFile::read(int64_t offset, void* dst, uint64_t n, const std::string& what) const {
  DPT_CHECK(offset >= 0 && offset <= size_ && n <= uint64_t(size_ - offset), FileError, path_,
            " is truncated or corrupt: ", what, " (", n, " bytes at offset ", offset,
            ") lies beyond the end of the file (", size_, " bytes)");
  read_at(fd_, dst, n, offset, path_);
}

void read_at(int fd, void* dst, uint64_t n, int64_t offset, const std::string& path) {
  char* p = static_cast<char*>(dst);
  for (uint64_t done = 0; done < n;) {
    const ssize_t r = pread(fd, p + done, size_t(n - done), off_t(offset + int64_t(done)));
    DPT_CHECK(r > 0, FileError, "cannot read ", path, ": ",
              r == 0 ? "unexpected end" : errno_str());
    done += uint64_t(r);
  }
}

void write_at(int fd, const void* data, uint64_t n, int64_t offset, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  for (uint64_t done = 0; done < n;) {
    const ssize_t r = pwrite(fd, p + done, size_t(n - done), off_t(offset + int64_t(done)));
    DPT_CHECK(r > 0, FileError, "cannot save ", path, ": writing failed: ", errno_str());
    done += uint64_t(r);
  }
}

namespace {

// A fixed set of aligned buffers passed between the filling thread and the writers.
class BufferQueue {
 public:
  struct Piece {
    unsigned char* data = nullptr;
    uint64_t offset = 0;
    size_t bytes = 0;
  };
  void push(std::deque<Piece>& q, Piece p) {
    {
      std::lock_guard<std::mutex> lock(m_);
      q.push_back(p);
    }
    cv_.notify_all();
  }
  // Waits for a piece of q; false once q is empty and closed (or the stream failed).
  bool pop(std::deque<Piece>& q, Piece& p) {
    std::unique_lock<std::mutex> lock(m_);
    cv_.wait(lock, [&] { return !q.empty() || closed_ || failed_; });
    if (failed_ || q.empty()) return false;
    p = q.front();
    q.pop_front();
    return true;
  }
  void close() {
    {
      std::lock_guard<std::mutex> lock(m_);
      closed_ = true;
    }
    cv_.notify_all();
  }
  void fail(std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> lock(m_);
      if (!error_) error_ = e;
      failed_ = true;
    }
    cv_.notify_all();
  }
  std::exception_ptr error() {
    std::lock_guard<std::mutex> lock(m_);
    return error_;
  }
  std::deque<Piece> free, full;

 private:
  std::mutex m_;
  std::condition_variable cv_;
  bool closed_ = false, failed_ = false;
  std::exception_ptr error_;
};

}  // namespace

void write_streamed(int fd, const std::string& file, int64_t size, const std::vector<Span>& spans,
                    const std::function<void(const void*, size_t)>& observe,
                    const std::string& path) {
  constexpr size_t kPiece = size_t(16) << 20, kAlign = 4096;
  Fd direct(open(file.c_str(), O_WRONLY | O_DIRECT | O_CLOEXEC));  // -1: buffered writes only
  const size_t piece = std::min(kPiece, (size_t(size) + kAlign - 1) / kAlign * kAlign);
  const int pieces = size > int64_t(2 * kPiece) ? 4 : 1;
  BufferQueue q;
  std::vector<std::unique_ptr<unsigned char, decltype(&std::free)>> owned;
  for (int i = 0; i < pieces; ++i) {
    owned.emplace_back(static_cast<unsigned char*>(std::aligned_alloc(kAlign, piece)), &std::free);
    DPT_CHECK(owned.back(), FileError, "cannot save ", path, ": out of memory for write buffers");
    q.free.push_back({owned.back().get(), 0, 0});
  }
  auto write_piece = [&](const BufferQueue::Piece& p) {
    // O_DIRECT takes whole 4 KiB blocks: the last piece's tail goes through the page cache, as
    // does everything when the file system refuses O_DIRECT (tmpfs, some network file systems).
    size_t head = direct.fd >= 0 ? p.bytes / kAlign * kAlign : 0;
    for (size_t done = 0; done < head;) {
      const ssize_t r = pwrite(direct.fd, p.data + done, head - done, off_t(p.offset + done));
      if (r < 0 && errno == EINVAL && done == 0) {
        head = 0;  // the file system takes no O_DIRECT at this alignment after all
        break;
      }
      DPT_CHECK(r > 0, FileError, "cannot save ", path, ": writing failed: ", errno_str());
      done += size_t(r);
    }
    write_at(fd, p.data + head, p.bytes - head, int64_t(p.offset + head), path);
  };
  auto writer = [&] {
    try {
      for (BufferQueue::Piece p; q.pop(q.full, p);) {
        write_piece(p);
        q.push(q.free, p);
      }
    } catch (...) {
      q.fail(std::current_exception());
    }
  };
  std::vector<std::thread> writers;
  for (int i = 0; i < std::min(pieces - 1, 2); ++i) writers.emplace_back(writer);
  try {
    size_t next = 0;  // first span not yet wholly copied
    for (uint64_t at = 0; at < uint64_t(size);) {
      BufferQueue::Piece p;
      if (writers.empty()) {
        p = q.free.front();
      } else if (!q.pop(q.free, p)) {
        break;  // a writer failed
      }
      p.offset = at;
      p.bytes = size_t(std::min<uint64_t>(piece, uint64_t(size) - at));
      const uint64_t end = at + p.bytes;
      // Fill [at, end): span bytes from memory, the rest from the file.
      for (uint64_t pos = at; pos < end;) {
        while (next < spans.size() && spans[next].offset + spans[next].bytes <= pos) ++next;
        const Span* s = next < spans.size() ? &spans[next] : nullptr;
        if (s && s->offset <= pos) {
          const uint64_t n = std::min(end, s->offset + s->bytes) - pos;
          std::memcpy(p.data + (pos - at), static_cast<const char*>(s->data) + (pos - s->offset),
                      size_t(n));
          pos += n;
        } else {
          const uint64_t stop = s ? std::min(end, s->offset) : end;
          read_at(fd, p.data + (pos - at), stop - pos, int64_t(pos), path);
          pos = stop;
        }
      }
      observe(p.data, p.bytes);
      if (writers.empty())
        write_piece(p);
      else
        q.push(q.full, p);
      at = end;
    }
  } catch (...) {
    q.fail(std::current_exception());
  }
  q.close();
  for (auto& t : writers) t.join();
  if (auto e = q.error()) std::rethrow_exception(e);
}

void parallel_for(size_t n, const std::function<void(size_t)>& fn) {
  std::atomic<size_t> next{0};
  std::exception_ptr failed;
  std::mutex m;
  auto work = [&] {
    for (size_t i; (i = next++) < n;) {
      try {
        fn(i);
      } catch (...) {
        std::lock_guard<std::mutex> lock(m);
        if (!failed) failed = std::current_exception();
        next = n;
      }
    }
  };
  const size_t threads =
      std::min<size_t>({n, std::max(1u, std::thread::hardware_concurrency()), 4});
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (failed) std::rethrow_exception(failed);
}

namespace {

// Fails early, and cleanly, when a file of `bytes` cannot be written to dir (libhdf5 1.10 crashes
// at exit after one of its own writes has failed, so it must never meet a full disk).
void check_room(const fs::path& dir, uint64_t bytes, const std::string& path) {
  struct statvfs vfs {};
  if (statvfs(dir.c_str(), &vfs) == 0) {
    const uint64_t free_bytes = uint64_t(vfs.f_bavail) * vfs.f_frsize;
    DPT_CHECK(free_bytes >= bytes, FileError, "cannot save ", path, ": it needs about ",
              bytes >> 20, " MiB and ", dir.string(), " has ", free_bytes >> 20, " MiB free");
  }
  rlimit lim{};
  if (getrlimit(RLIMIT_FSIZE, &lim) == 0 && lim.rlim_cur != RLIM_INFINITY)
    DPT_CHECK(uint64_t(lim.rlim_cur) >= bytes, FileError, "cannot save ", path, ": it needs about ",
              bytes >> 20, " MiB, over this process's file size limit of ", lim.rlim_cur >> 20,
              " MiB (ulimit -f)");
}

// ".<name>.tmp-<pid>": the temporary file a save to path writes first.
std::string temporary_name(const fs::path& path, const std::string& pid) {
  std::string s(".");
  s.append(path.filename().string()).append(".tmp-").append(pid);
  return s;
}

// Unlinks files on a thread of its own, one at a time; the last is waited for before the next
// starts and when the process exits (a process killed first leaves the file to the next save's
// clean-up of stale temporaries).
void remove_in_background(const fs::path& p) {
  struct Remover {
    std::mutex m;
    std::thread last;
    ~Remover() {
      if (last.joinable()) last.join();
    }
  };
  static Remover r;
  std::lock_guard<std::mutex> lock(r.m);
  if (r.last.joinable()) r.last.join();
  r.last = std::thread([p] { unlink(p.c_str()); });
}

// Removes temporary files of earlier saves to `path` whose writer process is gone (SIGKILL).
void remove_stale_temporaries(const fs::path& path) {
  std::error_code ec;
  const std::string stem = temporary_name(path, "");
  for (auto& e :
       fs::directory_iterator(path.parent_path().empty() ? "." : path.parent_path(), ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(stem, 0) != 0) continue;
    const long pid = std::atol(name.c_str() + stem.size());
    if (pid > 0 && kill(pid_t(pid), 0) != 0 && errno == ESRCH) fs::remove(e.path(), ec);
  }
}

}  // namespace

void atomic_save(const std::string& path_str, uint64_t bytes,
                 const std::function<void(const std::string& tmp)>& write) {
  const fs::path path(path_str);
  const fs::path dir = path.parent_path().empty() ? fs::path(".") : path.parent_path();
  std::error_code ec;
  DPT_CHECK(fs::is_directory(dir, ec), FileError, "cannot save ", path_str, ": directory ",
            dir.string(), " does not exist");
  DPT_CHECK(!fs::is_directory(path, ec), FileError, "cannot save ", path_str,
            ": it is a directory");
  check_room(dir, bytes, path_str);
  remove_stale_temporaries(path);
  const fs::path tmp = dir / temporary_name(path, std::to_string(getpid()));
  fs::remove(tmp, ec);
  // Renaming over a file frees its blocks, 0.2 s per 480 MB here: a second name keeps the old
  // file alive past the rename, and a thread removes it once the save is durable.
  const fs::path old = dir / (tmp.filename().string() + ".old");
  fs::remove(old, ec);
  const bool kept = link(path.c_str(), old.c_str()) == 0;
  try {
    write(tmp.string());
    DPT_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, FileError, "cannot save ", path_str,
              ": rename failed: ", errno_str());
  } catch (...) {
    fs::remove(tmp, ec);
    if (kept) fs::remove(old, ec);
    throw;
  }
  const int d = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  const bool synced = d >= 0 && fsync(d) == 0;
  if (d >= 0) close(d);
  if (kept) remove_in_background(old);
  DPT_CHECK(synced, FileError, "saved ", path_str,
            " but could not flush its directory to disk: ", errno_str());
}

}  // namespace dpt

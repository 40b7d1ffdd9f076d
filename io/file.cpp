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
#include <cstring>
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
  char* p = static_cast<char*>(dst);
  for (uint64_t done = 0; done < n;) {
    const ssize_t r = pread(fd_, p + done, size_t(n - done), off_t(offset + int64_t(done)));
    DPT_CHECK(r > 0, FileError, "cannot read ", path_, ": ",
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
  try {
    write(tmp.string());
    DPT_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, FileError, "cannot save ", path_str,
              ": rename failed: ", errno_str());
  } catch (...) {
    fs::remove(tmp, ec);
    throw;
  }
  const int d = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  const bool synced = d >= 0 && fsync(d) == 0;
  if (d >= 0) close(d);
  DPT_CHECK(synced, FileError, "saved ", path_str,
            " but could not flush its directory to disk: ", errno_str());
}

}  // namespace dpt

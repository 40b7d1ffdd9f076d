// The fuzz targets: one function per loader of untrusted bytes, each taking the raw input and
// swallowing the typed errors a bad file must produce. Anything else (a crash, a sanitizer
// report, an uncaught exception, a hang) is a bug. fuzz_main.cpp wraps one of them for libFuzzer;
// tests/test_fuzz_corpus.cpp replays the seed corpora and every past crash through all of them.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "data/idx.h"
#include "data/image.h"
#include "io/checkpoint.h"
#include "io/formats.h"
#include "io/pickle.h"
#include "models/arch.h"

namespace fuzz {

// The input as a file (the readers take paths), kept in memory.
class InputFile {
 public:
  InputFile(const uint8_t* data, size_t size) : fd_(memfd_create("fuzz-input", 0)) {
    for (size_t done = 0; fd_ >= 0 && done < size;) {
      const ssize_t n = write(fd_, data + done, size - done);
      if (n <= 0) break;
      done += size_t(n);
    }
  }
  ~InputFile() {
    if (fd_ >= 0) close(fd_);
  }
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;
  std::string path() const { return "/proc/self/fd/" + std::to_string(fd_); }

 private:
  int fd_;
};

template <typename F>
void expect_error_or_success(F&& f) {
  try {
    f();
  } catch (const dpt::Error&) {
  }
}

// torch.save zip files: zip reader, restricted unpickler, storages.
inline void pth(const uint8_t* data, size_t size) {
  InputFile in(data, size);
  expect_error_or_success([&] { dpt::read_pth(in.path()); });
}

// The restricted unpickler alone (data.pkl bytes).
inline void pickle(const uint8_t* data, size_t size) {
  expect_error_or_success(
      [&] { dpt::unpickle(std::string(reinterpret_cast<const char*>(data), size), "fuzz"); });
}

inline void safetensors(const uint8_t* data, size_t size) {
  InputFile in(data, size);
  expect_error_or_success([&] { dpt::read_safetensors(in.path()); });
}

// HDF5 checkpoints, as given (the digest check stops nearly everything) and re-sealed, so that
// libhdf5 and our structural checks see the mutated bytes behind a valid digest.
inline void checkpoint(const uint8_t* data, size_t size) {
  InputFile in(data, size);
  expect_error_or_success([&] { dpt::read_checkpoint(in.path(), dpt::FileFormat::Hdf5); });
  expect_error_or_success([&] {
    dpt::seal_checkpoint(in.path());
    dpt::read_checkpoint(in.path(), dpt::FileFormat::Hdf5);
  });
}

// IDX images and labels, plain or gzip.
inline void idx(const uint8_t* data, size_t size) {
  InputFile in(data, size);
  expect_error_or_success([&] { dpt::read_idx_images(in.path()); });
  expect_error_or_success([&] { dpt::read_idx_labels(in.path()); });
}

// The architecture JSON of full checkpoints.
inline void arch(const uint8_t* data, size_t size) {
  const nlohmann::json j = nlohmann::json::parse(data, data + size, nullptr, false);
  if (!j.is_discarded()) expect_error_or_success([&] { dpt::ArchSpec::from_json(j).validate(); });
}

// JPEG and PNG files: the header, a whole decode when small, and a partial (windowed) decode.
inline void image(const uint8_t* data, size_t size) {
  const std::vector<uint8_t> bytes(data, data + size);
  expect_error_or_success([&] {
    const dpt::ImageSize s = dpt::image_size(bytes, "fuzz");
    if (s.height * s.width <= (int64_t(1) << 22)) dpt::decode_image(bytes, "fuzz");
    const dpt::Window w{s.height / 3, s.width / 4, std::max<int64_t>(1, s.height / 2),
                        std::max<int64_t>(1, s.width / 2)};
    if (w.height * w.width <= (int64_t(1) << 22)) dpt::decode_image(bytes, "fuzz", w);
  });
}

struct Target {
  const char* name;
  void (*run)(const uint8_t*, size_t);
};
inline constexpr Target kTargets[] = {{"pth", pth},
                                      {"pickle", pickle},
                                      {"safetensors", safetensors},
                                      {"checkpoint", checkpoint},
                                      {"idx", idx},
                                      {"arch", arch},
                                      {"image", image}};

}  // namespace fuzz

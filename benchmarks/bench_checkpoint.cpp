// Times a ResNet-152 full checkpoint with momentum (about 480 MB): our save (libhdf5 lays out the
// file, we stream the tensors in with O_DIRECT and XXH3-128, fsync, rename) and load (read,
// verify, parse, validate; straight after the save, and again from the page cache), against a
// raw write + fsync and a raw read of the same tensor bytes. Prints one JSON object.
//
//   bench_checkpoint DIR [REPEATS]
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

#include "core/rng.h"
#include "io/checkpoint.h"

using namespace dpt;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Raw baseline: the tensors' bytes back to back, written and fsynced, then read back.
std::pair<double, double> raw_io(const Checkpoint& c, const std::string& path) {
  auto t0 = Clock::now();
  int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  DPT_CHECK(fd >= 0, FileError, "cannot create ", path);
  size_t total = 0;
  for (const StateDict* sd : {&c.state, &c.momentum})
    for (auto& [k, t] : sd->entries) {
      DPT_CHECK(write(fd, t.raw(), t.nbytes()) == ssize_t(t.nbytes()), FileError, "write failed");
      total += t.nbytes();
    }
  fsync(fd);
  close(fd);
  const double w = seconds_since(t0);
  std::vector<char> buf(total);
  t0 = Clock::now();
  fd = open(path.c_str(), O_RDONLY);
  for (size_t at = 0; at < total;) at += size_t(read(fd, buf.data() + at, total - at));
  close(fd);
  return {w, seconds_since(t0)};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_checkpoint DIR [REPEATS]\n");
    return 2;
  }
  const std::string dir = argv[1];
  const int repeats = argc > 2 ? std::max(1, std::atoi(argv[2])) : 3;
  ArchSpec spec;
  spec.arch = "resnet152";
  auto model = make_model(spec, 0);
  Checkpoint c = make_checkpoint(*model, CheckpointKind::Full);
  Rng rng(1);
  for (auto& [name, p] : model->named_parameters()) {
    Tensor m(p->value.shape());
    for (int64_t i = 0; i < m.numel(); ++i) m.data<float>()[i] = rng.normal();
    c.momentum.entries.emplace_back(name, std::move(m));
  }
  c.optimizer = {{"name", "sgd"}, {"lr", 0.1}, {"momentum", 0.9}};
  c.trainer = {{"step", 1000}, {"epoch", 3}, {"position", 17}};
  const std::string path = dir + "/bench_ckpt.h5";
  double save = 1e9, load = 1e9, load_cold = 1e9, raw_w = 1e9, raw_r = 1e9;
  int64_t bytes = 0;
  for (int r = 0; r < repeats; ++r) {
    auto t0 = Clock::now();
    write_checkpoint(c, path);
    save = std::min(save, seconds_since(t0));
    // The save bypasses the page cache (O_DIRECT), so the first load reads the disk; the second
    // reads the page cache, as torch.load of a file torch.save just wrote does.
    t0 = Clock::now();
    bytes = read_checkpoint(path).file_bytes;
    load_cold = std::min(load_cold, seconds_since(t0));
    t0 = Clock::now();
    read_checkpoint(path);
    load = std::min(load, seconds_since(t0));
    auto [w, rd] = raw_io(c, dir + "/bench_raw.bin");
    raw_w = std::min(raw_w, w);
    raw_r = std::min(raw_r, rd);
  }
  std::remove(path.c_str());
  std::remove((dir + "/bench_raw.bin").c_str());
  std::printf("%s\n", nlohmann::json{{"file_bytes", bytes},
                                     {"save_seconds", save},
                                     {"load_seconds", load},
                                     {"load_after_save_seconds", load_cold},
                                     {"raw_write_seconds", raw_w},
                                     {"raw_read_seconds", raw_r}}
                          .dump()
                          .c_str());
  return 0;
}

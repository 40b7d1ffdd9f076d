// One timed export or import of a ResNet-152 state dict (1000 classes, about 240 MB) through .pth
// or safetensors, in a fresh process as a user's command would meet it: export is
// write_checkpoint (serialise, write, fsync, rename), import is read_checkpoint (every check,
// CRC-32s for .pth). Prints the seconds. benchmarks/interop_io.py runs it beside torch.save /
// torch.load of the same dict.
//
//   bench_interop save PATH        (the format from the extension)
//   bench_interop load PATH
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>

#include "io/checkpoint.h"

using namespace dpt;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  if (argc != 3 || (std::strcmp(argv[1], "save") != 0 && std::strcmp(argv[1], "load") != 0)) {
    std::fprintf(stderr, "usage: bench_interop save|load PATH\n");
    return 2;
  }
  try {
    double seconds = 0;
    if (std::strcmp(argv[1], "save") == 0) {
      ArchSpec spec;
      spec.arch = "resnet152";
      auto model = make_model(spec, 0);
      const Checkpoint c = make_checkpoint(*model, CheckpointKind::Weights);
      const auto t0 = Clock::now();
      write_checkpoint(c, argv[2]);
      seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    } else {
      const auto t0 = Clock::now();
      const Checkpoint c = read_checkpoint(argv[2]);
      seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    }
    std::printf("%.6f\n", seconds);
  } catch (const Error& e) {
    std::fprintf(stderr, "bench_interop: %s\n", e.what());
    return 1;
  }
  return 0;
}

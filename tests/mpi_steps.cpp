// Test driver for multi-process DataParallel: K SGD steps of the fixture's ResNet-18 through
// DataParallel, either over MPI (when started by mpirun: one replica per process) or over D
// in-process CPU devices. Rank 0 writes the losses and its replica's final state_dict as raw
// float32 values, so test_mpi can compare the two modes.
//
//   mpi_steps OUT BN ROWS STEPS DEVICES BUCKET_MB [FAIL_RANK FAIL_STEP]
//
// FAIL_RANK/FAIL_STEP make that rank's replica throw in backward at that step (0-based).
#include <cstdio>
#include <fstream>
#include <string>

#include "parallel/mpi.h"
#include "tests/dp_fixture.h"

using namespace dpt;
using namespace dpt::fixture;

namespace {

// Passes through to the model, but throws in backward at one step: a replica dying mid-step.
class FailAt : public Module {
 public:
  FailAt(std::unique_ptr<Module> m, int step)
      : inner_(register_module("m", std::move(m))), at_(step) {}
  std::string kind() const override { return "FailAt"; }
  Tensor forward(Tensor x) override { return inner_.forward(std::move(x)); }
  Tensor backward(Tensor dy) override {
    if (step_++ == at_) throw NumericError("replica failed on purpose in backward");
    return inner_.backward(std::move(dy));
  }

 private:
  Module& inner_;
  int at_, step_ = 0;
};

int run(int argc, char** argv, const MpiRuntime* mpi) {
  DPT_CHECK(argc == 7 || argc == 9, UsageError,
            "usage: mpi_steps OUT BN ROWS STEPS DEVICES BUCKET_MB [FAIL_RANK FAIL_STEP]");
  const std::string out = argv[1];
  const BnMode bn = parse_bn_mode(argv[2]);
  const int64_t rows = std::stoll(argv[3]);
  const int steps = std::stoi(argv[4]), devices = std::stoi(argv[5]);
  const double bucket_mb = std::stod(argv[6]);
  const int fail_rank = argc == 9 ? std::stoi(argv[7]) : -1,
            fail_step = argc == 9 ? std::stoi(argv[8]) : -1;

  DataParallelOptions opt{.bn = bn, .threads = mpi ? 1 : devices, .bucket_mb = bucket_mb};
  std::vector<Device> devs{Device::cpu(0)};
  if (mpi) {
    opt.group = mpi->group();
  } else {
    for (int d = 1; d < devices; ++d) devs.push_back(Device::cpu(d));
  }
  const int rank = mpi ? mpi->rank() : 0;
  int made = 0;  // replica index within this process
  auto make = [&]() -> std::unique_ptr<Module> {
    const int global = mpi ? rank : made++;
    auto m = conditioned(3);
    if (global == fail_rank) return std::make_unique<FailAt>(std::move(m), fail_step);
    return m;
  };
  DataParallel dp(make(), make, devs, opt);
  auto opts = sgds(int(devs.size()));
  std::vector<float> losses;
  for (int s = 0; s < steps; ++s)
    losses.push_back(step(dp, opts, batch(rows, 10 + s), labels(rows)));
  if (rank != 0) return 0;
  std::ofstream f(out, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(losses.data()), std::streamsize(losses.size() * 4));
  for (auto& [name, t] : dp.module().state_dict().entries) {
    std::vector<float> v = t.to_vector();
    f.write(reinterpret_cast<const char*>(v.data()), std::streamsize(v.size() * 4));
  }
  DPT_CHECK(f.good(), FileError, "cannot write ", out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::unique_ptr<MpiRuntime> mpi;
  try {
    if (MpiRuntime::launched()) mpi = std::make_unique<MpiRuntime>(&argc, &argv);
    return run(argc, argv, mpi.get());
  } catch (const std::exception& e) {
    if (mpi) mpi->abort(e.what());
    std::fprintf(stderr, "mpi_steps: error: %s\n", e.what());
    return 1;
  }
}

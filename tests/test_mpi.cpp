// Multi-process DataParallel: `mpirun -np 2` (one replica per process, OpenMPI) trains exactly
// like two in-process CPU devices, and a rank that fails brings the whole job down quickly with
// its message instead of leaving the other rank waiting in a collective.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

struct Proc {
  int code = -1;
  std::string err;
};

// Runs a shell command with stderr captured, killed after `seconds`.
Proc shell(const std::string& cmd, int seconds = 300) {
  const std::string err = ::testing::TempDir() + "/mpi_stderr.txt";
  const std::string full = "timeout -s KILL " + std::to_string(seconds) + " " + cmd + " 2>" + err;
  Proc r;
  const int status = std::system(full.c_str());
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  std::ifstream f(err);
  r.err.assign(std::istreambuf_iterator<char>(f), {});
  return r;
}

std::string mpirun(int np) {
  // Open MPI refuses to run as root without these; --oversubscribe in case fewer cores are free.
  setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
  setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
  return std::string(DPT_MPIEXEC) + " -np " + std::to_string(np) +
         " --oversubscribe --bind-to none ";
}

std::vector<float> read_floats(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<char> bytes{std::istreambuf_iterator<char>(f), {}};
  std::vector<float> v(bytes.size() / 4);
  std::memcpy(v.data(), bytes.data(), v.size() * 4);
  return v;
}

const std::string kDriver = std::string(DPT_BINARY_DIR) + "/tests/mpi_steps";

}  // namespace

// (bn, rows, bucket MiB): even and uneven chunks, SyncBatchNorm and local BatchNorm (whose
// running statistics rank 0 broadcasts every step), many buckets and one.
class MpiEquivalence : public ::testing::TestWithParam<std::tuple<std::string, int, std::string>> {
};

TEST_P(MpiEquivalence, TwoProcessesEqualTwoInProcessDevices) {
  if (std::string(DPT_MPIEXEC).empty()) GTEST_SKIP() << "built without MPI (libopenmpi-dev)";
  const auto [bn, rows, mb] = GetParam();
  const std::string dir = ::testing::TempDir();
  const std::string args = bn + " " + std::to_string(rows) + " 3 2 " + mb;
  Proc a = shell(mpirun(2) + kDriver + " " + dir + "/mpi.bin " + args);
  ASSERT_EQ(a.code, 0) << a.err;
  Proc b = shell(kDriver + " " + dir + "/inproc.bin " + args);
  ASSERT_EQ(b.code, 0) << b.err;
  std::vector<float> x = read_floats(dir + "/mpi.bin"), y = read_floats(dir + "/inproc.bin");
  ASSERT_EQ(x.size(), y.size());
  ASSERT_GT(x.size(), 11000000u);  // 3 losses + every state_dict value of ResNet-18
  // Same chunks, same kernels on one thread each, sums of two values (order-free): bit-identical.
  size_t diffs = 0;
  for (size_t i = 0; i < x.size(); ++i) diffs += x[i] != y[i];
  EXPECT_EQ(diffs, 0u) << "losses " << x[0] << " " << x[1] << " " << x[2] << " vs " << y[0] << " "
                       << y[1] << " " << y[2];
}

INSTANTIATE_TEST_SUITE_P(DataParallel, MpiEquivalence,
                         ::testing::Values(std::make_tuple("sync", 8, "1"),
                                           std::make_tuple("sync", 7, "0"),
                                           std::make_tuple("local", 8, "25"),
                                           std::make_tuple("local", 1, "1")));

TEST(Mpi, FailingRankBringsTheJobDown) {
  if (std::string(DPT_MPIEXEC).empty()) GTEST_SKIP() << "built without MPI (libopenmpi-dev)";
  // Rank 1 throws in backward at step 1; rank 0 is then waiting for its gradients.
  Proc r =
      shell(mpirun(2) + kDriver + " " + ::testing::TempDir() + "/fail.bin sync 8 3 1 1 1 1", 120);
  EXPECT_NE(r.code, 0) << r.err;
  EXPECT_LT(r.code, 124) << "killed by the timeout: the job hung\n" << r.err;
  EXPECT_NE(r.err.find("dptrain: error: rank 1: replica failed on purpose in backward"),
            std::string::npos)
      << r.err;
}

// The dptrain executable end to end: bad input gives one clear line and exit code 2 (usage) or 1
// (runtime), never a crash; --json output; a short real training run that must learn.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

namespace {

struct CliRun {
  int code = -1;
  std::string out, err;
};

// launcher: prepended to the command (mpirun); the run is killed after 10 minutes.
CliRun dptrain(const std::string& args, const std::string& launcher = "") {
  const std::string dir = ::testing::TempDir();
  const std::string err_path = dir + "/dptrain_cli_stderr.txt";
  const std::string cmd = "timeout -s KILL 600 " + launcher + std::string(DPT_BINARY_DIR) +
                          "/dptrain " + args + " 2>" + err_path;
  CliRun r;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  std::ifstream f(err_path);
  std::stringstream ss;
  ss << f.rdbuf();
  r.err = ss.str();
  return r;
}

// Exit code `code`, exactly one "dptrain: error:" line mentioning `needle`, nothing on stdout.
void expect_error(const std::string& args, int code, const std::string& needle) {
  SCOPED_TRACE(args);
  CliRun r = dptrain(args);
  EXPECT_EQ(r.code, code) << r.err;
  EXPECT_EQ(r.err.rfind("dptrain: error: ", 0), 0u) << r.err;
  size_t errors = 0;
  for (size_t pos = 0; (pos = r.err.find("dptrain: error:", pos)) != std::string::npos; ++pos)
    ++errors;
  EXPECT_EQ(errors, 1u) << r.err;
  std::string first_line = r.err.substr(0, r.err.find('\n'));
  EXPECT_NE(first_line.find(needle), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("terminate called"), std::string::npos) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
}

const char* kTiny =
    "train --data synthetic --synthetic-size 64 --image-size 16 --model resnet18 "
    "--stem imagenet --batch-size 16 --max-steps 2 --threads 1 ";

}  // namespace

TEST(Cli, BadUsageExitsTwo) {
  expect_error("", 2, "ubcommand");
  expect_error("fly", 2, "unknown command 'fly'");
  expect_error("train --no-such-flag", 2, "--no-such-flag");
  expect_error(std::string(kTiny) + "--model resnet9000", 2, "resnet9000");
  expect_error(std::string(kTiny) + "--devices tpu:0", 2, "tpu:0");
  expect_error(std::string(kTiny) + "--devices cpu:x", 2, "cpu:x");
  expect_error(std::string(kTiny) + "--batch-size 0", 2, "batch");
  expect_error(std::string(kTiny) + "--batch-size -5", 2, "batch");
  expect_error(std::string(kTiny) + "--batch-size many", 2, "many");
  expect_error(std::string(kTiny) + "--lr -1", 2, "--lr");
  expect_error(std::string(kTiny) + "--epochs 0", 2, "--epochs");
  expect_error(std::string(kTiny) + "--data imagenet21k", 2, "imagenet21k");
  expect_error(std::string(kTiny) + "--lr-schedule linear", 2, "linear");
  expect_error(std::string(kTiny) + "--stem huge", 2, "huge");
  expect_error(std::string(kTiny) + "--num-classes 0", 2, "classes");
  expect_error(std::string(kTiny) + "--devices cpu:0,cpu:1 --bn global", 2, "global");
  expect_error(std::string(kTiny) + "--devices cpu:0,cpu:0", 2, "twice");
  CliRun r = dptrain("train --batch-size 0");
  EXPECT_NE(r.err.find("usage: dptrain"), std::string::npos) << "bad usage shows the usage line";
}

TEST(Cli, RuntimeFailuresExitOne) {
  expect_error("train --data fashion-mnist --data-dir /nonexistent/fmnist --max-steps 1", 1,
               "/nonexistent/fmnist");
  expect_error(std::string(kTiny) + "--metrics /nonexistent/dir/m.jsonl", 1, "/nonexistent/dir");
  // An empty data directory: the first missing file is named.
  std::string empty = ::testing::TempDir() + "/dpt_empty_data";
  std::system(("mkdir -p " + empty).c_str());
  expect_error("train --data-dir " + empty + " --max-steps 1", 1, "train-images-idx3-ubyte");
}

TEST(Cli, CudaWithoutGpuIsAClearError) {
  CliRun r = dptrain(std::string(kTiny) + "--devices cuda:0");
  if (r.code == 0) GTEST_SKIP() << "a usable CUDA device is present: nothing to check here";
  expect_error(std::string(kTiny) + "--devices cuda:0", 1, "cuda:0");
}

TEST(Cli, JsonSummaryAndMetricsFiles) {
  const std::string metrics = ::testing::TempDir() + "/dpt_cli_metrics.csv";
  CliRun r = dptrain(std::string(kTiny) + "--json --metrics " + metrics);
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("steps"), 2);
  EXPECT_TRUE(j.at("train_loss").is_number());
  EXPECT_GE(j.at("images_per_second").get<double>(), 0.0);
  EXPECT_FALSE(j.contains("test_accuracy"));  // synthetic data has no test set
  std::ifstream csv(metrics);
  std::string header;
  std::getline(csv, header);
  EXPECT_EQ(header.rfind("kind,step,epoch,loss", 0), 0u);
  std::ifstream svg(::testing::TempDir() + "/dpt_cli_metrics.svg");
  std::stringstream s;
  s << svg.rdbuf();
  EXPECT_NE(s.str().find("<svg"), std::string::npos);
  EXPECT_NE(s.str().find("<polyline"), std::string::npos);
  CliRun m = dptrain("model --model resnet152");
  ASSERT_EQ(m.code, 0) << m.err;
  auto mj = nlohmann::json::parse(m.out);
  EXPECT_EQ(mj.at("parameters"), 60192808);
  EXPECT_EQ(mj.at("state_dict_entries"), 932);
}

TEST(Cli, DataParallelOnTwoCpuDevices) {
  for (const char* bn : {"sync", "local"}) {
    CliRun r = dptrain(std::string(kTiny) + "--devices cpu*2 --bn " + bn + " --json");
    ASSERT_EQ(r.code, 0) << r.err;
    EXPECT_NE(r.err.find("cpu:0,cpu:1 (DataParallel"), std::string::npos) << r.err;
    EXPECT_EQ(nlohmann::json::parse(r.out).at("steps"), 2);
  }
}

// mpirun -np 2: one replica per process; only rank 0 logs and prints.
std::string mpirun2() {
  setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
  setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
  return std::string(DPT_MPIEXEC) + " -np 2 --oversubscribe --bind-to none ";
}

TEST(Cli, MpiTwoProcesses) {
  if (std::string(DPT_MPIEXEC).empty()) GTEST_SKIP() << "built without MPI (libopenmpi-dev)";
  CliRun r = dptrain(std::string(kTiny) + "--bn sync --bucket-mb 1 --json", mpirun2());
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);  // one object: rank 1 prints nothing
  EXPECT_EQ(j.at("steps"), 2);
  EXPECT_GT(j.at("gradient_buckets").get<int>(), 10);
  const std::string banner = "cpu:0 in each of 2 processes (DataParallel, sync BN)";
  const size_t at = r.err.find(banner);
  EXPECT_NE(at, std::string::npos) << r.err;
  EXPECT_EQ(r.err.find(banner, at + 1), std::string::npos) << "logged twice\n" << r.err;
}

TEST(Cli, MpiFailingRankStopsTheJob) {
  if (std::string(DPT_MPIEXEC).empty()) GTEST_SKIP() << "built without MPI (libopenmpi-dev)";
  // Only rank 0 writes metrics, so only rank 0 fails; rank 1 would wait for it forever.
  CliRun r = dptrain(std::string(kTiny) + "--metrics /nonexistent/dir/m.jsonl", mpirun2());
  EXPECT_NE(r.code, 0) << r.err;
  EXPECT_NE(r.code, 128 + 9) << "killed by the timeout: the job hung\n" << r.err;
  EXPECT_NE(r.err.find("dptrain: error: rank 0: cannot write metrics file"), std::string::npos)
      << r.err;
  r = dptrain(std::string(kTiny) + "--devices cpu:0,cpu:1", mpirun2());
  EXPECT_NE(r.code, 0) << r.err;
  EXPECT_NE(r.err.find("each process drives one device"), std::string::npos) << r.err;
}

TEST(Cli, Resnet18LearnsFashionMnist) {
  // 150 steps of batch 64 on the first 9,600 training images; chance is 10%.
  const std::string dir = "/usr/share/datasets/fashion-mnist";
  if (!std::ifstream(dir + "/train-images-idx3-ubyte.gz"))
    GTEST_SKIP() << "Debian's dataset-fashion-mnist is not installed (" << dir << ")";
  CliRun r = dptrain(
      "train --model resnet18 --stem imagenet --data fashion-mnist --train-limit 9600 "
      "--test-limit 2000 --batch-size 64 --max-steps 150 --lr 0.05 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j.at("steps"), 150);
  EXPECT_GE(j.at("test_accuracy").get<double>(), 0.72) << r.err;
  EXPECT_LT(j.at("train_loss").get<double>(), 1.0) << r.err;
}

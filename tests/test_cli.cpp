// The dptrain executable end to end: bad input gives one clear line and exit code 2 (usage) or 1
// (runtime), never a crash; --json output; a short real training run that must learn.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>

#include "core/device.h"

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
  expect_error(std::string(kTiny) + "--data imagefolder", 2, "needs --data-dir");
  expect_error(std::string(kTiny) + "--data cifar10", 2, "needs --data-dir");
  expect_error(std::string(kTiny) + "--workers 0", 2, "--workers");
  expect_error(std::string(kTiny) + "--workers many", 2, "many");
  expect_error(std::string(kTiny) + "--val-dir /tmp", 2, "--val-dir is for --data imagefolder");
  expect_error(std::string(kTiny) + "--data imagefolder --data-dir /tmp --train-limit 5", 2,
               "--train-limit");
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
  expect_error(std::string(kTiny) + "--data cifar100 --data-dir " + empty, 1, "train.bin");
  expect_error(std::string(kTiny) + "--data imagefolder --data-dir " + empty, 1,
               "no class folders");
  expect_error(std::string(kTiny) + "--data imagefolder --data-dir /nonexistent/images", 1,
               "/nonexistent/images");
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
  const std::string ck = ::testing::TempDir() + "/mpi_ckpt.h5";
  std::remove(ck.c_str());
  CliRun r = dptrain(std::string(kTiny) + "--bn sync --bucket-mb 1 --json --save " + ck, mpirun2());
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);  // one object: rank 1 prints nothing
  EXPECT_EQ(j.at("steps"), 2);
  EXPECT_GT(j.at("gradient_buckets").get<int>(), 10);
  // Rank 0 wrote the checkpoint, in DataParallel's layout, recording both processes.
  CliRun in = dptrain("ckpt inspect --json " + ck);
  ASSERT_EQ(in.code, 0) << in.err;
  auto ji = nlohmann::json::parse(in.out);
  EXPECT_EQ(ji.at("layout"), "module");
  EXPECT_EQ(ji.at("world_size"), 2);
  // The file evaluates on two in-process devices.
  CliRun e =
      dptrain("eval --checkpoint " + ck +
              " --data synthetic --synthetic-size 64 --image-size 16 --devices cpu*2 --json");
  EXPECT_EQ(e.code, 0) << e.err;
  const std::string banner = "cpu:0 in each of 2 processes (DataParallel, sync BN)";
  const size_t at = r.err.find(banner);
  EXPECT_NE(at, std::string::npos) << r.err;
  EXPECT_EQ(r.err.find(banner, at + 1), std::string::npos) << "logged twice\n" << r.err;
}

// mpirun on GPUs: one rank per GPU (--devices auto picks the GPU by the rank on the node), NCCL
// bootstrapped over MPI, trains like two GPUs in one process (both with SyncBatchNorm).
TEST(Cli, MpiTwoProcessesOnGpus) {
  if (std::string(DPT_MPIEXEC).empty()) GTEST_SKIP() << "built without MPI (libopenmpi-dev)";
  std::string why;
  const int n = dpt::cuda_device_count(&why);
  if (n < 2) GTEST_SKIP() << "mpirun on GPUs needs 2 or more GPUs, found " << n << ": " << why;
  const std::string args = std::string(kTiny) + "--bn sync --lr-schedule constant --json ";
  CliRun mpi = dptrain(args + "--devices auto", mpirun2());
  ASSERT_EQ(mpi.code, 0) << mpi.err;
  EXPECT_NE(mpi.err.find("cuda:0 in each of 2 processes"), std::string::npos) << mpi.err;
  CliRun local = dptrain(args + "--devices cuda:0,cuda:1");
  ASSERT_EQ(local.code, 0) << local.err;
  const double a = nlohmann::json::parse(mpi.out).at("train_loss");
  const double b = nlohmann::json::parse(local.out).at("train_loss");
  EXPECT_LT(std::abs(a - b), 1e-3 * std::max(1.0, std::abs(b))) << a << " vs " << b;
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

// ---- checkpoints ----

namespace {

// Three epochs of 4 steps, saving every 3 steps (and at epoch ends), history kept.
std::string ckpt_run(const std::string& dir, const std::string& devices) {
  return "train --data synthetic --synthetic-size 64 --image-size 16 --model resnet18 --stem small "
         "--batch-size 16 --threads 2 --lr 0.02 --augment --epochs 3 --devices " +
         devices + " --save " + dir + "/a.h5 ";
}

double max_diff(const std::string& a, const std::string& b) {
  CliRun r = dptrain("ckpt diff --json " + a + " " + b);
  EXPECT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_TRUE(j.at("only_in_a").empty() && j.at("only_in_b").empty());
  return j.at("max_abs_diff").get<double>();
}

std::string fresh_dir(const std::string& name) {
  const std::string dir = ::testing::TempDir() + "/" + name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace

// Save at step 6, resume, train to 12: bit-identical to the uninterrupted run, on one device and
// on two (same layout); from two devices onto one, equal up to rounding.
TEST(Cli, ResumeIsExact) {
  for (const std::string devices : {"cpu", "cpu*2"}) {
    SCOPED_TRACE(devices);
    const std::string dir = fresh_dir("resume");
    CliRun full = dptrain(ckpt_run(dir, devices) + "--save-every 3 --keep 5 --json");
    ASSERT_EQ(full.code, 0) << full.err;
    EXPECT_EQ(nlohmann::json::parse(full.out).at("steps"), 12);
    ASSERT_TRUE(std::filesystem::exists(dir + "/a-step6.h5"));
    std::filesystem::copy_file(dir + "/a-step6.h5", dir + "/r.h5");
    std::string cmd = ckpt_run(dir, devices) + "--resume " + dir + "/r.h5 --json";
    cmd.replace(cmd.find(dir + "/a.h5"), dir.size() + 5, dir + "/r.h5");
    CliRun resumed = dptrain(cmd);
    ASSERT_EQ(resumed.code, 0) << resumed.err;
    EXPECT_EQ(nlohmann::json::parse(resumed.out).at("resumed_step"), 6);
    EXPECT_EQ(max_diff(dir + "/a.h5", dir + "/r.h5"), 0.0);
    if (devices == "cpu*2") {
      std::filesystem::copy_file(dir + "/a-step6.h5", dir + "/one.h5");
      std::string one = ckpt_run(dir, "cpu") + "--resume " + dir + "/one.h5";
      one.replace(one.find(dir + "/a.h5"), dir.size() + 5, dir + "/one.h5");
      ASSERT_EQ(dptrain(one).code, 0);
      const double d = max_diff(dir + "/a.h5", dir + "/one.h5");
      EXPECT_GT(d, 0.0);  // different summation order
      EXPECT_LT(d, 1e-3);
    }
  }
}

// Mixed precision. fp16 with dynamic loss scaling: a scale so large that every gradient
// overflows skips every step (the weights stay those of an lr 0 run) and halves the scale each
// time; a normal scale trains, and a resume restores the scale and ends bit-identical. bf16
// trains close to fp32. A resume in another precision is refused.
TEST(Cli, MixedPrecisionLossScalingAndResume) {
  const std::string dir = fresh_dir("amp");
  const std::string base = ckpt_run(dir, "cpu") + "--max-steps 4 --json ";
  CliRun over = dptrain(base + "--precision fp16 --loss-scale 3e38");
  ASSERT_EQ(over.code, 0) << over.err;
  auto j = nlohmann::json::parse(over.out);
  EXPECT_EQ(j.at("skipped_steps"), 4);
  EXPECT_FLOAT_EQ(j.at("loss_scale").get<float>(), 3e38f / 16);
  std::filesystem::rename(dir + "/a.h5", dir + "/skipped.h5");
  // The same fp16 forwards (batch-norm statistics included), weights barely moving.
  std::string still = base + "--precision fp16";
  still.replace(still.find("--lr 0.02"), 9, "--lr 1e-30");
  ASSERT_EQ(dptrain(still).code, 0);
  EXPECT_LT(max_diff(dir + "/a.h5", dir + "/skipped.h5"), 1e-20);

  CliRun fp16 = dptrain(base + "--precision fp16");
  ASSERT_EQ(fp16.code, 0) << fp16.err;
  j = nlohmann::json::parse(fp16.out);
  const int skipped = j.at("skipped_steps");  // PyTorch's 2^16 overflows at first here too
  EXPECT_LE(skipped, 2);
  EXPECT_EQ(j.at("loss_scale"), 65536.0 / (1 << skipped));
  const double l16 = j.at("train_loss");
  std::filesystem::rename(dir + "/a.h5", dir + "/fp16.h5");
  CliRun fp32 = dptrain(base);
  ASSERT_EQ(fp32.code, 0) << fp32.err;
  EXPECT_GT(max_diff(dir + "/a.h5", dir + "/fp16.h5"), 0.0);  // rounded to half precision
  const double l32 = nlohmann::json::parse(fp32.out).at("train_loss");
  EXPECT_NEAR(l16, l32, 0.05);
  CliRun bf16 = dptrain(base + "--precision bf16");
  ASSERT_EQ(bf16.code, 0) << bf16.err;
  EXPECT_NEAR(nlohmann::json::parse(bf16.out).at("train_loss").get<double>(), l32, 0.05);
  // Channels-last activations (auto: only on GPUs) change no value: the same weights, bit for bit.
  std::filesystem::rename(dir + "/a.h5", dir + "/bf16.h5");
  CliRun bf16_last = dptrain(base + "--precision bf16 --channels-last on");
  ASSERT_EQ(bf16_last.code, 0) << bf16_last.err;
  EXPECT_EQ(max_diff(dir + "/a.h5", dir + "/bf16.h5"), 0.0);
  expect_error(base + "--channels-last maybe", 2, "--channels-last");
  CliRun tf32 = dptrain(base + "--precision tf32");
  ASSERT_EQ(tf32.code, 0) << tf32.err;
  const double l_tf32 = nlohmann::json::parse(tf32.out).at("train_loss");
  EXPECT_NEAR(l_tf32, l32, 0.01);
  EXPECT_NE(l_tf32, l32);  // the convolutions' operands were rounded

  // Scale 2^20: a few early steps overflow, so the scaler state in the checkpoint matters.
  const std::string scaled =
      base + "--precision fp16 --loss-scale 1048576 --save-every 2 --keep 3 ";
  CliRun whole = dptrain(scaled);
  ASSERT_EQ(whole.code, 0) << whole.err;
  std::filesystem::copy_file(dir + "/a-step2.h5", dir + "/r.h5");
  std::string cmd = scaled + "--resume " + dir + "/r.h5";
  cmd.replace(cmd.find(dir + "/a.h5"), dir.size() + 5, dir + "/r.h5");
  CliRun resumed = dptrain(cmd);
  ASSERT_EQ(resumed.code, 0) << resumed.err;
  EXPECT_EQ(nlohmann::json::parse(resumed.out).at("loss_scale"),
            nlohmann::json::parse(whole.out).at("loss_scale"));
  EXPECT_EQ(max_diff(dir + "/a.h5", dir + "/r.h5"), 0.0);
  std::string other = base + "--resume " + dir + "/a-step2.h5";
  other.replace(other.find(dir + "/a.h5"), dir.size() + 5, dir + "/o.h5");
  CliRun refused = dptrain(other);
  EXPECT_NE(refused.code, 0);
  EXPECT_NE(refused.err.find("resume with the same precision"), std::string::npos) << refused.err;
  // DataParallel: every replica rounds (test_parallel checks they all have the precision).
  CliRun dp = dptrain(ckpt_run(dir, "cpu*2") + "--max-steps 2 --json --precision fp16");
  ASSERT_EQ(dp.code, 0) << dp.err;
  EXPECT_TRUE(nlohmann::json::parse(dp.out).contains("skipped_steps"));
  expect_error(base + "--precision fp8", 2, "--precision");
}

// SIGKILL while a checkpoint is being written: the previous one stays intact, and
// --resume auto picks it up and finishes the run.
TEST(Cli, KilledDuringSaveLosesNothing) {
  const std::string dir = fresh_dir("killed");
  const std::string cmd = "exec " + std::string(DPT_BINARY_DIR) + "/dptrain " +
                          ckpt_run(dir, "cpu") + "--save-every 1 2>/dev/null";
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  const std::string tmp_name = ".a.h5.tmp-" + std::to_string(pid);
  bool caught = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!caught && std::chrono::steady_clock::now() < deadline) {
    // Once one checkpoint exists, kill the process as soon as the next one is being written.
    if (std::filesystem::exists(dir + "/a.h5") && std::filesystem::exists(dir + "/" + tmp_name)) {
      kill(pid, SIGKILL);
      caught = true;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  if (!caught) kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(caught) << "never saw a save in progress";
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  EXPECT_TRUE(std::filesystem::exists(dir + "/" + tmp_name)) << "killed after the save finished";
  CliRun v = dptrain("ckpt verify " + dir + "/a.h5");
  EXPECT_EQ(v.code, 0) << v.err;
  CliRun r = dptrain(ckpt_run(dir, "cpu") + "--resume auto --json");
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_GE(j.at("resumed_step").get<int>(), 1);
  EXPECT_EQ(j.at("steps"), 12);
  EXPECT_FALSE(std::filesystem::exists(dir + "/" + tmp_name)) << "stale temporary file kept";
}

TEST(Cli, EvalAndCkptCommands) {
  const std::string dir = fresh_dir("evalckpt");
  ASSERT_EQ(dptrain(ckpt_run(dir, "cpu*2") + "--max-steps 2").code, 0);
  const std::string a = dir + "/a.h5";
  // Saved on two devices, evaluated on three and on one: the same numbers.
  CliRun e3 =
      dptrain("eval --checkpoint " + a +
              " --data synthetic --synthetic-size 64 --image-size 16 --devices cpu*3 --json");
  ASSERT_EQ(e3.code, 0) << e3.err;
  auto j3 = nlohmann::json::parse(e3.out);
  CliRun e1 =
      dptrain("eval --checkpoint " + a +
              " --data synthetic --synthetic-size 64 --image-size 16 --map-location cpu --json");
  ASSERT_EQ(e1.code, 0) << e1.err;
  auto j1 = nlohmann::json::parse(e1.out);
  EXPECT_EQ(j3.at("samples"), 64);
  EXPECT_EQ(j3.at("layout"), "module");
  EXPECT_NEAR(j1.at("loss").get<double>(), j3.at("loss").get<double>(), 1e-5);
  EXPECT_EQ(j1.at("accuracy"), j3.at("accuracy"));
  // inspect --json
  CliRun in = dptrain("ckpt inspect --json " + a);
  ASSERT_EQ(in.code, 0) << in.err;
  auto ji = nlohmann::json::parse(in.out);
  EXPECT_EQ(ji.at("kind"), "full");
  EXPECT_EQ(ji.at("keys").size(), 122u);
  EXPECT_EQ(ji.at("keys")[0].at("key"), "module.conv1.weight");
  // convert to plain weights; evaluating them needs the model named.
  const std::string w = dir + "/w.h5";
  ASSERT_EQ(dptrain("ckpt convert " + a + " " + w + " --layout plain --kind weights").code, 0);
  auto jw = nlohmann::json::parse(dptrain("ckpt inspect --json " + w).out);
  EXPECT_EQ(jw.at("kind"), "weights");
  EXPECT_EQ(jw.at("keys")[0].at("key"), "conv1.weight");
  expect_error("eval --checkpoint " + w + " --data synthetic", 2, "weights only");
  CliRun ew = dptrain("eval --checkpoint " + w +
                      " --data synthetic --synthetic-size 64 --image-size 16 --model resnet18 "
                      "--stem small --json");
  ASSERT_EQ(ew.code, 0) << ew.err;
  EXPECT_EQ(nlohmann::json::parse(ew.out).at("accuracy"), j1.at("accuracy"));
  EXPECT_EQ(max_diff(a, w), 0.0);
  // Resuming from a weights file, or with another model, is refused.
  expect_error(ckpt_run(dir, "cpu") + "--resume " + w, 2, "no trainer state");
  expect_error(ckpt_run(dir, "cpu") + "--model resnet34 --resume " + a, 2, "same model options");
  // A corrupt file: one line, exit 1, for every command.
  {
    std::fstream f(a, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(4096);
    f.put('\x7f');
  }
  expect_error("ckpt verify " + a, 1, "is corrupt");
  expect_error("ckpt inspect " + a, 1, "is corrupt");
  expect_error("eval --checkpoint " + a + " --data synthetic --synthetic-size 64", 1, "is corrupt");
  expect_error("eval --checkpoint " + dir + "/none.h5 --data synthetic", 1, "cannot open");
  expect_error(ckpt_run(dir, "cpu") + "--resume auto --keep 0", 2, "--keep");
  expect_error(ckpt_run(dir, "cpu") + "--save-kind half", 2, "half");
}

// .h5 <-> .pth <-> .safetensors by extension, evaluation of each, and fine-tuning with --init-from
// from a file whose classifier and input channels differ.
TEST(Cli, InteropConvertEvalAndInitFrom) {
  const std::string dir = fresh_dir("interop");
  ASSERT_EQ(dptrain(ckpt_run(dir, "cpu*2") + "--max-steps 2").code, 0);
  const std::string a = dir + "/a.h5", pth = dir + "/a.pth", st = dir + "/a.safetensors";
  CliRun c1 = dptrain("ckpt convert " + a + " " + pth + " --layout plain");
  ASSERT_EQ(c1.code, 0) << c1.err;
  EXPECT_NE(c1.err.find("h5 to pth"), std::string::npos) << c1.err;
  EXPECT_NE(c1.err.find("left out"), std::string::npos) << c1.err;
  ASSERT_EQ(dptrain("ckpt convert " + a + " " + st).code, 0);
  EXPECT_EQ(max_diff(a, pth), 0.0);
  EXPECT_EQ(max_diff(pth, st), 0.0);
  ASSERT_EQ(dptrain("ckpt convert " + pth + " " + dir + "/p.safetensors").code, 0);
  EXPECT_EQ(nlohmann::json::parse(dptrain("ckpt inspect --json " + dir + "/p.safetensors").out)
                .at("kind"),
            "weights");
  auto jp = nlohmann::json::parse(dptrain("ckpt inspect --json " + pth).out);
  EXPECT_EQ(jp.at("format"), "pth");
  EXPECT_EQ(jp.at("layout"), "plain");
  EXPECT_EQ(nlohmann::json::parse(dptrain("ckpt inspect --json " + st).out).at("format"),
            "safetensors");
  // --to overrides the extension; --format overrides the content sniffing (and fails honestly).
  ASSERT_EQ(dptrain("ckpt convert " + a + " " + dir + "/x.bin --to safetensors").code, 0);
  EXPECT_EQ(
      nlohmann::json::parse(dptrain("ckpt inspect --json " + dir + "/x.bin").out).at("format"),
      "safetensors");
  expect_error("ckpt inspect --format pth " + dir + "/x.bin", 1, "not a ZIP archive");
  expect_error("ckpt convert " + a + " " + dir + "/y --to onnx", 2, "onnx");
  EXPECT_EQ(dptrain("ckpt verify " + pth).code, 0);
  // The same accuracy from all three; the safetensors file carries its architecture.
  const std::string data = " --data synthetic --synthetic-size 64 --image-size 16 --json";
  auto acc = [&](const std::string& args) {
    CliRun r = dptrain("eval --checkpoint " + args + data);
    EXPECT_EQ(r.code, 0) << r.err;
    return r.code == 0 ? nlohmann::json::parse(r.out).at("accuracy").get<double>() : -1.0;
  };
  const double want = acc(a);
  EXPECT_EQ(acc(pth + " --model resnet18 --stem small"), want);
  EXPECT_EQ(acc(st), want);
  expect_error("eval --checkpoint " + pth + data, 2, "weights only");
  // Fine-tune a 1-channel, 10-class model from a 3-channel, 20-class one.
  ASSERT_EQ(
      dptrain(std::string(kTiny) + "--stem small --num-classes 20 --save " + dir + "/big.h5").code,
      0);
  ASSERT_EQ(dptrain("ckpt convert " + dir + "/big.h5 " + dir + "/big.pth").code, 0);
  CliRun ft = dptrain(
      "train --data synthetic --synthetic-size 64 --image-size 16 --model resnet18 --stem small "
      "--in-channels 1 --batch-size 16 --max-steps 2 --threads 2 --json --init-from " +
      dir + "/big.pth");
  ASSERT_EQ(ft.code, 0) << ft.err;
  const std::string note = nlohmann::json::parse(ft.out).at("init_from");
  EXPECT_NE(note.find("fc re-initialised: the checkpoint has 20 classes, this model 10"),
            std::string::npos)
      << note;
  EXPECT_NE(note.find("3 input channels summed into 1"), std::string::npos) << note;
  expect_error(std::string(kTiny) + "--init-from " + dir + "/big.pth --model resnet34", 2,
               "does not fit");
  expect_error(std::string(kTiny) + "--init-from " + dir + "/none.pth", 1, "cannot open");
}

namespace {

// Starts dptrain with args in the background (stdout and stderr to files in dir); launcher is
// prepended (mpirun).
pid_t spawn(const std::string& args, const std::string& dir, const std::string& launcher = "") {
  const std::string cmd = "exec " + launcher + std::string(DPT_BINARY_DIR) + "/dptrain " + args +
                          " >" + dir + "/out.txt 2>" + dir + "/err.txt";
  const pid_t pid = fork();
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  return pid;
}

// Waits (at most two minutes) until path exists and contains needle.
bool wait_for(const std::string& path, const std::string& needle) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    if (ss.str().find(needle) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

// SIGTERM mid-run: the step finishes, a full checkpoint is written, exit code 75, and --resume
// auto then ends bit-identical to a run that was never interrupted.
TEST(Cli, SigtermSavesAndResumeIsExact) {
  const std::string ref = fresh_dir("preempt-ref"), dir = fresh_dir("preempt");
  ASSERT_EQ(dptrain(ckpt_run(ref, "cpu")).code, 0);
  const pid_t pid = spawn(ckpt_run(dir, "cpu") + "--json --metrics " + dir + "/m.jsonl", dir);
  ASSERT_GT(pid, 0);
  const bool started = wait_for(dir + "/m.jsonl", "\"step\":2}");
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(started) << slurp(dir + "/err.txt");
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 75) << slurp(dir + "/err.txt");
  auto j = nlohmann::json::parse(slurp(dir + "/out.txt"));
  EXPECT_EQ(j.at("interrupted"), "SIGTERM");
  const int stopped = j.at("steps");
  EXPECT_GE(stopped, 2);
  EXPECT_LT(stopped, 12);
  EXPECT_NE(slurp(dir + "/err.txt").find("continue with --resume auto"), std::string::npos);
  auto ji = nlohmann::json::parse(dptrain("ckpt inspect --json " + dir + "/a.h5").out);
  EXPECT_EQ(ji.at("kind"), "full");
  EXPECT_EQ(ji.at("trainer").at("step"), stopped);
  CliRun r = dptrain(ckpt_run(dir, "cpu") + "--resume auto --json");
  ASSERT_EQ(r.code, 0) << r.err;
  auto jr = nlohmann::json::parse(r.out);
  EXPECT_EQ(jr.at("resumed_step"), stopped);
  EXPECT_EQ(jr.at("steps"), 12);
  EXPECT_EQ(max_diff(ref + "/a.h5", dir + "/a.h5"), 0.0);
}

// Two SIGINTs: the second ends the process at once (128 + SIGINT) and the newest complete
// checkpoint is still valid.
TEST(Cli, SecondSigintExitsAtOnce) {
  const std::string dir = fresh_dir("sigint");
  const pid_t pid = spawn(ckpt_run(dir, "cpu") + "--metrics " + dir + "/m.jsonl", dir);
  ASSERT_GT(pid, 0);
  const bool saved = wait_for(dir + "/m.jsonl", "\"step\":5}");  // the epoch-end save is done
  kill(pid, SIGINT);
  // The second once the first has been handled (two pending SIGINTs would merge into one).
  const bool handled = wait_for(dir + "/err.txt", "signal received");
  kill(pid, SIGINT);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(saved && handled) << slurp(dir + "/err.txt");
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 128 + SIGINT) << slurp(dir + "/err.txt");
  EXPECT_NE(slurp(dir + "/err.txt").find("second signal"), std::string::npos);
  EXPECT_EQ(dptrain("ckpt verify " + dir + "/a.h5").code, 0);
}

// Under mpirun, SIGTERM to one rank stops both after the same step (they agree through a 4-byte
// all-reduce after every step), rank 0 saves, and the job resumes from there.
TEST(Cli, MpiSigtermToOneRankStopsBoth) {
  if (std::string(DPT_MPIEXEC).empty()) GTEST_SKIP() << "built without MPI (libopenmpi-dev)";
  const std::string dir = fresh_dir("mpi-preempt");
  const pid_t pid = spawn(ckpt_run(dir, "cpu") + "--json --metrics " + dir + "/m.jsonl", dir,
                          "timeout -s KILL 120 " + mpirun2());
  ASSERT_GT(pid, 0);
  const bool started = wait_for(dir + "/m.jsonl", "\"step\":2}");
  // The ranks are the processes running the dptrain binary with this test's directory.
  FILE* p = popen(
      ("pgrep -f '^" + std::string(DPT_BINARY_DIR) + "/dptrain train.*" + dir + "/'").c_str(), "r");
  std::vector<pid_t> ranks;
  for (int r; p && fscanf(p, "%d", &r) == 1;) ranks.push_back(pid_t(r));
  if (p) pclose(p);
  if (!ranks.empty()) kill(ranks.back(), SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(started) << slurp(dir + "/err.txt");
  ASSERT_EQ(ranks.size(), 2u);
  ASSERT_TRUE(WIFEXITED(status)) << "killed: the ranks did not stop together";
  EXPECT_NE(WEXITSTATUS(status), 0);
  auto j = nlohmann::json::parse(slurp(dir + "/out.txt"));
  EXPECT_EQ(j.at("interrupted"), "SIGTERM");
  const int stopped = j.at("steps");
  auto ji = nlohmann::json::parse(dptrain("ckpt inspect --json " + dir + "/a.h5").out);
  EXPECT_EQ(ji.at("trainer").at("step"), stopped);
  CliRun r = dptrain(ckpt_run(dir, "cpu") + "--resume auto --json", mpirun2());
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out).at("resumed_step"), stopped);
}

// SIGKILL at random moments (during steps and during saves), then --resume auto, again and again
// until the run completes: it always resumes from the newest complete checkpoint and ends with
// exactly the weights of a run that was never interrupted.
TEST(Cli, KillAndResumeCyclesEndBitIdentical) {
  const std::string ref = fresh_dir("kill-ref"), dir = fresh_dir("kill-cycles");
  ASSERT_EQ(dptrain(ckpt_run(ref, "cpu")).code, 0);
  const std::string args = ckpt_run(dir, "cpu") + "--save-every 1 --resume auto --json";
  std::mt19937 rng(12345);
  int kills = 0, during_save = 0, cycles = 0;
  bool finished = false;
  while (!finished && cycles < 60) {
    ++cycles;
    std::filesystem::remove(dir + "/err.txt");
    const pid_t pid = spawn(args, dir);
    ASSERT_GT(pid, 0);
    // Kill once training has started, after a random 0-1.5 s (a step takes about 0.1 s, a save
    // of the 90 MB checkpoint 0.1 to 0.5 s).
    const bool started = wait_for(dir + "/err.txt", "dptrain: resnet18");
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 1500));
    const bool saving = std::filesystem::exists(dir + "/.a.h5.tmp-" + std::to_string(pid));
    const bool killed = started && kill(pid, SIGKILL) == 0;
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFEXITED(status)) {
      ASSERT_EQ(WEXITSTATUS(status), 0) << slurp(dir + "/err.txt");
      finished = true;
    } else {
      ASSERT_TRUE(killed && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
      ++kills;
      during_save += saving;
    }
  }
  ASSERT_TRUE(finished) << "never completed in " << cycles << " cycles";
  EXPECT_GE(kills, 3);
  EXPECT_EQ(nlohmann::json::parse(slurp(dir + "/out.txt")).at("steps"), 12);
  EXPECT_EQ(max_diff(ref + "/a.h5", dir + "/a.h5"), 0.0);
  std::printf("survived %d SIGKILLs (%d during a save) in %d runs\n", kills, during_save, cycles);
}

// Directories where files are expected, and files where directories are: one line, no crash.
TEST(Cli, DirectoriesAndFilesSwapped) {
  const std::string dir = fresh_dir("swapped");
  const std::string file = dir + "/plain.txt";
  std::ofstream(file) << "not a checkpoint\n";
  expect_error("ckpt inspect " + dir, 1, "not a regular file");
  expect_error("ckpt verify " + dir, 1, "not a regular file");
  expect_error("eval --checkpoint " + dir + " --data synthetic", 1, "not a regular file");
  expect_error(std::string(kTiny) + "--init-from " + dir, 1, "not a regular file");
  expect_error(std::string(kTiny) + "--save " + dir, 1, "is a directory");
  expect_error("ckpt convert " + file + " " + dir + "/x.pth", 1, file);
  expect_error(std::string(kTiny) + "--data fashion-mnist --data-dir " + file, 1, file);
  expect_error(std::string(kTiny) + "--resume " + dir, 1, "not a regular file");
}

// A diverging run (learning rate 1e38) stops with one line naming the step, and whatever
// checkpoint it left is finite and valid: non-finite weights are never saved.
TEST(Cli, DivergenceStopsAndKeepsTheLastGoodCheckpoint) {
  const std::string dir = fresh_dir("diverge");
  CliRun r = dptrain(ckpt_run(dir, "cpu") + "--save-every 1 --lr 1e38 --momentum 0");
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_NE(r.err.find("diverged"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("step"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("terminate called"), std::string::npos) << r.err;
  if (std::filesystem::exists(dir + "/a.h5")) {
    EXPECT_EQ(dptrain("ckpt verify " + dir + "/a.h5").code, 0);
    EXPECT_EQ(max_diff(dir + "/a.h5", dir + "/a.h5"), 0.0);  // NaN would not compare equal
  }
}

// A disk that fills up during training, on a real 128 MiB tmpfs in a private mount namespace
// (unshare -m): the save that does not fit fails with one line that names the checkpoint left
// intact, no temporary file stays behind, and resuming from that checkpoint on another disk ends
// bit-identical to a run that never met a full disk. The same directory out of inodes refuses a
// conversion, and read-only refuses training before it starts; the checkpoint is untouched.
TEST(Cli, FullDiskAndReadOnlyDirectory) {
  if (std::system("unshare -m true 2>/dev/null") != 0)
    GTEST_SKIP() << "unshare -m is not permitted here (needs root or CAP_SYS_ADMIN): no tmpfs";
  const std::string ref = fresh_dir("fulldisk-ref"), out = fresh_dir("fulldisk"),
                    mnt = fresh_dir("fulldisk-mnt"), bin = std::string(DPT_BINARY_DIR) + "/dptrain";
  ASSERT_EQ(dptrain(ckpt_run(ref, "cpu")).code, 0);
  // A full checkpoint of this model is about 85 MiB: the one at step 3 fits, the next does not.
  const std::string script =
      "set -u; mount --make-rprivate / && mount -t tmpfs -o size=128m tmpfs " + mnt +
      " || exit 99\n" + bin + " " + ckpt_run(mnt, "cpu") + "--save-every 3 >/dev/null 2>" + out +
      "/train.err; echo $? >" + out + "/train.rc\n" + "cp " + mnt + "/a.h5 " + out +
      "/saved.h5; ls -A " + mnt + " >" + out + "/ls.txt\n" +
      // Out of inodes: room for bytes but not for one more file.
      "mount -o remount,size=512m,nr_inodes=3 " + mnt + " && touch " + mnt + "/filler; " + bin +
      " ckpt convert " + out + "/saved.h5 " + mnt + "/w.pth --kind weights 2>" + out +
      "/inodes.err; echo $? >" + out + "/inodes.rc\n" + "rm -f " + mnt +
      "/filler; mount -o remount,ro " + mnt + " && " + bin + " " + ckpt_run(mnt, "cpu") +
      "--resume auto 2>" + out + "/ro.err; echo $? >" + out + "/ro.rc\n" + "cmp -s " + mnt +
      "/a.h5 " + out + "/saved.h5; echo $? >" + out + "/cmp.rc\n";
  std::ofstream(out + "/run.sh") << script;
  ASSERT_EQ(std::system(("timeout -s KILL 600 unshare -m sh " + out + "/run.sh").c_str()), 0);
  auto error_line = [&](const std::string& name) {  // the one error line, after any progress
    const std::string s = slurp(out + "/" + name);
    const size_t at = s.find("dptrain: error: ");
    EXPECT_TRUE(at != std::string::npos &&
                s.find("dptrain: error: ", at + 1) == std::string::npos &&
                s.find('\n', at) == s.size() - 1)
        << s;
    return at == std::string::npos ? std::string() : s.substr(at);
  };
  EXPECT_EQ(slurp(out + "/train.rc"), "1\n");
  const std::string full = error_line("train.err");
  EXPECT_NE(full.find("MiB free"), std::string::npos) << full;
  EXPECT_NE(full.find("checkpoint of step 3"), std::string::npos) << full;
  EXPECT_EQ(slurp(out + "/ls.txt"), "a.h5\n") << "a temporary file was left behind";
  EXPECT_EQ(slurp(out + "/inodes.rc"), "1\n");
  EXPECT_NE(error_line("inodes.err").find("No space left"), std::string::npos);
  EXPECT_EQ(slurp(out + "/ro.rc"), "1\n");
  EXPECT_NE(error_line("ro.err").find("Read-only file system"), std::string::npos);
  EXPECT_EQ(slurp(out + "/cmp.rc"), "0\n") << "the checkpoint changed";
  ASSERT_EQ(dptrain("ckpt verify " + out + "/saved.h5").code, 0);
  std::string resume = ckpt_run(out, "cpu") + "--resume " + out + "/saved.h5 --json";
  resume.replace(resume.find(out + "/a.h5"), out.size() + 5, out + "/saved.h5");
  CliRun r = dptrain(resume);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(r.out).at("resumed_step"), 3);
  EXPECT_EQ(max_diff(ref + "/a.h5", out + "/saved.h5"), 0.0);
}

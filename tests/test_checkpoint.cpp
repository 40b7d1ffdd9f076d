// io/: HDF5 checkpoints. Round trips of every dtype, the save/load layout matrix (1 device and
// DataParallel on 2 or 3, full and weights), wrapper-prefix normalisation, strictness, corrupt
// files (truncated, bit-flipped) and failed saves that must leave the previous file intact.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include "io/checkpoint.h"
#include "io/file.h"
#include "models/layers.h"
#include "tests/dp_fixture.h"

using namespace dpt;
using namespace dpt::fixture;
namespace fs = std::filesystem;

namespace {

std::string tmp(const std::string& name) {
  return ::testing::TempDir() + "/" + name;
}

// A few-KB model for the corruption suite: conv, batch norm, linear.
class Tiny : public Module {
 public:
  Tiny() {
    Rng rng(5);
    register_module("conv", std::make_unique<Conv2d>(1, 2, 3, 1, 1, rng));
    register_module("bn", std::make_unique<BatchNorm2d>(2));
    register_module("fc", std::make_unique<Linear>(4, 3, rng));
  }
  std::string kind() const override { return "Tiny"; }
  Tensor forward(Tensor x) override { return x; }
  Tensor backward(Tensor dy) override { return dy; }
};

std::vector<char> read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}
void write_all(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(bytes.data(), std::streamsize(bytes.size()));
}

std::unique_ptr<DataParallel> dp_of(int n, std::unique_ptr<Module> m) {
  std::vector<Device> devs;
  for (int i = 0; i < n; ++i) devs.push_back(Device::cpu(i));
  return std::make_unique<DataParallel>(
      std::move(m), [] { return make_model(small_spec(), 0); }, devs,
      DataParallelOptions{.bn = BnMode::Sync, .threads = n});
}

Tensor eval_logits(Module& m) {
  m.eval();
  Tensor y = m.forward(batch(7, 99));
  m.train();
  return y;
}

bool bit_identical(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         (a.nbytes() == 0 || std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0);
}

}  // namespace

TEST(Checkpoint, RoundTripKeepsEveryDtypeAndAttribute) {
  Checkpoint c;
  c.kind = CheckpointKind::Full;
  c.arch = small_spec();
  Tensor f32 = batch(2, 1), i64 = Tensor::zeros({}, DType::I64);
  i64.data<int64_t>()[0] = (int64_t(1) << 40) + 3;
  c.state.entries.emplace_back("a.weight", f32.share());
  c.state.entries.emplace_back("a.f16", f32.to(DType::F16));
  c.state.entries.emplace_back("a.bf16", f32.to(DType::BF16));
  c.state.entries.emplace_back("a.num_batches_tracked", i64.share());
  c.state.entries.emplace_back("a.empty", Tensor({0, 3}));
  c.optimizer = {{"name", "sgd"}, {"lr", 0.5}};
  c.momentum.entries.emplace_back("a.weight", f32.clone());
  c.trainer = {{"step", 12}};
  c.saved_from = {"cuda:1", "cuda:2"};
  c.world_size = 2;
  write_checkpoint(c, tmp("rt.h5"));
  Checkpoint r = read_checkpoint(tmp("rt.h5"));
  EXPECT_EQ(r.kind, CheckpointKind::Full);
  EXPECT_EQ(r.arch->to_json(), small_spec().to_json());
  EXPECT_EQ(r.layout(), "plain");
  ASSERT_EQ(r.state.size(), c.state.size());
  for (size_t i = 0; i < c.state.size(); ++i) {
    EXPECT_EQ(r.state.entries[i].first, c.state.entries[i].first);  // order kept
    EXPECT_TRUE(bit_identical(r.state.entries[i].second, c.state.entries[i].second))
        << c.state.entries[i].first;
  }
  EXPECT_EQ(r.optimizer, c.optimizer);
  EXPECT_EQ(r.trainer, c.trainer);
  EXPECT_TRUE(bit_identical(*r.momentum.find("a.weight"), f32));
  EXPECT_EQ(r.saved_from, c.saved_from);
  EXPECT_EQ(r.world_size, 2);
  EXPECT_FALSE(r.saved_at.empty());
}

// The seed matrix: {1 device, DataParallel on 2} saving x {1, 2, 3 devices} loading x {full,
// weights}. Every load gives eval logits bit-identical to the saved model's weights run in the
// same device layout without a file in between. (Across layouts the batch is chunked
// differently, which changes GEMM blocking and so the last bits: there they agree to 1e-6.)
TEST(Checkpoint, EveryLayoutLoadsIntoEveryLayout) {
  for (int saved_on : {1, 2}) {
    std::unique_ptr<Module> src = conditioned(3);
    if (saved_on > 1) src = dp_of(saved_on, std::move(src));
    auto opts = sgds(saved_on);
    step(*src, opts, batch(6, 5), labels(6));  // non-trivial running statistics
    const Tensor want = eval_logits(*src);
    for (CheckpointKind kind : {CheckpointKind::Full, CheckpointKind::Weights}) {
      const std::string path = tmp("matrix.h5");
      save(*src, path, kind);
      for (int load_on : {1, 2, 3}) {
        SCOPED_TRACE(std::to_string(saved_on) + " -> " + std::to_string(load_on) + " " +
                     kind_name(kind));
        std::unique_ptr<Module> dst;
        if (kind == CheckpointKind::Full) {
          std::vector<Device> devs;
          for (int i = 0; i < load_on; ++i) devs.push_back(Device::cpu(i));
          LoadedModel lm = load_model(
              path, devs,
              [](std::unique_ptr<Module> m, const ArchSpec&, const std::vector<Device>& d) {
                return std::unique_ptr<Module>(dp_of(int(d.size()), std::move(m)));
              });
          EXPECT_TRUE(lm.load.report.ok());
          dst = std::move(lm.model);
        } else {
          dst = make_model(small_spec(), 42);  // the caller defines the model
          if (load_on > 1) dst = dp_of(load_on, std::move(dst));
          NormalizedLoad nl = load_normalized(*dst, load_state_dict(path), true);
          EXPECT_EQ(nl.prefixed, (saved_on > 1) != (load_on > 1) ? 122 : 0) << nl.str();
        }
        std::unique_ptr<Module> ref = make_model(small_spec(), 7);
        if (load_on > 1) ref = dp_of(load_on, std::move(ref));
        load_normalized(*ref, src->state_dict(), true);  // in memory, no file
        const Tensor got = eval_logits(*dst);
        EXPECT_TRUE(bit_identical(got, eval_logits(*ref)));
        if (load_on == saved_on) {
          EXPECT_TRUE(bit_identical(got, want));
        }
        EXPECT_LT(relative_error(got, want), 1e-6);
      }
    }
  }
}

TEST(Checkpoint, WrapperPrefixesAreWholeSegments) {
  auto model = make_model(small_spec(), 0);
  StateDict sd = model->state_dict();
  auto renamed = [&](const std::string& prefix) {
    StateDict out;
    for (auto& [k, t] : sd.entries) out.entries.emplace_back(prefix + k, t.clone());
    return out;
  };
  for (const std::string p :
       {"module.", "module.module.", "_orig_mod.module.", "_fsdp_wrapped_module.", ""}) {
    auto target = make_model(small_spec(), 9);
    NormalizedLoad nl = load_normalized(*target, renamed(p), true);
    EXPECT_EQ(nl.from_prefix, p);
    EXPECT_EQ(nl.prefixed, p.empty() ? 0 : int64_t(sd.size()));
    EXPECT_TRUE(bit_identical(*target->state_dict().find("fc.weight"), *sd.find("fc.weight")));
  }
  // A first segment of 7 characters, like "module.", is a name, not a prefix.
  EXPECT_EQ(wrapper_prefix({"encoder.weight", "decoder.bias"}), "");
  EXPECT_EQ(wrapper_prefix({"module.encoder.weight", "module.decoder.bias"}), "module.");
  EXPECT_EQ(wrapper_prefix({"modules.x", "modulex.y"}), "");
  // Mixed prefixes are refused with both examples named.
  try {
    wrapper_prefix({"module.conv1.weight", "fc.bias"});
    FAIL() << "mixed prefixes accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("mixes key prefixes"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("fc.bias"), std::string::npos);
  }
  // A wrapper inside a key (a compiled submodule) maps when the match is unique.
  StateDict inner;
  for (auto& [k, t] : sd.entries) {
    std::string key = k;
    if (key.rfind("layer1.", 0) == 0) key = "layer1._orig_mod." + key.substr(7);
    inner.entries.emplace_back(key, t.clone());
  }
  auto target = make_model(small_spec(), 9);
  NormalizedLoad nl = load_normalized(*target, inner, true);
  EXPECT_FALSE(nl.renamed.empty());
  EXPECT_EQ(nl.renamed[0].first.rfind("layer1._orig_mod.", 0), 0u);
}

TEST(Checkpoint, StrictnessAndShapesWithoutPartialLoads) {
  auto src = make_model(small_spec(), 0);
  StateDict sd = src->state_dict();
  StateDict missing;
  for (auto& [k, t] : sd.entries)
    if (k != "fc.bias") missing.entries.emplace_back(k, t.share());
  missing.entries.emplace_back("extra.weight", Tensor::zeros({2}));
  auto target = make_model(small_spec(), 9);
  const Tensor before = target->state_dict().find("conv1.weight")->clone();
  EXPECT_THROW(load_normalized(*target, missing, true), ConfigError);
  EXPECT_TRUE(bit_identical(*target->state_dict().find("conv1.weight"), before));  // untouched
  NormalizedLoad nl = load_normalized(*target, missing, false);
  EXPECT_EQ(nl.report.missing, std::vector<std::string>{"fc.bias"});
  EXPECT_EQ(nl.report.unexpected, std::vector<std::string>{"extra.weight"});
  // A shape mismatch is an error even when not strict, and loads nothing.
  ArchSpec other = small_spec();
  other.num_classes = 7;
  auto wrong = make_model(other, 1);
  auto fresh = make_model(small_spec(), 9);
  EXPECT_THROW(load_normalized(*fresh, wrong->state_dict(), false), ConfigError);
  EXPECT_TRUE(bit_identical(*fresh->state_dict().find("conv1.weight"), before));
  // A weights file has no architecture: load_model says what to do instead.
  save(*src, tmp("weights.h5"), CheckpointKind::Weights);
  try {
    load_model(tmp("weights.h5"), {Device::cpu()});
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("weights only"), std::string::npos) << e.what();
  }
}

// Files saved before the digest became XXH3-128 carry a version 1 header (magic ending "V1\n",
// SHA-256 at bytes 24-55): they still load, and are still checked.
TEST(Checkpoint, VersionOneHeadersStillLoadAndAreChecked) {
  Tiny model;
  const std::string v2 = tmp("tiny_v2.h5"), v1 = tmp("tiny_v1.h5");
  save(model, v2, CheckpointKind::Weights);
  std::vector<char> bytes = read_all(v2);
  ASSERT_EQ(std::string(bytes.data(), 16), "DPTRAIN-CKPT-V2\n");
  bytes[14] = '1';
  std::fill(bytes.begin() + 24, bytes.begin() + 56, 0);
  unsigned char sha[32];
  unsigned int len = 0;
  ASSERT_EQ(EVP_Digest(bytes.data(), bytes.size(), sha, &len, EVP_sha256(), nullptr), 1);
  std::memcpy(bytes.data() + 24, sha, 32);
  write_all(v1, bytes);
  const Checkpoint c = read_checkpoint(v1);
  const Checkpoint want = read_checkpoint(v2);
  ASSERT_EQ(c.state.entries.size(), want.state.entries.size());
  for (size_t i = 0; i < c.state.entries.size(); ++i)
    EXPECT_EQ(c.state.entries[i].second.to_vector(), want.state.entries[i].second.to_vector());
  bytes[bytes.size() - 3] ^= 1;
  write_all(v1, bytes);
  try {
    read_checkpoint(v1);
    FAIL() << "a flipped byte was accepted";
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("corrupt"), std::string::npos) << e.what();
  }
}

// Truncated or bit-flipped files fail on the digest with one message naming the file, before
// libhdf5 parses anything.
TEST(Checkpoint, CorruptFilesFailCleanly) {
  Tiny model;
  const std::string good = tmp("tiny.h5"), bad = tmp("tiny_bad.h5");
  save(model, good, CheckpointKind::Weights);
  const std::vector<char> bytes = read_all(good);
  ASSERT_GT(bytes.size(), 2048u);
  auto expect_clean = [&](const std::string& what) {
    try {
      read_checkpoint(bad);
      ADD_FAILURE() << what << ": accepted";
    } catch (const FileError& e) {
      EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << what << ": " << e.what();
    }
  };
  for (size_t cut : {size_t(0), size_t(10), size_t(511), size_t(512), size_t(600), bytes.size() / 2,
                     bytes.size() - 100, bytes.size() - 1}) {
    write_all(bad, std::vector<char>(bytes.begin(), bytes.begin() + std::ptrdiff_t(cut)));
    expect_clean("truncated at " + std::to_string(cut));
  }
  for (size_t at = 0; at < bytes.size(); at += bytes.size() / 37 + 1) {
    std::vector<char> flipped = bytes;
    flipped[at] = char(flipped[at] ^ 0x10);
    write_all(bad, flipped);
    expect_clean("byte " + std::to_string(at) + " flipped");
  }
  std::vector<char> longer = bytes;
  longer.push_back(0);
  write_all(bad, longer);
  expect_clean("extended");
  EXPECT_NO_THROW(read_checkpoint(good));
}

// A save that fails (file size limit standing in for a full disk; a read-only directory) reports
// it and leaves the previous checkpoint intact and loadable.
TEST(Checkpoint, FailedSavesKeepThePreviousCheckpoint) {
  auto model = make_model(small_spec(), 0);
  const std::string path = tmp("keep.h5");
  save(*model, path, CheckpointKind::Full);
  const std::vector<char> before = read_all(path);
  rlimit old{};
  getrlimit(RLIMIT_FSIZE, &old);
  auto handler = signal(SIGXFSZ, SIG_IGN);
  rlimit small = old;
  small.rlim_cur = 4 << 20;  // 4 MiB: the checkpoint needs about 45
  setrlimit(RLIMIT_FSIZE, &small);
  bool threw = false;
  try {
    save(*model, path, CheckpointKind::Full);
  } catch (const FileError& e) {
    threw = true;
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  setrlimit(RLIMIT_FSIZE, &old);
  signal(SIGXFSZ, handler);
  EXPECT_TRUE(threw) << "a save past the file size limit reported success";
  EXPECT_EQ(read_all(path), before);
  EXPECT_NO_THROW(read_checkpoint(path));
  for (auto& e : fs::directory_iterator(fs::path(path).parent_path()))
    EXPECT_EQ(e.path().filename().string().find(".keep.h5.tmp"), std::string::npos)
        << "temporary file left behind: " << e.path();
  // A directory that cannot be written: /proc is read-only even for root.
  try {
    save(*model, "/proc/dptrain-test.h5", CheckpointKind::Full);
    FAIL() << "saved into /proc";
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot save /proc"), std::string::npos) << e.what();
  }
  EXPECT_THROW(save(*model, tmp("no/such/dir/x.h5"), CheckpointKind::Full), FileError);
}

// A disk that fills up in the middle of a write (a real 1 MiB tmpfs, in a child process with its
// own mount namespace; the room check is told the file is empty so the writes themselves fail):
// FileError naming the file and ENOSPC, the temporary removed, the previous file intact.
TEST(Checkpoint, DiskFullMidWriteKeepsThePreviousFile) {
  const std::string dir = tmp("enospc");
  fs::create_directories(dir);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (unshare(CLONE_NEWNS) != 0 || mount("none", "/", nullptr, MS_REC | MS_PRIVATE, nullptr) ||
        mount("tmpfs", dir.c_str(), "tmpfs", 0, "size=1m") != 0)
      _exit(77);
    auto save_bytes = [&](size_t n) {
      atomic_save(dir + "/a.bin", 0, [&](const std::string& t) {
        Fd fd = create_file(t, dir + "/a.bin");
        const std::vector<char> chunk(64 << 10, char(n & 0xff));
        for (size_t off = 0; off < n; off += chunk.size())
          write_at(fd.fd, chunk.data(), std::min(chunk.size(), n - off), int64_t(off), t);
        sync_file(fd.fd, t);
      });
    };
    save_bytes(300 << 10);
    try {
      save_bytes(4 << 20);
      _exit(1);  // four MiB fit on a one MiB disk
    } catch (const FileError& e) {
      if (std::string(e.what()).find("No space left") == std::string::npos) _exit(2);
    }
    std::vector<std::string> names;
    for (auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename());
    if (names != std::vector<std::string>{"a.bin"}) _exit(3);
    const std::vector<char> kept = read_all(dir + "/a.bin");
    _exit(kept == std::vector<char>(300 << 10, char((300 << 10) & 0xff)) ? 0 : 4);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  if (WEXITSTATUS(status) == 77)
    GTEST_SKIP() << "cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)";
  EXPECT_EQ(WEXITSTATUS(status), 0)
      << "1: the oversized save succeeded, 2: wrong message, 3: temporary left, 4: file changed";
}

// write_streamed: a 48 MiB file in four pieces (two writer threads, O_DIRECT here, an unaligned
// tail through the page cache), spans crossing piece boundaries and ending the file, gaps read
// back from the file: the file and the bytes observed are exactly the expected ones. A writer
// that fails (over the file size limit) stops the stream with its error.
TEST(Checkpoint, StreamedWritesAreExactAndReportFailures) {
  const int64_t size = (int64_t(3) << 24) + 5007;
  std::vector<char> want(size_t(size), 0);
  Rng rng(11);
  for (auto& b : want) b = char(rng.next_u32());
  const std::vector<std::pair<int64_t, int64_t>> ranges = {{512, 1000},
                                                           {4096, (int64_t(1) << 24) - 4046},
                                                           {(int64_t(1) << 24) + 100, 1 << 24},
                                                           {(int64_t(2) << 24) + 200, 300},
                                                           {(int64_t(3) << 24), 5007}};
  std::vector<Span> spans;
  for (auto [at, n] : ranges) spans.push_back({uint64_t(at), want.data() + at, size_t(n)});
  const std::string file = tmp("streamed.bin");
  fs::remove(file);
  auto prepare = [&] {
    Fd fd(open(file.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    EXPECT_EQ(ftruncate(fd.fd, size), 0);
    int64_t at = 0;  // the gaps, as libhdf5 would have written them
    for (auto [start, n] : ranges) {
      write_at(fd.fd, want.data() + at, uint64_t(start - at), at, file);
      at = start + n;
    }
    return fd;
  };
  {
    Fd fd = prepare();
    std::vector<char> seen;
    write_streamed(
        fd.fd, file, size, spans,
        [&](const void* p, size_t n) {
          seen.insert(seen.end(), (const char*)p, (const char*)p + n);
        },
        file);
    EXPECT_TRUE(seen == want) << "observed bytes differ";
    EXPECT_TRUE(read_all(file) == want) << "file bytes differ";
  }
  fs::remove(file);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    Fd fd = prepare();
    signal(SIGXFSZ, SIG_IGN);
    const rlimit lim{20 << 20, 20 << 20};
    setrlimit(RLIMIT_FSIZE, &lim);
    try {
      write_streamed(
          fd.fd, file, size, spans, [](const void*, size_t) {}, file);
      _exit(1);
    } catch (const FileError& e) {
      _exit(std::string(e.what()).find("File too large") != std::string::npos ? 0 : 2);
    }
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0) << "1: writes past the limit succeeded, 2: wrong message";
  fs::remove(file);
}

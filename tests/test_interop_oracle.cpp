// .pth and safetensors against PyTorch. tests/interop/torch_oracle.py (Debian's /usr/bin/python3
// with python3-torch 1.13 and torchvision) writes torchvision ResNets in every layout users meet
// (plain, nn.DataParallel's module., torch.compile's _orig_mod., nested in training dicts, tagged
// cuda:3), hostile and malformed files, and checks our exports: torch.load(weights_only=True)
// must accept them and give our logits, and our safetensors must be byte for byte the file the
// reference writer makes. Without torch every test skips with the reason.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "io/formats.h"
#include "models/arch.h"
#include "parallel/data_parallel.h"

using namespace dpt;
namespace fs = std::filesystem;

namespace {

const std::string kOracle = std::string(DPT_SOURCE_DIR) + "/tests/interop/torch_oracle.py";
const std::string kDptrain = std::string(DPT_BINARY_DIR) + "/dptrain";

int python(const std::string& args) {
  return std::system(("/usr/bin/python3 " + kOracle + " " + args + " >/dev/null").c_str());
}

std::string torch_missing() {
  if (std::system("/usr/bin/python3 -c 'import torch, torchvision' >/dev/null 2>&1") != 0)
    return "Debian's python3-torch / python3-torchvision are not installed";
  return "";
}

std::vector<float> read_floats(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> b((std::istreambuf_iterator<char>(in)), {});
  std::vector<float> v(b.size() / 4);
  std::memcpy(v.data(), b.data(), v.size() * 4);
  return v;
}

double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

ArchSpec spec(const std::string& arch, int64_t classes) {
  ArchSpec s;
  s.arch = arch;
  s.num_classes = classes;
  return s;
}

std::vector<float> logits(Module& m, const std::string& input) {
  Tensor x = Tensor::from_vector({2, 3, 64, 64}, read_floats(input));
  m.eval();
  return m.forward(std::move(x)).to_vector();
}

// One oracle directory per model, made once per test program.
struct Made {
  std::string dir, skip;
};

const Made& made(const std::string& arch, int64_t classes, const std::string& only) {
  static std::map<std::string, Made> cache;
  const std::string id = arch + "-" + std::to_string(classes);
  auto it = cache.find(id);
  if (it != cache.end()) return it->second;
  Made m;
  m.skip = torch_missing();
  m.dir = ::testing::TempDir() + "/interop-" + id + "-" + std::to_string(getpid());
  if (m.skip.empty()) {
    const std::string args = "make " + m.dir + " --arch " + arch + " --num-classes " +
                             std::to_string(classes) + (only.empty() ? "" : " --only " + only);
    if (python(args) != 0) m.skip = "torch_oracle.py " + args + " failed";
  }
  return cache.emplace(id, m).first->second;
}

class InteropOracle : public ::testing::TestWithParam<std::string> {
 protected:
  static void TearDownTestSuite() {
    std::error_code ec;
    for (auto& e : fs::directory_iterator(::testing::TempDir(), ec))
      if (e.path().filename().string().rfind("interop-", 0) == 0 &&
          e.path().string().find(std::to_string(getpid())) != std::string::npos)
        fs::remove_all(e.path(), ec);
  }
};

}  // namespace

// Every layout imports and gives torchvision's logits (relative error <= 1e-5), into a plain model
// and into a DataParallel one (which adds module.).
TEST_P(InteropOracle, TorchFilesOfEveryLayoutGiveTorchLogits) {
  const bool big = GetParam() == "resnet152";
  const Made& m = made(GetParam(), 10, big ? "plain,module" : "");
  if (!m.skip.empty()) GTEST_SKIP() << m.skip;
  const std::vector<float> want = read_floats(m.dir + "/logits.bin");
  std::vector<std::string> files = {"plain.pth", "module.pth"};  // ResNet-152: its depth's names
  if (!big)
    for (const char* f :
         {"orig_mod.pth", "train.pth", "model.pth", "cuda3.pth", "plain.safetensors"})
      files.push_back(f);
  for (const std::string& f : files) {
    SCOPED_TRACE(f);
    Checkpoint c = read_checkpoint(m.dir + "/" + f);
    auto model = make_model(spec(GetParam(), 10), 0);
    NormalizedLoad nl = load_normalized(*model, c.state, true);
    EXPECT_TRUE(nl.report.ok());
    EXPECT_LE(rel_err(logits(*model, m.dir + "/input.bin"), want), 1e-5);
  }
  // A torch DataParallel file into our DataParallel on two CPU devices.
  Checkpoint c = read_checkpoint(m.dir + "/module.pth");
  DataParallel dp(make_model(spec(GetParam(), 10), 0),
                  [&] { return make_model(spec(GetParam(), 10), 0); },
                  {Device::cpu(0), Device::cpu(1)}, {});
  NormalizedLoad nl = load_normalized(dp, c.state, true);
  EXPECT_EQ(nl.to_prefix, "module.");
  EXPECT_LE(rel_err(logits(dp, m.dir + "/input.bin"), want), 1e-5);
}

// Our export loads in torch with weights_only=True, in either layout, and torch's logits are ours.
TEST_P(InteropOracle, OurExportLoadsInTorchWeightsOnly) {
  const bool big = GetParam() == "resnet152";
  const Made& m = made(GetParam(), 10, big ? "plain,module" : "");
  if (!m.skip.empty()) GTEST_SKIP() << m.skip;
  auto model = make_model(spec(GetParam(), 10), 7);  // our own weights, not torch's
  Tensor& rm = *model->named_buffers()[0].second;    // non-trivial running statistics
  for (int64_t i = 0; i < rm.numel(); ++i) rm.data<float>()[i] = 0.01f * float(i % 7);
  const std::vector<float> ours = logits(*model, m.dir + "/input.bin");
  for (const std::string layout : {"plain", "module"}) {
    SCOPED_TRACE(layout);
    Checkpoint c = make_checkpoint(*model, CheckpointKind::Weights);
    if (layout == "module") c.state = with_prefix(c.state, "module.");
    const std::string out = m.dir + "/ours-" + layout + ".pth";
    write_checkpoint(c, out);
    ASSERT_EQ(python("load " + out + " " + GetParam() + " 10 " + m.dir + "/input.bin " + m.dir +
                     "/ours.bin --expect-layout " + layout),
              0);
    EXPECT_LE(rel_err(read_floats(m.dir + "/ours.bin"), ours), 1e-5);
  }
  if (!big) {  // ZIP64 records, as PyTorch's reader meets them in files past 4 GiB
    Checkpoint c = make_checkpoint(*model, CheckpointKind::Weights);
    write_pth(c, m.dir + "/ours-zip64.pth", true);
    ASSERT_EQ(python("load " + m.dir + "/ours-zip64.pth " + GetParam() + " 10 " + m.dir +
                     "/input.bin " + m.dir + "/ours.bin"),
              0);
    EXPECT_LE(rel_err(read_floats(m.dir + "/ours.bin"), ours), 1e-5);
  }
}

INSTANTIATE_TEST_SUITE_P(ResNet, InteropOracle, ::testing::Values("resnet18", "resnet152"));

// Views of one storage (slices, a transpose, a strided view, a 0-d element, an empty tensor) and
// every dtype come out with torch's values.
TEST(InteropViews, SharedStridedAndOffsetStorages) {
  const Made& m = made("resnet18", 10, "");
  if (!m.skip.empty()) GTEST_SKIP() << m.skip;
  Checkpoint c = read_checkpoint(m.dir + "/views.pth");
  nlohmann::json expect = nlohmann::json::parse(std::ifstream(m.dir + "/views.json"));
  std::ifstream bin(m.dir + "/views.bin", std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(bin)), {});
  ASSERT_EQ(c.state.size(), expect.size());
  size_t at = 0;
  for (size_t i = 0; i < expect.size(); ++i) {
    auto& [key, t] = c.state.entries[i];
    SCOPED_TRACE(key);
    EXPECT_EQ(key, expect[i][0].get<std::string>());
    EXPECT_EQ(std::string(dtype_name(t.dtype())), expect[i][1].get<std::string>());
    EXPECT_EQ(t.shape(), expect[i][2].get<Shape>());
    ASSERT_LE(at + t.nbytes(), bytes.size());
    if (t.nbytes() > 0) {
      EXPECT_EQ(std::memcmp(t.raw(), bytes.data() + at, t.nbytes()), 0);
    }
    at += t.nbytes();
  }
}

// Hostile pickles (os.system, builtins.eval, subprocess, __reduce__ of a foreign function, INST,
// OBJ, STACK_GLOBAL) and malformed files are refused with one clear line, through the API and the
// CLI, and none of the payloads ran.
TEST(InteropHostile, RefusedAndNothingRuns) {
  if (!torch_missing().empty()) GTEST_SKIP() << torch_missing();
  const std::string dir = ::testing::TempDir() + "/interop-hostile-" + std::to_string(getpid());
  const std::string marker = dir + "-MARKER";
  ASSERT_EQ(python("hostile " + dir + " " + marker), 0);
  int files = 0;
  for (const std::string sub : {"", "/bad_safetensors"}) {
    for (auto& e : fs::directory_iterator(dir + sub)) {
      if (!e.is_regular_file() || e.path().filename() == "good.safetensors") continue;
      const std::string path = e.path().string();
      SCOPED_TRACE(path);
      ++files;
      EXPECT_THROW(read_checkpoint(path), FileError);
      const std::string out = dir + "/out.txt";
      const int rc =
          std::system((kDptrain + " ckpt inspect " + path + " >" + out + " 2>&1").c_str());
      EXPECT_EQ(WEXITSTATUS(rc), 1);
      std::ifstream in(out);
      std::string line, extra;
      std::getline(in, line);
      EXPECT_EQ(line.rfind("dptrain: error: ", 0), 0u) << line;
      EXPECT_FALSE(std::getline(in, extra)) << extra;
      fs::remove(out);
      const std::string name = e.path().filename().string();
      if (name.find("system") != std::string::npos || name.find("eval") != std::string::npos ||
          name.find("subprocess") != std::string::npos ||
          name.find("opcode") != std::string::npos || name.find("global") != std::string::npos ||
          name.find("class") != std::string::npos || name.find("evil") != std::string::npos) {
        try {
          read_checkpoint(path);
        } catch (const FileError& err) {
          EXPECT_NE(std::string(err.what()).find("nothing in it was executed"), std::string::npos)
              << err.what();
        }
      }
    }
  }
  EXPECT_GE(files, 30);
  EXPECT_NO_THROW(read_checkpoint(dir + "/bad_safetensors/good.safetensors"));
  EXPECT_FALSE(fs::exists(marker)) << "a hostile payload ran";
  fs::remove_all(dir);
}

// Our safetensors files are exactly what the reference writer makes of the same tensors.
TEST(InteropSafetensors, ByteForByteReferenceLayout) {
  if (!torch_missing().empty()) GTEST_SKIP() << torch_missing();
  const std::string dir = ::testing::TempDir() + "/interop-st-" + std::to_string(getpid());
  fs::create_directories(dir);
  auto model = make_model(spec("resnet18", 10), 3);
  Checkpoint c = make_checkpoint(*model, CheckpointKind::Full);
  Tensor w = c.state.find("fc.weight")->clone();
  c.state.entries.emplace_back("extra.half", w.to(DType::F16));
  c.state.entries.emplace_back("extra.bf16", w.to(DType::BF16));
  c.state.entries.emplace_back("extra.scalar", Tensor::full({}, 2.5f));
  c.state.entries.emplace_back("extra.empty", Tensor::zeros({0, 3}));
  c.state.entries.emplace_back("extra.\xc3\xa9t\xc3\xa9", Tensor::full({2}, 1.0f));
  write_checkpoint(c, dir + "/ours.safetensors");
  nlohmann::json expect = nlohmann::json::array();
  std::ofstream bin(dir + "/expect.bin", std::ios::binary);
  for (auto& [k, t] : c.state.entries) {
    expect.push_back({k, dtype_name(t.dtype()), t.shape()});
    bin.write(static_cast<const char*>(t.raw()), std::streamsize(t.nbytes()));
  }
  bin.close();
  std::ofstream(dir + "/expect.json") << expect.dump();
  EXPECT_EQ(python("check-safetensors " + dir + "/ours.safetensors " + dir + "/expect.json " + dir +
                   "/expect.bin"),
            0);
  // And it reads back as the full checkpoint it was: architecture included.
  Checkpoint back = read_checkpoint(dir + "/ours.safetensors");
  EXPECT_EQ(back.kind, CheckpointKind::Full);
  ASSERT_TRUE(back.arch.has_value());
  EXPECT_EQ(back.arch->to_json(), c.arch->to_json());
  fs::remove_all(dir);
}

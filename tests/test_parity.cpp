// Parity with PyTorch: torchvision's ResNet-18 and ResNet-152 against dptrain's, weight for weight.
//
// tests/parity/make_oracle.py (run with Debian's /usr/bin/python3 and python3-torch) writes one
// training step of a randomly initialised torchvision model to HDF5: the state dict before the
// step, the batch, eval- and train-mode logits, the loss, every parameter gradient and the state
// dict after one SGD step. We load the same weights, run the same step and compare everything.
// The oracle conditions the model so that two float32 implementations stay rounding-close (random
// BatchNorm parameters and statistics, damped residual branches, no pre-ReLU value or max-pool
// window within 1e-4 / 1e-5 x RMS of a kink): with torchvision's plain initialisation, ResNet-152
// at this batch size is so ill-conditioned that torch's own float32 gradients are up to 0.2 from
// its float64 ones (see make_oracle.py). Without torch the parity tests skip; the parameter-count
// test needs no oracle.
#include <hdf5.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "core/tensor.h"
#include "kernels/loss.h"
#include "models/arch.h"
#include "models/module.h"
#include "models/optimizer.h"
#include "parallel/data_parallel.h"

namespace {

using dpt::DType;
using dpt::Tensor;

// ---- HDF5 C API with every return value checked ----

template <typename T>
T h5_check(T result, const char* expr, const char* file, int line) {
  if (result < 0) {
    std::ostringstream os;
    os << "HDF5 call failed: " << expr << " returned " << static_cast<long long>(result) << " ("
       << file << ":" << line << ")";
    throw std::runtime_error(os.str());
  }
  return result;
}
#define H5_CHECK(expr) h5_check((expr), #expr, __FILE__, __LINE__)

// Owns one HDF5 identifier; only ever constructed from a checked (valid) id.
class H5Handle {
 public:
  H5Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  ~H5Handle() {
    if (close_(id_) < 0) ADD_FAILURE() << "closing HDF5 identifier " << id_ << " failed";
  }
  H5Handle(const H5Handle&) = delete;
  H5Handle& operator=(const H5Handle&) = delete;
  operator hid_t() const { return id_; }

 private:
  hid_t id_;
  herr_t (*close_)(hid_t);
};

bool h5_exists(hid_t file, const std::string& path) {
  return H5_CHECK(H5Lexists(file, path.c_str(), H5P_DEFAULT)) > 0;
}

// A float dataset as an F32 tensor, an integer one as I64; HDF5 converts on read.
Tensor read_tensor(hid_t file, const std::string& path) {
  if (!h5_exists(file, path)) throw std::runtime_error("oracle has no dataset '" + path + "'");
  H5Handle d(H5_CHECK(H5Dopen2(file, path.c_str(), H5P_DEFAULT)), H5Dclose);
  H5Handle space(H5_CHECK(H5Dget_space(d)), H5Sclose);
  const int nd = H5_CHECK(H5Sget_simple_extent_ndims(space));
  std::vector<hsize_t> dims(size_t(nd) + 1);  // +1: never an empty vector's data()
  H5_CHECK(H5Sget_simple_extent_dims(space, dims.data(), nullptr));
  dpt::Shape shape(dims.begin(), dims.begin() + nd);
  H5Handle type(H5_CHECK(H5Dget_type(d)), H5Tclose);
  const H5T_class_t cls = H5_CHECK(H5Tget_class(type));
  if (cls != H5T_FLOAT && cls != H5T_INTEGER)
    throw std::runtime_error("oracle dataset '" + path + "' is neither float nor integer");
  const bool is_int = cls == H5T_INTEGER;
  Tensor t(shape, is_int ? DType::I64 : DType::F32);
  H5_CHECK(H5Dread(d, is_int ? H5T_NATIVE_INT64 : H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT,
                   t.raw()));
  return t;
}

// A 1-D dataset of fixed-length strings (numpy 'S' dtype, as h5py writes it).
std::vector<std::string> read_strings(hid_t file, const std::string& path) {
  if (!h5_exists(file, path)) throw std::runtime_error("oracle has no dataset '" + path + "'");
  H5Handle d(H5_CHECK(H5Dopen2(file, path.c_str(), H5P_DEFAULT)), H5Dclose);
  H5Handle type(H5_CHECK(H5Dget_type(d)), H5Tclose);
  if (H5_CHECK(H5Tget_class(type)) != H5T_STRING || H5_CHECK(H5Tis_variable_str(type)) > 0)
    throw std::runtime_error("oracle dataset '" + path + "' is not fixed-length strings");
  const size_t len = H5Tget_size(type);
  if (len == 0) throw std::runtime_error("H5Tget_size failed on '" + path + "'");
  H5Handle space(H5_CHECK(H5Dget_space(d)), H5Sclose);
  if (H5_CHECK(H5Sget_simple_extent_ndims(space)) != 1)
    throw std::runtime_error("oracle dataset '" + path + "' is not one-dimensional");
  hsize_t n = 0;
  H5_CHECK(H5Sget_simple_extent_dims(space, &n, nullptr));
  std::vector<char> buf(size_t(n) * len + 1);
  H5_CHECK(H5Dread(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data()));
  std::vector<std::string> out;
  for (size_t i = 0; i < size_t(n); ++i) {
    const char* s = buf.data() + i * len;
    out.emplace_back(s, strnlen(s, len));
  }
  return out;
}

// ---- the oracle ----

const char* kPython = "/usr/bin/python3";

// Empty when Debian's interpreter can run the oracle, else why not.
std::string oracle_unavailable() {
  for (const char* mod : {"torch", "torchvision", "h5py"}) {
    std::string cmd = std::string(kPython) + " -c 'import " + mod + "' >/dev/null 2>&1";
    if (std::system(cmd.c_str()) != 0)
      return std::string(kPython) + " cannot import " + mod +
             " (install Debian's python3-torch, python3-torchvision and python3-h5py)";
  }
  return "";
}

// DPT_PARITY_ORACLE_ARGS, appended to the oracle's command line, is for diagnosis: e.g.
// "--init torchvision" (the ill-conditioned default initialisation) or "--dtype float64" (compare
// against exact results). The tolerances are meant for the default oracle.
std::string extra_oracle_args() {
  const char* s = std::getenv("DPT_PARITY_ORACLE_ARGS");
  return s ? s : "";
}

std::string slurp_tail(const std::string& path, size_t max_chars = 4000) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string s = ss.str();
  return s.size() > max_chars ? "..." + s.substr(s.size() - max_chars) : s;
}

// ---- comparisons ----

struct Worst {
  std::string name;
  double err = -1;
  void update(const std::string& n, double e) {
    if (e > err || std::isnan(e)) {
      name = n;
      err = e;
    }
  }
};

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

constexpr double kLogitsTol = 1e-4;
constexpr double kGradTol = 1e-3;
constexpr double kWeightTol = 1e-3;
constexpr double kRunningTol = 1e-4;

// devices > 1: ours runs DataParallel with local BatchNorm over cpu:0..devices-1 and the oracle
// runs nn.DataParallel's computation on one device (each torch.chunk of the batch through the
// model on its own, gradients summed through the concatenated logits, replica 0's BN buffers).
struct ParityCase {
  std::string arch;
  int devices;
  int batch;
  int seed;  // the oracle's; chosen so its margin checks pass (see make_oracle.py)
  std::string name() const {
    return arch + (devices > 1 ? "_dataparallel" + std::to_string(devices) : "");
  }
};

class Parity : public ::testing::TestWithParam<ParityCase> {};

TEST_P(Parity, OneTrainingStepMatchesTorchvision) {
  const std::string arch = GetParam().arch;
  const int devices = GetParam().devices;
  const std::string reason = oracle_unavailable();
  if (!reason.empty()) GTEST_SKIP() << "PyTorch oracle unavailable: " << reason;

  // 1. The oracle.
  const std::string out = std::string(DPT_BINARY_DIR) + "/parity_" + GetParam().name() + ".h5";
  const std::string log = std::string(DPT_BINARY_DIR) + "/parity_" + GetParam().name() + ".log";
  const std::string cmd = std::string(kPython) + " '" + DPT_SOURCE_DIR +
                          "/tests/parity/make_oracle.py' --model " + arch + " --batch " +
                          std::to_string(GetParam().batch) + " --chunks " +
                          std::to_string(devices) + " --size 64 --classes 10 --seed " +
                          std::to_string(GetParam().seed) + " --out '" + out + "' " +
                          extra_oracle_args() + " >'" + log + "' 2>&1";
  const auto t0 = std::chrono::steady_clock::now();
  const int status = std::system(cmd.c_str());
  ASSERT_TRUE(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0)
      << "oracle failed (status " << status << "): " << cmd << "\n"
      << slurp_tail(log);
  const auto t1 = std::chrono::steady_clock::now();

  H5Handle file(H5_CHECK(H5Fopen(out.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT)), H5Fclose);

  // 2. Our model with torch's names, order and shapes, then torch's weights.
  auto model = dpt::make_model(
      dpt::ArchSpec{.arch = arch, .num_classes = 10, .in_channels = 3, .stem = "imagenet"}, 0);
  const std::vector<std::string> keys = read_strings(file, "keys");
  {
    dpt::StateDict ours = model->state_dict();
    std::vector<std::string> our_keys;
    for (auto& [k, v] : ours.entries) our_keys.push_back(k);
    if (our_keys != keys) {
      size_t i = 0;
      while (i < keys.size() && i < our_keys.size() && keys[i] == our_keys[i]) ++i;
      FAIL() << "state_dict keys differ from torch's: ours has " << our_keys.size()
             << " entries, torch " << keys.size() << "; first difference at index " << i
             << ": ours '" << (i < our_keys.size() ? our_keys[i] : "<end>") << "', torch '"
             << (i < keys.size() ? keys[i] : "<end>") << "'";
    }
  }
  dpt::StateDict torch_sd;
  for (const std::string& k : keys)
    torch_sd.entries.emplace_back(k, read_tensor(file, "state_dict/" + k));
  {
    dpt::StateDict ours = model->state_dict();
    for (size_t i = 0; i < keys.size(); ++i) {
      const Tensor& a = ours.entries[i].second;
      const Tensor& b = torch_sd.entries[i].second;
      ASSERT_EQ(a.shape(), b.shape())
          << "shape of '" << keys[i] << "': ours " << dpt::shape_str(a.shape()) << ", torch "
          << dpt::shape_str(b.shape());
      ASSERT_EQ(a.dtype() == DType::I64, b.dtype() == DType::I64) << "dtype of '" << keys[i] << "'";
    }
  }
  const dpt::LoadReport rep = model->load_state_dict(torch_sd, /*strict=*/true);
  ASSERT_TRUE(rep.ok()) << rep.str();
  {
    dpt::StateDict ours = model->state_dict();
    for (size_t i = 0; i < keys.size(); ++i)
      ASSERT_TRUE(same_bits(ours.entries[i].second, torch_sd.entries[i].second))
          << "'" << keys[i] << "' differs from torch's after load_state_dict";
  }
  torch_sd = dpt::StateDict();

  const Tensor x = read_tensor(file, "input");
  const Tensor targets = read_tensor(file, "targets");
  ASSERT_EQ(targets.dtype(), DType::I64);

  // 3. Eval mode: BatchNorm with the running statistics.
  using clock = std::chrono::steady_clock;
  clock::duration compute{};
  auto t2 = clock::now();
  model->eval();
  const Tensor eval_logits = model->forward(x.clone());
  compute += clock::now() - t2;
  const double eval_err = dpt::relative_error(eval_logits, read_tensor(file, "eval_logits"));
  EXPECT_LE(eval_err, kLogitsTol) << "eval-mode logits";

  // 4. Train mode: forward, loss, backward (through DataParallel when devices > 1; `core` is the
  // model whose names are torch's: the wrapped one).
  std::unique_ptr<dpt::DataParallel> dp;
  dpt::Module* net = model.get();
  dpt::Module* core = model.get();
  if (devices > 1) {
    std::vector<dpt::Device> devs;
    for (int i = 0; i < devices; ++i) devs.push_back(dpt::Device::cpu(i));
    const dpt::ArchSpec spec{.arch = arch, .num_classes = 10, .in_channels = 3, .stem = "imagenet"};
    dp = std::make_unique<dpt::DataParallel>(
        std::move(model), [&] { return dpt::make_model(spec, 0); }, devs,
        dpt::DataParallelOptions{.bn = dpt::BnMode::Local, .threads = devices});
    net = dp.get();
    core = &dp->module();
  }
  t2 = clock::now();
  net->train();
  Tensor logits = net->forward(x.clone());
  compute += clock::now() - t2;
  const double logits_err = dpt::relative_error(logits, read_tensor(file, "logits"));
  EXPECT_LE(logits_err, kLogitsTol) << "train-mode logits";
  t2 = clock::now();
  Tensor dlogits(logits.shape());
  const float loss = dpt::softmax_cross_entropy(logits, targets, &dlogits);
  const float torch_loss = read_tensor(file, "loss").at(0);
  const double loss_err =
      std::abs(double(loss) - double(torch_loss)) / std::abs(double(torch_loss));
  EXPECT_LE(loss_err, kLogitsTol) << "loss: ours " << loss << ", torch " << torch_loss;
  net->backward(std::move(dlogits));
  compute += clock::now() - t2;

  Worst grad;
  int grad_bad = 0;
  for (auto& [name, p] : core->named_parameters()) {
    const double e = dpt::relative_error(p->grad, read_tensor(file, "grads/" + name));
    grad.update(name, e);
    grad_bad += !(e <= kGradTol);
  }
  EXPECT_LE(grad.err, kGradTol) << grad_bad << " parameter gradient(s) over " << kGradTol
                                << "; worst: '" << grad.name << "' at " << grad.err;

  // 5. One SGD step; the buffers were updated by the train-mode forward.
  t2 = clock::now();
  const dpt::SgdParams hyper{
      .lr = 0.1f, .momentum = 0.9f, .dampening = 0.0f, .weight_decay = 1e-4f, .nesterov = false};
  if (dp) {
    dp->for_each_replica([&](dpt::Module& m, int) { dpt::Sgd(hyper).step(m); });
  } else {
    dpt::Sgd(hyper).step(*core);
  }
  compute += clock::now() - t2;

  Worst weight, running;
  int weight_bad = 0, running_bad = 0, count_bad = 0;
  std::string count_msg;
  {
    dpt::StateDict ours = core->state_dict();
    ASSERT_EQ(ours.size(), keys.size());
    for (auto& [name, t] : ours.entries) {
      const Tensor ref = read_tensor(file, "after_step/" + name);
      if (t.dtype() == DType::I64) {
        const bool eq = same_bits(t, ref);
        if (!eq && count_bad++ == 0)
          count_msg = name + ": ours " + std::to_string(t.data<int64_t>()[0]) + ", torch " +
                      std::to_string(ref.data<int64_t>()[0]);
        continue;
      }
      const double e = dpt::relative_error(t, ref);
      if (ends_with(name, ".running_mean") || ends_with(name, ".running_var")) {
        running.update(name, e);
        running_bad += !(e <= kRunningTol);
      } else {
        weight.update(name, e);
        weight_bad += !(e <= kWeightTol);
      }
    }
  }
  EXPECT_LE(weight.err, kWeightTol) << weight_bad << " weight(s) after the step over " << kWeightTol
                                    << "; worst: '" << weight.name << "' at " << weight.err;
  EXPECT_LE(running.err, kRunningTol) << running_bad << " running statistic(s) over " << kRunningTol
                                      << "; worst: '" << running.name << "' at " << running.err;
  EXPECT_EQ(count_bad, 0) << "num_batches_tracked differs, first " << count_msg;

  using secs = std::chrono::duration<double>;
  std::cout << "[  parity  ] " << GetParam().name() << ": eval logits " << eval_err
            << ", train logits " << logits_err << ", loss " << loss_err << " (" << loss << " vs "
            << torch_loss << "), worst grad " << grad.err << " (" << grad.name
            << "), worst weight after step " << weight.err << " (" << weight.name
            << "), worst running stat " << running.err << " (" << running.name << ")\n"
            << "[  parity  ] " << GetParam().name() << ": oracle " << secs(t1 - t0).count()
            << " s, dptrain " << secs(compute).count()
            << " s (eval forward, train forward, loss, backward, SGD step)" << std::endl;
}

INSTANTIATE_TEST_SUITE_P(ResNet, Parity,
                         ::testing::Values(ParityCase{"resnet18", 1, 2, 0},
                                           ParityCase{"resnet152", 1, 2, 0},
                                           ParityCase{"resnet18", 2, 5, 1}),
                         [](const ::testing::TestParamInfo<ParityCase>& param) {
                           return param.param.name();
                         });

// torchvision's parameter counts for 1000 classes; needs no oracle.
TEST(ParityCounts, ParameterCountsMatchTorchvision) {
  const std::vector<std::pair<std::string, int64_t>> expected{{"resnet18", 11689512},
                                                              {"resnet34", 21797672},
                                                              {"resnet50", 25557032},
                                                              {"resnet101", 44549160},
                                                              {"resnet152", 60192808}};
  for (const auto& [arch, n] : expected) {
    auto model = dpt::make_model(
        dpt::ArchSpec{.arch = arch, .num_classes = 1000, .in_channels = 3, .stem = "imagenet"}, 0);
    EXPECT_EQ(model->num_parameters(), n) << arch;
    if (arch == "resnet152") {
      EXPECT_EQ(model->state_dict().size(), 932u) << arch;
    }
  }
}

}  // namespace

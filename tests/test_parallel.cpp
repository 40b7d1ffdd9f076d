// parallel/: the in-process communicator, DataParallel's PyTorch naming and chunking, and the
// equivalence of N-replica training (SyncBatchNorm) with one device on the whole batch.
#include <gtest/gtest.h>

#include <cmath>
#include <thread>

#include "core/rng.h"
#include "kernels/loss.h"
#include "models/arch.h"
#include "models/layers.h"
#include "models/optimizer.h"
#include "parallel/data_parallel.h"

using namespace dpt;

namespace {

void on_threads(int n, const std::function<void(int)>& f) {
  std::vector<std::thread> ts;
  for (int r = 0; r < n; ++r) ts.emplace_back(f, r);
  for (auto& t : ts) t.join();
}

ArchSpec small_spec() {
  ArchSpec s;
  s.arch = "resnet18";
  s.num_classes = 5;
  s.in_channels = 1;
  s.stem = "small";  // 16x16 inputs keep 2x2 maps in layer4, so train-mode BN is well conditioned
  return s;
}

// The model with BatchNorm parameters drawn as the PyTorch parity oracle does (weight U(0.5, 1),
// bias +-U(1.5, 2.5), residual branches' last BN scaled by 0.2): pre-ReLU values then rarely sit
// within rounding of zero, where two summation orders (one device vs. per-replica sums) would
// route a gradient differently and hide the comparison behind a ~1% jump.
std::unique_ptr<Module> conditioned(uint64_t seed) {
  auto m = make_model(small_spec(), seed);
  Rng r(seed, 77);
  for (auto& [name, p] : m->named_parameters()) {
    const bool bn =
        name.find("bn") != std::string::npos || name.find("downsample.1") != std::string::npos;
    if (!bn) continue;
    const float scale = name.find("bn2") != std::string::npos ? 0.2f : 1.0f;
    for (int64_t i = 0; i < p->value.numel(); ++i) {
      const float v = name.find(".bias") != std::string::npos
                          ? (r.uniform() < 0.5f ? -1.0f : 1.0f) * r.uniform(1.5f, 2.5f)
                          : r.uniform(0.5f, 1.0f);
      p->value.data<float>()[i] = scale * v;
    }
  }
  return m;
}

std::unique_ptr<DataParallel> wrap(int devices, BnMode bn, uint64_t seed = 3) {
  std::vector<Device> devs;
  for (int i = 0; i < devices; ++i) devs.push_back(Device::cpu(i));
  return std::make_unique<DataParallel>(
      conditioned(seed), [seed] { return make_model(small_spec(), seed); }, devs, bn, devices);
}

Tensor batch(int64_t n, uint64_t seed) {
  Tensor x({n, 1, 16, 16});
  Rng r(seed);
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = r.normal();
  return x;
}

Tensor labels(int64_t n) {
  Tensor t({n}, DType::I64);
  for (int64_t i = 0; i < n; ++i) t.data<int64_t>()[i] = (i * 7) % 5;
  return t;
}

// One SGD step; returns the loss.
float step(Module& m, std::vector<Sgd>& opts, const Tensor& x, const Tensor& y) {
  m.zero_grad();
  Tensor logits = m.forward(x.clone());
  Tensor d(logits.shape());
  float loss = softmax_cross_entropy(logits, y, &d);
  m.backward(std::move(d));
  if (auto* dp = dynamic_cast<DataParallel*>(&m))
    dp->for_each_replica([&](Module& r, int i) { opts[size_t(i)].step(r); });
  else
    opts[0].step(m);
  return loss;
}

std::vector<Sgd> sgds(int n) {
  std::vector<Sgd> v;
  for (int i = 0; i < n; ++i) v.emplace_back(SgdParams{0.01f, 0.9f, 0.0f, 1e-4f, false});
  return v;
}

}  // namespace

TEST(Communicator, InProcessCollectives) {
  auto comm = make_inprocess_communicator(3);
  EXPECT_EQ(comm->size(), 3);
  std::vector<std::vector<float>> reduced(3), bcast(3), gathered(3);
  on_threads(3, [&](int r) {
    Tensor t = Tensor::full({1001}, float(r + 1));
    t.data<float>()[1000] = float(10 * r);
    comm->all_reduce_sum(r, t);
    reduced[size_t(r)] = t.to_vector();
    Tensor b = Tensor::full({5}, float(r));
    comm->broadcast(r, b, 1);
    bcast[size_t(r)] = b.to_vector();
    Tensor in = Tensor::full({2}, float(r)), out({6});
    comm->all_gather(r, in, out);
    gathered[size_t(r)] = out.to_vector();
  });
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(reduced[size_t(r)][0], 6.0f);
    EXPECT_EQ(reduced[size_t(r)][999], 6.0f);
    EXPECT_EQ(reduced[size_t(r)][1000], 30.0f);
    EXPECT_EQ(bcast[size_t(r)], std::vector<float>(5, 1.0f));
    EXPECT_EQ(gathered[size_t(r)], (std::vector<float>{0, 0, 1, 1, 2, 2}));
  }
  EXPECT_THROW(make_inprocess_communicator(0), ConfigError);
}

TEST(DataParallel, ModulePrefixAsPyTorch) {
  auto plain = conditioned(3);
  StateDict ref = plain->state_dict();
  auto dp = wrap(2, BnMode::Local);
  StateDict sd = dp->state_dict();
  ASSERT_EQ(sd.size(), ref.size());
  for (size_t i = 0; i < sd.size(); ++i) {
    EXPECT_EQ(sd.entries[i].first, "module." + ref.entries[i].first);
    EXPECT_EQ(relative_error(sd.entries[i].second, ref.entries[i].second), 0.0);
  }
  EXPECT_EQ(dp->named_parameters().front().first, "module.conv1.weight");
  EXPECT_EQ(dp->num_parameters(), plain->num_parameters());
  // Every replica starts with replica 0's weights.
  EXPECT_EQ(relative_error(*dp->replica(1).state_dict().find("fc.weight"), *ref.find("fc.weight")),
            0.0);
  EXPECT_EQ(dp->replica(1).device(), Device::cpu(1));
  // Wrapped twice: module.module.
  auto outer = std::make_unique<DataParallel>(
      std::move(dp), [] { return std::unique_ptr<Module>(); }, std::vector<Device>{Device::cpu(0)});
  EXPECT_EQ(outer->state_dict().entries[0].first, "module.module.conv1.weight");
  EXPECT_EQ(&outer->module(), outer->named_modules()[1].second);
}

TEST(DataParallel, TorchChunkSemantics) {
  auto dp2 = wrap(2, BnMode::Local), dp3 = wrap(3, BnMode::Local);
  EXPECT_EQ(dp2->chunk_sizes(5), (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(dp3->chunk_sizes(7), (std::vector<int64_t>{3, 3, 1}));
  EXPECT_EQ(dp3->chunk_sizes(1), (std::vector<int64_t>{1}));
  EXPECT_EQ(dp3->chunk_sizes(4),
            (std::vector<int64_t>{2, 2}));  // torch.chunk(4 rows, 3) -> 2 chunks
  // A batch smaller than the device count runs on fewer replicas and still gathers every row.
  dp3->eval();
  Tensor y = dp3->forward(batch(2, 1));
  EXPECT_EQ(y.shape(), Shape({2, 5}));
  auto plain = conditioned(3);
  plain->eval();
  EXPECT_LT(relative_error(y, plain->forward(batch(2, 1))), 1e-6);
}

// Relative error of the whole set, ||got - want|| / ||want|| over every value of every entry
// (float entries only), and the entry contributing most to it. Per-tensor relative errors would
// be misleading: some entries (BN bias gradients, sums of dy) are near zero by cancellation.
std::pair<double, std::string> worst_error(const StateDict& got, const StateDict& want) {
  double num = 0, den = 0, most = -1;
  std::string name;
  for (auto& [k, t] : want.entries) {
    if (t.dtype() != DType::F32) continue;
    std::vector<float> a = got.find(k)->to_vector(), b = t.to_vector();
    double d = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      d += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
      den += double(b[i]) * b[i];
    }
    num += d;
    if (d > most) most = d, name = k;
  }
  return {std::sqrt(num / den), name};
}

StateDict grads(Module& m) {
  StateDict sd;
  for (auto& [name, p] : m.named_parameters()) sd.entries.emplace_back(name, p->grad.share());
  return sd;
}

// With SyncBatchNorm, 2, 3 and 4 replicas (even and uneven chunks) track one device on the whole
// batch: same loss, same gradients, same weights after three SGD steps, up to rounding.
class SyncEquivalence : public ::testing::TestWithParam<std::pair<int, int64_t>> {};

TEST_P(SyncEquivalence, TrainsLikeOneDevice) {
  const auto [devices, rows] = GetParam();
  auto single = conditioned(3);
  auto dp = wrap(devices, BnMode::Sync);
  auto o1 = sgds(1), on = sgds(devices);
  for (int s = 0; s < 3; ++s) {
    Tensor x = batch(rows, 10 + s), y = labels(rows);
    float a = step(*single, o1, x, y), b = step(*dp, on, x, y);
    EXPECT_NEAR(a, b, 1e-6 * std::abs(a)) << "step " << s;
    if (s == 0) {  // measured about 2e-7
      auto [e, name] = worst_error(grads(dp->module()), grads(*single));
      EXPECT_LT(e, 1e-5) << "gradients; most off: " << name;
    }
  }
  // Weights, running statistics after three steps: measured about 3e-8.
  auto [e, name] = worst_error(dp->module().state_dict(), single->state_dict());
  EXPECT_LT(e, 1e-5) << "state; most off: " << name;
  // Replicas stay bit-identical: same reduced gradients, same step.
  StateDict got = dp->module().state_dict();
  for (int r = 1; r < devices; ++r)
    for (auto& [n, t] : got.entries)
      ASSERT_EQ(relative_error(*dp->replica(r).state_dict().find(n), t), 0.0) << r << " " << n;
}

// (devices, rows): 8 over 2 (4+4), 7 over 3 (3+3+1: the last replica alone has one row, so its
// BatchNorms only work with statistics reduced across replicas), 10 over 4 (3+3+3+1).
INSTANTIATE_TEST_SUITE_P(
    DataParallel, SyncEquivalence,
    ::testing::Values(std::make_pair(2, int64_t(8)), std::make_pair(3, int64_t(7)),
                      std::make_pair(4, int64_t(10)), std::make_pair(4, int64_t(12)),
                      std::make_pair(2, int64_t(7)), std::make_pair(3, int64_t(9))));

TEST(DataParallel, ResNet152KeysAreTorchvisionsWithModulePrefix) {
  ArchSpec s;
  s.arch = "resnet152";
  auto plain = make_model(s, 0);
  std::vector<std::string> want;
  for (auto& [k, v] : plain->state_dict().entries) want.push_back("module." + k);
  DataParallel dp(std::move(plain), [&] { return make_model(s, 0); },
                  {Device::cpu(0), Device::cpu(1)});
  std::vector<std::string> got;
  for (auto& [k, v] : dp.state_dict().entries) got.push_back(k);
  EXPECT_EQ(got.size(), 932u);
  EXPECT_EQ(got, want);
  EXPECT_EQ(dp.num_parameters(), 60192808);
}

TEST(DataParallel, LocalBatchNormKeepsReplicaZeroStatistics) {
  auto dp = wrap(2, BnMode::Local);
  auto opts = sgds(2);
  for (int s = 0; s < 2; ++s) step(*dp, opts, batch(8, 20 + s), labels(8));
  StateDict a = dp->replica(0).state_dict(), b = dp->replica(1).state_dict();
  for (auto& [name, t] : a.entries) ASSERT_EQ(relative_error(*b.find(name), t), 0.0) << name;
  EXPECT_EQ(a.find("bn1.num_batches_tracked")->data<int64_t>()[0], 2);
  // Local statistics differ from whole-batch statistics: the loss is not the single-device one.
  auto single = conditioned(3);
  auto o1 = sgds(1);
  auto dp2 = wrap(2, BnMode::Local);
  auto o2 = sgds(2);
  EXPECT_NE(step(*single, o1, batch(8, 30), labels(8)), step(*dp2, o2, batch(8, 30), labels(8)));
}

TEST(DataParallel, RejectsBadDevices) {
  EXPECT_THROW(
      DataParallel(make_model(small_spec(), 0), [] { return make_model(small_spec(), 0); }, {}),
      UsageError);
  EXPECT_THROW(DataParallel(make_model(small_spec(), 0), [] { return make_model(small_spec(), 0); },
                            {Device::cpu(0), Device::cuda(0)}),
               DeviceError);
  EXPECT_THROW(parse_bn_mode("global"), UsageError);
}

namespace {
// A BatchNorm that can be told to fail before its collective, as a replica running out of
// memory would.
class Flaky : public Module {
 public:
  explicit Flaky(bool fails)
      : fail(fails), bn(register_module("bn", std::make_unique<BatchNorm2d>(2))) {}
  std::string kind() const override { return "Flaky"; }
  Tensor forward(Tensor x) override {
    if (fail) throw FileError("replica failed on purpose");
    return bn.forward(std::move(x));
  }
  Tensor backward(Tensor dy) override { return bn.backward(std::move(dy)); }
  bool fail;
  BatchNorm2d& bn;
};
}  // namespace

TEST(DataParallel, FailingReplicaDoesNotHangTheOthers) {
  DataParallel dp(
      std::make_unique<Flaky>(false), [] { return std::make_unique<Flaky>(true); },
      {Device::cpu(0), Device::cpu(1)}, BnMode::Sync, 2);
  // Replica 0 waits in SyncBatchNorm's all-gather for replica 1, which has thrown.
  try {
    dp.forward(Tensor::full({4, 2, 3, 3}, 1.0f));
    FAIL() << "the failure was swallowed";
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("on purpose"), std::string::npos) << e.what();
  }
  // The communicators are usable again once the replica recovers.
  static_cast<Flaky&>(dp.replica(1)).fail = false;
  EXPECT_EQ(dp.forward(Tensor::full({4, 2, 3, 3}, 1.0f)).shape(), Shape({4, 2, 3, 3}));
}

// parallel/: the in-process communicator, DataParallel's PyTorch naming and chunking, and the
// equivalence of N-replica training (SyncBatchNorm) with one device on the whole batch.
#include <gtest/gtest.h>

#include <cmath>
#include <thread>

#include "core/rng.h"
#include "kernels/batchnorm.h"
#include "kernels/loss.h"
#include "models/arch.h"
#include "models/layers.h"
#include "models/optimizer.h"
#include "parallel/data_parallel.h"
#include "tests/dp_fixture.h"

using namespace dpt;
using namespace dpt::fixture;

namespace {

void on_threads(int n, const std::function<void(int)>& f) {
  std::vector<std::thread> ts;
  for (int r = 0; r < n; ++r) ts.emplace_back(f, r);
  for (auto& t : ts) t.join();
}

std::unique_ptr<DataParallel> wrap(int devices, BnMode bn, uint64_t seed = 3,
                                   double bucket_mb = 25) {
  std::vector<Device> devs;
  for (int i = 0; i < devices; ++i) devs.push_back(Device::cpu(i));
  return wrap_on(devs, bn, seed, bucket_mb);
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

// Lists of tensors go through flat buckets: results must not depend on where buckets split.
TEST(Communicator, CoalescedCollectivesOverLists) {
  const int n = 3;
  auto comm = make_inprocess_communicator(n);
  const std::vector<int64_t> sizes{3, 700, 1, 260, 5};  // 40-byte buckets: several, one oversized
  std::vector<std::vector<std::vector<float>>> got(n);
  on_threads(n, [&](int r) {
    auto make = [&](float base) {
      std::vector<Tensor> ts;
      for (size_t i = 0; i < sizes.size(); ++i) {
        ts.emplace_back(Shape{sizes[i]});
        for (int64_t j = 0; j < sizes[i]; ++j)
          ts.back().data<float>()[j] = base + float(r * 1000 + int64_t(i) * 10 + j);
      }
      return ts;
    };
    auto ptrs = [](std::vector<Tensor>& ts) {
      std::vector<Tensor*> p;
      for (auto& t : ts) p.push_back(&t);
      return p;
    };
    std::vector<Tensor> a = make(0), b = make(0), c = make(0), d = make(0);
    all_reduce_sum(*comm, r, ptrs(a), 40);
    reduce_sum(*comm, r, ptrs(b), 2, 40);
    broadcast(*comm, r, ptrs(c), 1, 40);
    std::vector<Tensor> g;
    std::vector<const Tensor*> in;
    std::vector<Tensor*> out;
    for (auto& t : d) g.emplace_back(Shape{t.numel() * n}), in.push_back(&t);
    for (auto& t : g) out.push_back(&t);
    all_gather(*comm, r, in, out, 40);
    for (auto* set : {&a, &b, &c, &g})
      for (auto& t : *set) got[size_t(r)].push_back(t.to_vector());
  });
  const size_t m = sizes.size();
  for (int r = 0; r < n; ++r) {
    for (size_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < sizes[i]; ++j) {
        const float own = float(r * 1000 + int64_t(i) * 10 + j);
        const float sum = float(3000 + 3 * (int64_t(i) * 10 + j));  // (0 + 1000 + 2000) + 3 * ...
        ASSERT_EQ(got[size_t(r)][i][size_t(j)], sum) << "all_reduce " << r << " " << i;
        ASSERT_EQ(got[size_t(r)][m + i][size_t(j)], r == 2 ? sum : own) << "reduce " << r;
        ASSERT_EQ(got[size_t(r)][2 * m + i][size_t(j)], float(1000 + int64_t(i) * 10 + j));
        for (int q = 0; q < n; ++q)
          ASSERT_EQ(got[size_t(r)][3 * m + i][size_t(q * sizes[i] + j)],
                    float(q * 1000 + int64_t(i) * 10 + j))
              << "all_gather " << r << " " << i;
      }
    }
  }
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

// Mixed precision reaches every replica, not only the wrapped model (replica 0).
TEST(DataParallel, PrecisionReachesEveryReplica) {
  auto dp = wrap(3, BnMode::Sync);
  dp->set_precision(Precision::FP16);
  for (int r = 0; r < 3; ++r)
    for (auto& [name, m] : dp->replica(r).named_modules())
      EXPECT_EQ(m->precision(), Precision::FP16) << "replica " << r << " " << name;
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

// With SyncBatchNorm, 2, 3 and 4 replicas (even and uneven chunks) track one device on the whole
// batch: same loss, same gradients, same weights after three SGD steps, up to rounding.
// Gradient buckets of 1 MiB (a few dozen, reduced while backward runs) or one bucket (0).
class SyncEquivalence : public ::testing::TestWithParam<std::tuple<int, int64_t, double>> {};

TEST_P(SyncEquivalence, TrainsLikeOneDevice) {
  const auto [devices, rows, bucket_mb] = GetParam();
  auto single = conditioned(3);
  auto dp = wrap(devices, BnMode::Sync, 3, bucket_mb);
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
    ::testing::Values(std::make_tuple(2, int64_t(8), 1.0), std::make_tuple(3, int64_t(7), 1.0),
                      std::make_tuple(4, int64_t(10), 0.0), std::make_tuple(4, int64_t(12), 25.0),
                      std::make_tuple(2, int64_t(7), 0.0), std::make_tuple(3, int64_t(9), 25.0)));

// SyncBatchNorm's combination of per-chunk statistics gives the whole batch's (uneven chunks of
// 3, 3 and 1 rows).
TEST(DataParallel, CombinedBatchNormStatisticsAreTheWholeBatchs) {
  Tensor x({7, 3, 4, 4});
  Rng rng(12);
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = 2.0f + rng.normal();
  Tensor mean({3}), var({3});
  batchnorm_stats(x, mean, var);
  const std::vector<int64_t> rows = {3, 3, 1};
  Tensor all({6 * 3}), m({3}), v({3});
  int64_t at = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    const Tensor chunk = x.view(at * 48, {rows[r], 3, 4, 4});
    batchnorm_stats(chunk, m, v);
    all.view(int64_t(r) * 6, {3}).copy_from(m);
    all.view(int64_t(r) * 6 + 3, {3}).copy_from(v);
    at += rows[r];
  }
  Tensor cm({3}), cv({3}), rows_of({3}, DType::I64);
  std::copy(rows.begin(), rows.end(), rows_of.data<int64_t>());  // counts / 16: weights suffice
  batchnorm_combine_stats(all, rows_of, cm, cv);
  EXPECT_LT(relative_error(cm, mean), 1e-6);
  EXPECT_LT(relative_error(cv, var), 1e-6);
}

TEST(DataParallel, GradientBucketsFollowBackwardOrder) {
  auto dp = wrap(2, BnMode::Sync, 3, 1.0);
  auto all = dp->module().named_parameters();
  std::vector<std::string> flat;
  for (auto& b : dp->buckets()) {
    ASSERT_FALSE(b.empty());
    int64_t bytes = 0;
    for (auto& name : b) {
      flat.push_back(name);
      for (auto& [n, p] : all)
        if (n == name) bytes += p->grad.numel() * 4;
    }
    // At most 1 MiB, unless one parameter alone is larger.
    if (b.size() > 1) {
      EXPECT_LE(bytes, 1 << 20) << b.front();
    }
  }
  ASSERT_EQ(flat.size(), all.size());
  for (size_t i = 0; i < all.size(); ++i) EXPECT_EQ(flat[i], all[all.size() - 1 - i].first);
  EXPECT_GT(dp->buckets().size(), 10u);
  EXPECT_EQ(wrap(2, BnMode::Sync, 3, 0.0)->buckets().size(), 1u);
}

// Where buckets split changes nothing: each gradient element is the same sum of the same values.
TEST(DataParallel, BucketSizeDoesNotChangeGradients) {
  std::vector<StateDict> seen;
  std::vector<std::unique_ptr<DataParallel>> keep;
  for (double mb : {0.0, 0.05, 25.0}) {
    keep.push_back(wrap(2, BnMode::Local, 3, mb));
    auto opts = sgds(2);
    step(*keep.back(), opts, batch(6, 40), labels(6));
    seen.push_back(grads(keep.back()->replica(1)));
    EXPECT_GT(keep.back()->communication_seconds(), 0.0);
    EXPECT_GE(keep.back()->exposed_communication_seconds(), 0.0);
  }
  for (size_t v = 1; v < seen.size(); ++v)
    for (auto& [n, t] : seen[0].entries)
      ASSERT_EQ(relative_error(*seen[v].find(n), t), 0.0) << v << " " << n;
}

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

TEST(DataParallel, OutputDeviceAsPyTorch) {
  DataParallel dp(
      conditioned(3), [] { return make_model(small_spec(), 3); }, {Device::cpu(0), Device::cpu(1)},
      DataParallelOptions{.threads = 2, .output_device = Device::cpu(1)});
  EXPECT_EQ(dp.output_device(), Device::cpu(1));
  dp.eval();
  Tensor y = dp.forward(batch(4, 2));
  EXPECT_EQ(y.device(), Device::cpu(1));
  auto plain = conditioned(3);
  plain->eval();
  EXPECT_LT(relative_error(y, plain->forward(batch(4, 2))), 1e-6);
  EXPECT_EQ(wrap(2, BnMode::Local)->output_device(), Device::cpu(0));  // default: first device
  EXPECT_THROW(DataParallel(
                   make_model(small_spec(), 0), [] { return make_model(small_spec(), 0); },
                   {Device::cpu(0)}, DataParallelOptions{.output_device = Device::cuda(0)}),
               DeviceError);
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
  explicit Flaky(bool fails, bool in_backward = false)
      : fail(fails),
        fail_backward(in_backward),
        bn(register_module("bn", std::make_unique<BatchNorm2d>(2))) {}
  std::string kind() const override { return "Flaky"; }
  Tensor forward(Tensor x) override {
    if (fail && !fail_backward) throw FileError("replica failed on purpose");
    return bn.forward(std::move(x));
  }
  Tensor backward(Tensor dy) override {
    if (fail && fail_backward) throw FileError("replica failed in backward on purpose");
    return bn.backward(std::move(dy));
  }
  bool fail, fail_backward;
  BatchNorm2d& bn;
};
}  // namespace

TEST(DataParallel, FailingReplicaDoesNotHangTheOthers) {
  DataParallel dp(
      std::make_unique<Flaky>(false), [] { return std::make_unique<Flaky>(true); },
      {Device::cpu(0), Device::cpu(1)}, DataParallelOptions{.bn = BnMode::Sync, .threads = 2});
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

// A replica failing in backward: the others are waiting in SyncBatchNorm's gradient all-reduce
// and their communication threads for its gradient buckets; all must give up, then recover.
TEST(DataParallel, FailingReplicaInBackwardDoesNotHang) {
  DataParallel dp(
      std::make_unique<Flaky>(false), [] { return std::make_unique<Flaky>(true, true); },
      {Device::cpu(0), Device::cpu(1)}, DataParallelOptions{.bn = BnMode::Sync, .threads = 2});
  auto x = [] { return Tensor::full({4, 2, 3, 3}, 1.0f); };
  dp.forward(x());
  try {
    dp.backward(Tensor::full({4, 2, 3, 3}, 0.5f));
    FAIL() << "the failure was swallowed";
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("in backward"), std::string::npos) << e.what();
  }
  static_cast<Flaky&>(dp.replica(1)).fail = false;
  dp.zero_grad();
  dp.forward(x());
  dp.backward(Tensor::full({4, 2, 3, 3}, 0.5f));
  // Both replicas hold the summed gradient: 2 rows each of 9 values of 0.5 per channel, twice.
  for (int r = 0; r < 2; ++r)
    EXPECT_FLOAT_EQ(static_cast<Flaky&>(dp.replica(r)).bn.bias.grad.at(0), 18.0f) << r;
}

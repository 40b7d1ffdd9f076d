// The NCCL communicator on real GPUs: one GPU (a communicator of size 1), and two or more (sums,
// broadcast, all-gather across devices, one thread per rank as DataParallel drives them); and
// DataParallel on GPUs, reduced through it, against one GPU on the whole batch. Without a GPU
// (or without a second one) each test skips and says why; none passes without running.
#include <gtest/gtest.h>

#include <thread>

#include "parallel/communicator.h"
#include "tests/dp_fixture.h"

using namespace dpt;
using namespace dpt::fixture;

namespace {

int gpus_or_skip_reason(std::string& why) {
  return cuda_device_count(&why);
}

void check_collectives(int n) {
  std::vector<Device> devs;
  for (int i = 0; i < n; ++i) devs.push_back(Device::cuda(i));
  auto comm = make_nccl_communicator(devs);
  ASSERT_EQ(comm->size(), n);
  const size_t ranks = static_cast<size_t>(n);
  std::vector<std::vector<float>> reduced(ranks), bcast(ranks), gathered(ranks);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r)
    threads.emplace_back([&, r] {
      Tensor t = Tensor::full({1000}, float(r + 1)).to(devs[size_t(r)]);
      comm->all_reduce_sum(r, t);
      reduced[size_t(r)] = t.to(Device::cpu()).to_vector();
      Tensor b = Tensor::full({5}, float(r)).to(devs[size_t(r)]);
      comm->broadcast(r, b, n - 1);
      bcast[size_t(r)] = b.to(Device::cpu()).to_vector();
      Tensor in = Tensor::full({2}, float(r)).to(devs[size_t(r)]);
      Tensor out = Tensor::zeros({2 * n}, DType::F32, devs[size_t(r)]);
      comm->all_gather(r, in, out);
      gathered[size_t(r)] = out.to(Device::cpu()).to_vector();
    });
  for (auto& t : threads) t.join();
  const float sum = float(n * (n + 1) / 2);
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(reduced[size_t(r)], std::vector<float>(1000, sum)) << r;
    EXPECT_EQ(bcast[size_t(r)], std::vector<float>(5, float(n - 1))) << r;
    for (int q = 0; q < n; ++q) EXPECT_EQ(gathered[size_t(r)][size_t(2 * q)], float(q)) << r;
  }
}

}  // namespace

TEST(Nccl, SingleGpuCommunicator) {
  std::string why;
  if (gpus_or_skip_reason(why) < 1) GTEST_SKIP() << "no GPU here: " << why;
  check_collectives(1);
}

TEST(Nccl, AcrossGpus) {
  std::string why;
  const int n = gpus_or_skip_reason(why);
  if (n < 2) GTEST_SKIP() << "needs 2 or more GPUs, found " << n << (n ? "" : ": " + why);
  check_collectives(n);
}

TEST(Nccl, ClearErrorWithoutGpus) {
  std::string why;
  if (cuda_device_count(&why) > 0) GTEST_SKIP() << "GPUs present: the no-GPU path is not reachable";
  EXPECT_THROW(make_nccl_communicator({Device::cuda(0)}), DeviceError);
  EXPECT_FALSE(why.empty());
}

namespace {

// Three SGD steps of DataParallel on `gpus` GPUs against the bare model on cuda:0 on the whole
// batch of `rows` rows: losses, first-step gradients and final state within `bound`, replicas
// bit-identical.
void dp_matches_one_gpu(int gpus, int64_t rows, BnMode bn, double bucket_mb, double bound) {
  std::vector<Device> devs;
  for (int i = 0; i < gpus; ++i) devs.push_back(Device::cuda(i));
  auto single = conditioned(3);
  single->to(Device::cuda(0));
  auto dp = wrap_on(devs, bn, 3, bucket_mb);
  auto o1 = sgds(1), on = sgds(gpus);
  for (int s = 0; s < 3; ++s) {
    Tensor x = batch(rows, 10 + s), y = labels(rows);
    const float a = step(*single, o1, x, y), b = step(*dp, on, x, y);
    EXPECT_NEAR(a, b, bound * std::abs(a)) << "step " << s;
    if (s == 0) {
      auto [e, name] = worst_error(grads(dp->module()), grads(*single));
      EXPECT_LT(e, bound) << "gradients; most off: " << name;
      std::printf("[ measured ] %d GPU(s), %lld rows: first-step gradients within %.2g\n", gpus,
                  (long long)rows, e);
    }
  }
  auto [e, name] = worst_error(dp->module().state_dict(), single->state_dict());
  EXPECT_LT(e, bound) << "state; most off: " << name;
  std::printf("[ measured ] %d GPU(s): state after 3 steps within %.2g of one GPU\n", gpus, e);
  StateDict got = dp->module().state_dict();
  for (int r = 1; r < gpus; ++r)
    for (auto& [n, t] : got.entries)
      ASSERT_EQ(relative_error(*dp->replica(r).state_dict().find(n), t), 0.0) << r << " " << n;
  EXPECT_GT(dp->communication_seconds(), 0.0);
}

}  // namespace

// The whole GPU DataParallel path on one GPU: replica on cuda:0, buckets of 1 MiB reduced by a
// one-rank NCCL communicator on its own thread while backward runs, SyncBatchNorm statistics
// through NCCL. With one rank every reduction is an identity, so it must train like the bare
// model up to the summation order of the synced statistics.
TEST(NcclDataParallel, OneGpuTrainsLikeTheBareModel) {
  std::string why;
  if (gpus_or_skip_reason(why) < 1) GTEST_SKIP() << "no GPU here: " << why;
  dp_matches_one_gpu(1, 8, BnMode::Sync, 1.0, 1e-5);
  dp_matches_one_gpu(1, 8, BnMode::Local, 0.0, 1e-6);
}

// 2 to 4 GPUs, SyncBatchNorm, an uneven batch (7 rows: 4+3, 3+3+1 or 2+2+2+1).
TEST(NcclDataParallel, AcrossGpusTrainsLikeOneGpu) {
  std::string why;
  const int n = gpus_or_skip_reason(why);
  if (n < 2) GTEST_SKIP() << "needs 2 or more GPUs, found " << n << (n ? "" : ": " + why);
  dp_matches_one_gpu(std::min(n, 4), 7, BnMode::Sync, 1.0, 1e-5);
}

TEST(NcclDataParallel, RefusesCpuAndGpuReplicasTogether) {
  std::string why;
  if (gpus_or_skip_reason(why) < 1) GTEST_SKIP() << "no GPU here: " << why;
  EXPECT_THROW(wrap_on({Device::cuda(0), Device::cpu(0)}, BnMode::Sync), UsageError);
}

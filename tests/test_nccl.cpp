// The NCCL communicator on real GPUs: one GPU (a communicator of size 1), and two or more (sums,
// broadcast, all-gather across devices, one thread per rank as DataParallel drives them). Without
// a GPU every test skips and says why; none passes without running.
#include <gtest/gtest.h>

#include <thread>

#include "parallel/communicator.h"

using namespace dpt;

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

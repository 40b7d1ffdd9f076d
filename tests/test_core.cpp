// core/: Device parsing, Tensor ownership and copies, dtype conversions, the counter-based RNG.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <set>
#include <thread>

#include "core/allocator.h"
#include "core/device.h"
#include "core/rng.h"
#include "core/tensor.h"

using namespace dpt;

TEST(Device, ParsesValidStrings) {
  EXPECT_EQ(Device::parse("cpu"), Device::cpu(0));
  EXPECT_EQ(Device::parse("cpu:3"), Device::cpu(3));
  EXPECT_EQ(Device::parse("cuda:1"), Device::cuda(1));
  EXPECT_EQ(Device::parse("cuda"), Device::cuda(0));
  EXPECT_EQ(Device::cuda(2).str(), "cuda:2");
  auto list = parse_devices("cpu*3");
  ASSERT_EQ(list.size(), 3u);
  EXPECT_EQ(list[2], Device::cpu(2));
  EXPECT_EQ(parse_devices("cpu:0,cpu:1").size(), 2u);
  auto automatic = parse_devices("auto");
  ASSERT_FALSE(automatic.empty());
  if (!device_available(Device::cuda(0))) {
    EXPECT_EQ(automatic, (std::vector<Device>{Device::cpu(0), Device::cpu(1)}));
  }
}

TEST(Device, RejectsBadStrings) {
  for (const char* bad : {"", "tpu", "cpu:", "cpu:-1", "cpu:x", "cuda:1a", "cpu:99999", ":0"})
    EXPECT_THROW(Device::parse(bad), UsageError) << bad;
  EXPECT_THROW(parse_devices("cpu:0,cpu:0"), UsageError);
  EXPECT_THROW(parse_devices(""), UsageError);
  try {
    Device::parse("tpu:0");
    FAIL();
  } catch (const UsageError& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("tpu:0"), std::string::npos) << msg;
    EXPECT_NE(msg.find("device.cpp:"), std::string::npos) << "message carries file:line: " << msg;
  }
}

TEST(Device, CudaUnavailableWithoutBackend) {
  std::string why;
  EXPECT_TRUE(device_available(Device::cpu(1)));
  if (!device_available(Device::cuda(0), &why)) {
    EXPECT_FALSE(why.empty());
    EXPECT_THROW(Tensor({2}, DType::F32, Device::cuda(0)), DeviceError);
  }
}

TEST(Tensor, ShapeAndZeros) {
  Tensor t = Tensor::zeros({2, 3, 4});
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.nbytes(), 96u);
  EXPECT_EQ(t.dim(-1), 4);
  for (float v : t.to_vector()) EXPECT_EQ(v, 0.0f);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw()) % 64, 0u);
  EXPECT_THROW(Tensor({-1, 2}), ConfigError);
  EXPECT_THROW(Tensor({int64_t(1) << 40, int64_t(1) << 40}), ConfigError);
}

TEST(Tensor, CloneIsDeepShareIsShallow) {
  Tensor a = Tensor::from_vector({3}, {1, 2, 3});
  Tensor b = a.clone();
  Tensor c = a.share();
  a.data<float>()[0] = 7;
  EXPECT_EQ(b.at(0), 1.0f);
  EXPECT_EQ(c.at(0), 7.0f);
  EXPECT_TRUE(a.same_storage(c));
  EXPECT_FALSE(a.same_storage(b));
  Tensor r = a.reshape({3, 1});
  EXPECT_EQ(r.dim(0), 3);
  EXPECT_THROW(a.reshape({2, 2}), ConfigError);
  Tensor moved = std::move(a);
  EXPECT_FALSE(a.defined());  // NOLINT: checking the moved-from state on purpose
  EXPECT_EQ(moved.at(0), 7.0f);
}

TEST(Tensor, DtypeConversionsRoundTrip) {
  Tensor a = Tensor::from_vector({6}, {0.0f, 1.0f, -2.5f, 65504.0f, 1e-7f, 3.14159f});
  std::vector<float> h = a.to(DType::F16).to_vector();
  EXPECT_EQ(h[1], 1.0f);
  EXPECT_EQ(h[2], -2.5f);
  EXPECT_EQ(h[3], 65504.0f);
  EXPECT_NEAR(h[4], 1e-7f, 6e-8f);  // subnormal in half precision
  EXPECT_NEAR(h[5], 3.14159f, 2e-3f);
  std::vector<float> b = a.to(DType::BF16).to_vector();
  EXPECT_EQ(b[2], -2.5f);
  EXPECT_NEAR(b[5], 3.14159f, 2e-2f);
  EXPECT_TRUE(std::isinf(f16_to_float(float_to_f16(1e6f))));
  EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(NAN))));
  // Every half value converts to float and back unchanged.
  for (uint32_t u = 0; u < 0x10000; ++u) {
    uint16_t x = uint16_t(u);
    if (((x >> 10) & 0x1f) == 0x1f && (x & 0x3ff)) continue;  // NaN payloads
    ASSERT_EQ(float_to_f16(f16_to_float(x)), x) << u;
  }
  Tensor i = a.to(DType::I64);
  EXPECT_EQ(i.data<int64_t>()[2], -2);
}

TEST(Rng, ReproducibleAndCounterBased) {
  Rng a(42, 7), b(42, 7), c(43, 7), d(42, 8);
  std::vector<uint32_t> va, vb;
  for (int i = 0; i < 100; ++i) va.push_back(a.next_u32()), vb.push_back(b.next_u32());
  EXPECT_EQ(va, vb);
  EXPECT_NE(va[0], c.next_u32());
  EXPECT_NE(va[0], d.next_u32());
  // Restoring a saved state continues the same sequence.
  Rng e(42, 7);
  for (int i = 0; i < 37; ++i) e.next_u32();
  Rng f(e.state());
  EXPECT_EQ(f.next_u32(), va[37]);
}

TEST(Rng, Distributions) {
  Rng r(1);
  double s = 0, q = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    float x = r.normal();
    s += x;
    q += double(x) * x;
  }
  EXPECT_NEAR(s / n, 0.0, 0.01);
  EXPECT_NEAR(q / n, 1.0, 0.02);
  std::set<uint64_t> seen;
  for (int i = 0; i < 1000; ++i) {
    uint64_t v = r.below(10);
    ASSERT_LT(v, 10u);
    seen.insert(v);
  }
  EXPECT_EQ(seen.size(), 10u);
  double u = 0;
  for (int i = 0; i < n; ++i) u += r.uniform();
  EXPECT_NEAR(u / n, 0.5, 0.005);
}

// The CUDA caching allocator's logic, on a fake backend: a host heap of fixed capacity that
// counts its calls and fails (returns nullptr) when full.
namespace {
struct FakeDevice {
  explicit FakeDevice(size_t bytes) : capacity(bytes) {}
  size_t capacity, used = 0;
  int allocs = 0, frees = 0, thread_syncs = 0, device_syncs = 0;
  std::map<void*, size_t> live;
  AllocatorBackend backend() {
    return {.alloc = [this](int, size_t n) -> void* {
              if (used + n > capacity) return nullptr;
              void* p = std::malloc(n);
              used += n;
              live[p] = n;
              ++allocs;
              return p;
            },
            .free =
                [this](int, void* p) {
                  used -= live.at(p);
                  live.erase(p);
                  std::free(p);
                  ++frees;
                },
            .sync_thread = [this](int) { ++thread_syncs; },
            .sync_device = [this](int) { ++device_syncs; },
            .fill = nullptr};
  }
};
constexpr size_t MiB = size_t(1) << 20;
}  // namespace

TEST(CachingAllocator, ReusesFreedBlocksOfSimilarSize) {
  FakeDevice dev(64 * MiB);
  {
    CachingAllocator a(dev.backend(), "cuda");
    EXPECT_EQ(a.allocate(0, 0), nullptr);
    EXPECT_EQ(CachingAllocator::round_size(1), 512u);
    EXPECT_EQ(CachingAllocator::round_size(513), 1024u);
    EXPECT_EQ(CachingAllocator::round_size(MiB + 1), 2 * MiB);
    void* p = a.allocate(0, 1000);
    a.deallocate(0, p);
    EXPECT_EQ(a.allocate(0, 900), p);  // same rounded size: the cached block
    EXPECT_EQ(dev.allocs, 1);
    void* big = a.allocate(0, 10 * MiB);
    a.deallocate(0, big);
    void* small = a.allocate(0, MiB + 1);  // 2 MiB: the cached 10 MiB block is too large
    EXPECT_NE(small, big);
    void* mid = a.allocate(0, 6 * MiB);  // within 2x of 10 MiB: reused
    EXPECT_EQ(mid, big);
    EXPECT_EQ(dev.allocs, 3);
    void* other = a.allocate(1, 1000);  // another device never takes device 0's blocks
    a.deallocate(0, p);
    void* other2 = a.allocate(1, 1000);
    EXPECT_NE(other2, p);
    AllocatorStats s = a.stats(0);
    EXPECT_EQ(s.in_use, int64_t(2 * MiB + 10 * MiB));
    EXPECT_EQ(s.reserved, int64_t(512 * 2 + 2 * MiB + 10 * MiB));
    EXPECT_EQ(s.peak_in_use, int64_t(1024 + 2 * MiB + 10 * MiB));
    a.deallocate(0, small);
    a.deallocate(0, mid);
    a.deallocate(1, other);
    a.deallocate(1, other2);
    a.empty_cache(0);
    EXPECT_EQ(a.stats(0).reserved, 0);
    EXPECT_EQ(a.stats(0).backend_frees, 3);
    EXPECT_EQ(dev.device_syncs, 1);
    EXPECT_EQ(a.stats(1).reserved, 2 * 1024);  // device 1 keeps its cache
    a.empty_cache(1);
  }
  EXPECT_TRUE(dev.live.empty());
}

TEST(CachingAllocator, OutOfMemoryReleasesTheCacheThenReportsFigures) {
  FakeDevice dev(8 * MiB);
  CachingAllocator a(dev.backend(), "cuda");
  void* p = a.allocate(0, 4 * MiB);
  a.deallocate(0, p);                // cached: 4 MiB held
  void* q = a.allocate(0, 6 * MiB);  // 4 + 6 > 8: the cache goes back, then it fits
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(dev.frees, 1);
  EXPECT_EQ(dev.device_syncs, 1);
  try {
    a.allocate(0, 4 * MiB);
    FAIL() << "allocated past the capacity";
  } catch (const DeviceError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("out of memory on cuda:0 allocating 4 MiB: 6 MiB are in use"),
              std::string::npos)
        << m;
  }
  a.deallocate(0, q);
  a.empty_cache(0);
  EXPECT_TRUE(dev.live.empty());
}

// A thread that ends hands its cached blocks back at once, and its live ones when freed.
TEST(CachingAllocator, AnEndingThreadLeavesNoCacheBehind) {
  FakeDevice dev(64 * MiB);
  CachingAllocator a(dev.backend(), "cuda");
  void* kept = nullptr;
  std::thread([&] {
    void* cached = a.allocate(0, 5000);
    kept = a.allocate(1, 3 * MiB);
    a.deallocate(0, cached);
    a.release_thread();
  }).join();
  EXPECT_EQ(dev.frees, 1);
  EXPECT_EQ(a.stats(0).reserved, 0);
  EXPECT_EQ(a.stats(1).reserved, int64_t(4 * MiB));
  a.deallocate(1, kept);  // its owner has ended: straight back
  EXPECT_EQ(dev.frees, 2);
  EXPECT_EQ(a.stats(1).reserved, 0);
  EXPECT_EQ(a.stats(1).backend_frees, 1);
  EXPECT_TRUE(dev.live.empty());
}

TEST(CachingAllocator, BlocksFreedByAnotherThreadWaitAndGoHome) {
  FakeDevice dev(64 * MiB);
  CachingAllocator a(dev.backend(), "cuda");
  void* p = a.allocate(0, 3000);
  void* mine = nullptr;
  std::thread([&] {
    a.deallocate(0, p);          // not the owner: waits for this thread's work first
    mine = a.allocate(0, 3000);  // this thread's cache is empty: a new block
  }).join();
  EXPECT_EQ(dev.thread_syncs, 1);
  EXPECT_NE(mine, p);
  EXPECT_EQ(a.allocate(0, 3000), p);  // the owner gets its block back
  a.deallocate(0, p);
  a.deallocate(0, mine);
  a.empty_cache(0);
  EXPECT_TRUE(dev.live.empty());
}

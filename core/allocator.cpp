#include "core/allocator.h"

#include <algorithm>
#include <atomic>
#include <vector>

#include "core/cuda_check.h"
#include "core/error.h"

namespace dpt {

CachingAllocator::CachingAllocator(AllocatorBackend backend, std::string device_kind)
    : backend_(std::move(backend)), kind_(std::move(device_kind)) {}

size_t CachingAllocator::round_size(size_t bytes) {
  constexpr size_t kSmall = 512, kLarge = size_t(2) << 20;
  if (bytes < (size_t(1) << 20))
    return std::max<size_t>(kSmall, (bytes + kSmall - 1) / kSmall * kSmall);
  DPT_CHECK(bytes <= SIZE_MAX - kLarge, DeviceError, "cannot allocate ", bytes, " bytes");
  return (bytes + kLarge - 1) / kLarge * kLarge;
}

uint64_t CachingAllocator::this_thread_token() {
  static std::atomic<uint64_t> next{1};
  thread_local const uint64_t token = next++;
  return token;
}

void* CachingAllocator::take_cached(int device, size_t size) {
  auto pool = cached_.find({device, this_thread_token()});
  if (pool == cached_.end()) return nullptr;
  auto it = pool->second.lower_bound(size);
  if (it == pool->second.end() || it->first > 2 * size) return nullptr;
  void* p = it->second;
  const size_t got = it->first;
  pool->second.erase(it);
  live_[p] = {got, device, this_thread_token()};
  AllocatorStats& s = stats_[device];
  s.in_use += int64_t(got);
  s.peak_in_use = std::max(s.peak_in_use, s.in_use);
  return p;
}

void CachingAllocator::count_new(int device, void* p, size_t size) {
  live_[p] = {size, device, this_thread_token()};
  AllocatorStats& s = stats_[device];
  s.in_use += int64_t(size);
  s.reserved += int64_t(size);
  ++s.backend_allocs;
  s.peak_in_use = std::max(s.peak_in_use, s.in_use);
  s.peak_reserved = std::max(s.peak_reserved, s.reserved);
}

void* CachingAllocator::allocate(int device, size_t bytes) {
  void* p = take_or_allocate(device, bytes);
  if (p && backend_.fill) backend_.fill(device, p, round_size(bytes));
  return p;
}

void* CachingAllocator::take_or_allocate(int device, size_t bytes) {
  if (bytes == 0) return nullptr;
  const size_t size = round_size(bytes);
  {
    std::lock_guard<std::mutex> lock(m_);
    if (void* p = take_cached(device, size)) return p;
  }
  void* p = backend_.alloc(device, size);
  if (!p) {
    empty_cache(device);
    p = backend_.alloc(device, size);
  }
  std::lock_guard<std::mutex> lock(m_);
  if (!p) {
    const AllocatorStats& s = stats_[device];
    DPT_THROW(DeviceError, "out of memory on ", kind_, ":", device, " allocating ", bytes >> 20,
              " MiB: ", s.in_use >> 20, " MiB are in use by tensors (peak ", s.peak_in_use >> 20,
              " MiB); use a smaller --batch-size or fewer replicas per GPU");
  }
  count_new(device, p, size);
  return p;
}

void CachingAllocator::deallocate(int device, void* p) {
  if (!p) return;
  std::unique_lock<std::mutex> lock(m_);
  auto it = live_.find(p);
  DPT_ASSERT(it != live_.end() && it->second.device == device, "freeing memory on ", kind_, ":",
             device, " that this allocator did not hand out");
  const Block b = it->second;
  live_.erase(it);
  stats_[device].in_use -= int64_t(b.size);
  if (ended_.count(b.owner)) return give_back(lock, device, p, b.size);
  if (b.owner != this_thread_token()) {
    lock.unlock();
    try {
      backend_.sync_thread(device);  // this thread's work on the block is done before reuse
    } catch (const Error&) {
      return;  // a failed device: the block is not reused (deallocation must not throw)
    }
    lock.lock();
    if (ended_.count(b.owner)) return give_back(lock, device, p, b.size);  // ended meanwhile
  }
  cached_[{device, b.owner}].emplace(b.size, p);
}

// A block without a thread to cache it for goes back to the backend (called under the lock,
// returns without it).
void CachingAllocator::give_back(std::unique_lock<std::mutex>& lock, int device, void* p,
                                 size_t size) {
  stats_[device].reserved -= int64_t(size);
  ++stats_[device].backend_frees;
  lock.unlock();
  backend_.free(device, p);
}

void CachingAllocator::empty_cache(int device) {
  backend_.sync_device(device);
  std::vector<void*> release;
  {
    std::lock_guard<std::mutex> lock(m_);
    AllocatorStats& s = stats_[device];
    for (auto it = cached_.begin(); it != cached_.end();) {
      if (it->first.first != device) {
        ++it;
        continue;
      }
      for (auto& [size, p] : it->second) {
        release.push_back(p);
        s.reserved -= int64_t(size);
        ++s.backend_frees;
      }
      it = cached_.erase(it);
    }
  }
  for (void* p : release) backend_.free(device, p);
}

void CachingAllocator::release_thread() noexcept {
  const uint64_t me = this_thread_token();
  std::vector<std::pair<int, void*>> release;
  {
    std::lock_guard<std::mutex> lock(m_);
    ended_.insert(me);  // its live blocks, when freed, have no cache to go home to
    for (auto it = cached_.begin(); it != cached_.end();) {
      if (it->first.second != me) {
        ++it;
        continue;
      }
      AllocatorStats& s = stats_[it->first.first];
      for (auto& [size, p] : it->second) {
        release.emplace_back(it->first.first, p);
        s.reserved -= int64_t(size);
        ++s.backend_frees;
      }
      it = cached_.erase(it);
    }
  }
  for (auto [device, p] : release) {
    try {
      backend_.free(device, p);
    } catch (...) {  // a failed device at a thread's end: nothing more to do
    }
  }
}

AllocatorStats CachingAllocator::stats(int device) const {
  std::lock_guard<std::mutex> lock(m_);
  auto it = stats_.find(device);
  return it == stats_.end() ? AllocatorStats{} : it->second;
}

void CachingAllocator::reset_peak(int device) {
  std::lock_guard<std::mutex> lock(m_);
  AllocatorStats& s = stats_[device];
  s.peak_in_use = s.in_use;
  s.peak_reserved = s.reserved;
}

CachingAllocator& cuda_allocator() {
#ifdef DPTRAIN_HAVE_CUDA
  // Never destroyed: tensors in static storage may be freed after it would be, and the driver
  // reclaims everything at exit anyway.
  static CachingAllocator* a = new CachingAllocator(
      AllocatorBackend{
          .alloc = [](int device, size_t bytes) -> void* {
            DPT_CUDA(cudaSetDevice(device));
            void* p = nullptr;
            const cudaError_t rc = cudaMalloc(&p, bytes);
            if (rc == cudaErrorMemoryAllocation) {
              cudaGetLastError();  // clears the error so later calls do not report it
              return nullptr;
            }
            DPT_CUDA(rc);
            return p;
          },
          .free =
              [](int device, void* p) {
                if (cudaSetDevice(device) == cudaSuccess) cudaFree(p);
              },
          .sync_thread =
              [](int device) {
                DPT_CUDA(cudaSetDevice(device));
                DPT_CUDA(cudaStreamSynchronize(cudaStreamPerThread));
              },
          .sync_device =
              [](int device) {
                DPT_CUDA(cudaSetDevice(device));
                DPT_CUDA(cudaDeviceSynchronize());
              },
#ifdef DPTRAIN_CUDA_EMULATED
          .fill =
              [](int device, void* p, size_t bytes) {
                DPT_CUDA(cudaSetDevice(device));
                DPT_CUDA(cudaMemset(p, 0xff, bytes));
              },
#else
          .fill = nullptr,
#endif
      },
      "cuda");
  return *a;
#else
  DPT_THROW(DeviceError, "this build of dptrain has no CUDA support");
#endif
}

}  // namespace dpt

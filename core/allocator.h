// CachingAllocator: device memory kept for reuse instead of going back to the driver.
//
// cudaMalloc is slow and cudaFree waits for the whole device, so a training step that took every
// activation from the driver would spend its time there. A freed block goes to a cache kept per
// device and per allocating thread; a later request from that thread takes the smallest cached
// block that fits, if it is at most twice the (rounded) request. Requests are rounded up to 512 B
// under 1 MiB and to 2 MiB multiples above, so that the varying sizes of a step find each other.
//
// Stream order makes reuse safe: every op runs on its thread's own stream (cudaStreamPerThread),
// so work queued on a block before it was freed runs before work queued after its reuse by the
// same thread. A block freed by another thread first waits for that thread's queued work, then
// returns to its owner's cache. (A thread that launches work on another thread's tensor must be
// done with it before the owner frees it, as with PyTorch's record_stream.) A thread that ends
// calls release_thread(): its cached blocks go back to the backend, and so do its live blocks
// when they are freed, so that no cache is left without a thread to use it.
//
// When the backend runs out of memory, the device's whole cache is released (after the device
// is idle) and the request retried once; after that, DeviceError with the figures. The backend is
// a parameter so that the caching logic is tested without a GPU (tests/test_core.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>

namespace dpt {

struct AllocatorBackend {
  std::function<void*(int device, size_t bytes)> alloc;  // nullptr when out of memory
  std::function<void(int device, void* p)> free;
  std::function<void(int device)> sync_thread;  // the calling thread's queued work is done
  std::function<void(int device)> sync_device;  // all queued work on the device is done
  // Optional: fills every block as it is handed out, fresh or cached (the CUDA emulator's build
  // fills with NaN bytes, so that an output a kernel fails to write shows).
  std::function<void(int device, void* p, size_t bytes)> fill;
};

struct AllocatorStats {
  int64_t in_use = 0;         // bytes in blocks handed out (rounded sizes)
  int64_t reserved = 0;       // bytes held from the backend: in use + cached
  int64_t peak_in_use = 0;    // since construction or reset_peak
  int64_t peak_reserved = 0;  // since construction or reset_peak
  int64_t backend_allocs = 0;
  int64_t backend_frees = 0;
};

class CachingAllocator {
 public:
  // `device_kind` names devices in messages ("cuda" gives "cuda:0").
  CachingAllocator(AllocatorBackend backend, std::string device_kind);
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  void* allocate(int device, size_t bytes);  // nullptr for 0 bytes
  void deallocate(int device, void* p);      // p from allocate on this device, or nullptr
  void empty_cache(int device);              // returns the device's cached blocks to the backend
  void release_thread() noexcept;            // the calling thread ends (see above)
  AllocatorStats stats(int device) const;
  void reset_peak(int device);

  static size_t round_size(size_t bytes);

 private:
  struct Block {
    size_t size;
    int device;
    uint64_t owner;  // this_thread_token() of the allocating thread
  };
  using PoolKey = std::pair<int, uint64_t>;
  // A number for the calling thread, never reused (std::thread::id values are, once a thread
  // ends).
  static uint64_t this_thread_token();
  void give_back(std::unique_lock<std::mutex>& lock, int device, void* p, size_t size);
  void* take_cached(int device, size_t size);
  void* take_or_allocate(int device, size_t bytes);  // allocate, but for the fill
  void count_new(int device, void* p, size_t size);

  AllocatorBackend backend_;
  std::string kind_;
  mutable std::mutex m_;
  std::unordered_map<void*, Block> live_;
  std::map<PoolKey, std::multimap<size_t, void*>> cached_;
  std::unordered_set<uint64_t> ended_;  // threads that called release_thread()
  std::map<int, AllocatorStats> stats_;
};

// The process's allocator of CUDA device memory (cudaMalloc / cudaFree). Like the CUDA context it
// draws from, it is process-wide: a device buffer, freed anywhere, must find the cache it came
// from. Without a CUDA build, DeviceError.
CachingAllocator& cuda_allocator();

}  // namespace dpt

// The CUDA emulator: runs kernels/cuda's own kernels on the CPU, so that their index arithmetic,
// barriers, warp shuffles and results are tested on every CI run, on a machine without a GPU.
// A -DDPTRAIN_CUDA_EMULATE=ON build compiles kernels/cuda/*.cu as C++ (tests/cuda_emu/emu.h) and
// links this file in place of the CUDA runtime, with cudnn.cpp, cublas.cpp and nccl.cpp beside
// it (docs/cuda-emulator.md says what it does and does not cover).
//
// Execution: a launch runs its blocks one after another, in a shuffled order; within a block
// every thread is a fiber with its own stack, run until it finishes or reaches a barrier, in a
// shuffled order each round, so that a read of another thread's shared-memory write without a
// barrier between them shows as a wrong result. A kernel whose first launch reaches no barrier
// runs its threads as plain calls afterwards (much faster). Every pointer argument of a launch
// must point into memory of the launching thread's current device. Memory: device allocations are
// host memory filled with 0xff bytes (NaN as float, so unwritten outputs show), copies are
// memcpy, streams and events are synchronous (every race between streams resolves in program
// order, so a missing synchronisation goes unseen). Devices: 1, or DPT_CUDA_EMU_DEVICES.
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <string>
#include <unordered_set>
#include <vector>

#include "tests/cuda_emu/emu.h"

namespace dpt_emu {
namespace {

enum State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };
constexpr size_t kStackBytes = 64 << 10;

// A suspended fiber. On x86-64 a switch saves the callee-saved registers on the fiber's own stack
// and swaps stack pointers (a few nanoseconds); elsewhere ucontext (two system calls a switch).
#if defined(__x86_64__)
extern "C" void dpt_emu_switch(void** from_sp, void* to_sp);
asm(R"(
  .text
  .globl dpt_emu_switch
  .type dpt_emu_switch, @function
dpt_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dpt_emu_switch, .-dpt_emu_switch
)");
struct Context {
  void* sp = nullptr;
};
void start(Context& c, char* stack, void (*entry)()) {
  // The first switch pops six zeroed registers and "returns" into entry, whose stack then looks
  // as after a call (8 below a 16-byte boundary).
  auto* top = reinterpret_cast<uintptr_t*>(
      (reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t(15)) - 8);
  top[-1] = reinterpret_cast<uintptr_t>(entry);
  for (int i = 2; i <= 7; ++i) top[-i] = 0;
  c.sp = top - 7;
}
void jump(Context& from, Context& to) {
  dpt_emu_switch(&from.sp, to.sp);
}
#else
struct Context {
  ucontext_t uc;
};
void start(Context& c, char* stack, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = kStackBytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void jump(Context& from, Context& to) {
  swapcontext(&from.uc, &to.uc);
}
#endif

struct Fiber {
  Context ctx;
  std::unique_ptr<char[]> stack;
  State state = kDone;
  dim3 id;
};

// One launch at a time in the whole process; these belong to it.
std::mutex launch_mutex;
ThreadIds now;
std::vector<Fiber> fibers;
std::vector<std::array<unsigned char, 8>> slots;  // warp exchange area, 8 bytes a thread
Context scheduler;
int running = -1;  // the fiber running, -1 when threads run as plain calls
const std::function<void()>* body = nullptr;
bool saw_barrier = false;
std::string launch_error;
std::unordered_set<const void*> barrier_free;
uint64_t rng_state = 0x9e3779b97f4a7c15ull;

thread_local cudaError_t last_error = cudaSuccess;
thread_local int current_device = 0;

int linear_id() {
  return int(now.thread.x + now.block_dim.x * (now.thread.y + now.block_dim.y * now.thread.z));
}

[[noreturn]] void fiber_main() {
  (*body)();
  fibers[size_t(running)].state = kDone;
  jump(fibers[size_t(running)].ctx, scheduler);
  __builtin_unreachable();
}

uint64_t next_random() {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

// Runs one block's threads as fibers until all are done; false (launch_error set) on a barrier
// that cannot complete.
bool run_fibers(int n) {
  if (fibers.size() < size_t(n)) fibers.resize(size_t(n));
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[size_t(i)];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    start(f.ctx, f.stack.get(), fiber_main);
    f.state = kRunnable;
    f.id = dim3(unsigned(i) % now.block_dim.x, unsigned(i) / now.block_dim.x % now.block_dim.y,
                unsigned(i) / (now.block_dim.x * now.block_dim.y));
  }
  std::vector<int> order(static_cast<size_t>(n));
  for (;;) {
    for (int i = 0; i < n; ++i) order[size_t(i)] = i;
    for (int i = n - 1; i > 0; --i) std::swap(order[size_t(i)], order[next_random() % (i + 1)]);
    for (const int i : order) {
      if (fibers[size_t(i)].state != kRunnable) continue;
      running = i;
      now.thread = fibers[size_t(i)].id;
      jump(scheduler, fibers[size_t(i)].ctx);
    }
    running = -1;
    // Every thread is done or waits. A warp whose live threads all wait at its barrier goes on;
    // else the block's barrier completes when every live thread waits there.
    bool any_live = false, released = false, all_at_block = true;
    for (int w = 0; w * 32 < n; ++w) {
      bool all_at_warp = true, live = false;
      for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i) {
        const State s = fibers[size_t(i)].state;
        if (s == kDone) continue;
        live = true;
        all_at_warp &= s == kAtWarpBarrier;
        all_at_block &= s == kAtBlockBarrier;
      }
      any_live |= live;
      if (live && all_at_warp) {
        released = true;
        for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i)
          if (fibers[size_t(i)].state == kAtWarpBarrier) fibers[size_t(i)].state = kRunnable;
      }
    }
    if (!any_live) return true;
    if (released) continue;
    if (!all_at_block) {
      launch_error =
          "threads of a block wait at different barriers (a __syncthreads or a warp "
          "shuffle in code that not every thread reaches)";
      return false;
    }
    for (int i = 0; i < n; ++i)
      if (fibers[size_t(i)].state == kAtBlockBarrier) fibers[size_t(i)].state = kRunnable;
  }
}

}  // namespace

const ThreadIds& ids() {
  return now;
}

int lane() {
  return linear_id() % 32;
}

unsigned char* warp_slot(int l) {
  return slots[size_t(linear_id() / 32 * 32 + l)].data();
}

void barrier(int kind) {
  saw_barrier = true;
  if (running < 0) {
    launch_error =
        "a barrier in a kernel whose first launch reached none (the emulator then runs "
        "its threads as plain calls)";
    return;
  }
  fibers[size_t(running)].state = kind == 0 ? kAtBlockBarrier : kAtWarpBarrier;
  jump(fibers[size_t(running)].ctx, scheduler);
}

void run(dim3 grid, dim3 block, size_t arg_bytes, bool pointers_ok, const void* kernel,
         const std::function<void()>& fn) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (arg_bytes > 32764) {  // the kernel parameter limit of CUDA 12.1+ on Volta and later
    last_error = cudaErrorInvalidValue;
    return;
  }
  if (!pointers_ok) {
    std::fprintf(stderr,
                 "CUDA emulator: a kernel argument points outside the memory of device %d\n",
                 current_device);
    last_error = cudaErrorIllegalAddress;
    return;
  }
  body = &fn;
  saw_barrier = false;
  launch_error.clear();
  const bool plain = barrier_free.count(kernel) > 0;
  slots.assign(size_t((threads + 31) / 32 * 32), {});
  now.block_dim = block;
  now.grid_dim = grid;
  // Block k runs k-th in the order (k * stride + offset) mod blocks, stride coprime to blocks.
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z, offset = next_random() % blocks;
  uint64_t stride = next_random() % blocks | 1;
  while (std::gcd(stride, blocks) != 1) stride += 2;
  for (uint64_t k = 0; k < blocks && launch_error.empty(); ++k) {
    const uint64_t b = (k * stride + offset) % blocks;
    now.block = dim3(unsigned(b % grid.x), unsigned(b / grid.x % grid.y),
                     unsigned(b / (uint64_t(grid.x) * grid.y)));
    if (!plain) {
      run_fibers(int(threads));
      continue;
    }
    for (unsigned i = 0; i < threads; ++i) {
      now.thread = dim3(i % block.x, i / block.x % block.y, i / (block.x * block.y));
      fn();
    }
  }
  if (!launch_error.empty()) {
    std::fprintf(stderr, "CUDA emulator: %s\n", launch_error.c_str());
    last_error = cudaErrorLaunchFailure;
  } else if (!saw_barrier) {
    barrier_free.insert(kernel);
  }
}

}  // namespace dpt_emu

// ---- the CUDA runtime calls dptrain makes, on host memory ----
namespace {

constexpr size_t kDeviceBytes = size_t(16) << 30;  // what cudaMemGetInfo reports as total
std::mutex memory_mutex, waits_mutex;
size_t allocated = 0;                                              // all devices together
std::map<cudaStream_t, std::vector<std::function<void()>>> waits;  // by stream, for NCCL
std::map<const char*, size_t> device_blocks, pinned_blocks;        // start -> bytes
std::map<const char*, int> owners;  // start -> device (whose context, for pinned blocks)

// The start of the block that holds [p, p + bytes), or null.
const char* block_of(const std::map<const char*, size_t>& blocks, const void* p, size_t bytes = 1) {
  const char* c = static_cast<const char*>(p);
  auto it = blocks.upper_bound(c);
  if (it == blocks.begin() || c + bytes > std::prev(it)->first + std::prev(it)->second)
    return nullptr;
  return std::prev(it)->first;
}
bool holds(const std::map<const char*, size_t>& blocks, const void* p, size_t bytes = 1) {
  return block_of(blocks, p, bytes) != nullptr;
}

int device_count() {
  const char* e = std::getenv("DPT_CUDA_EMU_DEVICES");
  return e ? std::max(0, std::atoi(e)) : 1;
}

cudaError_t fail(cudaError_t e) {
  dpt_emu::last_error = e;
  return e;
}

}  // namespace

bool dpt_emu::device_range(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> lock(memory_mutex);
  return holds(device_blocks, p, bytes);
}

bool dpt_emu::on_current_device(const void* p) {
  std::lock_guard<std::mutex> lock(memory_mutex);
  const char* start = block_of(device_blocks, p);
  return start && owners[start] == current_device;
}

void dpt_emu::on_synchronize(cudaStream_t stream, std::function<void()> wait) {
  std::lock_guard<std::mutex> lock(waits_mutex);
  waits[stream].push_back(std::move(wait));
}

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  *count = device_count();
  return *count > 0 ? cudaSuccess : fail(cudaErrorNoDevice);
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device < 0 || device >= device_count()) return fail(cudaErrorInvalidDevice);
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof prop->name, "emulated GPU %d", device);
  prop->major = 9;  // as an H100: bf16 convolutions
  prop->totalGlobalMem = kDeviceBytes;
  prop->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= device_count()) return fail(cudaErrorInvalidDevice);
  dpt_emu::current_device = device;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = dpt_emu::current_device;
  return cudaSuccess;
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument (emulated)";
    case cudaErrorInvalidValue:
      return "invalid argument (emulated)";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure (emulated)";
    case cudaErrorMemoryAllocation:
      return "out of memory (emulated)";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal (emulated)";
    case cudaErrorNoDevice:
      return "no CUDA-capable device is detected (emulated)";
    case cudaErrorIllegalAddress:
      return "an illegal memory access was encountered (emulated)";
    default:
      return "an error of the CUDA emulator";
  }
}
cudaError_t cudaGetLastError() {
  const cudaError_t e = dpt_emu::last_error;
  dpt_emu::last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() {
  return dpt_emu::last_error;
}
cudaError_t cudaMalloc(void** p, size_t bytes) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + 255) / 256 * 256;
  char* m = static_cast<char*>(std::aligned_alloc(256, rounded));
  if (!m) return fail(cudaErrorMemoryAllocation);
  std::memset(m, 0xff, rounded);
  std::lock_guard<std::mutex> lock(memory_mutex);
  device_blocks[m] = rounded;
  owners[m] = dpt_emu::current_device;
  allocated += rounded;
  *p = m;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  if (!p) return cudaSuccess;
  std::lock_guard<std::mutex> lock(memory_mutex);
  auto it = device_blocks.find(static_cast<const char*>(p));
  if (it == device_blocks.end()) return fail(cudaErrorInvalidValue);
  allocated -= it->second;
  device_blocks.erase(it);
  owners.erase(static_cast<const char*>(p));
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t bytes) {
  bytes = std::max<size_t>(bytes, 1);
  *p = std::malloc(bytes);
  if (!*p) return fail(cudaErrorMemoryAllocation);
  std::lock_guard<std::mutex> lock(memory_mutex);
  pinned_blocks[static_cast<const char*>(*p)] = bytes;
  owners[static_cast<const char*>(*p)] = dpt_emu::current_device;
  return cudaSuccess;
}
cudaError_t cudaHostAlloc(void** p, size_t bytes, unsigned) {
  return cudaMallocHost(p, bytes);
}
cudaError_t cudaFreeHost(void* p) {
  if (!p) return cudaSuccess;
  std::lock_guard<std::mutex> lock(memory_mutex);
  if (pinned_blocks.erase(static_cast<const char*>(p)) == 0) return fail(cudaErrorInvalidValue);
  owners.erase(static_cast<const char*>(p));
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaPointerGetAttributes(cudaPointerAttributes* a, const void* p) {
  std::lock_guard<std::mutex> lock(memory_mutex);
  const bool device = holds(device_blocks, p);
  *a = cudaPointerAttributes{};
  a->type = device                    ? cudaMemoryTypeDevice
            : holds(pinned_blocks, p) ? cudaMemoryTypeHost
                                      : cudaMemoryTypeUnregistered;
  const char* pinned = block_of(pinned_blocks, p);
  a->device = device ? owners[block_of(device_blocks, p)] : pinned ? owners[pinned] : -1;
  a->devicePointer = device ? const_cast<void*>(p) : nullptr;
  a->hostPointer = device ? nullptr : const_cast<void*>(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyPeer(void* dst, int dst_device, const void* src, int src_device,
                           size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(memory_mutex);
    const char *d = block_of(device_blocks, dst, bytes), *s = block_of(device_blocks, src, bytes);
    if (bytes && (!d || !s || owners[d] != dst_device || owners[s] != src_device))
      return fail(cudaErrorInvalidValue);
  }
  return cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice);
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                            cudaStream_t) {
  return cudaMemcpy(dst, src, bytes, kind);
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  if (bytes) std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  return cudaMemset(p, value, bytes);
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total) {
  std::lock_guard<std::mutex> lock(memory_mutex);
  *total = kDeviceBytes;
  *free_bytes = kDeviceBytes - std::min(kDeviceBytes, allocated);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  std::vector<std::function<void()>> pending;
  {
    std::lock_guard<std::mutex> lock(waits_mutex);
    auto it = waits.find(stream);
    if (it == waits.end()) return cudaSuccess;
    pending.swap(it->second);
    waits.erase(it);
  }
  for (auto& w : pending) w();
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() {
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) {
  *s = reinterpret_cast<cudaStream_t>(new char);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete reinterpret_cast<char*>(s);
  return cudaSuccess;
}
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  *e = reinterpret_cast<cudaEvent_t>(new char);
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete reinterpret_cast<char*>(e);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t) {
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) {
  return cudaSuccess;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) {
  return cudaSuccess;
}

}  // extern "C"

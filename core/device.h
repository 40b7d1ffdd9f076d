// Device: a value naming where memory lives and kernels run ("cpu", "cpu:1", "cuda:0").
// Several cpu:N devices are distinct logical devices sharing the host (DataParallel on CPU).
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace dpt {

enum class DeviceType { CPU, CUDA };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;

  static Device cpu(int index = 0) { return {DeviceType::CPU, index}; }
  static Device cuda(int index = 0) { return {DeviceType::CUDA, index}; }
  // Parses "cpu", "cpu:N", "cuda", "cuda:N"; throws UsageError naming the bad string.
  static Device parse(std::string_view s);
  std::string str() const;
  bool is_cpu() const { return type == DeviceType::CPU; }
  bool is_cuda() const { return type == DeviceType::CUDA; }
  friend bool operator==(const Device&, const Device&) = default;
};

// Parses a comma-separated list ("cpu:0,cpu:1"); "cpu*N" expands to cpu:0..cpu:N-1; "auto" is
// every usable GPU or, without one, two CPU devices.
std::vector<Device> parse_devices(std::string_view list);

// Whether kernels can run on this device in this process: always for CPU devices; for a CUDA
// device, when this build has the CUDA kernels and the GPU is visible. Otherwise `why` says
// whether the build, the driver or the GPU is what is missing.
bool device_available(const Device& d, std::string* why = nullptr);

// GPUs this process can allocate memory on and communicate between (honours
// CUDA_VISIBLE_DEVICES): 0 without a CUDA build, a driver or a GPU, with the reason in `why`.
int cuda_device_count(std::string* why = nullptr);

// Blocks until the work this thread has queued on d has finished (CUDA: the thread's stream on
// that GPU). CPU work is finished when its call returns: nothing to wait for.
void device_sync(const Device& d);

// A point in the work this thread has queued on a device: record() sets it, wait() (from any
// thread) blocks until everything queued before it has finished. A CPU mark is always reached.
class StreamMark {
 public:
  StreamMark() = default;
  ~StreamMark();
  StreamMark(StreamMark&& o) noexcept;
  StreamMark& operator=(StreamMark&&) = delete;
  StreamMark(const StreamMark&) = delete;
  void record(const Device& d);
  void wait() const;

 private:
  void* event_ = nullptr;  // cudaEvent_t, made on first use on a GPU
  int device_ = -1;
};

}  // namespace dpt

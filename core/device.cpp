#include "core/device.h"

#include <charconv>
#include <utility>

#include "core/cuda_check.h"
#include "core/error.h"

namespace dpt {

static int parse_index(std::string_view digits, std::string_view whole) {
  int v = -1;
  auto [p, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), v);
  DPT_CHECK(ec == std::errc() && p == digits.data() + digits.size() && v >= 0 && v < 4096,
            UsageError, "bad device '", whole,
            "': the index after ':' must be a number from 0 to 4095 (e.g. cpu:1, cuda:0)");
  return v;
}

Device Device::parse(std::string_view s) {
  auto colon = s.find(':');
  std::string_view kind = s.substr(0, colon);
  Device d;
  if (kind == "cpu") {
    d.type = DeviceType::CPU;
  } else if (kind == "cuda" || kind == "gpu") {
    d.type = DeviceType::CUDA;
  } else {
    DPT_THROW(UsageError, "bad device '", s, "': expected cpu, cpu:N, cuda or cuda:N");
  }
  if (colon != std::string_view::npos) d.index = parse_index(s.substr(colon + 1), s);
  return d;
}

std::string Device::str() const {
  return std::string(is_cpu() ? "cpu" : "cuda") + ":" + std::to_string(index);
}

std::vector<Device> parse_devices(std::string_view list) {
  std::vector<Device> out;
  DPT_CHECK(!list.empty(), UsageError, "empty device list: give e.g. --devices cpu or cpu:0,cpu:1");
  if (list == "auto") {
    for (int i = 0; device_available(Device::cuda(i)); ++i) out.push_back(Device::cuda(i));
    if (out.empty()) out = {Device::cpu(0), Device::cpu(1)};
    return out;
  }
  size_t start = 0;
  while (start <= list.size()) {
    size_t comma = list.find(',', start);
    std::string_view item =
        list.substr(start, comma == std::string_view::npos ? list.npos : comma - start);
    auto star = item.find('*');
    if (star != std::string_view::npos) {
      Device base = Device::parse(item.substr(0, star));
      int n = parse_index(item.substr(star + 1), item);
      DPT_CHECK(n >= 1, UsageError, "bad device count in '", item, "': need at least 1");
      for (int i = 0; i < n; ++i) out.push_back({base.type, i});
    } else {
      out.push_back(Device::parse(item));
    }
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  for (size_t i = 0; i < out.size(); ++i)
    for (size_t j = i + 1; j < out.size(); ++j)
      DPT_CHECK(!(out[i] == out[j]), UsageError, "device ", out[i].str(), " is listed twice");
  return out;
}

}  // namespace dpt

namespace dpt {

int cuda_device_count(std::string* why) {
#ifdef DPTRAIN_HAVE_CUDA
  int n = 0;
  const cudaError_t rc = cudaGetDeviceCount(&n);
  if (rc != cudaSuccess) {
    if (why) *why = std::string("no usable CUDA GPU (") + cudaGetErrorString(rc) + ")";
    return 0;
  }
  if (n == 0 && why) *why = "no CUDA GPU visible";
  return n;
#else
  if (why) *why = "this build of dptrain has no CUDA support (CUDA toolkit and NCCL not found)";
  return 0;
#endif
}

bool device_available(const Device& d, std::string* why) {
  if (d.is_cpu()) return true;
  std::string reason;
  const int n = cuda_device_count(&reason);
  if (n == 0) {
    reason = "device " + d.str() + " is unavailable: " + reason;
  } else if (d.index >= n) {
    reason = "device " + d.str() + " does not exist: " + std::to_string(n) + " GPU(s) visible";
  } else {
#ifdef DPTRAIN_WITH_CUDA
    return true;
#else
    reason = "device " + d.str() +
             " is unavailable: this build of dptrain has no CUDA kernels (nvcc or cuDNN were not "
             "found when it was built)";
#endif
  }
  if (why) *why = reason;
  return false;
}

void device_sync(const Device& d) {
#ifdef DPTRAIN_HAVE_CUDA
  if (d.is_cuda()) {
    DPT_CUDA(cudaSetDevice(d.index));
    DPT_CUDA(cudaStreamSynchronize(cudaStreamPerThread));
  }
#else
  (void)d;
#endif
}

StreamMark::StreamMark(StreamMark&& o) noexcept
    : event_(std::exchange(o.event_, nullptr)), device_(o.device_) {}

StreamMark::~StreamMark() {
#ifdef DPTRAIN_HAVE_CUDA
  if (event_) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
#endif
}

void StreamMark::record(const Device& d) {
#ifdef DPTRAIN_HAVE_CUDA
  if (d.is_cuda()) {
    DPT_CUDA(cudaSetDevice(d.index));
    if (event_ && device_ != d.index) {
      DPT_CUDA(cudaEventDestroy(static_cast<cudaEvent_t>(event_)));
      event_ = nullptr;
    }
    if (!event_) {
      cudaEvent_t e;
      DPT_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      event_ = e;
      device_ = d.index;
    }
    DPT_CUDA(cudaEventRecord(static_cast<cudaEvent_t>(event_), cudaStreamPerThread));
    return;
  }
#endif
  DPT_ASSERT(d.is_cpu(), "a stream mark on ", d.str(), " needs CUDA support");
  device_ = -1;
}

void StreamMark::wait() const {
#ifdef DPTRAIN_HAVE_CUDA
  if (device_ >= 0) DPT_CUDA(cudaEventSynchronize(static_cast<cudaEvent_t>(event_)));
#endif
}

}  // namespace dpt

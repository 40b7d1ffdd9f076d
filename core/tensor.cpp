#include "core/tensor.h"

#include "core/allocator.h"
#include "core/cuda_check.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>

namespace dpt {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    DPT_CHECK(d >= 0, ConfigError, "negative dimension in shape ", shape_str(s));
    DPT_CHECK(d == 0 || n <= (int64_t(1) << 62) / d, ConfigError, "shape ", shape_str(s),
              " has too many elements");
    n *= d;
  }
  return n;
}

namespace {
std::atomic<int64_t> host_in_use{0}, host_peak{0};
size_t host_rounded(size_t bytes) {
  return (bytes + 63) / 64 * 64;
}
}  // namespace

HostMemory host_tensor_memory() {
  return {host_in_use.load(), host_peak.load()};
}
void reset_host_peak() {
  host_peak = host_in_use.load();
}

void* device_alloc(const Device& d, size_t bytes) {
  if (d.is_cuda()) {
    std::string why;
    const int n = cuda_device_count(&why);
    DPT_CHECK(d.index < n, DeviceError, "cannot allocate on ", d.str(), ": ",
              n == 0 ? why : std::to_string(n) + " GPU(s) visible");
    // A thread that allocated device memory hands its cache back when it ends.
    thread_local const struct ReleaseAtExit {
      ~ReleaseAtExit() { cuda_allocator().release_thread(); }
    } release_at_exit;
    (void)release_at_exit;
    return cuda_allocator().allocate(d.index, bytes);
  }
  if (bytes == 0) return nullptr;
  const size_t rounded = host_rounded(bytes);
  void* p = std::aligned_alloc(64, rounded);
  DPT_CHECK(p != nullptr, Error, "out of host memory allocating ", bytes, " bytes on ", d.str());
  const int64_t now = host_in_use += int64_t(rounded);
  for (int64_t seen = host_peak.load();
       now > seen && !host_peak.compare_exchange_weak(seen, now);) {
  }
  return p;
}

void device_free(const Device& d, void* p, size_t bytes) noexcept {
  if (d.is_cuda()) {
    if (p) cuda_allocator().deallocate(d.index, p);
    return;
  }
  if (p) host_in_use -= int64_t(host_rounded(bytes));
  std::free(p);
}

void device_copy(const Device& dst_dev, void* dst, const Device& src_dev, const void* src,
                 size_t bytes) {
  if (!bytes) return;
#ifdef DPTRAIN_HAVE_CUDA
  if (dst_dev.is_cuda() && src_dev.is_cuda() && dst_dev.index != src_dev.index) {
    // Between two GPUs: ordered after the work queued on both devices before it and before the
    // work queued on either after it (the host does not wait).
    DPT_CUDA(cudaMemcpyPeer(dst, dst_dev.index, src, src_dev.index, bytes));
    return;
  }
  if (dst_dev.is_cuda() || src_dev.is_cuda()) {  // unified addressing: the runtime knows where
    // On the device whose kernels produced the source (else the destination's): cudaMemcpy runs
    // on that device's legacy stream, which waits for its per-thread streams' work.
    DPT_CUDA(cudaSetDevice(src_dev.is_cuda() ? src_dev.index : dst_dev.index));
    DPT_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
    return;
  }
#endif
  DPT_ASSERT(dst_dev.is_cpu() && src_dev.is_cpu(), "copy between ", src_dev.str(), " and ",
             dst_dev.str(), " needs CUDA support");
  std::memcpy(dst, src, bytes);
}

void device_zero(const Device& d, void* p, size_t bytes) {
  if (!bytes) return;
#ifdef DPTRAIN_HAVE_CUDA
  if (d.is_cuda()) {
    DPT_CUDA(cudaSetDevice(d.index));
    DPT_CUDA(cudaMemset(p, 0, bytes));
    return;
  }
#endif
  DPT_ASSERT(d.is_cpu(), "zeroing on ", d.str(), " needs CUDA support");
  std::memset(p, 0, bytes);
}

namespace {
// Page-locked host memory in gpu's context, or nullptr when no GPU is usable (or it cannot be
// had).
void* pinned_alloc(size_t bytes, int gpu) {
#ifdef DPTRAIN_HAVE_CUDA
  static const int count = cuda_device_count();
  void* p = nullptr;
  if (bytes > 0 && gpu < count && cudaSetDevice(gpu) == cudaSuccess &&
      cudaHostAlloc(&p, bytes, cudaHostAllocPortable) == cudaSuccess)
    return p;
  if (count > 0) cudaGetLastError();  // not sticky; cleared so that later calls do not see it
#endif
  (void)bytes, (void)gpu;
  return nullptr;
}
}  // namespace

Storage::Storage(const Device& d, size_t bytes, const Device& pin_for)
    : device_(d), bytes_(bytes), data_(nullptr) {
  DPT_ASSERT(pin_for.is_cpu() || d.is_cpu(), "pinned memory is host memory, not ", d.str());
  if (pin_for.is_cuda()) data_ = pinned_alloc(bytes, pin_for.index);
  pinned_ = data_ != nullptr;
  if (!pinned_) data_ = device_alloc(d, bytes);
}
Storage::~Storage() {
#ifdef DPTRAIN_HAVE_CUDA
  if (pinned_) {
    cudaFreeHost(data_);
    return;
  }
#endif
  device_free(device_, data_, bytes_);
}

Tensor::Tensor(Shape shape, DType dtype, Device device)
    : Tensor(std::move(shape), dtype, device, Device::cpu()) {}

Tensor::Tensor(Shape shape, DType dtype, Device device, const Device& pin_for)
    : shape_(std::move(shape)), numel_(shape_numel(shape_)), dtype_(dtype) {
  storage_ = std::make_shared<Storage>(device, size_t(numel_) * dtype_size(dtype), pin_for);
}

Tensor Tensor::pinned(Shape shape, const Device& gpu, DType dtype) {
  DPT_ASSERT(gpu.is_cuda(), "pinned memory is for a CUDA device, not ", gpu.str());
  return Tensor(std::move(shape), dtype, Device::cpu(), gpu);
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) {
  Tensor t(std::move(shape), dtype, device);
  t.zero_();
  return t;
}

Tensor Tensor::full(Shape shape, float value, Device device) {
  Tensor t(std::move(shape), DType::F32, Device::cpu());
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = value;
  return device.is_cpu() ? std::move(t) : t.to(device);
}

Tensor Tensor::from_vector(Shape shape, const std::vector<float>& values) {
  Tensor t(std::move(shape));
  DPT_CHECK(int64_t(values.size()) == t.numel(), ConfigError, "from_vector: ", values.size(),
            " values for shape ", shape_str(t.shape()));
  std::memcpy(t.raw(), values.data(), t.nbytes());
  return t;
}

const Device& Tensor::device() const {
  static const Device kCpu = Device::cpu();
  return storage_ ? storage_->device() : kCpu;
}

Tensor Tensor::clone() const {
  return to(device());
}

Tensor Tensor::share() const {
  Tensor t;
  t.shape_ = shape_;
  t.numel_ = numel_;
  t.dtype_ = dtype_;
  t.channels_last_ = channels_last_;
  t.offset_ = offset_;
  t.storage_ = storage_;
  return t;
}

Tensor& Tensor::set_channels_last(bool on) {
  DPT_ASSERT(!on || shape_.size() == 4, "channels-last needs a 4-D tensor, not ",
             shape_str(shape_));
  channels_last_ = on;
  return *this;
}

Tensor Tensor::reshape(Shape shape) const {
  DPT_CHECK(shape_numel(shape) == numel_, ConfigError, "cannot reshape ", shape_str(shape_), " to ",
            shape_str(shape));
  DPT_ASSERT(!channels_last_, "reshape of a channels-last tensor");
  Tensor t = share();
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::view(int64_t start, Shape shape) const {
  const int64_t n = shape_numel(shape);
  DPT_ASSERT(defined() && start >= 0 && n <= numel_ - start, "view of ", n, " elements at ", start,
             " in a tensor of ", numel_);
  DPT_ASSERT(!channels_last_, "view of a channels-last tensor");
  Tensor t = share();
  t.shape_ = std::move(shape);
  t.numel_ = n;
  t.offset_ += size_t(start) * dtype_size(dtype_);
  return t;
}

Tensor Tensor::to(const Device& d) const {
  DPT_ASSERT(defined(), "to() on an undefined tensor");
  Tensor t(shape_, dtype_, d);
  t.channels_last_ = channels_last_;
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(DType target) const {
  DPT_ASSERT(device().is_cpu(), "dtype conversion runs on cpu");
  if (target == dtype_) return clone();
  std::vector<float> v = to_vector();
  Tensor t(shape_, target, Device::cpu());
  t.channels_last_ = channels_last_;
  for (int64_t i = 0; i < numel_; ++i) {
    switch (target) {
      case DType::F32:
        t.data<float>()[i] = v[i];
        break;
      case DType::F16:
        t.data<uint16_t>()[i] = float_to_f16(v[i]);
        break;
      case DType::BF16:
        t.data<uint16_t>()[i] = float_to_bf16(v[i]);
        break;
      case DType::I64:
        t.data<int64_t>()[i] = int64_t(v[i]);
        break;
    }
  }
  return t;
}

void Tensor::copy_from(const Tensor& src) {
  DPT_CHECK(src.shape_ == shape_ && src.dtype_ == dtype_, ConfigError,
            "copy_from: ", shape_str(src.shape_), " ", dtype_name(src.dtype_), " into ",
            shape_str(shape_), " ", dtype_name(dtype_));
  DPT_ASSERT(src.channels_last_ == channels_last_, "copy_from between memory formats: use cast");
  if (src.raw() == raw()) return;
  device_copy(device(), raw(), src.device(), src.raw(), nbytes());
}

void Tensor::zero_() {
  device_zero(device(), raw(), nbytes());
}

void Tensor::check_type(DType t) const {
  DPT_ASSERT(dtype_ == t, "tensor of dtype ", dtype_name(dtype_), " accessed as ", dtype_name(t));
}

float Tensor::at(int64_t i) const {
  DPT_ASSERT(device().is_cpu() && i >= 0 && i < numel_, "at(", i, ") out of range");
  return data<float>()[i];
}

std::vector<float> Tensor::to_vector() const {
  if (!device().is_cpu()) return to(Device::cpu()).to_vector();
  std::vector<float> v(static_cast<size_t>(numel_));
  for (int64_t i = 0; i < numel_; ++i) {
    switch (dtype_) {
      case DType::F32:
        v[i] = data<float>()[i];
        break;
      case DType::F16:
        v[i] = f16_to_float(data<uint16_t>()[i]);
        break;
      case DType::BF16:
        v[i] = bf16_to_float(data<uint16_t>()[i]);
        break;
      case DType::I64:
        v[i] = float(data<int64_t>()[i]);
        break;
    }
  }
  return v;
}

double relative_error(const Tensor& a, const Tensor& b) {
  DPT_CHECK(a.shape() == b.shape(), ConfigError, "relative_error: shapes ", shape_str(a.shape()),
            " and ", shape_str(b.shape()), " differ");
  std::vector<float> x = a.to_vector(), y = b.to_vector();
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    double d = double(x[i]) - double(y[i]);
    num += d * d;
    den += double(y[i]) * double(y[i]);
  }
  if (den == 0) return std::sqrt(num);
  return std::sqrt(num / den);
}

}  // namespace dpt

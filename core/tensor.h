// Tensor: a dense, contiguous, row-major array of one dtype on one device.
//
// A Tensor owns its storage through the device's allocator. It is move-only: a deep copy is
// clone() or to(), and share() is the explicit way to keep a second handle on the same storage
// (used to save activations for backward without copying them).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "core/device.h"
#include "core/dtype.h"
#include "core/error.h"

namespace dpt {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
// Product of dims; throws ConfigError on a negative dim or overflow past 2^62 elements.
int64_t shape_numel(const Shape& s);

// Device memory primitives: the one place that knows how to allocate and copy per device.
void* device_alloc(const Device& d, size_t bytes);
void device_free(const Device& d, void* p, size_t bytes) noexcept;
void device_copy(const Device& dst_dev, void* dst, const Device& src_dev, const void* src,
                 size_t bytes);
void device_zero(const Device& d, void* p, size_t bytes);

// Host (CPU) tensor memory, counted as device_alloc hands it out: bytes in use now, and the most
// in use at once since the process started or reset_host_peak() (page-locked batches excluded).
struct HostMemory {
  int64_t in_use = 0, peak = 0;
};
HostMemory host_tensor_memory();
void reset_host_peak();

class Storage {
 public:
  // pin_for (host memory only): a CUDA device, for page-locked memory in its context
  // (cudaHostAlloc) when a GPU is usable, else ordinary memory.
  Storage(const Device& d, size_t bytes, const Device& pin_for = Device::cpu());
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  const Device& device() const { return device_; }
  bool pinned() const { return pinned_; }

 private:
  Device device_;
  size_t bytes_;
  bool pinned_ = false;
  void* data_;
};

class Tensor {
 public:
  Tensor() = default;
  Tensor(Shape shape, DType dtype = DType::F32, Device device = Device::cpu());  // uninitialised
  static Tensor zeros(Shape shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor full(Shape shape, float value, Device device = Device::cpu());
  static Tensor from_vector(Shape shape, const std::vector<float>& values);
  // A host tensor in page-locked memory, for batches bound for GPU `gpu`: copies from it run at
  // full bus speed without a staging copy. The memory belongs to gpu's CUDA context, which becomes
  // the calling thread's current device (so that no context is made on another GPU). Without a
  // usable GPU it is ordinary host memory.
  static Tensor pinned(Shape shape, const Device& gpu, DType dtype = DType::F32);
  bool is_pinned() const { return storage_ && storage_->pinned(); }

  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  Tensor clone() const;               // deep copy on the same device
  Tensor share() const;               // second handle on the same storage (no copy)
  Tensor reshape(Shape shape) const;  // shares storage; numel must match
  // Elements [start, start + numel(shape)) of this tensor as a tensor of `shape` sharing its
  // storage (DataParallel lays the gradients out as views into its all-reduce buckets).
  Tensor view(int64_t start, Shape shape) const;
  Tensor to(const Device& d) const;   // deep copy to another device
  Tensor to(DType t) const;           // converted deep copy (CPU)
  void copy_from(const Tensor& src);  // same shape and dtype, any devices
  void zero_();

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_.at(i < 0 ? i + int(shape_.size()) : i); }
  int ndim() const { return int(shape_.size()); }
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return size_t(numel_) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  // Channels-last (PyTorch's memory format of that name): a 4-D tensor of logical shape
  // [N, C, H, W] whose values are stored in N, H, W, C order, as tensor-core convolutions want
  // their activations. Metadata only: set it on a tensor about to be written in that order.
  // share() and clone() keep it; to_vector() gives the values in storage order.
  bool channels_last() const { return channels_last_; }
  Tensor& set_channels_last(bool on);
  const Device& device() const;
  bool same_storage(const Tensor& o) const { return storage_ == o.storage_; }
  // No other handle shares this tensor's storage (a buffer that can be reused).
  bool sole_owner() const { return storage_ && storage_.use_count() == 1; }

  void* raw() const { return storage_ ? static_cast<char*>(storage_->data()) + offset_ : nullptr; }
  template <typename T>
  T* data() const {
    if constexpr (std::is_same_v<T, float>)
      check_type(DType::F32);
    else if constexpr (std::is_same_v<T, int64_t>)
      check_type(DType::I64);
    else
      static_assert(std::is_same_v<T, uint16_t>, "float, int64_t or uint16_t");
    if constexpr (std::is_same_v<T, uint16_t>)
      DPT_ASSERT(dtype_ == DType::F16 || dtype_ == DType::BF16, "tensor is not 16-bit");
    return static_cast<T*>(raw());
  }
  // Host-side element access for tests and small tensors (CPU float32 only).
  float at(int64_t i) const;
  std::vector<float> to_vector() const;  // float32 view of the values, from any device/dtype

 private:
  Tensor(Shape shape, DType dtype, Device device, const Device& pin_for);
  void check_type(DType t) const;
  Shape shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::F32;
  bool channels_last_ = false;
  size_t offset_ = 0;  // bytes into storage_
  std::shared_ptr<Storage> storage_;
};

// Relative error ||a - b|| / ||b|| (float32 values; shapes must match).
double relative_error(const Tensor& a, const Tensor& b);

}  // namespace dpt

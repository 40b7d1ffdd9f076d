// CUDA mixed-precision helpers (math in kernels/amp.h): in place, grid-stride loops. scale_check_
// raises one device flag for all its tensors and reads it back once.
#include "kernels/amp.h"
#include "kernels/cuda/common.h"

namespace dpt::cuda {
namespace {

template <typename T>
__global__ void round_kernel(float* x, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    x[i] = ld(st<T>(x[i]));
}

template <typename From, typename To>
__global__ void cast_kernel(const From* s, To* d, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    d[i] = st<To>(ld(s[i]));
}

// The same between memory formats: d[i] from the element of s at the same logical [n, c, p],
// to_last telling which side is channels-last.
template <typename From, typename To>
__global__ void reorder_kernel(const From* s, To* d, int64_t C, int64_t P, int64_t n,
                               bool to_last) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t j;      // the source index
    if (to_last) {  // i = (b*P + p)*C + c  <-  j = (b*C + c)*P + p
      const int64_t c = i % C, bp = i / C;
      j = ((bp / P) * C + c) * P + bp % P;
    } else {  // i = (b*C + c)*P + p  <-  j = (b*P + p)*C + c
      const int64_t p = i % P, bc = i / P;
      j = ((bc / C) * P + p) * C + bc % C;
    }
    d[i] = st<To>(ld(s[j]));
  }
}

__global__ void scale_check_kernel(float* x, int64_t n, float factor, int* found) {
  int bad = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    bad |= int(!isfinite(x[i]));
    x[i] *= factor;
  }
  if (bad) *found = 1;  // a benign race: every writer writes 1
}

}  // namespace

void round_(Tensor& x, DType t) {
  check_f32_cuda(x, "round_");
  DPT_ASSERT(t == DType::F16 || t == DType::BF16, "round_ to ", dtype_name(t));
  const int64_t n = x.numel();
  if (n == 0) return;
  DPT_CUDA(cudaSetDevice(x.device().index));
  with_type(t, [&](auto type) {
    using T = typename decltype(type)::type;
    round_kernel<T><<<blocks_for(n), kThreads, 0, cudaStreamPerThread>>>(x.data<float>(), n);
  });
  check_launch("round_");
}

void cast(const Tensor& src, Tensor& dst) {
  DPT_ASSERT(src.shape() == dst.shape() && src.device() == dst.device() && src.device().is_cuda(),
             "cast: shapes or devices differ");
  const int64_t n = src.numel();
  if (n == 0) return;
  DPT_CUDA(cudaSetDevice(src.device().index));
  const bool reorder = src.channels_last() != dst.channels_last();
  with_type(src.dtype(), [&](auto from) {
    with_type(dst.dtype(), [&](auto to) {
      using From = typename decltype(from)::type;
      using To = typename decltype(to)::type;
      if (reorder)
        reorder_kernel<<<blocks_for(n), kThreads, 0, cudaStreamPerThread>>>(
            ptr<const From>(src), ptr<To>(dst), src.dim(1), src.dim(2) * src.dim(3), n,
            dst.channels_last());
      else
        cast_kernel<<<blocks_for(n), kThreads, 0, cudaStreamPerThread>>>(ptr<const From>(src),
                                                                         ptr<To>(dst), n);
    });
  });
  check_launch("cast");
}

bool scale_check_(const std::vector<Tensor*>& ts, float factor) {
  const Device dev = ts[0]->device();
  DPT_CUDA(cudaSetDevice(dev.index));
  Tensor flag = Tensor::zeros({1}, DType::I64, dev);  // the int at its start is the flag
  for (Tensor* t : ts) {
    check_operands("scale_check_", {ts[0], t});
    const int64_t n = t->numel();
    if (n == 0) continue;
    scale_check_kernel<<<blocks_for(n), kThreads, 0, cudaStreamPerThread>>>(
        t->data<float>(), n, factor, static_cast<int*>(flag.raw()));
    check_launch("scale_check_");
  }
  return flag.to(Device::cpu()).data<int64_t>()[0] != 0;
}

}  // namespace dpt::cuda

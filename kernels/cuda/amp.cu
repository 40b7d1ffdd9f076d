// CUDA mixed-precision helpers (math in kernels/amp.h): in place, grid-stride loops. scale_check_
// raises one device flag for all its tensors and reads it back once.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/amp.h"
#include "kernels/cuda/common.h"

namespace dpt::cuda {
namespace {

template <bool half>
__global__ void round_kernel(float* x, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    if constexpr (half)
      x[i] = __half2float(__float2half_rn(x[i]));
    else
      x[i] = __bfloat162float(__float2bfloat16_rn(x[i]));
  }
}

// dst = src, converted between float32 and a 16-bit format (to nearest even).
__device__ inline void convert(float v, __half& d) {
  d = __float2half_rn(v);
}
__device__ inline void convert(float v, __nv_bfloat16& d) {
  d = __float2bfloat16_rn(v);
}
__device__ inline void convert(__half v, float& d) {
  d = __half2float(v);
}
__device__ inline void convert(__nv_bfloat16 v, float& d) {
  d = __bfloat162float(v);
}

template <typename From, typename To>
__global__ void cast_kernel(const From* s, To* d, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    convert(s[i], d[i]);
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
  if (t == DType::F16)
    round_kernel<true><<<blocks_for(n), kThreads, 0, cudaStreamPerThread>>>(x.data<float>(), n);
  else
    round_kernel<false><<<blocks_for(n), kThreads, 0, cudaStreamPerThread>>>(x.data<float>(), n);
  check_launch("round_");
}

void cast(const Tensor& src, Tensor& dst) {
  DPT_ASSERT(src.shape() == dst.shape() && src.device() == dst.device() && src.device().is_cuda(),
             "cast: shapes or devices differ");
  const int64_t n = src.numel();
  if (n == 0) return;
  DPT_CUDA(cudaSetDevice(src.device().index));
  const unsigned blocks = blocks_for(n);
  const DType from = src.dtype(), to = dst.dtype();
  if (from == DType::F32 && to == DType::F16)
    cast_kernel<<<blocks, kThreads, 0, cudaStreamPerThread>>>(static_cast<const float*>(src.raw()),
                                                              static_cast<__half*>(dst.raw()), n);
  else if (from == DType::F32 && to == DType::BF16)
    cast_kernel<<<blocks, kThreads, 0, cudaStreamPerThread>>>(
        static_cast<const float*>(src.raw()), static_cast<__nv_bfloat16*>(dst.raw()), n);
  else if (from == DType::F16 && to == DType::F32)
    cast_kernel<<<blocks, kThreads, 0, cudaStreamPerThread>>>(static_cast<const __half*>(src.raw()),
                                                              static_cast<float*>(dst.raw()), n);
  else if (from == DType::BF16 && to == DType::F32)
    cast_kernel<<<blocks, kThreads, 0, cudaStreamPerThread>>>(
        static_cast<const __nv_bfloat16*>(src.raw()), static_cast<float*>(dst.raw()), n);
  else
    DPT_ASSERT(false, "cast from ", dtype_name(from), " to ", dtype_name(to));
  check_launch("cast");
}

bool scale_check_(const std::vector<Tensor*>& ts, float factor) {
  const Device dev = ts[0]->device();
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

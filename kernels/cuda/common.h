// Shared pieces of the CUDA backend: checking macros for cuDNN and cuBLAS (DPT_CUDA is in
// core/cuda_check.h), cuBLAS loaded on first use, the library handles and launch geometry.
//
// Every op runs on the calling thread's per-thread default stream (cudaStreamPerThread) of the
// tensor's device. Each thread that runs ops keeps its own cuDNN and cuBLAS handles per device,
// created on first use, bound to that stream, destroyed when the thread ends. A thread per
// replica (DataParallel) therefore never shares a handle or a stream with another.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cudnn.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "core/cuda_check.h"
#include "core/tensor.h"

#define DPT_CUDNN(call)                                                       \
  do {                                                                        \
    const cudnnStatus_t dpt_cudnn_rc = (call);                                \
    DPT_CHECK(dpt_cudnn_rc == CUDNN_STATUS_SUCCESS, DeviceError, #call, ": ", \
              cudnnGetErrorString(dpt_cudnn_rc));                             \
  } while (0)

#define DPT_CUBLAS(call)                                                        \
  do {                                                                          \
    const cublasStatus_t dpt_cublas_rc = (call);                                \
    DPT_CHECK(dpt_cublas_rc == CUBLAS_STATUS_SUCCESS, DeviceError, #call, ": ", \
              ::dpt::cuda::cublas().status_string(dpt_cublas_rc));              \
  } while (0)

namespace dpt::cuda {

// cuBLAS, loaded with dlopen when a GPU first needs it: linking it would make every start of
// every dptrain binary map and relocate cuBLASLt (about 0.4 s and 200 MB here, GPU or not).
struct CublasApi {
  decltype(&cublasCreate) create;
  decltype(&cublasDestroy) destroy;
  decltype(&cublasSetStream) set_stream;
  decltype(&cublasSetMathMode) set_math_mode;
  decltype(&cublasSgemm) sgemm;
  decltype(&cublasGetStatusString) status_string;
};
// DeviceError naming the library when it cannot be loaded.
const CublasApi& cublas();

struct Handles {
  cudnnHandle_t cudnn = nullptr;
  cublasHandle_t cublas = nullptr;
};

// Makes t's device current and returns this thread's handles for it.
Handles& handles_for(const Tensor& t);

inline constexpr int kThreads = 256;
inline unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return unsigned(b < 65535 * 32 ? (b < 1 ? 1 : b) : 65535 * 32);
}

// Checks the launch that just happened (bad configuration, missing kernel image).
void check_launch(const char* what);

inline void check_f32_cuda(const Tensor& t, const char* what) {
  DPT_ASSERT(t.defined() && t.dtype() == DType::F32 && t.device().is_cuda(), what,
             " must be a defined float32 cuda tensor");
}
// Activations are float32, or 16-bit when a model trains in fp16/bf16 (kernels/amp.h). Kernels
// templated on the element type T load them as float (ld), compute in float and round to nearest
// even as they store (st<T>); with_type(dtype, f) calls f(Type<T>{}) for the dtype's T.
#if defined(__CUDACC__) || defined(DPTRAIN_CUDA_EMULATED)
__device__ inline float ld(float v) {
  return v;
}
__device__ inline float ld(__half v) {
  return __half2float(v);
}
__device__ inline float ld(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ inline T st(float v) {
  if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(v);
  else
    return v;
}
#endif
template <typename T>
struct Type {
  using type = T;
};
template <typename F>
void with_type(DType t, F&& f) {
  switch (t) {
    case DType::F32:
      return f(Type<float>{});
    case DType::F16:
      return f(Type<__half>{});
    case DType::BF16:
      return f(Type<__nv_bfloat16>{});
    default:
      DPT_ASSERT(false, "not a floating-point dtype: ", dtype_name(t));
  }
}
template <typename T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.raw());
}
// Every operand a float32, float16 or bfloat16 tensor of the first one's dtype, memory format and
// device.
inline void check_activations(const char* op, std::initializer_list<const Tensor*> ts) {
  const Tensor* first = *ts.begin();
  for (const Tensor* t : ts) {
    DPT_ASSERT(
        t->defined() && t->device().is_cuda() && t->device() == first->device() &&
            t->dtype() == first->dtype() && t->channels_last() == first->channels_last() &&
            (t->dtype() == DType::F32 || t->dtype() == DType::F16 || t->dtype() == DType::BF16),
        op, ": operands must be float tensors of one dtype and layout on one cuda device");
  }
}

// Every operand a float32 tensor on the first one's device.
inline void check_operands(const char* op, std::initializer_list<const Tensor*> ts) {
  const Tensor* first = *ts.begin();
  for (const Tensor* t : ts) {
    check_f32_cuda(*t, op);
    DPT_ASSERT(t->device() == first->device(), op, ": operands on ", first->device().str(), " and ",
               t->device().str());
  }
}

}  // namespace dpt::cuda

// DPT_CUDA(call): a CUDA runtime call whose failure throws DeviceError with the call, the CUDA
// error string and file:line. Only for builds with DPTRAIN_HAVE_CUDA.
#pragma once

#ifdef DPTRAIN_HAVE_CUDA
#include <cuda_runtime.h>

#include "core/error.h"

#define DPT_CUDA(call)                                              \
  do {                                                              \
    const cudaError_t dpt_cuda_rc = (call);                         \
    DPT_CHECK(dpt_cuda_rc == cudaSuccess, DeviceError, #call, ": ", \
              cudaGetErrorString(dpt_cuda_rc));                     \
  } while (0)
#endif

// Per-thread, per-device cuDNN and cuBLAS handles bound to the per-thread default stream.
#include <memory>
#include <vector>

#include "kernels/cuda/common.h"

namespace dpt::cuda {
namespace {

struct HandleSet {
  Handles h;
  ~HandleSet() {  // at thread exit; the CUDA context may already be gone, so nothing is checked
    if (h.cudnn) cudnnDestroy(h.cudnn);
    if (h.cublas) cublasDestroy(h.cublas);
  }
};

}  // namespace

Handles& handles_for(const Tensor& t) {
  const int dev = t.device().index;
  DPT_CUDA(cudaSetDevice(dev));
  thread_local std::vector<std::unique_ptr<HandleSet>> sets;
  if (int(sets.size()) <= dev) sets.resize(size_t(dev) + 1);
  auto& s = sets[size_t(dev)];
  if (!s) {
    auto fresh = std::make_unique<HandleSet>();
    DPT_CUDNN(cudnnCreate(&fresh->h.cudnn));
    DPT_CUDNN(cudnnSetStream(fresh->h.cudnn, cudaStreamPerThread));
    DPT_CUBLAS(cublasCreate(&fresh->h.cublas));
    DPT_CUBLAS(cublasSetStream(fresh->h.cublas, cudaStreamPerThread));
    // fp32 stays fp32 (no TF32) unless a precision mode asks for it.
    DPT_CUBLAS(cublasSetMathMode(fresh->h.cublas, CUBLAS_PEDANTIC_MATH));
    s = std::move(fresh);
  }
  return s->h;
}

void check_launch(const char* what) {
  const cudaError_t rc = cudaGetLastError();
  DPT_CHECK(rc == cudaSuccess, DeviceError, "launch of ", what, ": ", cudaGetErrorString(rc));
}

}  // namespace dpt::cuda

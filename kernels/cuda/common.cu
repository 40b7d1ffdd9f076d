// cuBLAS loaded on first use, and per-thread, per-device cuDNN and cuBLAS handles bound to the
// per-thread default stream.
#include <dlfcn.h>

#include <memory>
#include <string>
#include <vector>

#include "kernels/cuda/common.h"

namespace dpt::cuda {
namespace {

struct HandleSet {
  Handles h;
  ~HandleSet() {  // at thread exit; the CUDA context may already be gone, so nothing is checked
    if (h.cudnn) cudnnDestroy(h.cudnn);
    if (h.cublas) cublas().destroy(h.cublas);
  }
};

template <typename F>
void bind(void* lib, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  DPT_CHECK(fn, DeviceError, "libcublas.so.", CUBLAS_VER_MAJOR, " has no ", name, ": ", dlerror());
}

}  // namespace

const CublasApi& cublas() {
  static const CublasApi api = [] {
    const std::string name = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
    void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    DPT_CHECK(lib, DeviceError, "cannot load ", name,
              " (cuBLAS, for linear layers on GPUs): ", dlerror(),
              "; put its directory on LD_LIBRARY_PATH");
    CublasApi a{};
    bind(lib, "cublasCreate_v2", a.create);
    bind(lib, "cublasDestroy_v2", a.destroy);
    bind(lib, "cublasSetStream_v2", a.set_stream);
    bind(lib, "cublasSetMathMode", a.set_math_mode);
    bind(lib, "cublasSgemm_v2", a.sgemm);
    bind(lib, "cublasGetStatusString", a.status_string);
    return a;  // the library stays loaded for the life of the process
  }();
  return api;
}

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
    DPT_CUBLAS(cublas().create(&fresh->h.cublas));
    DPT_CUBLAS(cublas().set_stream(fresh->h.cublas, cudaStreamPerThread));
    // fp32 stays fp32: the default math runs cublasSgemm without TF32 (that takes
    // CUBLAS_TF32_TENSOR_OP_MATH), and without the pedantic mode's slower debugging kernels.
    DPT_CUBLAS(cublas().set_math_mode(fresh->h.cublas, CUBLAS_DEFAULT_MATH));
    s = std::move(fresh);
  }
  return s->h;
}

void check_launch(const char* what) {
  const cudaError_t rc = cudaGetLastError();
  DPT_CHECK(rc == cudaSuccess, DeviceError, "launch of ", what, ": ", cudaGetErrorString(rc));
}

}  // namespace dpt::cuda

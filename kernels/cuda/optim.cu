// CUDA SGD step with PyTorch's update rule (see kernels/optim.h); p and buf updated in place.
#include "kernels/cuda/common.h"
#include "kernels/optim.h"

namespace dpt::cuda {
namespace {

__global__ void sgd(float* p, const float* grad, float* buf, int64_t n, SgdParams h, bool first) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = sgd_update(p[i], grad[i], buf ? buf + i : nullptr, h, first);
}

}  // namespace

void sgd_step(Tensor& p, const Tensor& grad, Tensor& buf, const SgdParams& h, bool first_step) {
  check_operands("sgd_step", {&p, &grad});
  if (h.momentum != 0) check_operands("sgd_step", {&p, &buf});
  DPT_ASSERT(grad.numel() == p.numel(), "sgd: grad shape");
  const int64_t n = p.numel();
  if (n == 0) return;
  DPT_CUDA(cudaSetDevice(p.device().index));
  sgd<<<blocks_for(n), kThreads, 0, cudaStreamPerThread>>>(
      p.data<float>(), grad.data<float>(), h.momentum != 0 ? buf.data<float>() : nullptr, n, h,
      first_step);
  check_launch("sgd_step");
}

}  // namespace dpt::cuda

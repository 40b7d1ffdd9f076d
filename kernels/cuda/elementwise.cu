// CUDA elementwise ops (math in kernels/elementwise.h), in place, grid-stride loops.
#include "kernels/cuda/common.h"
#include "kernels/elementwise.h"

namespace dpt::cuda {
namespace {

enum class Op { Relu, ReluBackward, Add, AddRelu };

template <Op op>
__global__ void each(float* y, const float* x, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float a = y[i];
    if constexpr (op == Op::Relu) y[i] = a > 0 ? a : 0.0f;
    if constexpr (op == Op::ReluBackward) y[i] = x[i] > 0 ? a : 0.0f;
    if constexpr (op == Op::Add) y[i] = a + x[i];
    if constexpr (op == Op::AddRelu) y[i] = a + x[i] > 0 ? a + x[i] : 0.0f;
  }
}

template <Op op>
void run(Tensor& y, const Tensor* x, const char* name) {
  check_f32_cuda(y, name);
  if (x) check_operands(name, {&y, x});
  DPT_ASSERT(!x || x->numel() == y.numel(), name, ": ", shape_str(y.shape()), " vs ",
             x ? shape_str(x->shape()) : "");
  const int64_t n = y.numel();
  if (n == 0) return;
  DPT_CUDA(cudaSetDevice(y.device().index));
  each<op><<<blocks_for(n), kThreads, 0, cudaStreamPerThread>>>(y.data<float>(),
                                                                x ? x->data<float>() : nullptr, n);
  check_launch(name);
}

}  // namespace

void relu_(Tensor& x) {
  run<Op::Relu>(x, nullptr, "relu_");
}
void relu_backward_(Tensor& g, const Tensor& y) {
  run<Op::ReluBackward>(g, &y, "relu_backward_");
}
void add_(Tensor& y, const Tensor& x) {
  run<Op::Add>(y, &x, "add_");
}
void add_relu_(Tensor& y, const Tensor& x) {
  run<Op::AddRelu>(y, &x, "add_relu_");
}

}  // namespace dpt::cuda

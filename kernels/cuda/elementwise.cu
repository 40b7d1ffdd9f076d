// CUDA elementwise ops (math in kernels/elementwise.h), in place, grid-stride loops, on float32
// or 16-bit operands (computed in float, rounded as stored).
#include "kernels/cuda/common.h"
#include "kernels/elementwise.h"

namespace dpt::cuda {
namespace {

enum class Op { Relu, ReluBackward, Add, AddRelu };

template <Op op, typename T>
__global__ void each(T* y, const T* x, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float a = ld(y[i]);
    if constexpr (op == Op::Relu) y[i] = st<T>(a > 0 ? a : 0.0f);
    if constexpr (op == Op::ReluBackward) y[i] = st<T>(ld(x[i]) > 0 ? a : 0.0f);
    if constexpr (op == Op::Add) y[i] = st<T>(a + ld(x[i]));
    if constexpr (op == Op::AddRelu) y[i] = st<T>(a + ld(x[i]) > 0 ? a + ld(x[i]) : 0.0f);
  }
}

template <Op op>
void run(Tensor& y, const Tensor* x, const char* name) {
  check_activations(name, {&y});
  if (x) check_activations(name, {&y, x});
  DPT_ASSERT(!x || x->numel() == y.numel(), name, ": ", shape_str(y.shape()), " vs ",
             x ? shape_str(x->shape()) : "");
  const int64_t n = y.numel();
  if (n == 0) return;
  DPT_CUDA(cudaSetDevice(y.device().index));
  with_type(y.dtype(), [&](auto type) {
    using T = typename decltype(type)::type;
    each<op, T><<<blocks_for(n), kThreads, 0, cudaStreamPerThread>>>(ptr<T>(y),
                                                                     x ? ptr<T>(*x) : nullptr, n);
  });
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

// CUDA fully connected layer on cuBLAS (math in kernels/linear.h). cuBLAS is column-major: a
// row-major [r, c] matrix is its [c, r] transpose, so y = x w^T (row-major) is computed as
// y^T = w x^T. dw and db accumulate (beta = 1); dx is overwritten.
#include "kernels/cuda/common.h"
#include "kernels/linear.h"

namespace dpt::cuda {
namespace {

// y[n, o] = b[o] (broadcast before the GEMM adds x w^T)
__global__ void fill_bias(float* y, const float* b, int64_t N, int64_t O) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < N * O;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = b[i % O];
}

// db[o] += sum_n dy[n, o]
__global__ void sum_rows(const float* dy, float* db, int64_t N, int64_t O) {
  for (int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; o < O;
       o += int64_t(gridDim.x) * blockDim.x) {
    float s = 0;
    for (int64_t n = 0; n < N; ++n) s += dy[n * O + o];
    db[o] += s;
  }
}

}  // namespace

void linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y) {
  check_operands("linear_forward", {&x, &w, &b, &y});
  const int64_t N = x.dim(0), I = x.dim(1), O = w.dim(0);
  DPT_ASSERT(w.dim(1) == I && b.numel() == O && y.shape() == Shape({N, O}), "linear: shapes");
  Handles& h = handles_for(x);
  fill_bias<<<blocks_for(N * O), kThreads, 0, cudaStreamPerThread>>>(y.data<float>(),
                                                                     b.data<float>(), N, O);
  check_launch("linear bias");
  const float one = 1.0f;
  // y^T [O, N] = w [O, I] (col-major view: w^T [I, O] transposed) * x^T [I, N]
  DPT_CUBLAS(cublas().sgemm(h.cublas, CUBLAS_OP_T, CUBLAS_OP_N, int(O), int(N), int(I), &one,
                            w.data<float>(), int(I), x.data<float>(), int(I), &one, y.data<float>(),
                            int(O)));
}

void linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx, Tensor& dw,
                     Tensor& db) {
  check_operands("linear_backward", {&x, &dy, &w, &dw, &db});
  if (dx) check_operands("linear_backward", {&x, dx});
  const int64_t N = x.dim(0), I = x.dim(1), O = w.dim(0);
  Handles& h = handles_for(x);
  const float one = 1.0f, zero = 0.0f;
  // dw [O, I] += dy^T [O, N] x [N, I]; column-major: dw^T [I, O] += x^T [I, N] * dy [N, O]
  DPT_CUBLAS(cublas().sgemm(h.cublas, CUBLAS_OP_N, CUBLAS_OP_T, int(I), int(O), int(N), &one,
                            x.data<float>(), int(I), dy.data<float>(), int(O), &one,
                            dw.data<float>(), int(I)));
  sum_rows<<<blocks_for(O), kThreads, 0, cudaStreamPerThread>>>(dy.data<float>(), db.data<float>(),
                                                                N, O);
  check_launch("linear db");
  // dx [N, I] = dy [N, O] w [O, I]; column-major: dx^T [I, N] = w^T [I, O] * dy^T [O, N]
  if (dx)
    DPT_CUBLAS(cublas().sgemm(h.cublas, CUBLAS_OP_N, CUBLAS_OP_N, int(I), int(N), int(O), &one,
                              w.data<float>(), int(I), dy.data<float>(), int(O), &zero,
                              dx->data<float>(), int(I)));
}

}  // namespace dpt::cuda

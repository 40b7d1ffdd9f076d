// CPU fully connected layer on Eigen GEMMs (math in kernels/linear.h).
#include "kernels/linear.h"

#include "kernels/cpu/common.h"

namespace dpt::cpu {

void linear_forward(const Tensor& x, const Tensor& w, const Tensor& b, Tensor& y) {
  check_f32_cpu(x, "linear x");
  const int64_t N = x.dim(0), I = x.dim(1), O = w.dim(0);
  DPT_ASSERT(w.dim(1) == I && b.numel() == O && y.shape() == Shape({N, O}), "linear: shapes");
  MatMap Y(y.data<float>(), N, O);
  Y.noalias() = ConstMatMap(x.data<float>(), N, I) * ConstMatMap(w.data<float>(), O, I).transpose();
  Y.rowwise() += ConstVecMap(b.data<float>(), O).transpose();
}

void linear_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx, Tensor& dw,
                     Tensor& db) {
  const int64_t N = x.dim(0), I = x.dim(1), O = w.dim(0);
  ConstMatMap dY(dy.data<float>(), N, O);
  MatMap(dw.data<float>(), O, I).noalias() += dY.transpose() * ConstMatMap(x.data<float>(), N, I);
  VecMap(db.data<float>(), O) += dY.colwise().sum().transpose();
  if (dx) MatMap(dx->data<float>(), N, I).noalias() = dY * ConstMatMap(w.data<float>(), O, I);
}

}  // namespace dpt::cpu

// CUDA convolution on cuDNN (math in kernels/conv.h): forward, backward-data (dx overwritten,
// skipped when null) and backward-filter (dw accumulated). The precision (kernels/conv.h) picks
// cuDNN's math: FP32 its FMA math (no TF32), comparable with the CPU engine; TF32 its default
// math (tensor cores on Ampere and later); FP16 and BF16 tensor-core math with float32 sums
// (cuDNN's pseudo-half configurations) on 16-bit operands: the activations themselves when they
// are stored in 16 bits (x, y, dy, dx), else 16-bit copies cast back afterwards; the weights
// through a 16-bit copy, dw's 16-bit part added to it. The descriptors and the algorithm of each
// shape and math are made once (the algorithm by cuDNN's heuristics: the fastest deterministic one
// that fits the workspace limit) and cached per thread; the workspace is a per-thread, per-device
// buffer that grows as needed.
#include <array>
#include <map>
#include <memory>
#include <vector>

#include "kernels/conv.h"
#include "kernels/cuda/common.h"
#include "kernels/elementwise.h"

namespace dpt::cuda {
namespace {

constexpr size_t kWorkspaceLimit = size_t(1) << 30;

struct Descriptors {
  cudnnTensorDescriptor_t x = nullptr, y = nullptr;
  cudnnFilterDescriptor_t w = nullptr;
  cudnnConvolutionDescriptor_t conv = nullptr;
  Descriptors(const Tensor& xt, const Tensor& wt, const Tensor& yt, const Conv2dParams& p,
              bool nhwc) {
    DPT_CUDNN(cudnnCreateTensorDescriptor(&x));
    DPT_CUDNN(cudnnCreateTensorDescriptor(&y));
    DPT_CUDNN(cudnnCreateFilterDescriptor(&w));
    DPT_CUDNN(cudnnCreateConvolutionDescriptor(&conv));
    const cudnnDataType_t t = p.precision == Precision::FP16   ? CUDNN_DATA_HALF
                              : p.precision == Precision::BF16 ? CUDNN_DATA_BFLOAT16
                                                               : CUDNN_DATA_FLOAT;
    const cudnnTensorFormat_t f = nhwc ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
    DPT_CUDNN(cudnnSetTensor4dDescriptor(x, f, t, int(xt.dim(0)), int(xt.dim(1)), int(xt.dim(2)),
                                         int(xt.dim(3))));
    DPT_CUDNN(cudnnSetTensor4dDescriptor(y, f, t, int(yt.dim(0)), int(yt.dim(1)), int(yt.dim(2)),
                                         int(yt.dim(3))));
    DPT_CUDNN(cudnnSetFilter4dDescriptor(w, t, f, int(wt.dim(0)), int(wt.dim(1)), int(wt.dim(2)),
                                         int(wt.dim(3))));
    DPT_CUDNN(cudnnSetConvolution2dDescriptor(conv, p.pad, p.pad, p.stride, p.stride, 1, 1,
                                              CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
    const cudnnMathType_t math = p.precision == Precision::FP32   ? CUDNN_FMA_MATH
                                 : p.precision == Precision::TF32 ? CUDNN_DEFAULT_MATH
                                                                  : CUDNN_TENSOR_OP_MATH;
    DPT_CUDNN(cudnnSetConvolutionMathType(conv, math));
  }
  ~Descriptors() {
    cudnnDestroyTensorDescriptor(x);
    cudnnDestroyTensorDescriptor(y);
    cudnnDestroyFilterDescriptor(w);
    cudnnDestroyConvolutionDescriptor(conv);
  }
  Descriptors(const Descriptors&) = delete;
  Descriptors& operator=(const Descriptors&) = delete;
};

// Shape key: device, N, C, H, W, K, R, S, stride, pad, precision, channels-last.
using Key = std::array<int64_t, 12>;
Key key_of(const Tensor& x, const Tensor& w, const Conv2dParams& p, bool nhwc) {
  return {x.device().index, x.dim(0), x.dim(1), x.dim(2), x.dim(3),         w.dim(0),
          w.dim(2),         w.dim(3), p.stride, p.pad,    int(p.precision), int(nhwc)};
}

// What cuDNN reads for operand t in dtype fmt and memory format nhwc (t itself if it is stored so,
// else a converted copy kept in `copy`; the weights, [K, C, R, S], channels-last are cuDNN's
// NHWC filter layout), and where it writes an output t (t itself if it is stored so, else a
// `copy` to cast into t afterwards).
bool stored_as(const Tensor& t, DType fmt, bool nhwc) {
  return t.dtype() == fmt && t.channels_last() == nhwc;
}
const void* input_of(const Tensor& t, DType fmt, bool nhwc, Tensor& copy) {
  if (stored_as(t, fmt, nhwc)) return t.raw();
  copy = dpt::cast_to(t, fmt, nhwc);
  return copy.raw();
}
void* output_of(Tensor& t, DType fmt, bool nhwc, Tensor& copy) {
  if (stored_as(t, fmt, nhwc)) return t.raw();
  copy = Tensor(t.shape(), fmt, t.device());
  copy.set_channels_last(nhwc);
  return copy.raw();
}

// The activations float32 or 16-bit, each on the weight's device (float32).
void check(const char* op, std::initializer_list<const Tensor*> acts, const Tensor& w) {
  check_operands(op, {&w});
  for (const Tensor* a : acts) {
    check_activations(op, {a});
    DPT_ASSERT(a->device() == w.device(), op, ": operands on ", a->device().str(), " and ",
               w.device().str());
  }
}

// The algorithm of each direction, chosen when first needed (the stem never needs
// backward-data), with its workspace size.
struct Algos {
  bool have_fwd = false, have_data = false, have_filter = false;
  cudnnConvolutionFwdAlgo_t fwd{};
  cudnnConvolutionBwdDataAlgo_t bwd_data{};
  cudnnConvolutionBwdFilterAlgo_t bwd_filter{};
  size_t fwd_ws = 0, data_ws = 0, filter_ws = 0;
};

// The first (fastest by cuDNN's heuristics) deterministic algorithm that succeeds within the
// workspace limit, so that a rerun or a resume on the same GPU repeats every bit (the backward
// algorithms that sum with atomics do not); a non-deterministic one only if no other works.
template <typename Perf>
const Perf& pick(const std::vector<Perf>& perf, int n, const char* what) {
  for (const bool deterministic_only : {true, false})
    for (int i = 0; i < n; ++i) {
      const Perf& p = perf[size_t(i)];
      if (p.status == CUDNN_STATUS_SUCCESS && p.memory <= kWorkspaceLimit &&
          (!deterministic_only || p.determinism == CUDNN_DETERMINISTIC))
        return p;
    }
  DPT_THROW(
      DeviceError, "cuDNN offers no ", what,
      " algorithm for this convolution in this precision (bf16 needs an Ampere or later GPU)");
}

// This thread's descriptors and algorithms for the convolution of x by w into y.
struct Plan {
  std::unique_ptr<Descriptors> d;
  Algos a;
};
Plan& plan_for(const Tensor& x, const Tensor& w, const Tensor& y, const Conv2dParams& p,
               bool nhwc) {
  thread_local std::map<Key, Plan> cache;
  Plan& plan = cache[key_of(x, w, p, nhwc)];
  if (!plan.d) plan.d = std::make_unique<Descriptors>(x, w, y, p, nhwc);
  return plan;
}

void choose_fwd(cudnnHandle_t h, const Descriptors& d, Algos& a) {
  if (a.have_fwd) return;
  int n = 0;
  std::vector<cudnnConvolutionFwdAlgoPerf_t> f(CUDNN_CONVOLUTION_FWD_ALGO_COUNT);
  DPT_CUDNN(cudnnGetConvolutionForwardAlgorithm_v7(h, d.x, d.w, d.conv, d.y, int(f.size()), &n,
                                                   f.data()));
  a.fwd = pick(f, n, "forward").algo;
  DPT_CUDNN(cudnnGetConvolutionForwardWorkspaceSize(h, d.x, d.w, d.conv, d.y, a.fwd, &a.fwd_ws));
  a.have_fwd = true;
}

void choose_data(cudnnHandle_t h, const Descriptors& d, Algos& a) {
  if (a.have_data) return;
  int n = 0;
  std::vector<cudnnConvolutionBwdDataAlgoPerf_t> f(CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT);
  DPT_CUDNN(cudnnGetConvolutionBackwardDataAlgorithm_v7(h, d.w, d.y, d.conv, d.x, int(f.size()), &n,
                                                        f.data()));
  a.bwd_data = pick(f, n, "backward-data").algo;
  DPT_CUDNN(cudnnGetConvolutionBackwardDataWorkspaceSize(h, d.w, d.y, d.conv, d.x, a.bwd_data,
                                                         &a.data_ws));
  a.have_data = true;
}

void choose_filter(cudnnHandle_t h, const Descriptors& d, Algos& a) {
  if (a.have_filter) return;
  int n = 0;
  std::vector<cudnnConvolutionBwdFilterAlgoPerf_t> f(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT);
  DPT_CUDNN(cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, d.x, d.y, d.conv, d.w, int(f.size()),
                                                          &n, f.data()));
  a.bwd_filter = pick(f, n, "backward-filter").algo;
  DPT_CUDNN(cudnnGetConvolutionBackwardFilterWorkspaceSize(h, d.x, d.y, d.conv, d.w, a.bwd_filter,
                                                           &a.filter_ws));
  a.have_filter = true;
}

// This thread's workspace on device dev, at least `bytes` long.
void* workspace(int dev, size_t bytes) {
  thread_local std::map<int, Tensor> buffers;
  Tensor& t = buffers[dev];
  if (bytes == 0) return nullptr;
  if (!t.defined() || t.nbytes() < bytes)
    t = Tensor({int64_t((bytes + 3) / 4)}, DType::F32, Device::cuda(dev));
  return t.raw();
}

}  // namespace

// Convolutions run in their output's memory format (y forward, dy backward): channels-last
// activations make cuDNN's NHWC tensor-core kernels usable without transposes.
void conv2d_forward(const Tensor& x, const Tensor& w, Tensor& y, const Conv2dParams& p) {
  check("conv2d_forward", {&x, &y}, w);
  Handles& h = handles_for(x);
  const bool nhwc = y.channels_last();
  Plan& plan = plan_for(x, w, y, p, nhwc);
  const Descriptors& d = *plan.d;
  Algos& a = plan.a;
  choose_fwd(h.cudnn, d, a);
  const float one = 1.0f, zero = 0.0f;
  const DType fmt = rounding_of(p.precision);  // F16/BF16: cuDNN works on 16-bit operands
  Tensor xh, wh, yh;
  DPT_CUDNN(cudnnConvolutionForward(h.cudnn, &one, d.x, input_of(x, fmt, nhwc, xh), d.w,
                                    input_of(w, fmt, nhwc, wh), d.conv, a.fwd,
                                    workspace(x.device().index, a.fwd_ws), a.fwd_ws, &zero, d.y,
                                    output_of(y, fmt, nhwc, yh)));
  if (yh.defined()) cuda::cast(yh, y);
}

void conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx, Tensor& dw,
                     const Conv2dParams& p) {
  check("conv2d_backward", {&x, &dy}, w);
  check_operands("conv2d_backward", {&w, &dw});
  if (dx) check("conv2d_backward", {dx}, w);
  Handles& h = handles_for(x);
  const bool nhwc = dy.channels_last();
  Plan& plan = plan_for(x, w, dy, p, nhwc);
  const Descriptors& d = *plan.d;
  Algos& a = plan.a;
  const float one = 1.0f, zero = 0.0f;
  const int dev = x.device().index;
  const DType fmt = rounding_of(p.precision);  // F16/BF16: cuDNN works on 16-bit operands
  Tensor dyh, xh, wh, dwh, dxh;
  const void* dyp = input_of(dy, fmt, nhwc, dyh);
  choose_filter(h.cudnn, d, a);
  // dw is accumulated in place when cuDNN can write it (float32, NCHW); otherwise this call's
  // part (beta 0) goes to a copy that is cast back and added.
  void* dwp = output_of(dw, fmt, nhwc, dwh);
  DPT_CUDNN(cudnnConvolutionBackwardFilter(h.cudnn, &one, d.x, input_of(x, fmt, nhwc, xh), d.y, dyp,
                                           d.conv, a.bwd_filter, workspace(dev, a.filter_ws),
                                           a.filter_ws, dwh.defined() ? &zero : &one, d.w, dwp));
  if (dwh.defined()) {
    Tensor part(dw.shape(), DType::F32, dw.device());
    cuda::cast(dwh, part);
    cuda::add_(dw, part);
  }
  if (!dx) return;
  choose_data(h.cudnn, d, a);
  DPT_CUDNN(cudnnConvolutionBackwardData(h.cudnn, &one, d.w, input_of(w, fmt, nhwc, wh), d.y, dyp,
                                         d.conv, a.bwd_data, workspace(dev, a.data_ws), a.data_ws,
                                         &zero, d.x, output_of(*dx, fmt, nhwc, dxh)));
  if (dxh.defined()) cuda::cast(dxh, *dx);
}

}  // namespace dpt::cuda

// CUDA convolution on cuDNN (math in kernels/conv.h): forward, backward-data (dx overwritten,
// skipped when null) and backward-filter (dw accumulated: beta = 1). fp32 with FMA math (no
// TF32), comparable with the CPU engine, unless p.tf32 lets cuDNN use tensor cores (its default
// math: TF32 on Ampere and later). The descriptors and the algorithm of each shape and math are
// made once (the algorithm by cuDNN's heuristics: the fastest that fits the workspace limit) and
// cached per thread; the workspace is a per-thread, per-device buffer that grows as needed.
#include <array>
#include <map>
#include <memory>
#include <vector>

#include "kernels/conv.h"
#include "kernels/cuda/common.h"

namespace dpt::cuda {
namespace {

constexpr size_t kWorkspaceLimit = size_t(1) << 30;

struct Descriptors {
  cudnnTensorDescriptor_t x = nullptr, y = nullptr;
  cudnnFilterDescriptor_t w = nullptr;
  cudnnConvolutionDescriptor_t conv = nullptr;
  Descriptors(const Tensor& xt, const Tensor& wt, const Tensor& yt, const Conv2dParams& p) {
    DPT_CUDNN(cudnnCreateTensorDescriptor(&x));
    DPT_CUDNN(cudnnCreateTensorDescriptor(&y));
    DPT_CUDNN(cudnnCreateFilterDescriptor(&w));
    DPT_CUDNN(cudnnCreateConvolutionDescriptor(&conv));
    DPT_CUDNN(cudnnSetTensor4dDescriptor(x, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, int(xt.dim(0)),
                                         int(xt.dim(1)), int(xt.dim(2)), int(xt.dim(3))));
    DPT_CUDNN(cudnnSetTensor4dDescriptor(y, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, int(yt.dim(0)),
                                         int(yt.dim(1)), int(yt.dim(2)), int(yt.dim(3))));
    DPT_CUDNN(cudnnSetFilter4dDescriptor(w, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NCHW, int(wt.dim(0)),
                                         int(wt.dim(1)), int(wt.dim(2)), int(wt.dim(3))));
    DPT_CUDNN(cudnnSetConvolution2dDescriptor(conv, p.pad, p.pad, p.stride, p.stride, 1, 1,
                                              CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
    DPT_CUDNN(cudnnSetConvolutionMathType(conv, p.tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH));
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

// Shape key: device, N, C, H, W, K, R, S, stride, pad, tf32.
using Key = std::array<int64_t, 11>;
Key key_of(const Tensor& x, const Tensor& w, const Conv2dParams& p) {
  return {x.device().index, x.dim(0), x.dim(1), x.dim(2), x.dim(3), w.dim(0),
          w.dim(2),         w.dim(3), p.stride, p.pad,    p.tf32};
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

// The first (fastest by cuDNN's heuristics) algorithm that succeeds within the workspace limit.
template <typename Perf>
const Perf& pick(const std::vector<Perf>& perf, int n, const char* what) {
  for (int i = 0; i < n; ++i)
    if (perf[size_t(i)].status == CUDNN_STATUS_SUCCESS && perf[size_t(i)].memory <= kWorkspaceLimit)
      return perf[size_t(i)];
  DPT_THROW(DeviceError, "cuDNN offers no ", what, " algorithm for this convolution");
}

// This thread's descriptors and algorithms for the convolution of x by w into y.
struct Plan {
  std::unique_ptr<Descriptors> d;
  Algos a;
};
Plan& plan_for(const Tensor& x, const Tensor& w, const Tensor& y, const Conv2dParams& p) {
  thread_local std::map<Key, Plan> cache;
  Plan& plan = cache[key_of(x, w, p)];
  if (!plan.d) plan.d = std::make_unique<Descriptors>(x, w, y, p);
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

void conv2d_forward(const Tensor& x, const Tensor& w, Tensor& y, const Conv2dParams& p) {
  check_operands("conv2d_forward", {&x, &w, &y});
  Handles& h = handles_for(x);
  Plan& plan = plan_for(x, w, y, p);
  const Descriptors& d = *plan.d;
  Algos& a = plan.a;
  choose_fwd(h.cudnn, d, a);
  const float one = 1.0f, zero = 0.0f;
  DPT_CUDNN(cudnnConvolutionForward(h.cudnn, &one, d.x, x.raw(), d.w, w.raw(), d.conv, a.fwd,
                                    workspace(x.device().index, a.fwd_ws), a.fwd_ws, &zero, d.y,
                                    y.raw()));
}

void conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx, Tensor& dw,
                     const Conv2dParams& p) {
  check_operands("conv2d_backward", {&x, &dy, &w, &dw});
  if (dx) check_operands("conv2d_backward", {&x, dx});
  Handles& h = handles_for(x);
  Plan& plan = plan_for(x, w, dy, p);
  const Descriptors& d = *plan.d;
  Algos& a = plan.a;
  const float one = 1.0f, zero = 0.0f;
  const int dev = x.device().index;
  choose_filter(h.cudnn, d, a);
  DPT_CUDNN(cudnnConvolutionBackwardFilter(h.cudnn, &one, d.x, x.raw(), d.y, dy.raw(), d.conv,
                                           a.bwd_filter, workspace(dev, a.filter_ws), a.filter_ws,
                                           &one, d.w, dw.raw()));
  if (!dx) return;
  choose_data(h.cudnn, d, a);
  DPT_CUDNN(cudnnConvolutionBackwardData(h.cudnn, &one, d.w, w.raw(), d.y, dy.raw(), d.conv,
                                         a.bwd_data, workspace(dev, a.data_ws), a.data_ws, &zero,
                                         d.x, dx->raw()));
}

}  // namespace dpt::cuda

// CUDA convolution on cuDNN (math in kernels/conv.h): forward, backward-data (dx overwritten,
// skipped when null) and backward-filter (dw accumulated). The precision (kernels/conv.h) picks
// cuDNN's math: FP32 its FMA math (no TF32), comparable with the CPU engine; TF32 its default
// math (tensor cores on Ampere and later); FP16 and BF16 tensor-core math with float32 sums
// (cuDNN's pseudo-half configurations) on 16-bit operands: the activations themselves when they
// are stored in 16 bits (x, y, dy, dx), else 16-bit copies cast back afterwards; the weights
// through a 16-bit copy, dw's 16-bit part added to it. The descriptors and the algorithm of each
// shape and math are made once (the algorithm: the first of cuDNN's heuristic candidates that
// runs, deterministic ones first, within the workspace limit; see run_chosen) and cached per
// thread; the workspace is a per-thread, per-device buffer that grows as needed.
#include <algorithm>
#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <string>
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
  cudnnMathType_t math;  // the precision's, for cuDNN's heuristics
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
    math = p.precision == Precision::FP32   ? CUDNN_FMA_MATH
           : p.precision == Precision::TF32 ? CUDNN_DEFAULT_MATH
                                            : CUDNN_TENSOR_OP_MATH;
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

// The algorithm of one direction and the math type to run it with, chosen when first needed (the
// stem never needs backward-data), with its workspace size.
struct Choice {
  int algo = -1;  // not chosen yet
  cudnnMathType_t math = CUDNN_DEFAULT_MATH;
  size_t ws = 0;
};
struct Algos {
  Choice fwd, data, filter;
};

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

// This thread's workspace on device dev, at least `bytes` long.
void* workspace(int dev, size_t bytes) {
  thread_local std::map<int, Tensor> buffers;
  Tensor& t = buffers[dev];
  if (bytes == 0) return nullptr;
  if (!t.defined() || t.nbytes() < bytes)
    t = Tensor({int64_t((bytes + 3) / 4)}, DType::F32, Device::cuda(dev));
  return t.raw();
}

std::mutex chosen_mutex;
std::map<std::string, int64_t> chosen;  // conv_algorithms_chosen()

void note_choice(const char* what, int algo, cudnnMathType_t math, bool deterministic) {
  const char* m = math == CUDNN_FMA_MATH         ? "fma"
                  : math == CUDNN_DEFAULT_MATH   ? "default"
                  : math == CUDNN_TENSOR_OP_MATH ? "tensor-op"
                                                 : "tensor-op-conversion";
  std::lock_guard<std::mutex> lock(chosen_mutex);
  ++chosen[std::string(what) + " " + std::to_string(algo) + " " + m +
           (deterministic ? "" : " non-deterministic")];
}

// One direction's convolution, c = alpha * conv(a, b) + beta * c in cuDNN's terms (forward: x, w
// -> y; backward-data: w, dy -> dx; backward-filter: x, dy -> dw, the three calls alike), with
// its chosen algorithm, chosen on the first call: cuDNN's heuristic candidates, best first, the
// deterministic ones before the others (a rerun or a resume on the same GPU then repeats every
// bit; backward algorithms that sum with atomics do not), each with the math type cuDNN pairs it
// with (float32 keeps FMA math: no TF32) and a workspace within the limit. Heuristic statuses are
// predictions: the first candidate whose run succeeds is kept, one that fails is passed over.
template <typename A, typename B, typename C, typename Perf, typename Algo>
void convolve(Choice& ch, const Descriptors& d, cudnnHandle_t h, int dev, const char* what,
              cudnnStatus_t (*max_count)(cudnnHandle_t, int*),
              cudnnStatus_t (*heuristics)(cudnnHandle_t, A, B, cudnnConvolutionDescriptor_t, C, int,
                                          int*, Perf*),
              cudnnStatus_t (*ws_query)(cudnnHandle_t, A, B, cudnnConvolutionDescriptor_t, C, Algo,
                                        size_t*),
              cudnnStatus_t (*run)(cudnnHandle_t, const void*, A, const void*, B, const void*,
                                   cudnnConvolutionDescriptor_t, Algo, void*, size_t, const void*,
                                   C, void*),
              A a, const void* ap, B b, const void* bp, C c, void* cp, float beta) {
  const float one = 1.0f;
  if (ch.algo >= 0) {  // the descriptor serves the three directions: its math is set each time
    DPT_CUDNN(cudnnSetConvolutionMathType(d.conv, ch.math));
    DPT_CUDNN(run(h, &one, a, ap, b, bp, d.conv, Algo(ch.algo), workspace(dev, ch.ws), ch.ws, &beta,
                  c, cp));
    return;
  }
  DPT_CUDNN(cudnnSetConvolutionMathType(d.conv, d.math));
  int cap = 0, n = 0;
  DPT_CUDNN(max_count(h, &cap));
  std::vector<Perf> perf(size_t(std::max(cap, 1)));
  DPT_CUDNN(heuristics(h, a, b, d.conv, c, int(perf.size()), &n, perf.data()));
  perf.resize(size_t(std::clamp(n, 0, int(perf.size()))));
  std::stable_partition(perf.begin(), perf.end(),
                        [](const Perf& p) { return p.determinism == CUDNN_DETERMINISTIC; });
  cudnnStatus_t last = CUDNN_STATUS_NOT_SUPPORTED;
  for (const Perf& p : perf) {
    const cudnnMathType_t math = d.math == CUDNN_FMA_MATH ? CUDNN_FMA_MATH : p.mathType;
    size_t ws = 0;
    if (p.status != CUDNN_STATUS_SUCCESS ||
        cudnnSetConvolutionMathType(d.conv, math) != CUDNN_STATUS_SUCCESS ||
        ws_query(h, a, b, d.conv, c, p.algo, &ws) != CUDNN_STATUS_SUCCESS || ws > kWorkspaceLimit)
      continue;
    void* buffer = nullptr;
    try {
      buffer = workspace(dev, ws);
    } catch (const DeviceError&) {  // out of memory for this one: perhaps not for the next
      continue;
    }
    last = run(h, &one, a, ap, b, bp, d.conv, p.algo, buffer, ws, &beta, c, cp);
    if (last == CUDNN_STATUS_SUCCESS) {
      ch = {int(p.algo), math, ws};
      note_choice(what, ch.algo, math, p.determinism == CUDNN_DETERMINISTIC);
      return;
    }
    cudaGetLastError();  // a launch that failed inside cuDNN: not the next kernel's error
  }
  DPT_THROW(DeviceError, "cuDNN runs no ", what,
            " algorithm for this convolution in this precision (the last tried: ",
            cudnnGetErrorString(last), "; bf16 needs an Ampere or later GPU)");
}

}  // namespace

std::map<std::string, int64_t> conv_algorithms_chosen() {
  std::lock_guard<std::mutex> lock(chosen_mutex);
  return chosen;
}

// Convolutions run in their output's memory format (y forward, dy backward): channels-last
// activations make cuDNN's NHWC tensor-core kernels usable without transposes.
void conv2d_forward(const Tensor& x, const Tensor& w, Tensor& y, const Conv2dParams& p) {
  check("conv2d_forward", {&x, &y}, w);
  cudnnHandle_t h = handles_for(x).cudnn;  // the device set, before any cast runs
  const bool nhwc = y.channels_last();
  Plan& plan = plan_for(x, w, y, p, nhwc);
  const Descriptors& d = *plan.d;
  const DType fmt = rounding_of(p.precision);  // F16/BF16: cuDNN works on 16-bit operands
  Tensor xh, wh, yh;
  convolve(plan.a.fwd, d, h, x.device().index, "forward",
           cudnnGetConvolutionForwardAlgorithmMaxCount, cudnnGetConvolutionForwardAlgorithm_v7,
           cudnnGetConvolutionForwardWorkspaceSize, cudnnConvolutionForward, d.x,
           input_of(x, fmt, nhwc, xh), d.w, input_of(w, fmt, nhwc, wh), d.y,
           output_of(y, fmt, nhwc, yh), 0.0f);
  if (yh.defined()) cuda::cast(yh, y);
}

void conv2d_backward(const Tensor& dy, const Tensor& x, const Tensor& w, Tensor* dx, Tensor& dw,
                     const Conv2dParams& p) {
  check("conv2d_backward", {&x, &dy}, w);
  check_operands("conv2d_backward", {&w, &dw});
  if (dx) check("conv2d_backward", {dx}, w);
  cudnnHandle_t h = handles_for(x).cudnn;
  const bool nhwc = dy.channels_last();
  Plan& plan = plan_for(x, w, dy, p, nhwc);
  const Descriptors& d = *plan.d;
  const int dev = x.device().index;
  const DType fmt = rounding_of(p.precision);  // F16/BF16: cuDNN works on 16-bit operands
  Tensor dyh, xh, wh, dwh, dxh;
  const void* dyp = input_of(dy, fmt, nhwc, dyh);
  // dw is accumulated in place when cuDNN can write it (float32, NCHW); otherwise this call's
  // part (beta 0) goes to a copy that is cast back and added.
  void* dwp = output_of(dw, fmt, nhwc, dwh);
  convolve(plan.a.filter, d, h, dev, "backward-filter",
           cudnnGetConvolutionBackwardFilterAlgorithmMaxCount,
           cudnnGetConvolutionBackwardFilterAlgorithm_v7,
           cudnnGetConvolutionBackwardFilterWorkspaceSize, cudnnConvolutionBackwardFilter, d.x,
           input_of(x, fmt, nhwc, xh), d.y, dyp, d.w, dwp, dwh.defined() ? 0.0f : 1.0f);
  if (dwh.defined()) {
    Tensor part(dw.shape(), DType::F32, dw.device());
    cuda::cast(dwh, part);
    cuda::add_(dw, part);
  }
  if (!dx) return;
  convolve(plan.a.data, d, h, dev, "backward-data",
           cudnnGetConvolutionBackwardDataAlgorithmMaxCount,
           cudnnGetConvolutionBackwardDataAlgorithm_v7,
           cudnnGetConvolutionBackwardDataWorkspaceSize, cudnnConvolutionBackwardData, d.w,
           input_of(w, fmt, nhwc, wh), d.y, dyp, d.x, output_of(*dx, fmt, nhwc, dxh), 0.0f);
  if (dxh.defined()) cuda::cast(dxh, *dx);
}

}  // namespace dpt::cuda

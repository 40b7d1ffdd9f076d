// The CUDA emulator's cuDNN: the calls kernels/cuda/conv.cu makes (4-d tensor, filter and 2-d
// convolution descriptors; the _v7 algorithm queries; forward, backward-data and backward-filter
// convolution), computed on the CPU in double precision (im2col and Eigen's GEMM), apart from
// the CPU engine they are compared with. Strict where cuDNN is: every operand's dimensions, data
// type and memory format must agree with the others and with the convolution, the pointers must lie
// inside emulated device allocations of the described size, and the workspace must be at least
// the size the queries reported (4 KiB, so that a missing workspace shows).
//
// The heuristic queries offer five candidates, so that the caller's choice is exercised as the real
// library's lists would: algorithm 5 first, whose workspace query asks 2 GiB (its heuristic entry
// says 4 KiB); 0, which runs but is non-deterministic; 3,
// reported unsupported; 2, reported fine but failing to run (cuDNN's statuses are predictions);
// and 1, which works. Each comes with a math type, tensor-op math unless the descriptor asks for
// FMA math, and runs only with the descriptor set to it. Runs of 5, 0 or 3 are counted
// (dpt_emu::cudnn_unwanted_runs).
#include <cudnn.h>
#include <Eigen/Core>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tests/cuda_emu/emu.h"

struct cudnnContext {
  cudaStream_t stream = nullptr;
};
struct cudnnTensorStruct {
  cudnnTensorFormat_t format = CUDNN_TENSOR_NCHW;
  cudnnDataType_t type = CUDNN_DATA_FLOAT;
  int n = 0, c = 0, h = 0, w = 0;
  bool set = false;
};
struct cudnnFilterStruct {
  cudnnTensorFormat_t format = CUDNN_TENSOR_NCHW;
  cudnnDataType_t type = CUDNN_DATA_FLOAT;
  int k = 0, c = 0, r = 0, s = 0;
  bool set = false;
};
struct cudnnConvolutionStruct {
  int pad_h = 0, pad_w = 0, u = 1, v = 1, dil_h = 1, dil_w = 1;
  cudnnDataType_t compute = CUDNN_DATA_FLOAT;
  bool set = false;
  cudnnMathType_t math = CUDNN_DEFAULT_MATH;
};

namespace {

constexpr size_t kWorkspace = 4096, kHugeWorkspace = size_t(2) << 30;
std::atomic<int> unwanted_runs{0};
size_t workspace_of(int algo) {  // the workspace query's answer
  return algo == 5 ? kHugeWorkspace : kWorkspace;
}

// A 4-d operand: dims (n, c, h, w) in the given format, elements of the given type.
struct View {
  cudnnTensorFormat_t format;
  cudnnDataType_t type;
  int n, c, h, w;
  size_t count() const { return size_t(n) * c * h * w; }
  size_t index(int in, int ic, int ih, int iw) const {
    return format == CUDNN_TENSOR_NHWC ? ((size_t(in) * h + ih) * w + iw) * c + ic
                                       : ((size_t(in) * c + ic) * h + ih) * w + iw;
  }
  size_t bytes() const { return count() * (type == CUDNN_DATA_FLOAT ? 4 : 2); }
};
View view(const cudnnTensorStruct& t) {
  return {t.format, t.type, t.n, t.c, t.h, t.w};
}
View view(const cudnnFilterStruct& f) {
  return {f.format, f.type, f.k, f.c, f.r, f.s};
}

bool supported(cudnnDataType_t t) {
  return t == CUDNN_DATA_FLOAT || t == CUDNN_DATA_HALF || t == CUDNN_DATA_BFLOAT16;
}

float load(const void* p, cudnnDataType_t t, size_t i) {
  if (t == CUDNN_DATA_HALF) return __half2float(static_cast<const __half*>(p)[i]);
  if (t == CUDNN_DATA_BFLOAT16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}
void store(void* p, cudnnDataType_t t, size_t i, float v) {
  if (t == CUDNN_DATA_HALF)
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  else if (t == CUDNN_DATA_BFLOAT16)
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else
    static_cast<float*>(p)[i] = v;
}

// The operand as float32 in NCHW order.
std::vector<float> unpack(const View& v, const void* p) {
  std::vector<float> out(v.count());
  for (int n = 0; n < v.n; ++n)
    for (int c = 0; c < v.c; ++c)
      for (int h = 0; h < v.h; ++h)
        for (int w = 0; w < v.w; ++w)
          out[((size_t(n) * v.c + c) * v.h + h) * v.w + w] = load(p, v.type, v.index(n, c, h, w));
  return out;
}
// out = alpha * sum + beta * out, sum in NCHW order; out is not read when beta is 0.
void pack(const View& v, const std::vector<double>& sum, float alpha, float beta, void* p) {
  for (int n = 0; n < v.n; ++n)
    for (int c = 0; c < v.c; ++c)
      for (int h = 0; h < v.h; ++h)
        for (int w = 0; w < v.w; ++w) {
          const size_t i = v.index(n, c, h, w);
          double r = alpha * sum[((size_t(n) * v.c + c) * v.h + h) * v.w + w];
          if (beta != 0) r += double(beta) * load(p, v.type, i);
          store(p, v.type, i, float(r));
        }
}

// The checks cuDNN makes, and those of the emulator (pointers inside allocations).
bool consistent(const cudnnTensorStruct* x, const cudnnFilterStruct* w,
                const cudnnConvolutionStruct* cv, const cudnnTensorStruct* y) {
  if (!x || !w || !cv || !y || !x->set || !w->set || !cv->set || !y->set) return false;
  if (x->type != w->type || y->type != x->type || !supported(x->type)) return false;
  if (x->format != y->format || w->format != x->format) return false;
  if (cv->compute != CUDNN_DATA_FLOAT) return false;
  const int oh = (x->h + 2 * cv->pad_h - cv->dil_h * (w->r - 1) - 1) / cv->u + 1;
  const int ow = (x->w + 2 * cv->pad_w - cv->dil_w * (w->s - 1) - 1) / cv->v + 1;
  return x->c == w->c && y->c == w->k && y->n == x->n && y->h == oh && y->w == ow;
}
bool inside(const void* p, const View& v) {
  return p && dpt_emu::device_range(p, v.bytes());
}
bool workspace_ok(const void* ws, size_t bytes, int algo) {
  return bytes >= workspace_of(algo) && ws && dpt_emu::device_range(ws, bytes);
}

using Matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// The convolution's shape: x [N, C, H, W] by w [K, C, R, S] into y [N, K, OH, OW].
struct Shape {
  const cudnnTensorStruct &x, &y;
  const cudnnFilterStruct& w;
  const cudnnConvolutionStruct& cv;
  int64_t rows() const { return int64_t(w.c) * w.r * w.s; }  // c, r, s
  int64_t cols() const { return int64_t(x.n) * y.h * y.w; }  // n, oh, ow
  // Calls f(row, col, index in x (NCHW)) for every input value a product of the convolution
  // takes (im2col); padding takes none.
  template <typename F>
  void each(F f) const {
    for (int c = 0; c < w.c; ++c)
      for (int r = 0; r < w.r; ++r)
        for (int s = 0; s < w.s; ++s) {
          const int64_t row = (int64_t(c) * w.r + r) * w.s + s;
          for (int n = 0; n < x.n; ++n)
            for (int oh = 0; oh < y.h; ++oh) {
              const int ih = oh * cv.u - cv.pad_h + r * cv.dil_h;
              if (ih < 0 || ih >= x.h) continue;
              for (int ow = 0; ow < y.w; ++ow) {
                const int iw = ow * cv.v - cv.pad_w + s * cv.dil_w;
                if (iw >= 0 && iw < x.w)
                  f(row, (int64_t(n) * y.h + oh) * y.w + ow,
                    ((size_t(n) * x.c + c) * x.h + ih) * x.w + iw);
              }
            }
        }
  }
  Matrix columns(const std::vector<float>& xv) const {
    Matrix m = Matrix::Zero(rows(), cols());
    each([&](int64_t row, int64_t col, size_t i) { m(row, col) = xv[i]; });
    return m;
  }
  // y or dy (NCHW) as [K, N * OH * OW], and back.
  Matrix outputs(const std::vector<float>& yv) const {
    Matrix m(w.k, cols());
    const int64_t p = int64_t(y.h) * y.w;
    for (int n = 0; n < y.n; ++n)
      for (int k = 0; k < y.c; ++k)
        for (int64_t q = 0; q < p; ++q) m(k, n * p + q) = yv[(size_t(n) * y.c + k) * p + q];
    return m;
  }
  std::vector<double> nchw(const Matrix& m) const {
    std::vector<double> out(size_t(y.n) * y.c * y.h * y.w);
    const int64_t p = int64_t(y.h) * y.w;
    for (int n = 0; n < y.n; ++n)
      for (int k = 0; k < y.c; ++k)
        for (int64_t q = 0; q < p; ++q) out[(size_t(n) * y.c + k) * p + q] = m(k, n * p + q);
    return out;
  }
};

Matrix filters(const std::vector<float>& wv, const cudnnFilterStruct& w) {
  Matrix m(w.k, int64_t(w.c) * w.r * w.s);
  for (int64_t i = 0; i < m.size(); ++i) m.data()[i] = wv[size_t(i)];
  return m;
}

// The candidates (see the top), in the heuristics' order.
constexpr int kCandidates = 5;
constexpr int kOrder[kCandidates] = {5, 0, 3, 2, 1};

// The math type the candidates come with for a descriptor's math.
cudnnMathType_t paired_math(const cudnnConvolutionStruct& cv) {
  return cv.math == CUDNN_FMA_MATH ? CUDNN_FMA_MATH : CUDNN_TENSOR_OP_MATH;
}

template <typename Perf, typename Algo>
cudnnStatus_t heuristics(const cudnnConvolutionStruct& cv, int requested, int* returned,
                         Perf* perf) {
  if (requested < 1 || !returned || !perf) return CUDNN_STATUS_BAD_PARAM;
  *returned = std::min(requested, kCandidates);
  for (int i = 0; i < *returned; ++i) {
    perf[i] = Perf{};
    perf[i].algo = Algo(kOrder[i]);
    perf[i].status = kOrder[i] == 3 ? CUDNN_STATUS_NOT_SUPPORTED : CUDNN_STATUS_SUCCESS;
    perf[i].memory = kWorkspace;
    perf[i].determinism = kOrder[i] == 0 ? CUDNN_NON_DETERMINISTIC : CUDNN_DETERMINISTIC;
    perf[i].mathType = paired_math(cv);
  }
  return CUDNN_STATUS_SUCCESS;
}
// Whether algorithm `algo` runs (else the status to return), counting the unwanted runs.
cudnnStatus_t runs(int algo, const cudnnConvolutionStruct& cv) {
  if (algo == 5 || algo == 0 || algo == 3) ++unwanted_runs;
  if (algo == 2 || algo == 3 || algo < 0 || algo >= 8) return CUDNN_STATUS_NOT_SUPPORTED;
  return cv.math == paired_math(cv) ? CUDNN_STATUS_SUCCESS : CUDNN_STATUS_NOT_SUPPORTED;
}

// The handle and the descriptors: objects of the structs above.
template <typename T>
cudnnStatus_t make(T** p) {
  *p = new T;
  return CUDNN_STATUS_SUCCESS;
}
template <typename T>
cudnnStatus_t drop(T* p) {
  delete p;
  return CUDNN_STATUS_SUCCESS;
}

}  // namespace

extern "C" {

const char* cudnnGetErrorString(cudnnStatus_t s) {
  return s == CUDNN_STATUS_SUCCESS         ? "CUDNN_STATUS_SUCCESS"
         : s == CUDNN_STATUS_NOT_SUPPORTED ? "CUDNN_STATUS_NOT_SUPPORTED (emulated)"
                                           : "CUDNN_STATUS_BAD_PARAM (emulated)";
}
cudnnStatus_t cudnnCreate(cudnnHandle_t* h) {
  return make(h);
}
cudnnStatus_t cudnnDestroy(cudnnHandle_t h) {
  return drop(h);
}
cudnnStatus_t cudnnSetStream(cudnnHandle_t h, cudaStream_t s) {
  h->stream = s;
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnCreateTensorDescriptor(cudnnTensorDescriptor_t* d) {
  return make(d);
}
cudnnStatus_t cudnnDestroyTensorDescriptor(cudnnTensorDescriptor_t d) {
  return drop(d);
}
cudnnStatus_t cudnnSetTensor4dDescriptor(cudnnTensorDescriptor_t d, cudnnTensorFormat_t f,
                                         cudnnDataType_t t, int n, int c, int h, int w) {
  if (n <= 0 || c <= 0 || h <= 0 || w <= 0 || !supported(t)) return CUDNN_STATUS_BAD_PARAM;
  *d = {f, t, n, c, h, w, true};
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnCreateFilterDescriptor(cudnnFilterDescriptor_t* d) {
  return make(d);
}
cudnnStatus_t cudnnDestroyFilterDescriptor(cudnnFilterDescriptor_t d) {
  return drop(d);
}
cudnnStatus_t cudnnSetFilter4dDescriptor(cudnnFilterDescriptor_t d, cudnnDataType_t t,
                                         cudnnTensorFormat_t f, int k, int c, int r, int s) {
  if (k <= 0 || c <= 0 || r <= 0 || s <= 0 || !supported(t)) return CUDNN_STATUS_BAD_PARAM;
  *d = {f, t, k, c, r, s, true};
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnCreateConvolutionDescriptor(cudnnConvolutionDescriptor_t* d) {
  return make(d);
}
cudnnStatus_t cudnnDestroyConvolutionDescriptor(cudnnConvolutionDescriptor_t d) {
  return drop(d);
}
cudnnStatus_t cudnnSetConvolution2dDescriptor(cudnnConvolutionDescriptor_t d, int pad_h, int pad_w,
                                              int u, int v, int dil_h, int dil_w,
                                              cudnnConvolutionMode_t mode,
                                              cudnnDataType_t compute) {
  if (pad_h < 0 || pad_w < 0 || u <= 0 || v <= 0 || dil_h <= 0 || dil_w <= 0 ||
      mode != CUDNN_CROSS_CORRELATION)
    return CUDNN_STATUS_BAD_PARAM;
  *d = {pad_h, pad_w, u, v, dil_h, dil_w, compute, true};
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnSetConvolutionMathType(cudnnConvolutionDescriptor_t d, cudnnMathType_t m) {
  if (!d || (m != CUDNN_DEFAULT_MATH && m != CUDNN_TENSOR_OP_MATH && m != CUDNN_FMA_MATH))
    return CUDNN_STATUS_BAD_PARAM;
  d->math = m;
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnGetConvolutionForwardAlgorithmMaxCount(cudnnHandle_t, int* n) {
  *n = kCandidates;
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnGetConvolutionBackwardDataAlgorithmMaxCount(cudnnHandle_t, int* n) {
  *n = kCandidates;
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(cudnnHandle_t, int* n) {
  *n = kCandidates;
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnGetConvolutionForwardAlgorithm_v7(cudnnHandle_t, const cudnnTensorDescriptor_t x,
                                                     const cudnnFilterDescriptor_t w,
                                                     const cudnnConvolutionDescriptor_t cv,
                                                     const cudnnTensorDescriptor_t y, int requested,
                                                     int* returned,
                                                     cudnnConvolutionFwdAlgoPerf_t* perf) {
  if (!consistent(x, w, cv, y)) return CUDNN_STATUS_BAD_PARAM;
  return heuristics<cudnnConvolutionFwdAlgoPerf_t, cudnnConvolutionFwdAlgo_t>(*cv, requested,
                                                                              returned, perf);
}
cudnnStatus_t cudnnGetConvolutionBackwardDataAlgorithm_v7(
    cudnnHandle_t, const cudnnFilterDescriptor_t w, const cudnnTensorDescriptor_t dy,
    const cudnnConvolutionDescriptor_t cv, const cudnnTensorDescriptor_t dx, int requested,
    int* returned, cudnnConvolutionBwdDataAlgoPerf_t* perf) {
  if (!consistent(dx, w, cv, dy)) return CUDNN_STATUS_BAD_PARAM;
  return heuristics<cudnnConvolutionBwdDataAlgoPerf_t, cudnnConvolutionBwdDataAlgo_t>(
      *cv, requested, returned, perf);
}
cudnnStatus_t cudnnGetConvolutionBackwardFilterAlgorithm_v7(
    cudnnHandle_t, const cudnnTensorDescriptor_t x, const cudnnTensorDescriptor_t dy,
    const cudnnConvolutionDescriptor_t cv, const cudnnFilterDescriptor_t dw, int requested,
    int* returned, cudnnConvolutionBwdFilterAlgoPerf_t* perf) {
  if (!consistent(x, dw, cv, dy)) return CUDNN_STATUS_BAD_PARAM;
  return heuristics<cudnnConvolutionBwdFilterAlgoPerf_t, cudnnConvolutionBwdFilterAlgo_t>(
      *cv, requested, returned, perf);
}
cudnnStatus_t cudnnGetConvolutionForwardWorkspaceSize(
    cudnnHandle_t, const cudnnTensorDescriptor_t x, const cudnnFilterDescriptor_t w,
    const cudnnConvolutionDescriptor_t cv, const cudnnTensorDescriptor_t y,
    cudnnConvolutionFwdAlgo_t algo, size_t* bytes) {
  if (!consistent(x, w, cv, y)) return CUDNN_STATUS_BAD_PARAM;
  *bytes = workspace_of(algo);
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnGetConvolutionBackwardDataWorkspaceSize(
    cudnnHandle_t, const cudnnFilterDescriptor_t w, const cudnnTensorDescriptor_t dy,
    const cudnnConvolutionDescriptor_t cv, const cudnnTensorDescriptor_t dx,
    cudnnConvolutionBwdDataAlgo_t algo, size_t* bytes) {
  if (!consistent(dx, w, cv, dy)) return CUDNN_STATUS_BAD_PARAM;
  *bytes = workspace_of(algo);
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnGetConvolutionBackwardFilterWorkspaceSize(
    cudnnHandle_t, const cudnnTensorDescriptor_t x, const cudnnTensorDescriptor_t dy,
    const cudnnConvolutionDescriptor_t cv, const cudnnFilterDescriptor_t dw,
    cudnnConvolutionBwdFilterAlgo_t algo, size_t* bytes) {
  if (!consistent(x, dw, cv, dy)) return CUDNN_STATUS_BAD_PARAM;
  *bytes = workspace_of(algo);
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnConvolutionForward(cudnnHandle_t, const void* alpha,
                                      const cudnnTensorDescriptor_t xd, const void* x,
                                      const cudnnFilterDescriptor_t wd, const void* w,
                                      const cudnnConvolutionDescriptor_t cv,
                                      cudnnConvolutionFwdAlgo_t algo, void* ws, size_t ws_bytes,
                                      const void* beta, const cudnnTensorDescriptor_t yd, void* y) {
  if (!consistent(xd, wd, cv, yd) || !inside(x, view(*xd)) || !inside(w, view(*wd)) ||
      !inside(y, view(*yd)) || !workspace_ok(ws, ws_bytes, algo))
    return CUDNN_STATUS_BAD_PARAM;
  if (const cudnnStatus_t r = runs(algo, *cv); r != CUDNN_STATUS_SUCCESS) return r;
  const Shape g{*xd, *yd, *wd, *cv};
  const Matrix y_mat = filters(unpack(view(*wd), w), *wd) * g.columns(unpack(view(*xd), x));
  pack(view(*yd), g.nchw(y_mat), *static_cast<const float*>(alpha),
       *static_cast<const float*>(beta), y);
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnConvolutionBackwardData(cudnnHandle_t, const void* alpha,
                                           const cudnnFilterDescriptor_t wd, const void* w,
                                           const cudnnTensorDescriptor_t dyd, const void* dy,
                                           const cudnnConvolutionDescriptor_t cv,
                                           cudnnConvolutionBwdDataAlgo_t algo, void* ws,
                                           size_t ws_bytes, const void* beta,
                                           const cudnnTensorDescriptor_t dxd, void* dx) {
  if (!consistent(dxd, wd, cv, dyd) || !inside(w, view(*wd)) || !inside(dy, view(*dyd)) ||
      !inside(dx, view(*dxd)) || !workspace_ok(ws, ws_bytes, algo))
    return CUDNN_STATUS_BAD_PARAM;
  if (const cudnnStatus_t r = runs(algo, *cv); r != CUDNN_STATUS_SUCCESS) return r;
  const Shape g{*dxd, *dyd, *wd, *cv};
  const Matrix cols =
      filters(unpack(view(*wd), w), *wd).transpose() * g.outputs(unpack(view(*dyd), dy));
  std::vector<double> sum(view(*dxd).count(), 0.0);  // col2im
  g.each([&](int64_t row, int64_t col, size_t i) { sum[i] += cols(row, col); });
  pack(view(*dxd), sum, *static_cast<const float*>(alpha), *static_cast<const float*>(beta), dx);
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnConvolutionBackwardFilter(cudnnHandle_t, const void* alpha,
                                             const cudnnTensorDescriptor_t xd, const void* x,
                                             const cudnnTensorDescriptor_t dyd, const void* dy,
                                             const cudnnConvolutionDescriptor_t cv,
                                             cudnnConvolutionBwdFilterAlgo_t algo, void* ws,
                                             size_t ws_bytes, const void* beta,
                                             const cudnnFilterDescriptor_t dwd, void* dw) {
  if (!consistent(xd, dwd, cv, dyd) || !inside(x, view(*xd)) || !inside(dy, view(*dyd)) ||
      !inside(dw, view(*dwd)) || !workspace_ok(ws, ws_bytes, algo))
    return CUDNN_STATUS_BAD_PARAM;
  if (const cudnnStatus_t r = runs(algo, *cv); r != CUDNN_STATUS_SUCCESS) return r;
  const Shape g{*xd, *dyd, *dwd, *cv};
  const Matrix dw_mat =
      g.outputs(unpack(view(*dyd), dy)) * g.columns(unpack(view(*xd), x)).transpose();
  pack(view(*dwd), std::vector<double>(dw_mat.data(), dw_mat.data() + dw_mat.size()),
       *static_cast<const float*>(alpha), *static_cast<const float*>(beta), dw);
  return CUDNN_STATUS_SUCCESS;
}

}  // extern "C"

int dpt_emu::cudnn_unwanted_runs() {
  return unwanted_runs;
}

// kernels/cuda against the CPU engine (label gpu): every op on random inputs, forward and
// backward, within a relative-error bound per op (fp32, TF32 off), and whole ResNet-50 and
// ResNet-152 training steps on cuda:0 against the same steps on the CPU. Without a GPU, or in a
// build without the CUDA kernels, every test skips and says why. The CUDA emulator build
// (tests/cuda_emu) runs them all on the CPU.
#include <gtest/gtest.h>
#include <link.h>

#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "core/device.h"
#include "core/rng.h"
#include "kernels/amp.h"
#include "kernels/batchnorm.h"
#include "kernels/conv.h"
#include "kernels/elementwise.h"
#include "kernels/linear.h"
#include "kernels/loss.h"
#include "kernels/optim.h"
#include "kernels/pool.h"
#include "models/arch.h"
#include "models/optimizer.h"
#ifdef DPTRAIN_WITH_CUDA
#include "kernels/cuda/common.h"
#endif
#ifdef DPTRAIN_CUDA_EMULATED
namespace dpt_emu {
int cudnn_unwanted_runs();  // tests/cuda_emu/cudnn.cpp
}
#endif

using namespace dpt;

namespace {

std::string no_gpu() {
#ifndef DPTRAIN_WITH_CUDA
  return "this build has no CUDA kernels (nvcc, cuDNN or NCCL not found)";
#else
  std::string why;
  return cuda_device_count(&why) > 0 ? "" : why;
#endif
}

#define NEED_GPU()                          \
  const std::string skip_reason = no_gpu(); \
  if (!skip_reason.empty()) GTEST_SKIP() << skip_reason;

const Device kGpu = Device::cuda(0);

// cuDNN has bf16 convolutions from Ampere (compute capability 8) on: before, the bf16 cases are
// left out, with a line saying so.
bool bf16_convolutions() {
#ifdef DPTRAIN_WITH_CUDA
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess && prop.major >= 8) return true;
  std::printf(
      "[ skipped  ] bf16 cases: cuDNN has no bf16 convolutions on %s (compute capability "
      "%d.%d, before Ampere)\n",
      prop.name, prop.major, prop.minor);
#endif
  return false;
}

Tensor random(Shape s, uint64_t seed, float scale = 1.0f) {
  Tensor t(std::move(s));
  Rng rng(seed);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = scale * rng.normal();
  return t;
}

// max |gpu - cpu| / max(1e-6, max |cpu|): the error relative to the tensor's scale; infinite
// when a value is not finite on either side.
double rel_error(const Tensor& gpu, const Tensor& cpu) {
  const std::vector<float> a = gpu.to_vector(), b = cpu.to_vector();
  EXPECT_EQ(a.size(), b.size());
  double diff = 0, scale = 1e-6;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    diff = std::max(diff, std::fabs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::fabs(double(b[i])));
  }
  return diff / scale;
}

// An output on the GPU filled with NaN, so that an op that fails to overwrite it is caught.
Tensor out(Shape s) {
  return Tensor::full(std::move(s), NAN).to(kGpu);
}

}  // namespace

// fp32 (FMA math) within 1e-4 of the CPU engine; TF32, fp16 and bf16 (tensor cores) against the
// CPU engine's emulation of them (the same rounded operands and outputs, unless cuDNN truncates
// the TF32 operands or picks a kernel without tensor cores for a shape): within 5e-3, 2e-3 (an
// fp16 ulp, 9.8e-4 of the largest value, plus summation order) and 2e-2 (a bf16 ulp is 7.8e-3).
// In fp16 and bf16 the GPU's outputs must also be values of that format: an fp32 convolution
// would be within these bounds too.
//
// Each also with channels-last output (y, dy; cuDNN's NHWC descriptors) over an NCHW input and
// input gradient, as the stem and a channels-last network mix them.
TEST(Cuda, ConvolutionForwardAndBackward) {
  NEED_GPU();
  const bool bf16 = bf16_convolutions();
  for (const bool last : {false, true})
    for (const Precision pr : {Precision::FP32, Precision::TF32, Precision::FP16, Precision::BF16})
      for (const auto& [c, k, r, stride, pad, hw] :
           std::vector<std::tuple<int, int, int, int, int, int>>{{3, 64, 7, 2, 3, 32},
                                                                 {64, 64, 3, 1, 1, 16},
                                                                 {64, 256, 1, 1, 0, 8},
                                                                 {128, 128, 3, 2, 1, 9},
                                                                 {256, 512, 1, 2, 0, 7}}) {
        if (pr == Precision::BF16 && !bf16) continue;
        SCOPED_TRACE(std::to_string(c) + "->" + std::to_string(k) + " k" + std::to_string(r) +
                     " precision " + std::to_string(int(pr)) + (last ? " channels-last" : ""));
        const Conv2dParams p{stride, pad, pr};
        const double bound = pr == Precision::FP32   ? 1e-4
                             : pr == Precision::TF32 ? 5e-3
                             : pr == Precision::FP16 ? 2e-3
                                                     : 2e-2;
        const int64_t o = conv_out_size(hw, r, stride, pad);
        Tensor x = random({2, c, hw, hw}, 1), w = random({k, c, r, r}, 2, 0.1f);
        Tensor dy = cast_to(random({2, k, o, o}, 3), DType::F32, last);
        Tensor y({2, k, o, o}), dx(x.shape()), dw = random(w.shape(), 4);
        y.set_channels_last(last);
        Tensor gx = x.to(kGpu), gw = w.to(kGpu), gdy = dy.to(kGpu), gy = out({2, k, o, o}),
               gdx = out(x.shape()), gdw = dw.to(kGpu);
        gy.set_channels_last(last);
        conv2d_forward(x, w, y, p);
        conv2d_forward(gx, gw, gy, p);
        EXPECT_LT(rel_error(gy, y), bound);
        conv2d_backward(dy, x, w, &dx, dw, p);  // dw accumulates onto its random start
        conv2d_backward(gdy, gx, gw, &gdx, gdw, p);
        EXPECT_LT(rel_error(gdx, dx), bound);
        EXPECT_LT(rel_error(gdw, dw), bound);
        if (pr == Precision::FP16 || pr == Precision::BF16) {
          const DType fmt = rounding_of(pr);
          Tensor part = Tensor::zeros(w.shape()).to(kGpu);  // dw's contribution alone
          conv2d_backward(gdy, gx, gw, nullptr, part, p);
          for (const Tensor* t : {&gy, &gdx, &part}) {
            Tensor in_fmt = t->clone();
            round_(in_fmt, fmt);
            EXPECT_EQ(in_fmt.to_vector(), t->to_vector()) << "an output is not " << dtype_name(fmt);
          }
        }
        if (pr != Precision::FP32)
          std::printf("[ measured ] precision %d conv %d->%d k%d: forward %.2g, dx %.2g, dw %.2g\n",
                      int(pr), c, k, r, rel_error(gy, y), rel_error(gdx, dx), rel_error(gdw, dw));
      }
  // Deterministic algorithms only (bit-identical reruns and resumes on the same GPU).
  for (const auto& [algo, plans] : cuda::conv_algorithms_chosen()) {
    std::printf("[ measured ] cuDNN algorithm %s: %lld plans\n", algo.c_str(), (long long)plans);
    EXPECT_EQ(algo.find("non-deterministic"), std::string::npos) << algo;
  }
#ifdef DPTRAIN_CUDA_EMULATED  // its cuDNN offers candidates to pass over (docs/cuda-emulator.md)
  EXPECT_EQ(dpt_emu::cudnn_unwanted_runs(), 0)
      << "a non-deterministic, over-limit or unsupported algorithm ran";
#endif
}

// The third shape spreads each channel over 13 blocks, its values 30 standard deviations from 0;
// the 4-D shapes run NCHW and channels-last (40 channels: two blocks of 32, one partly empty).
TEST(Cuda, BatchNormPieces) {
  NEED_GPU();
  for (const Shape& s : {Shape{4, 16, 7, 7}, Shape{3, 8}, Shape{64, 4, 28, 28}, Shape{4, 40, 6, 6}})
    for (const bool last : {false, true}) {
      if (last && s.size() != 4) continue;
      SCOPED_TRACE(shape_str(s) + (last ? " channels-last" : ""));
      const int64_t C = s[1], count = Tensor(s).numel() / C;
      Tensor x = random(s, 5, 2.0f);
      if (s[0] == 64)
        for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] += 60.0f;
      x = cast_to(x, DType::F32, last);
      Tensor gamma = random({C}, 6), beta = random({C}, 7),
             dy = cast_to(random(s, 8), DType::F32, last);
      Tensor mean({C}), var({C}), y(s), rm = random({C}, 9), rv = Tensor::full({C}, 1.5f);
      Tensor gmean = out({C}), gvar = out({C}), gy = out(s);
      y.set_channels_last(last);
      gy.set_channels_last(last);
      Tensor gx = x.to(kGpu), ggamma = gamma.to(kGpu), gbeta = beta.to(kGpu), gdy = dy.to(kGpu),
             grm = rm.to(kGpu), grv = rv.to(kGpu);
      batchnorm_stats(x, mean, var);
      batchnorm_stats(gx, gmean, gvar);
      EXPECT_LT(rel_error(gmean, mean), 1e-6);
      EXPECT_LT(rel_error(gvar, var), 1e-6);
      batchnorm_forward(x, mean, var, gamma, beta, 1e-5f, y);
      batchnorm_forward(gx, gmean, gvar, ggamma, gbeta, 1e-5f, gy);
      EXPECT_LT(rel_error(gy, y), 1e-6);
      Tensor batches = Tensor::zeros({}, DType::I64), gbatches = batches.to(kGpu);
      batchnorm_update_running(rm, rv, batches, mean, var, count, 0.1f);
      batchnorm_update_running(grm, grv, gbatches, gmean, gvar, count, 0.1f);
      EXPECT_LT(rel_error(grm, rm), 1e-6);
      EXPECT_LT(rel_error(grv, rv), 1e-6);
      EXPECT_EQ(gbatches.to(Device::cpu()).data<int64_t>()[0], 1);
      Tensor sd({C}), sdx({C}), dx(s), gsd = out({C}), gsdx = out({C}), gdx = out(s);
      dx.set_channels_last(last);
      gdx.set_channels_last(last);
      batchnorm_backward_reduce(dy, x, mean, var, 1e-5f, sd, sdx);
      batchnorm_backward_reduce(gdy, gx, gmean, gvar, 1e-5f, gsd, gsdx);
      EXPECT_LT(rel_error(gsd, sd), 1e-5);
      EXPECT_LT(rel_error(gsdx, sdx), 1e-5);
      batchnorm_backward_data(dy, x, mean, var, gamma, sd, sdx, 1e-5f, count, dx);
      batchnorm_backward_data(gdy, gx, gmean, gvar, ggamma, gsd, gsdx, 1e-5f, count, gdx);
      EXPECT_LT(rel_error(gdx, dx), 1e-5);
      // The same with the ReLU fused: forward clamps, backward masks dy by the output.
      Tensor gry = out(s);
      gry.set_channels_last(last);
      batchnorm_forward(x, mean, var, gamma, beta, 1e-5f, y, true);
      batchnorm_forward(gx, gmean, gvar, ggamma, gbeta, 1e-5f, gry, true);
      EXPECT_LT(rel_error(gry, y), 1e-6);
      // Backward on the CPU's mask: values within an ulp of 0 may fall on either side on the GPU.
      const Tensor gmask = y.to(kGpu);
      batchnorm_backward_reduce(dy, x, mean, var, 1e-5f, sd, sdx, &y);
      batchnorm_backward_reduce(gdy, gx, gmean, gvar, 1e-5f, gsd, gsdx, &gmask);
      EXPECT_LT(rel_error(gsd, sd), 1e-5);
      EXPECT_LT(rel_error(gsdx, sdx), 1e-5);
      batchnorm_backward_data(dy, x, mean, var, gamma, sd, sdx, 1e-5f, count, dx, &y);
      batchnorm_backward_data(gdy, gx, gmean, gvar, ggamma, gsd, gsdx, 1e-5f, count, gdx, &gmask);
      EXPECT_LT(rel_error(gdx, dx), 1e-5);
      // SyncBatchNorm's combination of 3 replicas' statistics.
      const Tensor all = random({3 * 2 * C}, 10, 1.0f);
      Tensor positive = all.clone();  // variances must not be negative
      for (int64_t i = 0; i < positive.numel(); ++i)
        positive.data<float>()[i] = std::fabs(positive.data<float>()[i]);
      Tensor cm({C}), cv({C}), gcm = out({C}), gcv = out({C}), counts({3}, DType::I64);
      counts.data<int64_t>()[0] = 5, counts.data<int64_t>()[1] = 7, counts.data<int64_t>()[2] = 2;
      batchnorm_combine_stats(positive, counts, cm, cv);
      batchnorm_combine_stats(positive.to(kGpu), counts.to(kGpu), gcm, gcv);
      EXPECT_LT(rel_error(gcm, cm), 1e-6);
      EXPECT_LT(rel_error(gcv, cv), 1e-6);
    }
}

TEST(Cuda, PoolingElementwiseLinearLossAndSgd) {
  NEED_GPU();
  // Max pool 3x3/2 pad 1 and global average pool, forward and backward.
  Tensor x = random({2, 4, 9, 9}, 10), dy = random({2, 4, 5, 5}, 11);
  Tensor y({2, 4, 5, 5}), dx(x.shape()), gy = out({2, 4, 5, 5}), gdx = out(x.shape());
  Tensor gx = x.to(kGpu), gdy = dy.to(kGpu);
  maxpool2d_forward(x, y, {});
  maxpool2d_forward(gx, gy, {});
  EXPECT_EQ(rel_error(gy, y), 0.0);
  maxpool2d_backward(dy, x, dx, {});
  maxpool2d_backward(gdy, gx, gdx, {});
  EXPECT_EQ(rel_error(gdx, dx), 0.0);  // the CPU's sums in the CPU's order
  Tensor a({2, 4}), ga = out({2, 4}), da = random({2, 4}, 12), gda = da.to(kGpu);
  global_avgpool_forward(x, a);
  global_avgpool_forward(gx, ga);
  EXPECT_LT(rel_error(ga, a), 1e-6);
  global_avgpool_backward(da, dx);
  global_avgpool_backward(gda, gdx);
  EXPECT_LT(rel_error(gdx, dx), 1e-6);
  // Elementwise ops, exact.
  Tensor e = random({1000}, 13), f = random({1000}, 14);
  Tensor ge = e.to(kGpu), gf = f.to(kGpu);
  add_relu_(e, f);
  add_relu_(ge, gf);
  EXPECT_EQ(rel_error(ge, e), 0.0);
  relu_backward_(f, e);
  relu_backward_(gf, ge);
  EXPECT_EQ(rel_error(gf, f), 0.0);
  // Linear.
  Tensor lx = random({5, 33}, 15), lw = random({10, 33}, 16, 0.2f), lb = random({10}, 17),
         ldy = random({5, 10}, 18);
  Tensor ly({5, 10}), ldx({5, 33}), ldw = random({10, 33}, 19), ldb = random({10}, 20);
  Tensor glx = lx.to(kGpu), glw = lw.to(kGpu), glb = lb.to(kGpu), gldy = ldy.to(kGpu),
         gly = out({5, 10}), gldx = out({5, 33}), gldw = ldw.to(kGpu), gldb = ldb.to(kGpu);
  linear_forward(lx, lw, lb, ly);
  linear_forward(glx, glw, glb, gly);
  EXPECT_LT(rel_error(gly, ly), 1e-6);
  linear_backward(ldy, lx, lw, &ldx, ldw, ldb);
  linear_backward(gldy, glx, glw, &gldx, gldw, gldb);
  EXPECT_LT(rel_error(gldx, ldx), 1e-6);
  EXPECT_LT(rel_error(gldw, ldw), 1e-6);
  EXPECT_LT(rel_error(gldb, ldb), 1e-6);
  // Softmax cross-entropy: loss, hits and gradient.
  Tensor z = random({7, 1000}, 21, 3.0f), t({7}, DType::I64);
  for (int64_t n = 0; n < 7; ++n) t.data<int64_t>()[n] = (n * 137) % 1000;
  Tensor dz({7, 1000}), gz = z.to(kGpu), gt = t.to(kGpu), gdz = out({7, 1000});
  int64_t hits = -1, ghits = -2;
  const float loss = softmax_cross_entropy(z, t, &dz, 2.0f, &hits);
  const float gloss = softmax_cross_entropy(gz, gt, &gdz, 2.0f, &ghits);
  EXPECT_NEAR(gloss, loss, 1e-6 * std::fabs(loss));
  EXPECT_EQ(ghits, hits);
  EXPECT_LT(rel_error(gdz, dz), 1e-6);
  // NaN logits (an fp16 step that overflowed) count hits as on the CPU: a NaN first in its row is
  // the maximum, any other is passed over (here with the row's maximum 128 places after it).
  Tensor zn = z.clone(), tn = t.clone();
  zn.data<float>()[0] = NAN;
  tn.data<int64_t>()[0] = 0;
  for (int64_t n = 1; n < 7; ++n) {
    zn.data<float>()[n * 1000 + 5 * n] = NAN;
    zn.data<float>()[n * 1000 + 5 * n + 128] = 100.0f;
    tn.data<int64_t>()[n] = 5 * n + 128;
  }
  softmax_cross_entropy(zn, tn, nullptr, 1.0f, &hits);
  softmax_cross_entropy(zn.to(kGpu), tn.to(kGpu), nullptr, 1.0f, &ghits);
  EXPECT_EQ(hits, 7);
  EXPECT_EQ(ghits, hits);
  t.data<int64_t>()[3] = 1000;  // out of range: the same clear error as on the CPU
  EXPECT_THROW(softmax_cross_entropy(z.to(kGpu), t.to(kGpu), nullptr), ConfigError);
  // SGD with momentum, weight decay and Nesterov, first step and later, on 70 parameters of
  // sizes 0 to 69999 at once (three multi-tensor launches, one parameter empty).
  for (bool nesterov : {false, true}) {
    const SgdParams h{0.1f, 0.9f, 0.0f, 5e-4f, nesterov};
    std::vector<Tensor> p, g, buf, gp, gg, gbuf;
    for (int i = 0; i < 70; ++i) {
      const int64_t n = (i * 1000 + 7 * i) % 70000;
      p.push_back(random({n}, 22 + i));
      g.push_back(random({n}, 122 + i));
      buf.emplace_back(Shape{n});
      gp.push_back(p.back().to(kGpu));
      gg.push_back(g.back().to(kGpu));
      gbuf.push_back(out({n}));
    }
    for (bool first : {true, false, false}) {
      std::vector<SgdSlot> cpu_slots, gpu_slots;
      for (size_t i = 0; i < p.size(); ++i) {
        cpu_slots.push_back({&p[i], &g[i], &buf[i], first});
        gpu_slots.push_back({&gp[i], &gg[i], &gbuf[i], first});
      }
      sgd_step(cpu_slots, h);
      sgd_step(gpu_slots, h);
    }
    for (size_t i = 0; i < p.size(); ++i) {
      EXPECT_LT(rel_error(gp[i], p[i]), 1e-6) << i;
      EXPECT_LT(rel_error(gbuf[i], buf[i]), 1e-6) << i;
    }
  }
}

// The conditioning of tests/parity/make_oracle.py, without its guard pass: every batch norm's
// weight ~ U(0.5, 1) and bias +-U(1.5, 2.5), the last of each residual block (Bottleneck bn3)
// scaled by 0.2. With torchvision's initialisation (weight 1, bias 0) ResNet-152's train-mode
// batch norms at small maps and batch amplify rounding so much that two float32 engines (or
// float32 and float64) differ by 0.1 or more in some gradients, and many pre-ReLU values lie
// within rounding of 0, where the engines route gradients differently.
void condition(Module& m, uint64_t seed) {
  Rng rng(seed);
  for (auto& [name, p] : m.named_parameters()) {
    if (name.find("bn") == std::string::npos && name.find("downsample.1") == std::string::npos)
      continue;
    const bool weight = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0;
    const float damp = name.find(".bn3.") != std::string::npos ? 0.2f : 1.0f;
    float* v = p->value.data<float>();
    for (int64_t i = 0; i < p->value.numel(); ++i)
      v[i] = damp * (weight ? rng.uniform(0.5f, 1.0f)
                            : (rng.below(2) ? 1.0f : -1.0f) * rng.uniform(1.5f, 2.5f));
  }
}

// One SGD step of a whole (conditioned) network on cuda:0 and on the CPU from the same weights and
// batch: logits, loss, every gradient and every weight after the step, each tensor by
// relative_error (norms: a few values routed differently at a ReLU's kink move one channel, not
// the whole tensor). In fp32 within 1e-3 (logits, loss) and 1e-2 (gradients, weights) of the
// CPU. In fp16 and bf16 the logits and loss within 10 and 80 units of the format's last place of
// the CPU's; but the gradients of a 16-bit step are noisy on either engine (every activation
// rounded; sums that cancel, such as a batch norm's bias gradient where the next batch norm's
// zero-mean input gradient comes back, keep few correct digits, and the two engines' errors in
// one tensor differ by up to 5x), so there the GPU's step is held to the CPU's accuracy against a
// float32 step: each tensor within 2.5e-2 (fp16) or 0.2 (bf16) of the float32 step or 8x the
// CPU's error, whichever is larger, and the GPU's errors on average at most 1.5x the CPU's.
struct StepResult {
  Tensor logits;
  float loss = 0;
  std::vector<std::string> names;
  std::vector<Tensor> grads, weights;  // on the CPU; weights after the step
};

StepResult one_step(const std::string& arch, const Device& dev, Precision pr) {
  ArchSpec spec;
  spec.arch = arch;
  spec.num_classes = 10;
  spec.in_channels = 3;
  spec.stem = "imagenet";
  auto m = make_model(spec, 3);
  condition(*m, 4);
  m->to(dev);
  m->set_precision(pr);
  m->set_channels_last(dev.is_cuda() && (pr == Precision::FP16 || pr == Precision::BF16));
  Tensor x = random({4, 3, 64, 64}, 30), t({4}, DType::I64);
  for (int64_t n = 0; n < 4; ++n) t.data<int64_t>()[n] = n * 3;
  StepResult r;
  r.logits = m->forward(x.to(dev));
  Tensor dz(r.logits.shape(), DType::F32, dev);
  r.loss = softmax_cross_entropy(r.logits, t.to(dev), &dz);
  r.logits = r.logits.to(Device::cpu());
  m->backward(std::move(dz));
  for (auto& [name, p] : m->named_parameters()) {
    r.names.push_back(name);
    r.grads.push_back(p->grad.to(Device::cpu()).clone());
  }
  Sgd({0.1f, 0.9f, 0.0f, 1e-4f, false}).step(*m);
  for (auto& [name, p] : m->named_parameters()) r.weights.push_back(p->value.to(Device::cpu()));
  return r;
}

void whole_step(const std::string& arch, Precision pr = Precision::FP32) {
  const bool sixteen = pr == Precision::FP16 || pr == Precision::BF16;
  const double close = pr == Precision::FP32 ? 1e-3 : pr == Precision::FP16 ? 1e-2 : 8e-2;
  const double bound = pr == Precision::FP32 ? 1e-2 : pr == Precision::FP16 ? 2.5e-2 : 2e-1;
  const StepResult c = one_step(arch, Device::cpu(), pr), g = one_step(arch, kGpu, pr);
  // The reference of each tensor: the CPU's (fp32), or the CPU's float32 step (fp16, bf16).
  const StepResult f32 = sixteen ? one_step(arch, Device::cpu(), Precision::FP32) : StepResult{};
  const StepResult& ref = sixteen ? f32 : c;
  EXPECT_LT(relative_error(g.logits, c.logits), close);
  EXPECT_NEAR(g.loss, c.loss, close * std::fabs(c.loss));
  ASSERT_EQ(g.grads.size(), c.grads.size());
  double worst = 0, gpu_sum = 0, cpu_sum = 0;
  std::string worst_name = "none";
  auto check = [&](const Tensor& gt, const Tensor& ct, const Tensor& rt, const std::string& what) {
    const double e = relative_error(gt, rt), own = sixteen ? relative_error(ct, rt) : 0.0;
    const double allowed = std::max(bound, 8 * own);
    EXPECT_LT(e, allowed) << what << " (the CPU's error: " << own << ")";
    if (e / allowed > worst) worst = e / allowed, worst_name = what;
    gpu_sum += e, cpu_sum += own;
  };
  for (size_t i = 0; i < c.grads.size(); ++i) {
    check(g.grads[i], c.grads[i], ref.grads[i], "gradient of " + c.names[i]);
    check(g.weights[i], c.weights[i], ref.weights[i], "weight after the step: " + c.names[i]);
  }
  if (sixteen) {
    EXPECT_LE(gpu_sum, 1.5 * cpu_sum) << "the GPU's 16-bit step is less accurate";
  }
  const double n = double(2 * c.grads.size());
  std::printf(
      "%s (precision %d) on %s: logits %.2e from the CPU's; worst tensor (%s) at %.2g of its "
      "bound; mean error of a tensor %.2e%s\n",
      arch.c_str(), int(pr), kGpu.str().c_str(), relative_error(g.logits, c.logits),
      worst_name.c_str(), worst, gpu_sum / n,
      sixteen ? (" against float32, the CPU's " + std::to_string(cpu_sum / n)).c_str() : "");
}

TEST(Cuda, Resnet50TrainingStepMatchesTheCpu) {
  NEED_GPU();
  whole_step("resnet50");
}

TEST(Cuda, Resnet152TrainingStepMatchesTheCpu) {
  NEED_GPU();
  whole_step("resnet152");
}

// The GPU with channels-last activations (as dptrain trains in fp16 and bf16 there), the CPU
// without.
TEST(Cuda, Resnet50HalfPrecisionStepsMatchTheCpu) {
  NEED_GPU();
  whole_step("resnet50", Precision::FP16);
  if (bf16_convolutions()) whole_step("resnet50", Precision::BF16);
}

// round_ and scale_check_ on the GPU give exactly the CPU's values (the same IEEE roundings).
TEST(Cuda, MixedPrecisionHelpersEqualTheCpu) {
  NEED_GPU();
  Tensor x = random({1000}, 21, 3e4f);  // some past half's 65504
  x.data<float>()[7] = 1e-7f;           // a half subnormal
  for (DType t : {DType::F16, DType::BF16}) {
    Tensor c = x.clone(), g = x.to(kGpu);
    round_(c, t);
    round_(g, t);
    EXPECT_EQ(g.to_vector(), c.to_vector()) << dtype_name(t);
    const Tensor h = cast_to(x.to(kGpu), t);  // 16-bit storage: the same values, back exactly
    EXPECT_EQ(h.dtype(), t);
    EXPECT_EQ(h.to_vector(), c.to_vector()) << dtype_name(t);
    Tensor back(x.shape(), DType::F32, kGpu);
    cast(h, back);
    EXPECT_EQ(back.to_vector(), c.to_vector()) << dtype_name(t);
  }
  Tensor a = random({5000}, 22), b = random({300}, 23);
  Tensor ga = a.to(kGpu), gb = b.to(kGpu);
  EXPECT_FALSE(scale_check_({&ga, &gb}, 0.25f));
  EXPECT_FALSE(scale_check_({&a, &b}, 0.25f));
  EXPECT_EQ(ga.to_vector(), a.to_vector());
  EXPECT_EQ(gb.to_vector(), b.to_vector());
  b.data<float>()[299] = NAN;
  gb = b.to(kGpu);
  EXPECT_TRUE(scale_check_({&ga, &gb}, 1.0f));
}

// Every op on the 16-bit activations of fp16 and bf16 training, on the GPU and on the CPU from
// the same 16-bit inputs: elementwise ops and max pooling exactly equal (float32 math in the
// CPU's order, one rounding); batch norm, average pooling and the convolution within 4 units of
// the format's last place (summation order); each output in the CPU's dtype.
std::vector<std::pair<std::string, Tensor>> sixteen_bit_ops(DType t, const Device& dev, bool last) {
  auto in = [&](Shape s, uint64_t seed, float scale = 1.0f) {
    return cast_to(random(std::move(s), seed, scale).to(dev), t, last);
  };
  auto f32 = [&](Shape s, uint64_t seed, float scale = 1.0f) {
    return random(std::move(s), seed, scale).to(dev);
  };
  auto act = [&](Shape s) {  // an activation output, in the layout under test
    Tensor o(std::move(s), t, dev);
    o.set_channels_last(last);
    return o;
  };
  std::vector<std::pair<std::string, Tensor>> r;
  const Tensor x = in({2, 8, 9, 9}, 40), x2 = in({2, 8, 9, 9}, 41), dy = in({2, 8, 9, 9}, 42);
  Tensor a = x.clone();
  add_relu_(a, x2);
  Tensor g = dy.clone();
  relu_backward_(g, a);
  Tensor b = x.clone();
  add_(b, x2);
  relu_(b);
  r.emplace_back("add_relu_", std::move(a));
  r.emplace_back("relu_backward_", std::move(g));
  r.emplace_back("add_ relu_", std::move(b));
  Tensor mean({8}, DType::F32, dev), var({8}, DType::F32, dev), s1({8}, DType::F32, dev),
      s2({8}, DType::F32, dev);
  const Tensor gamma = f32({8}, 43), beta = f32({8}, 44);
  batchnorm_stats(x, mean, var);
  Tensor y = act(x.shape()), dx = act(x.shape());
  batchnorm_forward(x, mean, var, gamma, beta, 1e-5f, y);
  batchnorm_backward_reduce(dy, x, mean, var, 1e-5f, s1, s2);
  batchnorm_backward_data(dy, x, mean, var, gamma, s1, s2, 1e-5f, 162, dx);
  Tensor ry = act(x.shape()), rdx = act(x.shape()), r1({8}, DType::F32, dev),
         r2({8}, DType::F32, dev);  // the same with the ReLU fused
  batchnorm_forward(x, mean, var, gamma, beta, 1e-5f, ry, true);
  batchnorm_backward_reduce(dy, x, mean, var, 1e-5f, r1, r2, &ry);
  batchnorm_backward_data(dy, x, mean, var, gamma, r1, r2, 1e-5f, 162, rdx, &ry);
  r.emplace_back("batchnorm+relu y", std::move(ry));
  r.emplace_back("batchnorm+relu sum_dy", std::move(r1));
  r.emplace_back("batchnorm+relu dx", std::move(rdx));
  r.emplace_back("batchnorm mean", std::move(mean));
  r.emplace_back("batchnorm var", std::move(var));
  r.emplace_back("batchnorm y", std::move(y));
  r.emplace_back("batchnorm sum_dy_xhat", std::move(s2));
  r.emplace_back("batchnorm dx", std::move(dx));
  Tensor p = act({2, 8, 5, 5}), pdx = act(x.shape()), avg({2, 8}, DType::F32, dev),
         adx = act(x.shape());
  maxpool2d_forward(x, p, {});
  maxpool2d_backward(in({2, 8, 5, 5}, 45), x, pdx, {});
  global_avgpool_forward(x, avg);
  global_avgpool_backward(f32({2, 8}, 46), adx);
  r.emplace_back("maxpool y", std::move(p));
  r.emplace_back("maxpool dx", std::move(pdx));
  r.emplace_back("avgpool y", std::move(avg));
  r.emplace_back("avgpool dx", std::move(adx));
  const Conv2dParams cp{1, 1, t == DType::F16 ? Precision::FP16 : Precision::BF16};
  const Tensor w = f32({16, 8, 3, 3}, 47, 0.1f);
  Tensor cy = act({2, 16, 9, 9}), cdx = act(x.shape()), dw = f32(w.shape(), 48);
  conv2d_forward(x, w, cy, cp);
  conv2d_backward(in({2, 16, 9, 9}, 49), x, w, &cdx, dw, cp);
  r.emplace_back("conv y", std::move(cy));
  r.emplace_back("conv dx", std::move(cdx));
  r.emplace_back("conv dw", std::move(dw));
  return r;
}

// Also channels-last (the layout of fp16/bf16 training on a GPU): the same values in that order.
TEST(Cuda, SixteenBitActivationKernelsEqualTheCpu) {
  NEED_GPU();
  const bool bf16 = bf16_convolutions();
  for (const bool last : {false, true})
    for (const DType t : {DType::F16, DType::BF16}) {
      if (t == DType::BF16 && !bf16) continue;
      const auto cpu = sixteen_bit_ops(t, Device::cpu(), last),
                 gpu = sixteen_bit_ops(t, kGpu, last);
      ASSERT_EQ(cpu.size(), gpu.size());
      const double ulp = t == DType::F16 ? 9.8e-4 : 7.8e-3;
      for (size_t i = 0; i < cpu.size(); ++i) {
        const std::string& name = cpu[i].first;
        SCOPED_TRACE(std::string(dtype_name(t)) + " " + name + (last ? " channels-last" : ""));
        EXPECT_EQ(gpu[i].second.dtype(), cpu[i].second.dtype());
        EXPECT_EQ(gpu[i].second.channels_last(), cpu[i].second.channels_last());
        const double err = rel_error(gpu[i].second, cpu[i].second);
        if (name.rfind("add", 0) == 0 || name.rfind("relu", 0) == 0 ||
            name.rfind("maxpool", 0) == 0)
          EXPECT_EQ(err, 0.0);
        else
          EXPECT_LT(err, 4 * ulp);
        std::printf("[ measured ] %s%s %s: %.2g\n", dtype_name(t).data(),
                    last ? " channels-last" : "", name.c_str(), err);
      }
    }
}

// cast reorders into and out of channels-last on the GPU exactly as on the CPU.
TEST(Cuda, ChannelsLastCastsEqualTheCpu) {
  NEED_GPU();
  const Tensor x = random({3, 5, 7, 6}, 50, 3.0f);
  for (const DType t : {DType::F32, DType::F16, DType::BF16}) {
    const Tensor c = cast_to(x, t, true), g = cast_to(x.to(kGpu), t, true);
    EXPECT_TRUE(g.channels_last());
    EXPECT_EQ(g.to_vector(), c.to_vector()) << dtype_name(t);
    EXPECT_EQ(cast_to(g, DType::F32).to_vector(), cast_to(c, DType::F32).to_vector());
  }
}

// Tensor::pinned is page-locked host memory on a GPU machine, in the context of the GPU it is for
// (a loader thread makes no context on cuda:0 for a run on another GPU), and copies through it
// round trip.
TEST(Cuda, PinnedHostTensors) {
  NEED_GPU();
  const int last = cuda_device_count() - 1;
  std::thread([&] {
    Tensor q = Tensor::pinned({10}, Device::cuda(last));
    cudaPointerAttributes attr{};
    ASSERT_EQ(cudaPointerGetAttributes(&attr, q.raw()), cudaSuccess);
    EXPECT_EQ(attr.device, last);
  }).join();
  Tensor p = Tensor::pinned({1000}, kGpu);
  ASSERT_TRUE(p.is_pinned());
  cudaPointerAttributes attr{};
  ASSERT_EQ(cudaPointerGetAttributes(&attr, p.raw()), cudaSuccess);
  EXPECT_EQ(attr.type, cudaMemoryTypeHost);
  const Tensor x = random({1000}, 31);
  p.copy_from(x);
  const Tensor g = p.to(kGpu);
  EXPECT_EQ(g.to_vector(), x.to_vector());
  Tensor back = Tensor::pinned({1000}, kGpu);
  back.copy_from(g);
  EXPECT_EQ(back.to_vector(), x.to_vector());
}

// The dptrain binary: $DPTRAIN_BIN (the GPU bundle's) or this build's.
std::string run_dptrain(const std::string& args, int* code) {
  const char* env = std::getenv("DPTRAIN_BIN");
  const std::string bin = env ? env : std::string(DPT_BINARY_DIR) + "/dptrain";
  FILE* p = popen(("timeout -s KILL 300 " + bin + " " + args + " 2>&1").c_str(), "r");
  std::string out;
  char buf[4096];
  for (size_t n; p && (n = fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
  const int status = p ? pclose(p) : -1;
  *code = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  return out;
}

nlohmann::json last_json(const std::string& out) {
  const size_t at = out.rfind("\n{");
  return nlohmann::json::parse(out.substr(at == std::string::npos ? 0 : at + 1));
}

// The trainer on one GPU: 4 fp16 steps as on the CPU (losses within 1e-2, the same steps skipped
// for overflow), the same 6 fp32 steps as on the CPU (losses within 1e-3), a checkpoint
// saved from cuda:0 that evaluates the same on the CPU and on the GPU, and a resume on the GPU
// from it that continues bit for bit as the uninterrupted GPU run does.
TEST(Cuda, TrainerOnOneGpuMatchesTheCpuAndItsCheckpointLoadsAnywhere) {
  NEED_GPU();
  const std::string dir = ::testing::TempDir();
  const std::string data = " --data synthetic --synthetic-size 96 --image-size 32 --seed 3 --json";
  // A constant rate: a 3-step run then shares its schedule with the first half of a 6-step one.
  // A small one: at 0.05 these steps diverge (the loss reaches 8 by step 6) and the engines'
  // rounding differences grow with the loss. The small stem: the ImageNet stem's max pool routes
  // gradients by which of two close values is larger, where the engines' last bits differ (its
  // backward is checked bit for bit against the CPU's on equal inputs, PoolingElementwise...).
  const std::string common =
      "train --model resnet18 --stem small --batch-size 16 --lr 0.002 --lr-schedule constant "
      "--warmup-steps 0" +
      data;
  int code = 0;
  auto train = [&](const std::string& devices, const std::string& extra) {
    const std::string out = run_dptrain(common + " --devices " + devices + extra, &code);
    EXPECT_EQ(code, 0) << out;
    return code == 0 ? last_json(out) : nlohmann::json();
  };
  const nlohmann::json cpu16 = train("cpu", " --max-steps 4 --precision fp16");
  const nlohmann::json gpu16 = train("cuda:0", " --max-steps 4 --precision fp16");
  ASSERT_TRUE(cpu16.contains("train_loss") && gpu16.contains("train_loss"));
  EXPECT_NEAR(double(cpu16["train_loss"]), double(gpu16["train_loss"]), 1e-2);
  EXPECT_EQ(cpu16["skipped_steps"], gpu16["skipped_steps"]);
  const nlohmann::json cpu = train("cpu", " --max-steps 6");
  const nlohmann::json gpu = train("cuda:0", " --max-steps 6 --save " + dir + "/gpu6.h5");
  ASSERT_TRUE(cpu.contains("train_loss") && gpu.contains("train_loss"));
  const double lc = cpu["train_loss"], lg = gpu["train_loss"];
  EXPECT_FALSE(cpu.contains("peak_gpu_bytes"));
  ASSERT_TRUE(gpu.contains("peak_gpu_bytes"));
  EXPECT_GT(int64_t(gpu["peak_gpu_bytes"]), 0);
  EXPECT_GE(int64_t(gpu["peak_gpu_reserved_bytes"]), int64_t(gpu["peak_gpu_bytes"]));
  EXPECT_LT(std::abs(lc - lg), 1e-3 * std::max(1.0, std::abs(lc))) << lc << " vs " << lg;
  auto eval = [&](const std::string& devices) {
    const std::string out =
        run_dptrain("eval --checkpoint " + dir + "/gpu6.h5 --devices " + devices + data, &code);
    EXPECT_EQ(code, 0) << out;
    return code == 0 ? last_json(out) : nlohmann::json();
  };
  const nlohmann::json on_cpu = eval("cpu"), on_gpu = eval("cuda:0");
  ASSERT_TRUE(on_cpu.contains("loss") && on_gpu.contains("loss"));
  EXPECT_LT(std::abs(double(on_cpu["loss"]) - double(on_gpu["loss"])), 1e-4);
  EXPECT_EQ(on_cpu["samples"], on_gpu["samples"]);
  train("cuda:0", " --max-steps 3 --save " + dir + "/gpu3.h5");
  const nlohmann::json resumed =
      train("cuda:0", " --max-steps 6 --resume " + dir + "/gpu3.h5 --save " + dir + "/gpu3.h5");
  ASSERT_TRUE(resumed.contains("resumed_step"));
  EXPECT_EQ(resumed["resumed_step"], 3);
  const std::string diff =
      run_dptrain("ckpt diff --json " + dir + "/gpu3.h5 " + dir + "/gpu6.h5", &code);
  ASSERT_EQ(code, 0) << diff;
  const double worst = last_json(diff)["max_abs_diff"];
  // Deterministic cuDNN algorithms, our own kernels without atomics and cuBLAS's fixed GEMMs: the
  // resumed run repeats the uninterrupted one bit for bit, as on the CPU.
  EXPECT_EQ(worst, 0.0) << "resumed 3+3 steps against 6 uninterrupted steps";
  std::printf(
      "trainer on %s: 6-step loss %.6f (cpu %.6f); eval loss on gpu %.6f, on cpu %.6f; "
      "resumed against uninterrupted: max |diff| %.2e\n",
      kGpu.str().c_str(), lg, lc, double(on_gpu["loss"]), double(on_cpu["loss"]), worst);
}

// The trainer data-parallel on GPUs (NCCL, SyncBatchNorm) trains like one GPU on the whole
// batch; mixing GPU and CPU replicas is refused with one line.
TEST(Cuda, TrainerDataParallelOnGpus) {
  NEED_GPU();
  int code = 0;
  const std::string mixed = run_dptrain(
      "train --model resnet18 --data synthetic --max-steps 1 --devices cuda:0,cpu:0", &code);
  EXPECT_EQ(code, 2) << mixed;
  EXPECT_NE(mixed.find("all on GPUs or all on CPU devices"), std::string::npos) << mixed;
  std::string why;
  const int n = cuda_device_count(&why);
  if (n < 2) GTEST_SKIP() << "data-parallel training needs 2 or more GPUs, found " << n;
  const std::string common =
      "train --model resnet18 --stem small --batch-size 15 --lr 0.002 --lr-schedule constant "
      "--warmup-steps 0 --max-steps 4 --bn sync --data synthetic --synthetic-size 60 "
      "--image-size 32 --seed 3 --json --devices ";
  const std::string one = run_dptrain(common + "cuda:0", &code);
  ASSERT_EQ(code, 0) << one;
  const std::string two = run_dptrain(common + "cuda:0,cuda:1", &code);
  ASSERT_EQ(code, 0) << two;
  const double l1 = last_json(one)["train_loss"], l2 = last_json(two)["train_loss"];
  EXPECT_LT(std::abs(l1 - l2), 1e-3 * std::max(1.0, std::abs(l1))) << l1 << " vs " << l2;
  EXPECT_GT(int(last_json(two)["gradient_buckets"]), 0);
  std::printf("trainer on cuda:0,cuda:1 (sync BN): loss %.6f, on cuda:0 alone %.6f\n", l2, l1);
}

// cuBLAS is not linked but loaded when first needed, so that no dptrain binary pays for mapping
// cuBLASLt at every start (0.4 s and 200 MB here). Runs without a GPU. Whether it was mapped at
// start is recorded before any test runs (the op tests before this one load it on a GPU).
#ifdef DPTRAIN_WITH_CUDA
bool cublas_mapped() {
  bool found = false;
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* out) {
        if (info->dlpi_name && std::string(info->dlpi_name).find("libcublas") != std::string::npos)
          *static_cast<bool*>(out) = true;
        return 0;
      },
      &found);
  return found;
}
const bool kCublasAtStart = cublas_mapped();
#endif

TEST(Cuda, CublasIsLoadedOnlyWhenFirstNeeded) {
#ifndef DPTRAIN_WITH_CUDA
  GTEST_SKIP() << "this build has no CUDA kernels (nvcc, cuDNN or NCCL not found)";
#else
  EXPECT_FALSE(kCublasAtStart) << "cuBLAS was loaded at start";
  const cuda::CublasApi& api = cuda::cublas();
  EXPECT_TRUE(cublas_mapped());
  EXPECT_NE(api.sgemm, nullptr);
  EXPECT_STREQ(api.status_string(CUBLAS_STATUS_SUCCESS), "success");
#endif
}

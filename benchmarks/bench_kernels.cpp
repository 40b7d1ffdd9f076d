// Micro-benchmarks of the CPU kernels on ResNet shapes (Google Benchmark). They report GFLOP/s
// for convolution so a change to im2col, the GEMM path or threading shows up in isolation:
//   build/benchmarks/bench_kernels --benchmark_filter=Conv
#include <benchmark/benchmark.h>

#include "kernels/batchnorm.h"
#include "kernels/conv.h"
#include "kernels/optim.h"

using namespace dpt;

namespace {

// Args: batch, in channels, out channels, side, kernel, stride.
void BM_Conv(benchmark::State& st, bool backward) {
  const int64_t n = st.range(0), ci = st.range(1), co = st.range(2), hw = st.range(3);
  const int k = int(st.range(4)), s = int(st.range(5)), p = k / 2;
  Tensor x = Tensor::full({n, ci, hw, hw}, 0.5f), w = Tensor::full({co, ci, k, k}, 0.01f);
  const int64_t ho = conv_out_size(hw, k, s, p);
  Tensor y({n, co, ho, ho}), dx(x.shape()), dw = Tensor::zeros(w.shape());
  for (auto _ : st) {
    if (backward)
      conv2d_backward(y, x, w, &dx, dw, {s, p});
    else
      conv2d_forward(x, w, y, {s, p});
  }
  const double flops = 2.0 * double(n * co * ho * ho * ci * k * k) * (backward ? 2 : 1);
  st.counters["GFLOP/s"] =
      benchmark::Counter(flops * double(st.iterations()) / 1e9, benchmark::Counter::kIsRate);
}
void BM_ConvForward(benchmark::State& st) {
  BM_Conv(st, false);
}
void BM_ConvBackward(benchmark::State& st) {
  BM_Conv(st, true);
}

void ResNetShapes(benchmark::internal::Benchmark* b) {
  b->Args({64, 1, 64, 28, 7, 2})        // imagenet stem on Fashion-MNIST
      ->Args({64, 64, 64, 7, 3, 1})     // layer1 3x3
      ->Args({64, 256, 64, 7, 1, 1})    // layer1 1x1 reduce
      ->Args({64, 256, 256, 2, 3, 1})   // layer3 3x3 at 2x2
      ->Args({64, 2048, 512, 1, 1, 1})  // layer4 1x1 at 1x1
      ->Args({8, 64, 64, 56, 3, 1})     // 224x224 input, layer1 3x3
      ->Unit(benchmark::kMillisecond)
      ->UseRealTime();
}
BENCHMARK(BM_ConvForward)->Apply(ResNetShapes);
BENCHMARK(BM_ConvBackward)->Apply(ResNetShapes);

void BM_BatchNormTrain(benchmark::State& st) {
  const int64_t n = st.range(0), c = st.range(1), hw = st.range(2);
  Tensor x = Tensor::full({n, c, hw, hw}, 0.5f), y(x.shape()), dx(x.shape());
  Tensor g = Tensor::full({c}, 1.0f), b = Tensor::zeros({c}), mean({c}), var({c}), sd({c}),
         sdx({c});
  for (auto _ : st) {
    batchnorm_stats(x, mean, var);
    batchnorm_forward(x, mean, var, g, b, 1e-5f, y);
    batchnorm_backward_reduce(y, x, mean, var, 1e-5f, sd, sdx);
    batchnorm_backward_data(y, x, mean, var, g, sd, sdx, 1e-5f, n * hw * hw, dx);
  }
  st.SetBytesProcessed(int64_t(st.iterations()) * x.numel() * 4 * 7);
}
BENCHMARK(BM_BatchNormTrain)->Args({64, 256, 7})->Args({8, 64, 56})->Unit(benchmark::kMillisecond);

void BM_SgdStep(benchmark::State& st) {
  const int64_t n = st.range(0);
  Tensor p = Tensor::full({n}, 1.0f), g = Tensor::full({n}, 0.1f), buf = Tensor::zeros({n});
  SgdParams h;
  for (auto _ : st) sgd_step({{&p, &g, &buf, false}}, h);
  st.SetBytesProcessed(int64_t(st.iterations()) * n * 4 * 4);
}
BENCHMARK(BM_SgdStep)->Arg(1 << 22)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();

// Shared by the DataParallel tests (in-process and MPI): a small, well-conditioned ResNet-18,
// deterministic batches, and one SGD step through a plain model or a DataParallel.
#pragma once

#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/rng.h"
#include "kernels/loss.h"
#include "models/arch.h"
#include "models/optimizer.h"
#include "parallel/data_parallel.h"

namespace dpt::fixture {

inline ArchSpec small_spec() {
  ArchSpec s;
  s.arch = "resnet18";
  s.num_classes = 5;
  s.in_channels = 1;
  s.stem = "small";  // 16x16 inputs keep 2x2 maps in layer4, so train-mode BN is well conditioned
  return s;
}

// The model with BatchNorm parameters drawn as the PyTorch parity oracle does (weight U(0.5, 1),
// bias +-U(1.5, 2.5), residual branches' last BN scaled by 0.2): pre-ReLU values then rarely sit
// within rounding of zero, where two summation orders (one device vs. per-replica sums) would
// route a gradient differently and hide the comparison behind a ~1% jump.
inline std::unique_ptr<Module> conditioned(uint64_t seed) {
  auto m = make_model(small_spec(), seed);
  Rng r(seed, 77);
  for (auto& [name, p] : m->named_parameters()) {
    const bool bn =
        name.find("bn") != std::string::npos || name.find("downsample.1") != std::string::npos;
    if (!bn) continue;
    const float scale = name.find("bn2") != std::string::npos ? 0.2f : 1.0f;
    for (int64_t i = 0; i < p->value.numel(); ++i) {
      const float v = name.find(".bias") != std::string::npos
                          ? (r.uniform() < 0.5f ? -1.0f : 1.0f) * r.uniform(1.5f, 2.5f)
                          : r.uniform(0.5f, 1.0f);
      p->value.data<float>()[i] = scale * v;
    }
  }
  return m;
}

inline Tensor batch(int64_t n, uint64_t seed) {
  Tensor x({n, 1, 16, 16});
  Rng r(seed);
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = r.normal();
  return x;
}

inline Tensor labels(int64_t n) {
  Tensor t({n}, DType::I64);
  for (int64_t i = 0; i < n; ++i) t.data<int64_t>()[i] = (i * 7) % 5;
  return t;
}

// t on dev (a copy unless both are host memory).
inline Tensor on(const Tensor& t, const Device& dev) {
  return dev.is_cpu() && t.device().is_cpu() ? t.clone() : t.to(dev);
}

// One SGD step on host batches, wherever the model is; returns the loss.
inline float step(Module& m, std::vector<Sgd>& opts, const Tensor& x, const Tensor& y) {
  m.zero_grad();
  Tensor logits = m.forward(on(x, m.device()));
  Tensor d(logits.shape(), DType::F32, logits.device());
  float loss = softmax_cross_entropy(logits, on(y, logits.device()), &d);
  m.backward(std::move(d));
  if (auto* dp = dynamic_cast<DataParallel*>(&m))
    dp->for_each_replica([&](Module& r, int i) { opts[size_t(i)].step(r); });
  else
    opts[0].step(m);
  return loss;
}

inline std::vector<Sgd> sgds(int n) {
  std::vector<Sgd> v;
  for (int i = 0; i < n; ++i) v.emplace_back(SgdParams{0.01f, 0.9f, 0.0f, 1e-4f, false});
  return v;
}

// A conditioned model wrapped in DataParallel on devs, its replicas from the same seed.
inline std::unique_ptr<DataParallel> wrap_on(const std::vector<Device>& devs, BnMode bn,
                                             uint64_t seed = 3, double bucket_mb = 25) {
  return std::make_unique<DataParallel>(
      conditioned(seed), [seed] { return make_model(small_spec(), seed); }, devs,
      DataParallelOptions{.bn = bn, .threads = int(devs.size()), .bucket_mb = bucket_mb});
}

// Relative error of the whole set, ||got - want|| / ||want|| over every value of every entry
// (float entries only), and the entry contributing most to it. Per-tensor relative errors would
// be misleading: some entries (BN bias gradients, sums of dy) are near zero by cancellation.
inline std::pair<double, std::string> worst_error(const StateDict& got, const StateDict& want) {
  double num = 0, den = 0, most = -1;
  std::string name;
  for (auto& [k, t] : want.entries) {
    if (t.dtype() != DType::F32) continue;
    std::vector<float> a = got.find(k)->to_vector(), b = t.to_vector();
    double d = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      d += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
      den += double(b[i]) * b[i];
    }
    num += d;
    if (d > most) most = d, name = k;
  }
  return {std::sqrt(num / den), name};
}

inline StateDict grads(Module& m) {
  StateDict sd;
  for (auto& [name, p] : m.named_parameters()) sd.entries.emplace_back(name, p->grad.share());
  return sd;
}

}  // namespace dpt::fixture

// models/: torchvision naming and order, state_dict loading rules, initialisation distributions,
// the architecture description, train/eval and device moves.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "kernels/amp.h"
#include "kernels/batchnorm.h"
#include "kernels/conv.h"
#include "kernels/elementwise.h"
#include "kernels/pool.h"
#include "models/arch.h"
#include "models/layers.h"
#include "models/optimizer.h"
#include "models/resnet.h"

using namespace dpt;

namespace {
std::unique_ptr<Module> model(const std::string& arch, int64_t classes = 10,
                              const std::string& stem = "imagenet") {
  ArchSpec s;
  s.arch = arch;
  s.num_classes = classes;
  s.stem = stem;
  return make_model(s, 1);
}
}  // namespace

TEST(Models, TorchvisionNamesAndOrder) {
  auto m = model("resnet50");
  StateDict sd = m->state_dict();
  std::vector<std::string> first;
  for (size_t i = 0; i < 8; ++i) first.push_back(sd.entries[i].first);
  EXPECT_EQ(first,
            (std::vector<std::string>{"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean",
                                      "bn1.running_var", "bn1.num_batches_tracked",
                                      "layer1.0.conv1.weight", "layer1.0.bn1.weight"}));
  EXPECT_TRUE(sd.find("layer1.0.downsample.0.weight"));
  EXPECT_TRUE(sd.find("layer1.0.downsample.1.running_var"));
  EXPECT_TRUE(sd.find("layer4.2.bn3.weight"));
  EXPECT_FALSE(sd.find("layer1.1.downsample.0.weight"));
  EXPECT_EQ(sd.entries[sd.size() - 2].first, "fc.weight");
  EXPECT_EQ(sd.entries.back().first, "fc.bias");
  EXPECT_EQ(sd.find("fc.weight")->shape(), Shape({10, 2048}));
  EXPECT_EQ(sd.find("layer2.0.conv2.weight")->shape(), Shape({128, 128, 3, 3}));
  EXPECT_EQ(sd.find("bn1.num_batches_tracked")->dtype(), DType::I64);
  EXPECT_EQ(sd.find("bn1.num_batches_tracked")->ndim(), 0);
  // named_parameters excludes buffers and keeps module order.
  auto params = m->named_parameters();
  EXPECT_EQ(params.front().first, "conv1.weight");
  EXPECT_EQ(params[1].first, "bn1.weight");
  EXPECT_EQ(params.back().first, "fc.bias");
  EXPECT_EQ(m->named_buffers().size() * 1 + params.size(), sd.size());
  auto r18 = model("resnet18");
  EXPECT_TRUE(r18->state_dict().find("layer4.1.bn2.running_mean"));
  EXPECT_FALSE(r18->state_dict().find("layer4.1.conv3.weight"));
}

TEST(Models, StemsAndInChannels) {
  ArchSpec s;
  s.arch = "resnet18";
  s.in_channels = 1;
  s.stem = "small";
  auto m = make_model(s, 0);
  EXPECT_EQ(m->state_dict().find("conv1.weight")->shape(), Shape({64, 1, 3, 3}));
  m->eval();
  Tensor y = m->forward(Tensor::zeros({2, 1, 28, 28}));
  EXPECT_EQ(y.shape(), Shape({2, 1000}));
  auto big = model("resnet18");
  EXPECT_EQ(big->state_dict().find("conv1.weight")->shape(), Shape({64, 3, 7, 7}));
}

TEST(Models, LoadStateDictReportsMismatches) {
  auto a = model("resnet18"), b = model("resnet18");
  StateDict sd = a->state_dict();
  b->load_state_dict(sd);
  EXPECT_EQ(relative_error(*b->state_dict().find("fc.weight"), *sd.find("fc.weight")), 0.0);
  EXPECT_FALSE(b->state_dict().find("fc.weight")->same_storage(*sd.find("fc.weight")));

  StateDict partial;
  for (auto& [k, v] : sd.entries)
    if (k != "fc.bias") partial.entries.emplace_back(k, v.share());
  partial.entries.emplace_back("extra.weight", Tensor::zeros({1}));
  EXPECT_THROW(b->load_state_dict(partial, true), ConfigError);
  LoadReport rep = b->load_state_dict(partial, false);
  EXPECT_EQ(rep.missing, std::vector<std::string>{"fc.bias"});
  EXPECT_EQ(rep.unexpected, std::vector<std::string>{"extra.weight"});

  auto c = model("resnet18", 7);
  EXPECT_THROW(c->load_state_dict(sd, false), ConfigError);  // fc shape differs: always an error
}

TEST(Models, InitialisationDistributions) {
  auto m = model("resnet50");
  auto sd = m->state_dict();
  // kaiming_normal(fan_out, relu): std = sqrt(2 / (out * k * k)).
  const Tensor& w = *sd.find("layer3.0.conv2.weight");  // [256, 256, 3, 3]
  double s = 0, q = 0;
  for (float v : w.to_vector()) s += v, q += double(v) * v;
  const double n = double(w.numel()), expect = std::sqrt(2.0 / (256 * 9));
  EXPECT_NEAR(s / n, 0.0, 0.05 * expect);
  EXPECT_NEAR(std::sqrt(q / n), expect, 0.02 * expect);
  // Linear: U(-1/sqrt(in), 1/sqrt(in)).
  float bound = 1.0f / std::sqrt(2048.0f), mx = 0;
  for (float v : sd.find("fc.weight")->to_vector()) mx = std::max(mx, std::abs(v));
  EXPECT_LE(mx, bound);
  EXPECT_GT(mx, 0.95f * bound);
  EXPECT_EQ(sd.find("bn1.weight")->at(3), 1.0f);
  EXPECT_EQ(sd.find("bn1.running_var")->at(0), 1.0f);
  // Same seed, same weights; different seed, different weights.
  EXPECT_EQ(
      relative_error(*model("resnet50")->state_dict().find("fc.weight"), *sd.find("fc.weight")),
      0.0);
  ArchSpec s2;
  s2.arch = "resnet50";
  s2.num_classes = 10;
  EXPECT_GT(
      relative_error(*make_model(s2, 2)->state_dict().find("fc.weight"), *sd.find("fc.weight")),
      0.1);
}

TEST(Models, ZeroInitResidual) {
  ArchSpec s;
  s.arch = "resnet50";
  s.zero_init_residual = true;
  auto m = make_model(s, 0);
  EXPECT_EQ(m->state_dict().find("layer2.1.bn3.weight")->at(5), 0.0f);
  EXPECT_EQ(m->state_dict().find("layer2.1.bn2.weight")->at(5), 1.0f);
  s.arch = "resnet18";
  auto b = make_model(s, 0);
  EXPECT_EQ(b->state_dict().find("layer1.0.bn2.weight")->at(0), 0.0f);
}

TEST(Models, ArchJsonRoundTripAndValidation) {
  ArchSpec s;
  s.arch = "resnet152";
  s.num_classes = 10;
  s.in_channels = 1;
  s.stem = "small";
  ArchSpec t = ArchSpec::from_json(nlohmann::json::parse(s.to_json().dump()));
  EXPECT_EQ(t.to_json(), s.to_json());
  auto bad = [&](const char* key, nlohmann::json v) {
    nlohmann::json j = s.to_json();
    j[key] = v;
    EXPECT_THROW(ArchSpec::from_json(j), ConfigError) << key << "=" << v.dump();
  };
  bad("arch", "resnet9000");
  bad("num_classes", 0);
  bad("num_classes", int64_t(1) << 40);
  bad("in_channels", -3);
  bad("stem", "huge");
  bad("version", 2);
  bad("format", "other");
  bad("num_classes", "ten");
  nlohmann::json j = s.to_json();
  j.erase("stem");
  EXPECT_THROW(ArchSpec::from_json(j), ConfigError);
  EXPECT_THROW(ArchSpec::from_json(nlohmann::json::array()), ConfigError);
}

TEST(Models, TrainEvalAndDeviceMove) {
  auto m = model("resnet18", 4, "small");
  m->eval();
  for (auto& [n, sub] : m->named_modules()) EXPECT_FALSE(sub->is_training()) << n;
  Tensor x = Tensor::full({2, 3, 8, 8}, 0.5f);
  Tensor y1 = m->forward(x.clone());
  Tensor y2 = m->forward(x.clone());
  EXPECT_EQ(relative_error(y1, y2), 0.0);  // eval mode: running statistics, no updates
  m->train();
  m->forward(x.clone());
  EXPECT_EQ(m->state_dict().find("bn1.num_batches_tracked")->data<int64_t>()[0], 1);
  m->to(Device::cpu(1));
  EXPECT_EQ(m->device(), Device::cpu(1));
  EXPECT_EQ(m->state_dict().find("layer1.0.bn1.running_mean")->device(), Device::cpu(1));
}

TEST(Optimizer, SgdMatchesPyTorchRule) {
  // One scalar parameter through three steps of torch.optim.SGD(lr=.1, momentum=.9, wd=.01).
  Rng rng(0);
  Linear fc(1, 1, rng);
  fc.weight.value.data<float>()[0] = 1.0f;
  Sgd opt(SgdParams{0.1f, 0.9f, 0.0f, 0.01f, false});
  double p = 1.0, buf = 0;
  for (int step = 0; step < 3; ++step) {
    fc.weight.grad.data<float>()[0] = 0.5f;
    opt.step(fc);
    double g = 0.5 + 0.01 * p;
    buf = step == 0 ? g : 0.9 * buf + g;
    p -= 0.1 * buf;
    EXPECT_NEAR(fc.weight.value.at(0), p, 1e-6);
  }
  SgdParams nest{0.1f, 0.9f, 0.0f, 0.0f, true};
  Sgd n(nest);
  fc.weight.value.data<float>()[0] = 1.0f;
  fc.weight.grad.data<float>()[0] = 1.0f;
  n.step(fc);  // buf = 1, g = 1 + 0.9 * 1
  EXPECT_NEAR(fc.weight.value.at(0), 1.0 - 0.1 * 1.9, 1e-6);
}

TEST(Optimizer, LrSchedules) {
  LrSchedule s;
  s.base_lr = 0.4f;
  s.warmup_steps = 4;
  s.total_steps = 104;
  s.kind = LrSchedule::Kind::Cosine;
  EXPECT_FLOAT_EQ(s.lr_at(0), 0.1f);
  EXPECT_FLOAT_EQ(s.lr_at(3), 0.4f);
  EXPECT_FLOAT_EQ(s.lr_at(4), 0.4f);
  EXPECT_NEAR(s.lr_at(54), 0.2f, 1e-6);
  EXPECT_NEAR(s.lr_at(104), 0.0f, 1e-6);
  s.kind = LrSchedule::Kind::Step;
  s.step_size = 10;
  EXPECT_FLOAT_EQ(s.lr_at(13), 0.4f);
  EXPECT_NEAR(s.lr_at(14), 0.04f, 1e-7);
  EXPECT_THROW(LrSchedule::parse("linear"), UsageError);
}

// Mixed precision: round_ gives IEEE half and bfloat16 values (round to nearest even, half
// overflowing to infinity past 65504, half subnormals kept), scale_check_ scales and reports
// non-finite values, and GradScaler follows PyTorch's GradScaler rule.
TEST(MixedPrecision, RoundingScalingAndTheScaler) {
  const float h = std::ldexp(1.0f, -11), b = std::ldexp(1.0f, -8);  // half an ulp at 1
  const float inf = INFINITY;
  Tensor x = Tensor::from_vector({8}, {1 + h, 1 + 3 * h, 65504, 65519, 65520, std::ldexp(1.0f, -24),
                                       std::ldexp(1.0f, -26), -2.5f});
  round_(x, DType::F16);
  EXPECT_EQ(x.to_vector(),
            (std::vector<float>{1, 1 + 4 * h, 65504, 65504, inf, std::ldexp(1.0f, -24), 0, -2.5f}));
  Tensor y = Tensor::from_vector({4}, {1 + b, 1 + 3 * b, 1e30f, 70000});
  round_(y, DType::BF16);
  EXPECT_EQ(y.to_vector(),
            (std::vector<float>{1, 1 + 4 * b, bf16_to_float(float_to_bf16(1e30f)), 70144}));
  Tensor same = Tensor::from_vector({2}, {1 + h, 3});
  round_(same, DType::F32);
  EXPECT_EQ(same.to_vector(), (std::vector<float>{1 + h, 3}));
  // cast: to 16-bit storage rounds as round_, and back is exact.
  const Tensor src = Tensor::from_vector({3}, {1 + 3 * h, 65520, -2.5f});
  const Tensor half = cast_to(src, DType::F16);
  EXPECT_EQ(half.dtype(), DType::F16);
  Tensor wide({3});
  cast(half, wide);
  EXPECT_EQ(wide.to_vector(), (std::vector<float>{1 + 4 * h, inf, -2.5f}));
  cast(cast_to(src, DType::BF16), wide);
  EXPECT_EQ(wide.to_vector(), (std::vector<float>{1, 65536, -2.5f}));

  Tensor g1 = Tensor::from_vector({3}, {1, -2, 4}), g2 = Tensor::from_vector({2}, {8, 0});
  EXPECT_FALSE(scale_check_({&g1, &g2}, 0.5f));
  EXPECT_EQ(g1.to_vector(), (std::vector<float>{0.5f, -1, 2}));
  EXPECT_EQ(g2.to_vector(), (std::vector<float>{4, 0}));
  Tensor bad = Tensor::from_vector({2}, {NAN, 1});
  EXPECT_TRUE(scale_check_({&g1, &bad}, 2.0f));
  Tensor big = Tensor::from_vector({1}, {-inf});
  EXPECT_TRUE(scale_check_({&big}, 1.0f));

  GradScaler s(1024.0f, 2.0f, 0.5f, 3);
  s.update(false);
  s.update(false);
  EXPECT_EQ(s.scale(), 1024.0f);
  s.update(false);  // the third good step in a row
  EXPECT_EQ(s.scale(), 2048.0f);
  EXPECT_EQ(s.good_steps(), 0);
  s.update(false);
  s.update(true);  // an overflow halves the scale and restarts the count
  EXPECT_EQ(s.scale(), 1024.0f);
  EXPECT_EQ(s.good_steps(), 0);
  auto m = model("resnet18");
  for (auto& [name, p] : m->named_parameters()) p->grad.zero_();
  auto params = m->named_parameters();
  params[3].second->grad.copy_from(Tensor::full(params[3].second->grad.shape(), 2048.0f));
  EXPECT_FALSE(s.unscale(*m));
  EXPECT_EQ(params[3].second->grad.to_vector()[0], 2.0f);
  params[5].second->grad.copy_from(Tensor::full(params[5].second->grad.shape(), inf));
  EXPECT_TRUE(s.unscale(*m));
  s.restore(8.0f, 2);
  EXPECT_EQ(s.scale(), 8.0f);
  EXPECT_THROW(s.restore(0.0f, 0), ConfigError);
  EXPECT_THROW(s.restore(inf, 0), ConfigError);
  EXPECT_THROW(GradScaler(-1.0f), UsageError);
}

// Module::set_precision reaches every layer, and a half-precision forward differs from the fp32
// one by about half precision's resolution.
TEST(MixedPrecision, HalfForwardIsCloseToFloat) {
  auto m = model("resnet18", 10, "small");
  m->eval();
  Tensor x({2, 3, 16, 16});
  Rng rng(4);
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = rng.normal();
  const Tensor full = m->forward(x.clone());
  m->set_precision(Precision::FP16);
  for (auto& [name, sub] : m->named_modules()) EXPECT_EQ(sub->precision(), Precision::FP16) << name;
  const Tensor half = m->forward(x.clone());
  const double err = relative_error(half, full);
  EXPECT_GT(err, 0.0);
  EXPECT_LT(err, 1e-2);
  m->set_precision(parse_precision("tf32"));  // operands of the convolutions only
  const double tf32_err = relative_error(m->forward(x.clone()), full);
  EXPECT_GT(tf32_err, 0.0);
  EXPECT_LT(tf32_err, err);
  EXPECT_EQ(parse_precision("bf16"), Precision::BF16);
  EXPECT_THROW(parse_precision("fp8"), UsageError);
}

// TF32 keeps 10 mantissa bits, rounding to nearest even; a tf32 convolution is the float32 one
// on rounded operands, forward and backward; an fp16 or bf16 one also rounds its outputs (and
// the part it adds to dw).
TEST(MixedPrecision, ConvolutionPrecisionsRoundOperandsAndOutputs) {
  const float ulp = std::ldexp(1.0f, -10);
  EXPECT_EQ(round_to_tf32(1.0f + ulp / 2), 1.0f);               // tie: to even
  EXPECT_EQ(round_to_tf32(1.0f + 1.5f * ulp), 1.0f + 2 * ulp);  // tie: to even
  EXPECT_EQ(round_to_tf32(1.0f + 0.51f * ulp), 1.0f + ulp);     // above the tie
  EXPECT_EQ(round_to_tf32(-3.0f - 0.49f * 2 * ulp), -3.0f);     // below it, negative
  EXPECT_EQ(round_to_tf32(std::numeric_limits<float>::infinity()),
            std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(round_to_tf32(std::nanf(""))));
  Rng rng(9);
  auto random = [&](Shape s) {
    Tensor t(std::move(s));
    for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = rng.normal();
    return t;
  };
  const Tensor x = random({2, 3, 6, 6}), w = random({4, 3, 3, 3}), dy = random({2, 4, 6, 6});
  const Tensor dw0 = random(w.shape());  // dw accumulates onto what it holds
  for (const Precision pr : {Precision::TF32, Precision::FP16, Precision::BF16}) {
    SCOPED_TRACE(int(pr));
    const DType out = rounding_of(pr);  // F32 (no rounding of outputs) for TF32
    auto rounded = [&](const Tensor& t) {
      Tensor r = t.clone();
      for (int64_t i = 0; i < r.numel(); ++i) {
        float& v = r.data<float>()[i];
        v = pr == Precision::TF32 ? round_to_tf32(v)
            : out == DType::F16   ? f16_to_float(float_to_f16(v))
                                  : bf16_to_float(float_to_bf16(v));
      }
      return r;
    };
    const Conv2dParams p{1, 1, pr}, plain{1, 1};
    Tensor y({2, 4, 6, 6}), want({2, 4, 6, 6}), fp32({2, 4, 6, 6});
    conv2d_forward(x, w, y, p);
    conv2d_forward(rounded(x), rounded(w), want, plain);
    round_(want, out);
    conv2d_forward(x, w, fp32, plain);
    EXPECT_EQ(relative_error(y, want), 0.0);
    EXPECT_GT(relative_error(y, fp32), 0.0);
    Tensor dx(x.shape()), dw = dw0.clone(), dx2(x.shape()), part = Tensor::zeros(w.shape());
    conv2d_backward(dy, x, w, &dx, dw, p);
    conv2d_backward(rounded(dy), rounded(x), rounded(w), &dx2, part, plain);
    round_(dx2, out);
    round_(part, out);
    Tensor dw2 = dw0.clone();
    add_(dw2, part);
    EXPECT_EQ(relative_error(dx, dx2), 0.0);
    EXPECT_EQ(relative_error(dw, dw2), 0.0);
  }
}

// fp16 and bf16 training stores activations in 16 bits: every kernel that takes them computes in
// float32 and rounds what it stores, so an op on 16-bit tensors equals the op on their float32
// values with its outputs rounded (statistics and sums, float32, exactly equal).
TEST(MixedPrecision, SixteenBitActivationsAreFloat32MathRoundedAsStored) {
  Rng rng(11);
  auto random = [&](Shape s, float scale = 1.0f) {
    Tensor t(std::move(s));
    for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = scale * rng.normal();
    return t;
  };
  for (const DType t : {DType::F16, DType::BF16}) {
    SCOPED_TRACE(std::string(dtype_name(t)));
    auto narrow = [&](const Tensor& f) { return cast_to(f, t); };
    auto widen = [](const Tensor& h) { return cast_to(h, DType::F32); };
    auto expect_rounded = [&](const Tensor& got, Tensor want, const char* what) {
      EXPECT_EQ(got.dtype(), t) << what;
      round_(want, t);
      EXPECT_EQ(got.to_vector(), want.to_vector()) << what;
    };
    const Tensor x = narrow(random({2, 4, 9, 9})), x2 = narrow(random({2, 4, 9, 9}));
    const Tensor dy = narrow(random({2, 4, 9, 9}));
    // Elementwise, in place.
    Tensor a = x.clone(), af = widen(x);
    add_(a, x2);
    add_(af, widen(x2));
    expect_rounded(a, af.clone(), "add_");
    Tensor b = x.clone(), bf = widen(x);
    add_relu_(b, x2);
    add_relu_(bf, widen(x2));
    expect_rounded(b, bf.clone(), "add_relu_");
    Tensor g = dy.clone(), gf = widen(dy);
    relu_backward_(g, b);
    relu_backward_(gf, widen(b));
    expect_rounded(g, gf.clone(), "relu_backward_");
    // Batch norm: statistics, forward, backward sums and dx.
    Tensor mean({4}), var({4}), mean_f({4}), var_f({4});
    batchnorm_stats(x, mean, var);
    batchnorm_stats(widen(x), mean_f, var_f);
    EXPECT_EQ(mean.to_vector(), mean_f.to_vector());
    EXPECT_EQ(var.to_vector(), var_f.to_vector());
    const Tensor gamma = random({4}), beta = random({4});
    Tensor y(x.shape(), t), yf(x.shape());
    batchnorm_forward(x, mean, var, gamma, beta, 1e-5f, y);
    batchnorm_forward(widen(x), mean, var, gamma, beta, 1e-5f, yf);
    expect_rounded(y, yf.clone(), "batchnorm_forward");
    Tensor s1({4}), s2({4}), s1f({4}), s2f({4});
    batchnorm_backward_reduce(dy, x, mean, var, 1e-5f, s1, s2);
    batchnorm_backward_reduce(widen(dy), widen(x), mean, var, 1e-5f, s1f, s2f);
    EXPECT_EQ(s1.to_vector(), s1f.to_vector());
    EXPECT_EQ(s2.to_vector(), s2f.to_vector());
    Tensor dx(x.shape(), t), dxf(x.shape());
    batchnorm_backward_data(dy, x, mean, var, gamma, s1, s2, 1e-5f, 162, dx);
    batchnorm_backward_data(widen(dy), widen(x), mean, var, gamma, s1, s2, 1e-5f, 162, dxf);
    expect_rounded(dx, dxf.clone(), "batchnorm_backward_data");
    // Pooling: max pool both ways, average pool (float32 out, 16-bit dx).
    Tensor p({2, 4, 5, 5}, t), pf({2, 4, 5, 5});
    maxpool2d_forward(x, p, {});
    maxpool2d_forward(widen(x), pf, {});
    expect_rounded(p, pf.clone(), "maxpool2d_forward");
    const Tensor pdy = narrow(random({2, 4, 5, 5}));
    Tensor pdx(x.shape(), t), pdxf(x.shape());
    maxpool2d_backward(pdy, x, pdx, {});
    maxpool2d_backward(widen(pdy), widen(x), pdxf, {});
    expect_rounded(pdx, pdxf.clone(), "maxpool2d_backward");
    Tensor avg({2, 4}), avg_f({2, 4});
    global_avgpool_forward(x, avg);
    global_avgpool_forward(widen(x), avg_f);
    EXPECT_EQ(avg.to_vector(), avg_f.to_vector());
    const Tensor ady = random({2, 4});
    Tensor adx(x.shape(), t), adxf(x.shape());
    global_avgpool_backward(ady, adx);
    global_avgpool_backward(ady, adxf);
    expect_rounded(adx, adxf.clone(), "global_avgpool_backward");
    // Convolution in the matching precision: 16-bit x, y, dy and dx; float32 w and dw.
    const Conv2dParams cp{1, 1, t == DType::F16 ? Precision::FP16 : Precision::BF16};
    const Tensor w = random({6, 4, 3, 3}, 0.2f), cdy = narrow(random({2, 6, 9, 9}));
    Tensor cy({2, 6, 9, 9}, t), cyf({2, 6, 9, 9});
    conv2d_forward(x, w, cy, cp);
    conv2d_forward(widen(x), w, cyf, cp);
    expect_rounded(cy, cyf.clone(), "conv2d_forward");
    Tensor cdx(x.shape(), t), cdxf(x.shape()), dw = Tensor::zeros(w.shape()),
                                               dwf = Tensor::zeros(w.shape());
    conv2d_backward(cdy, x, w, &cdx, dw, cp);
    conv2d_backward(widen(cdy), widen(x), w, &cdxf, dwf, cp);
    expect_rounded(cdx, cdxf.clone(), "conv2d_backward dx");
    EXPECT_EQ(dw.dtype(), DType::F32);
    EXPECT_EQ(dw.to_vector(), dwf.to_vector());
  }
}

// In fp16 and bf16 a network's activations are 16-bit from the first convolution's output to the
// global average pool's input, both ways; its logits, weights and gradients stay float32.
TEST(MixedPrecision, NetworksStoreSixteenBitActivations) {
  Rng rng(12);
  Tensor x({2, 3, 16, 16});
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = rng.normal();
  for (const Precision pr : {Precision::FP16, Precision::BF16}) {
    const DType t = rounding_of(pr);
    Conv2d conv(3, 8, 3, 1, 1, rng);
    BatchNorm2d bn(8);
    MaxPool2d pool(PoolParams{});
    for (Module* m : std::vector<Module*>{&conv, &bn, &pool}) m->set_precision(pr);
    Tensor y = pool.forward(bn.forward(conv.forward(x.clone())));
    EXPECT_EQ(y.dtype(), t);
    Tensor dy(y.shape(), t);
    dy.zero_();
    Tensor dx = bn.backward(pool.backward(std::move(dy)));
    EXPECT_EQ(dx.dtype(), t);
    EXPECT_EQ(conv.backward(std::move(dx)).dtype(), DType::F32);  // the input's dtype
    EXPECT_EQ(conv.weight.grad.dtype(), DType::F32);
    auto net = model("resnet18", 10, "small");
    net->set_precision(pr);
    Tensor z = net->forward(x.clone());
    EXPECT_EQ(z.dtype(), DType::F32);
    Tensor dz = Tensor::full(z.shape(), 0.01f);
    net->backward(std::move(dz));
    for (auto& [name, p] : net->named_parameters()) {
      EXPECT_EQ(p->grad.dtype(), DType::F32) << name;
      for (float v : p->grad.to_vector()) ASSERT_TRUE(std::isfinite(v)) << name;
    }
  }
}

// What a training forward keeps for backward halves in fp16 and bf16 (host tensor bytes in use
// after the forward, against before it).
TEST(MixedPrecision, SixteenBitActivationsHalveTheMemoryKeptForBackward) {
  Tensor x({8, 3, 32, 32});
  Rng rng(13);
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = rng.normal();
  auto kept = [&](Precision pr) {
    auto net = model("resnet18", 10, "small");
    net->set_precision(pr);
    const int64_t before = host_tensor_memory().in_use;
    Tensor z = net->forward(x.clone());
    return host_tensor_memory().in_use - before - int64_t(x.nbytes() + z.nbytes());
  };
  const int64_t fp32 = kept(Precision::FP32), fp16 = kept(Precision::FP16),
                bf16 = kept(Precision::BF16);
  std::printf("[ measured ] kept for backward: fp32 %lld B, fp16 %lld B, bf16 %lld B\n",
              static_cast<long long>(fp32), static_cast<long long>(fp16),
              static_cast<long long>(bf16));
  EXPECT_GT(fp32, 8 * 64 * 32 * 32 * 4);  // at least the stem's output
  EXPECT_NEAR(double(fp16) / double(fp32), 0.5, 0.02);
  EXPECT_EQ(bf16, fp16);
}

// A batch norm with its ReLU fused gives exactly what the batch norm followed by a ReLU gives,
// forward and backward (dx and the parameter gradients), on float32 and 16-bit activations.
TEST(Models, FusedBatchNormReluEqualsBatchNormThenRelu) {
  Rng rng(14);
  auto random = [&](Shape s) {
    Tensor t(std::move(s));
    for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = rng.normal();
    return t;
  };
  for (const DType t : {DType::F32, DType::F16}) {
    SCOPED_TRACE(std::string(dtype_name(t)));
    const Tensor x = cast_to(random({4, 6, 5, 5}), t), dy = cast_to(random({4, 6, 5, 5}), t);
    const Tensor gamma = random({6}), beta = random({6});
    BatchNorm2d fused(6), plain(6);
    ReLU relu;
    fused.fuse_relu();
    for (BatchNorm2d* bn : {&fused, &plain}) {
      bn->weight.value.copy_from(gamma);
      bn->bias.value.copy_from(beta);
    }
    const Tensor y = fused.forward(x.clone()), want = relu.forward(plain.forward(x.clone()));
    EXPECT_EQ(y.to_vector(), want.to_vector());
    int zeros = 0;
    for (float v : y.to_vector()) zeros += v == 0.0f;
    EXPECT_GT(zeros, 50);  // the ReLU did something
    const Tensor dx = fused.backward(dy.clone()),
                 dx_want = plain.backward(relu.backward(dy.clone()));
    EXPECT_EQ(dx.to_vector(), dx_want.to_vector());
    EXPECT_EQ(fused.weight.grad.to_vector(), plain.weight.grad.to_vector());
    EXPECT_EQ(fused.bias.grad.to_vector(), plain.bias.grad.to_vector());
    fused.eval();
    plain.eval();
    EXPECT_EQ(fused.forward(x.clone()).to_vector(),
              relu.forward(plain.forward(x.clone())).to_vector());
  }
}

// Channels-last activations are a storage order only on the CPU: a network trained with them
// gives the same logits and parameter gradients, bit for bit, in fp32 and fp16, and so does a
// convolution's input gradient (NCHW input, channels-last output); every activation from the first
// convolution to the average pool is channels-last.
TEST(Models, ChannelsLastActivationsChangeNoValue) {
  Rng rng(15);
  Tensor x({3, 3, 20, 20});
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = rng.normal();
  for (const Precision pr : {Precision::FP32, Precision::FP16}) {
    SCOPED_TRACE(int(pr));
    auto plain = model("resnet18", 10, "imagenet"), last = model("resnet18", 10, "imagenet");
    for (Module* m : {plain.get(), last.get()}) m->set_precision(pr);
    last->set_channels_last(true);
    const Tensor z = plain->forward(x.clone()), z_last = last->forward(x.clone());
    EXPECT_FALSE(z_last.channels_last());
    EXPECT_EQ(z.to_vector(), z_last.to_vector());
    Tensor dz = Tensor::full(z.shape(), 0.1f);
    plain->backward(dz.clone());
    last->backward(std::move(dz));
    auto a = plain->named_parameters(), b = last->named_parameters();
    for (size_t i = 0; i < a.size(); ++i)
      EXPECT_EQ(a[i].second->grad.to_vector(), b[i].second->grad.to_vector()) << a[i].first;
    Conv2d conv(3, 4, 3, 1, 1, rng);
    BatchNorm2d bn(4);
    MaxPool2d pool(PoolParams{});
    Rng r1(16), r2(16);  // the same weights
    Conv2d plain_conv(3, 4, 3, 1, 1, r1), last_conv(3, 4, 3, 1, 1, r2);
    plain_conv.set_precision(pr);
    last_conv.set_precision(pr);
    last_conv.set_channels_last(true);
    Tensor cy = plain_conv.forward(x.clone()), cy_last = last_conv.forward(x.clone());
    ASSERT_TRUE(cy_last.channels_last());
    EXPECT_EQ(cast_to(cy_last, DType::F32).to_vector(), cast_to(cy, DType::F32).to_vector());
    Tensor g32(cy.shape());
    for (int64_t i = 0; i < g32.numel(); ++i) g32.data<float>()[i] = 0.01f * float(i % 97);
    Tensor g = cast_to(g32, cy.dtype()), g_last = cast_to(g32, cy.dtype(), true);
    const Tensor dx = plain_conv.backward(std::move(g)),
                 dx_last = last_conv.backward(std::move(g_last));
    EXPECT_FALSE(dx_last.channels_last());
    EXPECT_EQ(dx.to_vector(), dx_last.to_vector());
    EXPECT_EQ(plain_conv.weight.grad.to_vector(), last_conv.weight.grad.to_vector());
    for (Module* m : std::vector<Module*>{&conv, &bn, &pool}) m->set_channels_last(true);
    const Tensor y = pool.forward(bn.forward(conv.forward(x.clone())));
    EXPECT_TRUE(y.channels_last());
    Tensor dy = Tensor::full(y.shape(), 1.0f);
    dy.set_channels_last(true);
    EXPECT_TRUE(bn.backward(pool.backward(std::move(dy))).channels_last());
  }
}

// cast reorders between NCHW and channels-last (and converts the dtype on the way).
TEST(Models, CastReordersToAndFromChannelsLast) {
  std::vector<float> v(24);
  for (int i = 0; i < 24; ++i) v[size_t(i)] = float(i);
  const Tensor t = Tensor::from_vector({2, 3, 2, 2}, v);  // value = (n*3 + c)*4 + p
  for (const DType d : {DType::F32, DType::F16, DType::BF16}) {
    const Tensor last = cast_to(t, d, true);
    EXPECT_TRUE(last.channels_last());
    const std::vector<float> s = last.to_vector();  // storage order: (n*4 + p)*3 + c
    for (int n = 0; n < 2; ++n)
      for (int c = 0; c < 3; ++c)
        for (int p = 0; p < 4; ++p)
          EXPECT_EQ(s[size_t((n * 4 + p) * 3 + c)], float((n * 3 + c) * 4 + p));
    EXPECT_EQ(cast_to(last, DType::F32).to_vector(), v);
    EXPECT_TRUE(cast_to(last, d, true).channels_last());
  }
  EXPECT_TRUE(t.clone().set_channels_last(true).clone().channels_last());
}

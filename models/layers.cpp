#include "models/layers.h"

#include <cmath>

#include "kernels/amp.h"
#include "kernels/batchnorm.h"
#include "kernels/elementwise.h"
#include "kernels/linear.h"

namespace dpt {

namespace {
// Fills a new tensor with f(rng) per element, in parallel chunks whose generators start at the
// offsets the serial draw would reach: the values do not depend on the thread count.
template <typename F>
Tensor random_fill(Shape shape, Rng& rng, uint64_t draws_per_value, F f) {
  Tensor t(std::move(shape));
  float* p = t.data<float>();
  const int64_t n = t.numel(), chunk = 4096;
  const RngState base = rng.state();
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < (n + chunk - 1) / chunk; ++c) {
    Rng r(base);
    r.advance(uint64_t(c * chunk) * draws_per_value);
    for (int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); ++i) p[i] = f(r);
  }
  rng.advance(uint64_t(n) * draws_per_value);
  return t;
}
Tensor normal_tensor(Shape shape, float stddev, Rng& rng) {
  return random_fill(std::move(shape), rng, 2, [stddev](Rng& r) { return stddev * r.normal(); });
}
Tensor uniform_tensor(Shape shape, float bound, Rng& rng) {
  return random_fill(std::move(shape), rng, 1,
                     [bound](Rng& r) { return r.uniform(-bound, bound); });
}
}  // namespace

Conv2d::Conv2d(int64_t in, int64_t out, int k, int stride, int pad, Rng& rng)
    : weight(register_parameter(
          "weight", normal_tensor({out, in, k, k}, std::sqrt(2.0f / float(out * k * k)), rng))),
      p_{stride, pad} {}

namespace {

// Mixed precision (Module::set_precision): a copy of t rounded to `d`, or t itself for F32.
Tensor rounded(const Tensor& t, DType d) {
  if (d == DType::F32) return t.share();
  Tensor r = t.clone();
  round_(r, d);
  return r;
}

// Accumulates into `grad` a gradient computed by `fill` (which accumulates into what it is
// given), rounded to `d` first: in half precision, each layer's weight gradient is a half value.
template <typename F>
void add_rounded_grad(Tensor& grad, DType d, F fill) {
  if (d == DType::F32) return fill(grad);
  Tensor g = Tensor::zeros(grad.shape(), DType::F32, grad.device());
  fill(g);
  round_(g, d);
  add_(grad, g);
}

}  // namespace

namespace {
// Outputs and gradients take the input's dtype and layout.
Tensor like(const Tensor& t) {
  Tensor r(t.shape(), t.dtype(), t.device());
  r.set_channels_last(t.channels_last());
  return r;
}
}  // namespace

// The kernels round the operands and outputs as the precision asks (kernels/conv.h).
Conv2dParams Conv2d::params() const {
  Conv2dParams p = p_;
  p.precision = precision();
  return p;
}

// In fp16 and bf16 the output, and every activation computed from it, is stored in 16 bits.
Tensor Conv2d::forward(Tensor x) {
  const Tensor& w = weight.value;
  Tensor y({x.dim(0), w.dim(0), conv_out_size(x.dim(2), w.dim(2), p_.stride, p_.pad),
            conv_out_size(x.dim(3), w.dim(3), p_.stride, p_.pad)},
           rounding_of(precision()), x.device());
  y.set_channels_last(channels_last());
  conv2d_forward(x, w, y, params());
  if (is_training()) x_ = std::move(x);
  return y;
}

Tensor Conv2d::backward(Tensor dy) {
  DPT_ASSERT(x_.defined(), "Conv2d::backward without a training-mode forward");
  Tensor dx;
  if (input_grad_) dx = like(x_);
  conv2d_backward(dy, x_, weight.value, input_grad_ ? &dx : nullptr, weight.grad, params());
  grads_ready();
  release();
  return dx;
}

BatchNorm2d::BatchNorm2d(int64_t c, float eps, float momentum)
    : weight(register_parameter("weight", Tensor::full({c}, 1.0f))),
      bias(register_parameter("bias", Tensor::zeros({c}))),
      running_mean(register_buffer("running_mean", Tensor::zeros({c}))),
      running_var(register_buffer("running_var", Tensor::full({c}, 1.0f))),
      num_batches_tracked(register_buffer("num_batches_tracked", Tensor::zeros({}, DType::I64))),
      eps_(eps),
      momentum_(momentum) {}

Tensor BatchNorm2d::forward(Tensor x) {
  Tensor y = like(x);
  if (!is_training()) {
    batchnorm_forward(x, running_mean, running_var, weight.value, bias.value, eps_, y, relu_);
    return y;
  }
  const int64_t C = x.dim(1);
  Tensor mean({C}, DType::F32, x.device()), var({C}, DType::F32, x.device());
  batchnorm_stats(x, mean, var);
  int64_t count = x.numel() / C;
  if (sync_) sync_->reduce_stats(mean, var, count);
  DPT_CHECK(count > 1, ConfigError, "BatchNorm2d in training mode needs more than one value per ",
            "channel (got a batch of shape ", shape_str(x.shape()), "); use a larger batch");
  batchnorm_forward(x, mean, var, weight.value, bias.value, eps_, y, relu_);
  batchnorm_update_running(running_mean, running_var, num_batches_tracked, mean, var, count,
                           momentum_);
  x_ = std::move(x);
  if (relu_) y_ = y.share();
  mean_ = std::move(mean);
  var_ = std::move(var);
  count_ = count;
  return y;
}

Tensor BatchNorm2d::backward(Tensor dy) {
  DPT_CHECK(x_.defined(), ConfigError,
            "BatchNorm2d::backward needs a training-mode forward first (eval mode keeps nothing)");
  const int64_t C = x_.dim(1);
  Tensor sum_dy({C}, DType::F32, x_.device()), sum_dy_xhat({C}, DType::F32, x_.device());
  const Tensor* relu_y = relu_ ? &y_ : nullptr;
  batchnorm_backward_reduce(dy, x_, mean_, var_, eps_, sum_dy, sum_dy_xhat, relu_y);
  add_(weight.grad, sum_dy_xhat);
  add_(bias.grad, sum_dy);
  grads_ready();
  if (sync_) sync_->reduce_grad_sums(sum_dy, sum_dy_xhat);
  Tensor dx = like(x_);
  batchnorm_backward_data(dy, x_, mean_, var_, weight.value, sum_dy, sum_dy_xhat, eps_, count_, dx,
                          relu_y);
  release();
  return dx;
}

void BatchNorm2d::release() {
  x_ = Tensor();
  y_ = Tensor();
  mean_ = Tensor();
  var_ = Tensor();
}

Tensor ReLU::forward(Tensor x) {
  relu_(x);
  if (is_training()) y_ = x.share();
  return x;
}

Tensor ReLU::backward(Tensor dy) {
  relu_backward_(dy, y_);
  release();
  return dy;
}

Tensor MaxPool2d::forward(Tensor x) {
  Tensor y({x.dim(0), x.dim(1), conv_out_size(x.dim(2), p_.kernel, p_.stride, p_.pad),
            conv_out_size(x.dim(3), p_.kernel, p_.stride, p_.pad)},
           x.dtype(), x.device());
  y.set_channels_last(x.channels_last());
  maxpool2d_forward(x, y, p_);
  if (is_training()) x_ = std::move(x);
  return y;
}

Tensor MaxPool2d::backward(Tensor dy) {
  Tensor dx = like(x_);
  maxpool2d_backward(dy, x_, dx, p_);
  release();
  return dx;
}

Tensor GlobalAvgPool::forward(Tensor x) {
  Tensor y({x.dim(0), x.dim(1)}, DType::F32, x.device());
  global_avgpool_forward(x, y);
  in_shape_ = x.shape();
  in_dtype_ = x.dtype();
  in_channels_last_ = x.channels_last();
  dev_ = x.device();
  return y;
}

Tensor GlobalAvgPool::backward(Tensor dy) {
  Tensor dx(in_shape_, in_dtype_, dev_);
  dx.set_channels_last(in_channels_last_);
  global_avgpool_backward(dy, dx);
  return dx;
}

Linear::Linear(int64_t in, int64_t out, Rng& rng)
    : weight(register_parameter("weight",
                                uniform_tensor({out, in}, 1.0f / std::sqrt(float(in)), rng))),
      bias(register_parameter("bias", uniform_tensor({out}, 1.0f / std::sqrt(float(in)), rng))) {}

Tensor Linear::forward(Tensor x) {
  DPT_CHECK(x.ndim() == 2 && x.dim(1) == weight.value.dim(1), ConfigError, "Linear expects [N, ",
            weight.value.dim(1), "] input, got ", shape_str(x.shape()));
  const DType d = rounding_of(precision());
  x = rounded(x, d);
  Tensor y({x.dim(0), weight.value.dim(0)}, DType::F32, x.device());
  linear_forward(x, rounded(weight.value, d), rounded(bias.value, d), y);
  round_(y, d);
  if (is_training()) x_ = std::move(x);
  return y;
}

Tensor Linear::backward(Tensor dy) {
  const DType d = rounding_of(precision());
  dy = rounded(dy, d);
  Tensor dx(x_.shape(), DType::F32, x_.device());
  const Tensor w = rounded(weight.value, d);
  add_rounded_grad(weight.grad, d, [&](Tensor& gw) {
    add_rounded_grad(bias.grad, d, [&](Tensor& gb) { linear_backward(dy, x_, w, &dx, gw, gb); });
  });
  round_(dx, d);
  grads_ready();
  release();
  return dx;
}

Tensor forward_chain(const std::vector<Module*>& chain, Tensor x) {
  for (Module* m : chain) x = m->forward(std::move(x));
  return x;
}

Tensor backward_chain(const std::vector<Module*>& chain, Tensor dy) {
  for (auto it = chain.rbegin(); it != chain.rend(); ++it) dy = (*it)->backward(std::move(dy));
  return dy;
}

}  // namespace dpt

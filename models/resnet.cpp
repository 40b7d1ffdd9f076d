#include "models/resnet.h"

#include "kernels/elementwise.h"

namespace dpt {

ResidualBlock::ResidualBlock(bool bottleneck, int64_t in, int64_t planes, int stride, Rng& rng)
    : bottleneck_(bottleneck) {
  const int64_t out = planes * expansion(bottleneck);
  auto conv = [&](const char* name, int64_t ci, int64_t co, int k, int s) {
    convs_.push_back(&register_module(name, std::make_unique<Conv2d>(ci, co, k, s, k / 2, rng)));
  };
  auto bn = [&](const char* name, int64_t c) {
    bns_.push_back(&register_module(name, std::make_unique<BatchNorm2d>(c)));
  };
  if (bottleneck) {
    conv("conv1", in, planes, 1, 1);
    bn("bn1", planes);
    conv("conv2", planes, planes, 3, stride);
    bn("bn2", planes);
    conv("conv3", planes, out, 1, 1);
    bn("bn3", out);
  } else {
    conv("conv1", in, planes, 3, stride);
    bn("bn1", planes);
    conv("conv2", planes, planes, 3, 1);
    bn("bn2", planes);
  }
  register_module("relu", std::make_unique<ReLU>());  // torchvision's tree; fused where it runs
  for (size_t i = 0; i + 1 < bns_.size(); ++i) bns_[i]->fuse_relu();
  if (stride != 1 || in != out) {
    downsample_ = &register_module("downsample", std::make_unique<Sequential>());
    downsample_->add(std::make_unique<Conv2d>(in, out, 1, stride, 0, rng));
    downsample_->add(std::make_unique<BatchNorm2d>(out));
  }
}

// Every batch norm but the last applies the ReLU after it (fused); the last one's ReLU comes after
// the residual add, fused with it.
Tensor ResidualBlock::forward(Tensor x) {
  Tensor identity = downsample_ ? downsample_->forward(x.share()) : x.share();
  for (size_t i = 0; i < convs_.size(); ++i) x = bns_[i]->forward(convs_[i]->forward(std::move(x)));
  add_relu_(x, identity);
  if (is_training()) y_ = x.share();
  return x;
}

Tensor ResidualBlock::backward(Tensor dy) {
  DPT_ASSERT(y_.defined(), "ResidualBlock::backward without a training-mode forward");
  relu_backward_(dy, y_);
  Tensor g = dy.share();
  for (size_t i = convs_.size(); i-- > 0;) g = convs_[i]->backward(bns_[i]->backward(std::move(g)));
  if (downsample_)
    add_(g, downsample_->backward(std::move(dy)));
  else
    add_(g, dy);
  release();
  return g;
}

ResNet::ResNet(const ResNetConfig& cfg, Rng& rng) {
  const int64_t width = 64;
  const int k = cfg.small_stem ? 3 : 7, s = cfg.small_stem ? 1 : 2;
  auto& stem =
      register_module("conv1", std::make_unique<Conv2d>(cfg.in_channels, width, k, s, k / 2, rng));
  stem.set_input_grad(false);
  order_.push_back(&stem);
  auto& bn1 = register_module("bn1", std::make_unique<BatchNorm2d>(width));
  bn1.fuse_relu();  // the stem's relu (registered for torchvision's tree) runs inside bn1
  order_.push_back(&bn1);
  register_module("relu", std::make_unique<ReLU>());
  if (!cfg.small_stem)
    order_.push_back(&register_module("maxpool", std::make_unique<MaxPool2d>(PoolParams{3, 2, 1})));
  int64_t in = width;
  for (int stage = 0; stage < 4; ++stage) {
    auto& layer =
        register_module("layer" + std::to_string(stage + 1), std::make_unique<Sequential>());
    const int64_t planes = width << stage;
    for (int b = 0; b < cfg.layers.at(stage); ++b) {
      int stride = (stage > 0 && b == 0) ? 2 : 1;
      auto& block =
          layer.add(std::make_unique<ResidualBlock>(cfg.bottleneck, in, planes, stride, rng));
      if (cfg.zero_init_residual) block.last_bn().weight.value.zero_();
      in = planes * ResidualBlock::expansion(cfg.bottleneck);
    }
    order_.push_back(&layer);
  }
  order_.push_back(&register_module("avgpool", std::make_unique<GlobalAvgPool>()));
  order_.push_back(&register_module("fc", std::make_unique<Linear>(in, cfg.num_classes, rng)));
}

}  // namespace dpt

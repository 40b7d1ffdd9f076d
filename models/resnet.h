// ResNet (He et al. 2015) with torchvision's module tree, names and initialisation:
// conv1, bn1, relu, [maxpool], layer1..layer4 (Sequential of blocks), avgpool, fc.
// Bottleneck puts the stride on its 3x3 conv (torchvision's "ResNet v1.5").
#pragma once

#include <memory>
#include <vector>

#include "models/layers.h"

namespace dpt {

// BasicBlock (two 3x3 convs, expansion 1) or Bottleneck (1x1, 3x3, 1x1, expansion 4).
class ResidualBlock : public Module {
 public:
  ResidualBlock(bool bottleneck, int64_t in, int64_t planes, int stride, Rng& rng);
  std::string kind() const override { return bottleneck_ ? "Bottleneck" : "BasicBlock"; }
  Tensor forward(Tensor x) override;
  Tensor backward(Tensor dy) override;
  void release() override { y_ = Tensor(); }
  BatchNorm2d& last_bn() { return *bns_.back(); }
  static int64_t expansion(bool bottleneck) { return bottleneck ? 4 : 1; }

 private:
  bool bottleneck_;
  std::vector<Conv2d*> convs_;
  std::vector<BatchNorm2d*> bns_;
  Sequential* downsample_ = nullptr;
  Tensor y_;  // block output after the final ReLU
};

struct ResNetConfig {
  bool bottleneck = true;
  std::vector<int> layers{3, 8, 36, 3};
  int64_t num_classes = 1000;
  int64_t in_channels = 3;
  bool small_stem = false;
  bool zero_init_residual = false;
};

class ResNet : public Module {
 public:
  ResNet(const ResNetConfig& cfg, Rng& rng);
  std::string kind() const override { return "ResNet"; }
  Tensor forward(Tensor x) override { return forward_chain(order_, std::move(x)); }
  Tensor backward(Tensor dy) override { return backward_chain(order_, std::move(dy)); }

 private:
  std::vector<Module*> order_;
};

}  // namespace dpt

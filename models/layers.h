// The layers ResNet is built from, with torch.nn's names for their parameters and buffers.
#pragma once

#include <memory>
#include <vector>

#include "core/rng.h"
#include "kernels/conv.h"
#include "kernels/pool.h"
#include "models/module.h"

namespace dpt {

class Conv2d : public Module {
 public:
  // weight: [out, in, k, k], no bias; kaiming-normal (fan_out, relu) init as torchvision's ResNet.
  Conv2d(int64_t in, int64_t out, int k, int stride, int pad, Rng& rng);
  std::string kind() const override { return "Conv2d"; }
  Tensor forward(Tensor x) override;
  Tensor backward(Tensor dy) override;
  void release() override { x_ = Tensor(); }
  // The first layer of a network needs no gradient for its input: backward then returns none.
  void set_input_grad(bool on) { input_grad_ = on; }
  Parameter& weight;

 private:
  Conv2dParams params() const;  // p_ with the math precision() asks for
  Conv2dParams p_;              // stride and padding (its precision is params()' business)
  bool input_grad_ = true;
  Tensor x_;
};

// Hook through which SyncBatchNorm reduces per-channel statistics across replicas.
class BatchNormSync {
 public:
  virtual ~BatchNormSync() = default;
  // In: this replica's mean/var over `count` values. Out: the global mean/var and count.
  virtual void reduce_stats(Tensor& mean, Tensor& var, int64_t& count) = 0;
  // In/out: per-channel sums of dy and dy*xhat, summed over all replicas on return.
  virtual void reduce_grad_sums(Tensor& sum_dy, Tensor& sum_dy_xhat) = 0;
};

class BatchNorm2d : public Module {
 public:
  explicit BatchNorm2d(int64_t channels, float eps = 1e-5f, float momentum = 0.1f);
  std::string kind() const override { return "BatchNorm2d"; }
  Tensor forward(Tensor x) override;
  Tensor backward(Tensor dy) override;
  void release() override;
  void set_sync(BatchNormSync* sync) { sync_ = sync; }
  // Applies the ReLU that follows (torchvision's separate nn.ReLU) inside the batch norm kernels:
  // the same values, one pass over the activations fewer each way.
  void fuse_relu() { relu_ = true; }
  Parameter& weight;
  Parameter& bias;
  Tensor& running_mean;
  Tensor& running_var;
  Tensor& num_batches_tracked;

 private:
  float eps_, momentum_;
  BatchNormSync* sync_ = nullptr;
  bool relu_ = false;
  Tensor x_, y_, mean_, var_;  // y_: the output, kept (shared) for the fused ReLU's mask
  int64_t count_ = 0;          // values per channel behind mean_/var_ (all replicas with SyncBN)
};

class ReLU : public Module {
 public:
  std::string kind() const override { return "ReLU"; }
  Tensor forward(Tensor x) override;    // in place
  Tensor backward(Tensor dy) override;  // in place on dy
  void release() override { y_ = Tensor(); }

 private:
  Tensor y_;
};

class MaxPool2d : public Module {
 public:
  explicit MaxPool2d(PoolParams p) : p_(p) {}
  std::string kind() const override { return "MaxPool2d"; }
  Tensor forward(Tensor x) override;
  Tensor backward(Tensor dy) override;
  void release() override { x_ = Tensor(); }

 private:
  PoolParams p_;
  Tensor x_;
};

// AdaptiveAvgPool2d((1, 1)) followed by flatten: [N, C, H, W] -> [N, C]. The output is float32
// whatever the input's dtype (16-bit in fp16/bf16 training) and layout, and dx has the input's
// dtype and layout.
class GlobalAvgPool : public Module {
 public:
  std::string kind() const override { return "AdaptiveAvgPool2d"; }
  Tensor forward(Tensor x) override;
  Tensor backward(Tensor dy) override;

 private:
  Shape in_shape_;
  DType in_dtype_ = DType::F32;
  bool in_channels_last_ = false;
  Device dev_;
};

class Linear : public Module {
 public:
  // weight [out, in] and bias [out], both U(-1/sqrt(in), 1/sqrt(in)) as torch.nn.Linear.
  Linear(int64_t in, int64_t out, Rng& rng);
  std::string kind() const override { return "Linear"; }
  Tensor forward(Tensor x) override;
  Tensor backward(Tensor dy) override;
  void release() override { x_ = Tensor(); }
  Parameter& weight;
  Parameter& bias;

 private:
  Tensor x_;
};

// Runs modules in order (forward) or in reverse order (backward).
Tensor forward_chain(const std::vector<Module*>& chain, Tensor x);
Tensor backward_chain(const std::vector<Module*>& chain, Tensor dy);

// Children named "0", "1", ... run in order.
class Sequential : public Module {
 public:
  std::string kind() const override { return "Sequential"; }
  template <typename M>
  M& add(std::unique_ptr<M> m) {
    M& ref = register_module(std::to_string(children().size()), std::move(m));
    order_.push_back(&ref);
    return ref;
  }
  Tensor forward(Tensor x) override { return forward_chain(order_, std::move(x)); }
  Tensor backward(Tensor dy) override { return backward_chain(order_, std::move(dy)); }
  size_t size() const { return order_.size(); }

 private:
  std::vector<Module*> order_;
};

}  // namespace dpt

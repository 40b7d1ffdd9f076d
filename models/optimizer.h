// SGD over a module's named parameters (momentum buffers keyed by parameter name, so they survive
// renaming between layouts), the learning-rate schedule (linear warmup, then constant, step
// decay or cosine annealing) and the loss scaler of fp16 training.
#pragma once

#include <map>
#include <string>

#include "kernels/optim.h"
#include "models/module.h"

namespace dpt {

class Sgd {
 public:
  explicit Sgd(SgdParams h) : h_(h) {}
  void set_lr(float lr) { h_.lr = lr; }
  const SgdParams& params() const { return h_; }
  void step(Module& m);
  // Momentum buffers by parameter name; absent until the first step.
  std::map<std::string, Tensor>& buffers() { return bufs_; }

 private:
  SgdParams h_;
  std::map<std::string, Tensor> bufs_;
};

// Dynamic loss scaling, PyTorch's GradScaler rule: the loss gradient is multiplied by scale()
// before backward; after it, unscale() divides every gradient by it and reports whether any was
// inf or NaN. A step with an overflow is skipped and the scale multiplied by `backoff`;
// `interval` steps in a row without one multiply it by `growth`. (scale, good_steps) is what a
// checkpoint keeps.
class GradScaler {
 public:
  explicit GradScaler(float scale = 65536.0f, float growth = 2.0f, float backoff = 0.5f,
                      int64_t interval = 2000);
  float scale() const { return scale_; }
  int64_t good_steps() const { return good_steps_; }
  void restore(float scale, int64_t good_steps);
  // Multiplies the loss gradient (the gradient backward starts from) by the scale.
  void scale_loss_grad(Tensor& dloss) const;
  // Divides m's gradients by the scale; true when one of them was not finite.
  bool unscale(Module& m) const;
  // After each step: found_inf as unscale() reported it (the same on every replica).
  void update(bool found_inf);

 private:
  float scale_, growth_, backoff_;
  int64_t interval_, good_steps_ = 0;
};

struct LrSchedule {
  enum class Kind { Constant, Step, Cosine };
  Kind kind = Kind::Cosine;
  float base_lr = 0.1f;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;   // cosine: anneal to 0 at this step
  int64_t step_size = 1000;  // step: multiply by gamma every step_size steps after warmup
  float gamma = 0.1f;
  float lr_at(int64_t step) const;
  static Kind parse(const std::string& s);  // "constant" | "step" | "cosine"
};

}  // namespace dpt

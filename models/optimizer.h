// SGD over a module's named parameters (momentum buffers keyed by parameter name, so they survive
// renaming between layouts) and the learning-rate schedule: linear warmup, then constant, step
// decay or cosine annealing.
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

#include "models/optimizer.h"

#include <cmath>
#include <vector>

#include "kernels/amp.h"

namespace dpt {

void Sgd::step(Module& m) {
  std::vector<SgdSlot> slots;
  for (auto& [name, p] : m.named_parameters()) {
    auto it = bufs_.find(name);
    const bool first = it == bufs_.end();
    if (first && h_.momentum != 0)
      it = bufs_.emplace(name, Tensor(p->value.shape(), DType::F32, p->value.device())).first;
    slots.push_back({&p->value, &p->grad, h_.momentum != 0 ? &it->second : nullptr, first});
  }
  sgd_step(slots, h_);
}

GradScaler::GradScaler(float scale, float growth, float backoff, int64_t interval)
    : scale_(scale), growth_(growth), backoff_(backoff), interval_(interval) {
  DPT_CHECK(std::isfinite(scale) && scale > 0, UsageError,
            "the loss scale must be a positive finite number, got ", scale);
}

void GradScaler::restore(float scale, int64_t good_steps) {
  DPT_CHECK(std::isfinite(scale) && scale > 0 && good_steps >= 0, ConfigError,
            "impossible loss scaler state (scale ", scale, ", good steps ", good_steps, ")");
  scale_ = scale;
  good_steps_ = good_steps;
}

void GradScaler::scale_loss_grad(Tensor& dloss) const {
  scale_check_({&dloss}, scale_);
}

bool GradScaler::unscale(Module& m) const {
  std::vector<Tensor*> grads;
  for (auto& [name, p] : m.named_parameters()) grads.push_back(&p->grad);
  return scale_check_(grads, 1.0f / scale_);
}

void GradScaler::update(bool found_inf) {
  if (found_inf) {
    scale_ *= backoff_;
    good_steps_ = 0;
  } else if (++good_steps_ == interval_) {
    scale_ *= growth_;
    good_steps_ = 0;
  }
}

float LrSchedule::lr_at(int64_t step) const {
  if (step < warmup_steps) return base_lr * float(step + 1) / float(warmup_steps);
  const int64_t t = step - warmup_steps;
  switch (kind) {
    case Kind::Constant:
      return base_lr;
    case Kind::Step:
      return base_lr * std::pow(gamma, float(t / std::max<int64_t>(step_size, 1)));
    case Kind::Cosine: {
      const int64_t span = std::max<int64_t>(total_steps - warmup_steps, 1);
      const double frac = std::min(1.0, double(t) / double(span));
      return float(0.5 * base_lr * (1.0 + std::cos(3.141592653589793 * frac)));
    }
  }
  return base_lr;
}

LrSchedule::Kind LrSchedule::parse(const std::string& s) {
  if (s == "constant") return Kind::Constant;
  if (s == "step") return Kind::Step;
  if (s == "cosine") return Kind::Cosine;
  DPT_THROW(UsageError, "unknown --lr-schedule '", s, "': expected constant, step or cosine");
}

}  // namespace dpt

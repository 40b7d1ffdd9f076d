#include "models/module.h"

#include <sstream>
#include <unordered_map>

namespace dpt {

const Tensor* StateDict::find(const std::string& name) const {
  for (auto& [k, v] : entries)
    if (k == name) return &v;
  return nullptr;
}

std::string LoadReport::str() const {
  std::ostringstream os;
  auto list = [&](const char* what, const std::vector<std::string>& v) {
    if (v.empty()) return;
    os << what << " (" << v.size() << "):";
    for (size_t i = 0; i < v.size() && i < 8; ++i) os << " " << v[i];
    if (v.size() > 8) os << " ...";
    os << "; ";
  };
  list("missing keys", missing);
  list("unexpected keys", unexpected);
  std::string s = os.str();
  return s.empty() ? "all keys matched" : s.substr(0, s.size() - 2);
}

Parameter& Module::register_parameter(const std::string& name, Tensor value) {
  auto p = std::make_unique<Parameter>();
  p->grad = Tensor::zeros(value.shape(), value.dtype(), value.device());
  p->value = std::move(value);
  params_.emplace_back(name, std::move(p));
  return *params_.back().second;
}

Tensor& Module::register_buffer(const std::string& name, Tensor value) {
  buffers_.emplace_back(name, std::make_unique<Tensor>(std::move(value)));
  return *buffers_.back().second;
}

std::vector<Parameter*> Module::own_parameters() {
  std::vector<Parameter*> out;
  for (auto& [n, p] : params_) out.push_back(p.get());
  return out;
}

std::vector<std::pair<std::string, Parameter*>> Module::named_parameters(
    const std::string& prefix) {
  std::vector<std::pair<std::string, Parameter*>> out;
  for (auto& [name, m] : named_modules(prefix)) {
    std::string dot = name.empty() ? "" : name + ".";
    for (auto& [n, p] : m->params_) out.emplace_back(dot + n, p.get());
  }
  return out;
}

std::vector<std::pair<std::string, Tensor*>> Module::named_buffers(const std::string& prefix) {
  std::vector<std::pair<std::string, Tensor*>> out;
  for (auto& [name, m] : named_modules(prefix)) {
    std::string dot = name.empty() ? "" : name + ".";
    for (auto& [n, b] : m->buffers_) out.emplace_back(dot + n, b.get());
  }
  return out;
}

std::vector<std::pair<std::string, Module*>> Module::named_modules(const std::string& prefix) {
  std::vector<std::pair<std::string, Module*>> out{{prefix, this}};
  for (auto& [n, c] : children_) {
    auto sub = c->named_modules(prefix.empty() ? n : prefix + "." + n);
    out.insert(out.end(), sub.begin(), sub.end());
  }
  return out;
}

StateDict Module::state_dict() {
  StateDict sd;
  for (auto& [name, m] : named_modules()) {
    std::string dot = name.empty() ? "" : name + ".";
    for (auto& [n, p] : m->params_) sd.entries.emplace_back(dot + n, p->value.share());
    for (auto& [n, b] : m->buffers_) sd.entries.emplace_back(dot + n, b->share());
  }
  return sd;
}

LoadReport Module::load_state_dict(const StateDict& sd, bool strict) {
  std::unordered_map<std::string, const Tensor*> given;
  for (auto& [k, v] : sd.entries) given[k] = &v;
  LoadReport rep;
  std::vector<std::pair<Tensor*, const Tensor*>> copies;
  std::unordered_map<std::string, bool> known;
  auto match = [&](const std::string& name, Tensor& dst) {
    known[name] = true;
    auto it = given.find(name);
    if (it == given.end()) {
      rep.missing.push_back(name);
      return;
    }
    const Tensor& src = *it->second;
    DPT_CHECK(src.shape() == dst.shape(), ConfigError, "shape mismatch for '", name,
              "': checkpoint has ", shape_str(src.shape()), ", model has ", shape_str(dst.shape()));
    DPT_CHECK((src.dtype() == DType::I64) == (dst.dtype() == DType::I64), ConfigError,
              "dtype mismatch for '", name, "': checkpoint has ", dtype_name(src.dtype()),
              ", model has ", dtype_name(dst.dtype()));
    copies.emplace_back(&dst, &src);
  };
  for (auto& [n, p] : named_parameters()) match(n, p->value);
  for (auto& [n, b] : named_buffers()) match(n, *b);
  for (auto& [k, v] : sd.entries)
    if (!known.count(k)) rep.unexpected.push_back(k);
  DPT_CHECK(!strict || rep.ok(), ConfigError, "state dict does not match the model: ", rep.str(),
            " (pass strict=false / --no-strict to load the matching keys only)");
  for (auto& [dst, src] : copies) {
    if (src->dtype() == dst->dtype()) {
      dst->copy_from(*src);
    } else {
      Tensor cpu = src->to(Device::cpu()).to(dst->dtype());
      dst->copy_from(cpu);
    }
  }
  return rep;
}

int64_t Module::num_parameters() {
  int64_t n = 0;
  for (auto& [name, p] : named_parameters()) n += p->value.numel();
  return n;
}

void Module::train(bool on) {
  for (auto& [name, m] : named_modules()) m->training_ = on;
}

void Module::set_precision(Precision p) {
  for (auto& [name, m] : named_modules()) m->precision_ = p;
}

void Module::set_channels_last(bool on) {
  for (auto& [name, m] : named_modules()) m->channels_last_ = on;
}

void Module::to(const Device& d) {
  for (auto& [name, m] : named_modules()) {
    m->release();
    for (auto& [n, p] : m->params_) {
      if (p->value.device() == d) continue;
      p->value = p->value.to(d);
      p->grad = p->grad.to(d);
    }
    for (auto& [n, b] : m->buffers_)
      if (b->device() != d) *b = b->to(d);
  }
}

Device Module::device() {
  for (auto& [n, p] : named_parameters()) return p->value.device();
  return Device::cpu();
}

void Module::zero_grad() {
  for (auto& [n, p] : named_parameters()) p->grad.zero_();
}

}  // namespace dpt

// Module: the base of every layer and model, with PyTorch's naming of parameters and buffers.
//
// Each module registers its parameters, buffers and children in construction order; the named_*
// walks and state_dict() then produce exactly torch.nn.Module's dotted names and order
// (state_dict: per module its parameters, then its buffers, then its children, recursively).
//
// Training is explicit: forward(x) computes the output and, in train mode, keeps what backward
// needs; backward(dy) returns dx and ACCUMULATES into each parameter's grad (zero_grad clears).
// Only activation modules (ReLU) may overwrite dy in place; all others leave it untouched.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "kernels/amp.h"

namespace dpt {

struct ArchSpec;  // models/arch.h

struct Parameter {
  Tensor value;
  Tensor grad;
};

// Ordered (name, tensor) pairs; tensors share storage with the module they came from.
struct StateDict {
  std::vector<std::pair<std::string, Tensor>> entries;
  const Tensor* find(const std::string& name) const;
  size_t size() const { return entries.size(); }
};

struct LoadReport {
  std::vector<std::string> missing;     // in the module, not in the state dict
  std::vector<std::string> unexpected;  // in the state dict, not in the module
  bool ok() const { return missing.empty() && unexpected.empty(); }
  std::string str() const;
};

class Module {
 public:
  virtual ~Module() = default;
  Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  virtual std::string kind() const = 0;
  virtual Tensor forward(Tensor x) = 0;
  virtual Tensor backward(Tensor dy) = 0;

  std::vector<std::pair<std::string, Parameter*>> named_parameters(const std::string& prefix = "");
  std::vector<std::pair<std::string, Tensor*>> named_buffers(const std::string& prefix = "");
  std::vector<std::pair<std::string, Module*>> named_modules(const std::string& prefix = "");
  StateDict state_dict();
  // Copies values in (converting float dtypes). A shape mismatch always throws ConfigError; missing
  // or unexpected keys throw in strict mode and are only reported otherwise.
  virtual LoadReport load_state_dict(const StateDict& sd, bool strict = true);
  int64_t num_parameters();

  virtual void train(bool on = true);
  void eval() { train(false); }
  bool is_training() const { return training_; }
  virtual void to(const Device& d);  // moves parameters, grads and buffers
  // How convolutions and linear layers compute (kernels/amp.h: fp32, tf32, fp16 or bf16
  // numerics over float32 storage). Set on this module and every descendant.
  virtual void set_precision(Precision p);
  Precision precision() const { return precision_; }
  // Whether convolutions write their outputs channels-last (Tensor::channels_last), the layout
  // tensor-core convolutions want; the layers after them follow their inputs' layout. Set on
  // this module and every descendant.
  virtual void set_channels_last(bool on);
  bool channels_last() const { return channels_last_; }
  Device device();
  virtual void zero_grad();
  // Drops tensors kept for backward (after backward, or when a forward's output is not used).
  virtual void release() {}

  // The declarative description this model was built from (make_model records it; DataParallel
  // forwards its wrapped model's), or null. A full checkpoint needs it.
  virtual const ArchSpec* arch() const { return arch_.get(); }
  void set_arch(std::shared_ptr<const ArchSpec> spec) { arch_ = std::move(spec); }

  // This module's own parameters (not its children's), in registration order.
  std::vector<Parameter*> own_parameters();
  // Called with this module as soon as its backward has finished writing its own parameters'
  // gradients (DataParallel starts reducing a bucket once all of its gradients are ready).
  void set_grad_ready_hook(std::function<void(Module&)> hook) { grad_ready_ = std::move(hook); }

 protected:
  Parameter& register_parameter(const std::string& name, Tensor value);
  Tensor& register_buffer(const std::string& name, Tensor value);
  template <typename M>
  M& register_module(const std::string& name, std::unique_ptr<M> m) {
    M& ref = *m;
    children_.emplace_back(name, std::move(m));
    return ref;
  }
  std::vector<std::pair<std::string, std::unique_ptr<Module>>>& children() { return children_; }
  void grads_ready() {
    if (grad_ready_) grad_ready_(*this);
  }

 private:
  std::vector<std::pair<std::string, std::unique_ptr<Parameter>>> params_;
  std::vector<std::pair<std::string, std::unique_ptr<Tensor>>> buffers_;
  std::vector<std::pair<std::string, std::unique_ptr<Module>>> children_;
  bool training_ = true;
  Precision precision_ = Precision::FP32;
  bool channels_last_ = false;
  std::function<void(Module&)> grad_ready_;
  std::shared_ptr<const ArchSpec> arch_;
};

}  // namespace dpt

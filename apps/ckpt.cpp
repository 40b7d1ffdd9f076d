#include "apps/ckpt.h"

#include <cmath>
#include <map>

#include "io/checkpoint.h"

namespace dpt {

nlohmann::json ckpt_inspect(const std::string& path, FileFormat format) {
  Checkpoint c = read_checkpoint(path, format);
  nlohmann::json keys = nlohmann::json::array();
  int64_t bytes = 0;
  for (auto& [k, t] : c.state.entries) {
    keys.push_back({{"key", k},
                    {"shape", t.shape()},
                    {"dtype", dtype_name(t.dtype())},
                    {"bytes", t.nbytes()}});
    bytes += int64_t(t.nbytes());
  }
  nlohmann::json j{{"path", path},
                   {"format", format_name(c.format)},
                   {"found_under", c.found_under},
                   {"kind", kind_name(c.kind)},
                   {"layout", c.layout()},
                   {"prefix", c.prefix},
                   {"saved_from", c.saved_from},
                   {"world_size", c.world_size},
                   {"dptrain_version", c.version},
                   {"saved_at", c.saved_at},
                   {"file_bytes", c.file_bytes},
                   {"tensor_bytes", bytes},
                   {"keys", keys}};
  j["architecture"] = c.arch ? c.arch->to_json() : nlohmann::json();
  j["optimizer"] = c.optimizer;
  j["momentum_buffers"] = c.momentum.size();
  j["trainer"] = c.trainer;
  return j;
}

std::string ckpt_convert(const std::string& in, const std::string& out, const std::string& layout,
                         bool weights_only, FileFormat from, FileFormat to) {
  DPT_CHECK(layout.empty() || layout == "plain" || layout == "module", UsageError,
            "unknown --layout '", layout, "': expected plain or module");
  Checkpoint c = read_checkpoint(in, from);
  if (to == FileFormat::Auto) to = format_for_extension(out);
  std::string did = std::string(format_name(c.format)) + " to " + format_name(to);
  if (!c.found_under.empty()) did += "; state dict taken from '" + c.found_under + "'";
  if (!layout.empty()) {
    const std::string prefix = layout == "plain" ? "" : "module.";
    if (prefix != c.prefix) did += "; keys from layout " + c.layout() + " to " + layout;
    c.state = with_prefix(c.state, prefix);
    c.prefix = prefix;
  }
  if (weights_only && c.kind == CheckpointKind::Full) {
    c.kind = CheckpointKind::Weights;
    c.arch.reset();
    c.optimizer = nullptr;
    c.momentum = StateDict();
    c.trainer = nullptr;
    did += "; kind full to weights";
  }
  const bool training = !c.optimizer.is_null() || !c.trainer.is_null();
  if (to == FileFormat::Pth && c.kind == CheckpointKind::Full)
    did += "; the architecture" + std::string(training ? " and training state were" : " was") +
           " left out (a .pth file holds the state dict only)";
  else if (to == FileFormat::Safetensors && training)
    did += "; the optimizer and trainer state were left out (resuming needs an .h5 checkpoint)";
  write_checkpoint(c, out, to);
  return did;
}

nlohmann::json ckpt_diff(const std::string& a_path, const std::string& b_path) {
  Checkpoint a = read_checkpoint(a_path), b = read_checkpoint(b_path);
  StateDict sa = with_prefix(a.state, ""), sb = with_prefix(b.state, "");
  std::map<std::string, const Tensor*> in_b;
  for (auto& [k, t] : sb.entries) in_b[k] = &t;
  nlohmann::json tensors = nlohmann::json::array(), only_a = nlohmann::json::array();
  double worst = 0;
  for (auto& [k, t] : sa.entries) {
    auto it = in_b.find(k);
    if (it == in_b.end()) {
      only_a.push_back(k);
      continue;
    }
    const Tensor& u = *it->second;
    nlohmann::json e{{"key", k}};
    if (u.shape() != t.shape()) {
      e["shape_a"] = t.shape();
      e["shape_b"] = u.shape();
    } else {
      std::vector<float> x = t.to_vector(), y = u.to_vector();
      double m = 0;
      for (size_t i = 0; i < x.size(); ++i) m = std::max(m, double(std::fabs(x[i] - y[i])));
      e["max_abs_diff"] = m;
      worst = std::max(worst, m);
    }
    tensors.push_back(e);
    in_b.erase(it);
  }
  nlohmann::json only_b = nlohmann::json::array();
  for (auto& [k, t] : in_b) only_b.push_back(k);
  return {{"a", a_path},        {"b", b_path},         {"max_abs_diff", worst},
          {"tensors", tensors}, {"only_in_a", only_a}, {"only_in_b", only_b}};
}

}  // namespace dpt

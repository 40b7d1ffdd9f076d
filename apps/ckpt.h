// `dptrain ckpt`: inspect, convert, diff and verify checkpoints.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace dpt {

// Kind, layout, architecture, provenance and every key with shape, dtype and bytes.
nlohmann::json ckpt_inspect(const std::string& path);
// Rewrites in as out with the keys in `layout` ("plain", "module" or "" to keep) and, when
// weights_only, without architecture, optimizer and trainer state. Returns what it did.
std::string ckpt_convert(const std::string& in, const std::string& out, const std::string& layout,
                         bool weights_only);
// Per-tensor max |a - b| after name normalisation, plus keys only in one of them.
nlohmann::json ckpt_diff(const std::string& a, const std::string& b);

}  // namespace dpt

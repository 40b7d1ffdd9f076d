// `dptrain ckpt`: inspect, convert, diff and verify checkpoints.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "io/checkpoint.h"

namespace dpt {

// Format, kind, layout, architecture, provenance and every key with shape, dtype and bytes.
nlohmann::json ckpt_inspect(const std::string& path, FileFormat format = FileFormat::Auto);
// Rewrites in as out (formats from content and extension unless given) with the keys in `layout`
// ("plain", "module" or "" to keep) and, when weights_only, without architecture, optimizer and
// trainer state. Returns what it did, including what the output format cannot hold.
std::string ckpt_convert(const std::string& in, const std::string& out, const std::string& layout,
                         bool weights_only, FileFormat from = FileFormat::Auto,
                         FileFormat to = FileFormat::Auto);
// Per-tensor max |a - b| after name normalisation, plus keys only in one of them.
nlohmann::json ckpt_diff(const std::string& a, const std::string& b);

}  // namespace dpt

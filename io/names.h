// Name normalisation between state_dict layouts: PyTorch's wrappers put segments in front of
// every key ("module." from DataParallel / DistributedDataParallel, "_orig_mod." from
// torch.compile, "_fsdp_wrapped_module." from FSDP), any number of times. Keys are compared by
// whole dotted segments, never by character count, so a model whose first module happens to be
// named "encoder" (7 letters, like "module.") is never damaged.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "models/module.h"

namespace dpt {

// Whether s is one of the wrapper segments above.
bool is_wrapper_segment(const std::string& s);

// The chain of wrapper segments in front of every key, with its trailing dot ("", "module.",
// "_orig_mod.module."). Keys that disagree (some with a chain, some without, or different chains)
// throw ConfigError naming an example of each: such a mix cannot be mapped unambiguously.
std::string wrapper_prefix(const std::vector<std::string>& keys);

std::vector<std::string> keys_of(const StateDict& sd);

struct NormalizedLoad {
  std::string from_prefix, to_prefix;  // the wrapper chains removed and added
  int64_t prefixed = 0;                // keys whose leading chain was replaced
  std::vector<std::pair<std::string, std::string>> renamed;  // others: inner wrappers removed
  LoadReport report;                                         // missing / unexpected after mapping
  std::string str() const;                                   // one line for logs and the CLI
};

// Loads sd into target whatever the two layouts: sd's wrapper chain is replaced by target's, and
// a key still unknown to target is matched once wrapper segments inside it are dropped on both
// sides, when that match is unique. Shape mismatches always throw ConfigError; missing or
// unexpected keys throw in strict mode and are reported otherwise. Nothing is copied unless the
// whole load succeeds.
NormalizedLoad load_normalized(Module& target, const StateDict& sd, bool strict = true);

// sd with its keys rewritten to `prefix` (a wrapper chain such as "module." or "") in front of
// each key's canonical name; the tensors are shared, not copied.
StateDict with_prefix(const StateDict& sd, const std::string& prefix);

}  // namespace dpt

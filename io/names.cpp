#include "io/names.h"

#include <map>
#include <set>
#include <sstream>
#include <unordered_map>

namespace dpt {

namespace {

std::vector<std::string> split(const std::string& key) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(key);
  while (std::getline(in, cur, '.')) out.push_back(cur);
  return out;
}

std::string join(const std::vector<std::string>& segs, size_t from = 0) {
  std::string out;
  for (size_t i = from; i < segs.size(); ++i) out += (out.empty() ? "" : ".") + segs[i];
  return out;
}

// Number of leading wrapper segments (never the last segment: that is the tensor's own name).
size_t chain_length(const std::vector<std::string>& segs) {
  size_t n = 0;
  while (n + 1 < segs.size() && is_wrapper_segment(segs[n])) ++n;
  return n;
}

std::string chain_of(const std::string& key) {
  auto segs = split(key);
  std::string out;
  for (size_t i = 0; i < chain_length(segs); ++i) out += segs[i] + ".";
  return out;
}

std::string without_wrappers(const std::string& key) {
  auto segs = split(key);
  std::vector<std::string> kept;
  for (size_t i = 0; i < segs.size(); ++i)
    if (i + 1 == segs.size() || !is_wrapper_segment(segs[i])) kept.push_back(segs[i]);
  return join(kept);
}

}  // namespace

bool is_wrapper_segment(const std::string& s) {
  return s == "module" || s == "_orig_mod" || s == "_fsdp_wrapped_module";
}

std::vector<std::string> keys_of(const StateDict& sd) {
  std::vector<std::string> keys;
  for (auto& [k, t] : sd.entries) keys.push_back(k);
  return keys;
}

std::string wrapper_prefix(const std::vector<std::string>& keys) {
  if (keys.empty()) return "";
  std::map<std::string, std::string> example;  // chain -> first key with it
  for (const std::string& k : keys) example.emplace(chain_of(k), k);
  if (example.size() == 1) return example.begin()->first;
  std::string msg;
  for (auto& [chain, k] : example)
    msg += (msg.empty() ? "" : ", ") + std::string("'") + k + "' (" +
           (chain.empty() ? std::string("no prefix") : "prefix '" + chain + "'") + ")";
  DPT_THROW(ConfigError, "the state dict mixes key prefixes: ", msg,
            "; it cannot be mapped onto a model unambiguously, so fix the keys where it was saved");
}

StateDict with_prefix(const StateDict& sd, const std::string& prefix) {
  const std::string from = wrapper_prefix(keys_of(sd));
  StateDict out;
  for (auto& [k, t] : sd.entries)
    out.entries.emplace_back(prefix + k.substr(from.size()), t.share());
  return out;
}

NormalizedLoad load_normalized(Module& target, const StateDict& sd, bool strict) {
  NormalizedLoad res;
  StateDict mine = target.state_dict();
  res.from_prefix = wrapper_prefix(keys_of(sd));
  res.to_prefix = wrapper_prefix(keys_of(mine));
  std::set<std::string> targets;
  std::unordered_map<std::string, std::vector<std::string>> by_plain;  // wrappers dropped -> keys
  for (auto& [k, t] : mine.entries) {
    targets.insert(k);
    by_plain[without_wrappers(k)].push_back(k);
  }
  StateDict mapped;
  std::set<std::string> claimed;
  for (auto& [k, t] : sd.entries) {
    std::string to = res.to_prefix + k.substr(res.from_prefix.size());
    if (!targets.count(to)) {
      auto it = by_plain.find(without_wrappers(k));
      if (it != by_plain.end() && it->second.size() == 1) {
        to = it->second[0];
        res.renamed.emplace_back(k, to);
      } else {
        to = k;  // left as is: reported unexpected
      }
    } else if (to != k) {
      ++res.prefixed;
    }
    DPT_CHECK(claimed.insert(to).second, ConfigError, "two checkpoint keys map onto '", to,
              "' (one of them is '", k, "'): the layout is ambiguous");
    mapped.entries.emplace_back(to, t.share());
  }
  res.report = target.load_state_dict(mapped, strict);
  return res;
}

std::string NormalizedLoad::str() const {
  std::ostringstream o;
  if (prefixed > 0) {
    o << prefixed << " keys renamed from "
      << (from_prefix.empty() ? "no prefix" : "prefix '" + from_prefix + "'") << " to "
      << (to_prefix.empty() ? "no prefix" : "prefix '" + to_prefix + "'");
  } else {
    o << "keys matched as saved";
  }
  if (!renamed.empty())
    o << "; " << renamed.size() << " more renamed (e.g. '" << renamed[0].first << "' -> '"
      << renamed[0].second << "')";
  if (!report.ok()) o << "; " << report.str();
  return o.str();
}

}  // namespace dpt

// The declarative architecture description stored in full checkpoints: an architecture name from
// a closed set plus numbers and strings, never code. make_model() is the one factory.
//
// JSON form (docs/architecture.md):
//   {"format": "dptrain-arch", "version": 1, "arch": "resnet152", "num_classes": 10,
//    "in_channels": 1, "stem": "small", "zero_init_residual": false}
#pragma once

#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "models/module.h"

namespace dpt {

struct ArchSpec {
  std::string arch = "resnet18";  // resnet18 | resnet34 | resnet50 | resnet101 | resnet152
  int64_t num_classes = 1000;
  int64_t in_channels = 3;
  std::string stem = "imagenet";  // imagenet: 7x7/2 conv + 3x3/2 max pool; small: 3x3/1 conv
  bool zero_init_residual = false;

  nlohmann::json to_json() const;
  // Validates every field (names from the closed sets, sizes within sane bounds): ConfigError.
  static ArchSpec from_json(const nlohmann::json& j);
  void validate() const;
};

// j[key] as an integer: ConfigError naming `where` when it is missing, not an integer (a float
// such as 1e31 included) or outside int64. For every integer read from a file's JSON.
int64_t json_integer(const nlohmann::json& j, const char* key, const std::string& where);

// Builds the model with torchvision's initialisation, drawing from Rng(seed).
std::unique_ptr<Module> make_model(const ArchSpec& spec, uint64_t seed);

}  // namespace dpt

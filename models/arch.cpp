#include "models/arch.h"

#include "core/rng.h"
#include "models/resnet.h"

namespace dpt {

namespace {
struct Variant {
  const char* name;
  bool bottleneck;
  std::vector<int> layers;
};
const std::vector<Variant>& variants() {
  static const std::vector<Variant> v{{"resnet18", false, {2, 2, 2, 2}},
                                      {"resnet34", false, {3, 4, 6, 3}},
                                      {"resnet50", true, {3, 4, 6, 3}},
                                      {"resnet101", true, {3, 4, 23, 3}},
                                      {"resnet152", true, {3, 8, 36, 3}}};
  return v;
}
const Variant* find_variant(const std::string& name) {
  for (auto& v : variants())
    if (name == v.name) return &v;
  return nullptr;
}
}  // namespace

void ArchSpec::validate() const {
  DPT_CHECK(find_variant(arch), ConfigError, "unknown model '", arch,
            "': expected resnet18, resnet34, resnet50, resnet101 or resnet152");
  DPT_CHECK(num_classes >= 1 && num_classes <= 1000000, ConfigError, "num_classes ", num_classes,
            " is out of range [1, 1000000]");
  DPT_CHECK(in_channels >= 1 && in_channels <= 64, ConfigError, "in_channels ", in_channels,
            " is out of range [1, 64]");
  DPT_CHECK(stem == "imagenet" || stem == "small", ConfigError, "unknown stem '", stem,
            "': expected imagenet or small");
}

nlohmann::json ArchSpec::to_json() const {
  return {{"format", "dptrain-arch"},
          {"version", 1},
          {"arch", arch},
          {"num_classes", num_classes},
          {"in_channels", in_channels},
          {"stem", stem},
          {"zero_init_residual", zero_init_residual}};
}

int64_t json_integer(const nlohmann::json& j, const char* key, const std::string& where) {
  DPT_CHECK(j.is_object() && j.contains(key), ConfigError, where, " lacks '", key, "'");
  const nlohmann::json& v = j.at(key);
  DPT_CHECK(v.is_number_integer() &&
                (!v.is_number_unsigned() || v.get<uint64_t>() <= uint64_t(INT64_MAX)),
            ConfigError, where, ": '", key, "' is ", v.dump(), ", not an integer");
  return v.get<int64_t>();
}

ArchSpec ArchSpec::from_json(const nlohmann::json& j) {
  DPT_CHECK(j.is_object(), ConfigError, "architecture description must be a JSON object");
  auto field = [&](const char* key) -> const nlohmann::json& {
    DPT_CHECK(j.contains(key), ConfigError, "architecture description lacks '", key, "'");
    return j.at(key);
  };
  DPT_CHECK(field("format") == "dptrain-arch", ConfigError, "architecture description has format ",
            field("format").dump(), ", expected \"dptrain-arch\"");
  DPT_CHECK(field("version") == 1, ConfigError, "architecture description version ",
            field("version").dump(), " is not supported by this dptrain (reads version 1)");
  ArchSpec s;
  try {
    s.arch = field("arch").get<std::string>();
    s.num_classes = json_integer(j, "num_classes", "architecture description");
    s.in_channels = json_integer(j, "in_channels", "architecture description");
    s.stem = field("stem").get<std::string>();
    s.zero_init_residual = field("zero_init_residual").get<bool>();
  } catch (const nlohmann::json::exception& e) {
    DPT_THROW(ConfigError, "architecture description has a field of the wrong type: ", e.what());
  }
  s.validate();
  return s;
}

std::unique_ptr<Module> make_model(const ArchSpec& spec, uint64_t seed) {
  spec.validate();
  const Variant& v = *find_variant(spec.arch);
  ResNetConfig cfg;
  cfg.bottleneck = v.bottleneck;
  cfg.layers = v.layers;
  cfg.num_classes = spec.num_classes;
  cfg.in_channels = spec.in_channels;
  cfg.small_stem = spec.stem == "small";
  cfg.zero_init_residual = spec.zero_init_residual;
  Rng rng(seed, /*stream=*/0x1417);
  auto model = std::make_unique<ResNet>(cfg, rng);
  model->set_arch(std::make_shared<const ArchSpec>(spec));
  return model;
}

}  // namespace dpt

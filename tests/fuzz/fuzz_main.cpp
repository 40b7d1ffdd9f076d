// libFuzzer entry point for the target named by DPT_FUZZ_TARGET (one executable per target).
#include <cstring>

#include "tests/fuzz/targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const fuzz::Target* target = [] {
    for (const fuzz::Target& t : fuzz::kTargets)
      if (std::strcmp(t.name, DPT_FUZZ_TARGET) == 0) return &t;
    return static_cast<const fuzz::Target*>(nullptr);
  }();
  target->run(data, size);
  return 0;
}

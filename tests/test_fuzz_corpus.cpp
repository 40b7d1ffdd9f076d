// Replays the fuzz seed corpora (tests/fuzz/corpus/<target>/, small valid files) and every input
// that once broke a fuzz target (tests/fuzz/regressions/<target>/) through the same target
// functions the libFuzzer executables run: each input must end in success or a dpt::Error. Under
// the sanitizer build (scripts/test.sh) this is the regression suite of the fuzzing campaign.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include "tests/fuzz/targets.h"

namespace fs = std::filesystem;

TEST(FuzzCorpus, EveryInputEndsCleanly) {
  const fs::path root = fs::path(DPT_SOURCE_DIR) / "tests" / "fuzz";
  for (const fuzz::Target& t : fuzz::kTargets) {
    int seeds = 0;
    for (const char* kind : {"corpus", "regressions"}) {
      const fs::path dir = root / kind / t.name;
      if (!fs::is_directory(dir)) continue;
      for (const auto& e : fs::directory_iterator(dir)) {
        SCOPED_TRACE(e.path().string());
        std::ifstream in(e.path(), std::ios::binary);
        const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), {});
        t.run(bytes.data(), bytes.size());
        seeds += std::string(kind) == "corpus";
      }
    }
    EXPECT_GE(seeds, 1) << "no seed corpus for " << t.name;
  }
}

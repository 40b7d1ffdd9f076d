// Checkpoints against independent readers: h5py (Debian's python3-h5py) reads every value we
// wrote, h5dump parses the file, and files changed by h5py in ways a foreign tool might (then
// re-sealed, so they pass the digest) are refused by dptrain's structural checks.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "models/layers.h"
#include "tests/dp_fixture.h"

using namespace dpt;

namespace {

std::string tmp(const std::string& name) {
  return ::testing::TempDir() + "/" + name;
}

const std::string kOracle = std::string(DPT_SOURCE_DIR) + "/tests/checkpoint/h5py_oracle.py";

int python(const std::string& args) {
  return std::system(("/usr/bin/python3 " + kOracle + " " + args + " 2>&1").c_str());
}

bool have_h5py() {
  return std::system("/usr/bin/python3 -c 'import h5py' >/dev/null 2>&1") == 0;
}

}  // namespace

TEST(CheckpointOracle, H5pyReadsEveryValueWeWrote) {
  if (!have_h5py()) GTEST_SKIP() << "Debian's python3-h5py is not installed";
  auto model = fixture::conditioned(3);
  Checkpoint c = make_checkpoint(*model, CheckpointKind::Full);
  Tensor w = c.state.find("fc.weight")->clone();
  c.state.entries.emplace_back("extra.half", w.to(DType::F16));
  c.state.entries.emplace_back("extra.bf16", w.to(DType::BF16));
  write_checkpoint(c, tmp("oracle.h5"));
  nlohmann::json expect = nlohmann::json::array();
  std::ofstream bin(tmp("oracle.bin"), std::ios::binary);
  for (auto& [k, t] : c.state.entries) {
    expect.push_back({k, dtype_name(t.dtype()), t.shape()});
    bin.write(static_cast<const char*>(t.raw()), std::streamsize(t.nbytes()));
  }
  bin.close();
  std::ofstream(tmp("oracle.json")) << expect.dump();
  EXPECT_EQ(
      python("check " + tmp("oracle.h5") + " " + tmp("oracle.json") + " " + tmp("oracle.bin")), 0);
  if (std::system("command -v h5dump >/dev/null") != 0) {
    GTEST_SKIP() << "h5dump (Debian hdf5-tools) is not installed: only h5py was checked";
  }
  EXPECT_EQ(std::system(("h5dump -H " + tmp("oracle.h5") + " >/dev/null").c_str()), 0);
}

TEST(CheckpointOracle, ForeignChangesAreRefusedEvenWithAValidDigest) {
  if (!have_h5py()) GTEST_SKIP() << "Debian's python3-h5py is not installed";
  auto model = fixture::conditioned(3);
  const std::string good = tmp("foreign.h5"), bad = tmp("foreign_bad.h5");
  save(*model, good, CheckpointKind::Weights);
  const Tensor before = model->state_dict().find("conv1.weight")->clone();
  for (const std::string mode : {"dtype", "external", "soft", "extra", "gzip", "shape"}) {
    SCOPED_TRACE(mode);
    ASSERT_EQ(python("corrupt " + mode + " " + good + " " + bad), 0);
    EXPECT_THROW(verify_checkpoint(bad), FileError);  // h5py's change breaks the digest
    seal_checkpoint(bad);                             // as a forger would
    try {
      StateDict sd = load_state_dict(bad);
      load_normalized(*model, sd, true);
      ADD_FAILURE() << "accepted";
    } catch (const Error& e) {
      const std::string what = e.what();
      if (mode == "shape")
        EXPECT_NE(what.find("shape mismatch"), std::string::npos) << what;
      else
        EXPECT_NE(what.find(bad), std::string::npos) << what;
      std::fprintf(stderr, "%s: %s\n", mode.c_str(), what.c_str());
    }
    EXPECT_EQ(relative_error(*model->state_dict().find("conv1.weight"), before), 0.0);
  }
}

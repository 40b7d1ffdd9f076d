// Internal to io/: one reader and one writer per file format, behind read_checkpoint and
// write_checkpoint (io/checkpoint.h), which choose among them.
#pragma once

#include <string>
#include <vector>

#include "io/checkpoint.h"

namespace dpt {

// "a,b,,c" -> {"a", "b", "c"} (device lists in provenance fields).
std::vector<std::string> split_commas(const std::string& s);

// HDF5, dptrain's own format (docs/checkpoint-format.md).
Checkpoint read_hdf5(const std::string& path);
void write_hdf5(const Checkpoint& c, const std::string& path);

// torch.save's zip format (docs/interop.md): the state dict only, in c.prefix's layout.
Checkpoint read_pth(const std::string& path);
void write_pth(const Checkpoint& c, const std::string& path, bool force_zip64 = false);

// safetensors (docs/interop.md): the state dict, plus the architecture and provenance in the
// header's __metadata__.
Checkpoint read_safetensors(const std::string& path);
void write_safetensors(const Checkpoint& c, const std::string& path);

}  // namespace dpt

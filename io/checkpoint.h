// HDF5 checkpoints (format: docs/checkpoint-format.md). One file holds a model's state_dict, and
// for a full checkpoint also its architecture and, when the trainer saved it, the optimizer and
// trainer state needed to resume exactly.
//
// Saving is atomic and durable (temporary file, fsync, rename, fsync of the directory): a crash
// or a full disk leaves the previous file at the path intact. Loading trusts nothing: the file's
// SHA-256 (kept in the HDF5 user block) is verified before libhdf5 parses a byte, filter plugins
// are off, and every link, dtype, rank and size is checked before any memory is allocated for it.
// Nothing binds a checkpoint to devices: device names are provenance only.
#pragma once

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "io/names.h"
#include "models/arch.h"
#include "models/module.h"

namespace dpt {

enum class CheckpointKind { Full, Weights };
// The file formats dptrain reads and writes: its own HDF5 checkpoints, PyTorch's torch.save zip
// files (.pt/.pth/.pkl) and safetensors. Auto: by content when reading, by extension when writing
// (.pt/.pth/.pkl, .safetensors, anything else HDF5).
enum class FileFormat { Auto, Hdf5, Pth, Safetensors };
FileFormat parse_file_format(const std::string& s);  // "auto" | "h5" | "pth" | "safetensors"
const char* format_name(FileFormat f);
// The format of an existing file, from its first bytes (FileError when none fits).
FileFormat sniff_format(const std::string& path);
// The format a path is written in, from its extension.
FileFormat format_for_extension(const std::string& path);
CheckpointKind parse_checkpoint_kind(const std::string& s);  // "full" | "weights"; UsageError
const char* kind_name(CheckpointKind k);

struct Checkpoint {
  CheckpointKind kind = CheckpointKind::Weights;
  StateDict state;               // keys as saved, wrapper prefix included
  std::string prefix;            // that prefix: "" (layout "plain") or e.g. "module."
  std::optional<ArchSpec> arch;  // full checkpoints
  nlohmann::json optimizer;      // full, saved by the trainer: SGD hyper-parameters (else null)
  StateDict momentum;            // full, saved by the trainer: by canonical parameter name
  nlohmann::json trainer;        // full, saved by the trainer: position, RNG, schedule (else null)
  // Provenance: recorded for people, never needed to load.
  std::vector<std::string> saved_from{"cpu"};  // device names
  int64_t world_size = 1;                      // processes x devices that trained it
  std::string version;                         // dptrain version that wrote it
  std::string saved_at;                        // UTC, ISO 8601
  int64_t file_bytes = 0;                      // filled in by read_checkpoint
  FileFormat format = FileFormat::Hdf5;        // the file's format (read_checkpoint)
  std::string found_under;                     // .pth training dicts: the key holding the state
  std::string layout() const { return prefix.empty() ? "plain" : "module"; }
};

// Writes c to path atomically and durably. FileError (path untouched) on any failure. .pth files
// hold the state dict only and safetensors files the state dict and architecture: optimizer and
// trainer state live in HDF5 checkpoints alone.
void write_checkpoint(const Checkpoint& c, const std::string& path,
                      FileFormat format = FileFormat::Auto);
// Verifies, then reads and validates the whole file. FileError naming the file and the problem.
Checkpoint read_checkpoint(const std::string& path, FileFormat format = FileFormat::Auto);
// The integrity check alone: for HDF5 the magic, recorded size and SHA-256 of the file; for the
// other formats a full read (CRC-32 of every .pth entry, every safetensors offset).
void verify_checkpoint(const std::string& path);
// Recomputes and stores the digest of an HDF5 file that has a 512-byte user block (tests use it
// to build well-sealed files with bad contents).
void seal_checkpoint(const std::string& path);

// A checkpoint of a model or DataParallel (through Module): full needs model.arch().
Checkpoint make_checkpoint(Module& model, CheckpointKind kind);
void save(Module& model, const std::string& path, CheckpointKind kind);

// Rebuilds the model of a full checkpoint on devices[0]; with several devices `wrap` makes the
// data-parallel wrapper (apps pass DataParallel: io does not depend on parallel/).
using ModelWrapper = std::function<std::unique_ptr<Module>(
    std::unique_ptr<Module> model, const ArchSpec& arch, const std::vector<Device>& devices)>;
struct LoadedModel {
  std::unique_ptr<Module> model;
  Checkpoint checkpoint;  // the state dict's tensors are the model's own after loading
  NormalizedLoad load;
};
LoadedModel load_model(const std::string& path, const std::vector<Device>& devices,
                       const ModelWrapper& wrap = nullptr);
// The state dict of any checkpoint, for load_normalized(model, sd, strict).
StateDict load_state_dict(const std::string& path);

}  // namespace dpt

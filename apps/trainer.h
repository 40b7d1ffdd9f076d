// The training loop behind `dptrain train`: data, model, SGD with a warmup + decay schedule,
// progress output, metrics and test-set evaluation. It knows nothing of the command line.
#pragma once

#include <atomic>

#include <cstdint>
#include <string>
#include <vector>

#include "core/device.h"
#include "models/arch.h"
#include "parallel/communicator.h"

namespace dpt {

// The data of a run: where it comes from and how it is decoded.
struct DataSpec {
  std::string kind =
      "fashion-mnist";  // fashion-mnist | cifar10 | cifar100 | imagefolder | synthetic
  std::string dir;      // the dataset's directory (default: Debian's Fashion-MNIST)
  std::string val_dir;  // imagefolder: the folder evaluated after each epoch (training: optional)
  int64_t train_limit = -1;  // use only the first N training samples (-1: all)
  int64_t test_limit = -1;
  int64_t synthetic_size = 2048;
  int64_t image_size = 32;  // synthetic only
  int64_t crop = 224;       // imagefolder: RandomResizedCrop / CenterCrop size
  int64_t resize = 256;     // imagefolder: evaluation Resize before the center crop
  int workers = 2;          // threads decoding and augmenting
  bool skip_bad = false;    // imagefolder: leave out unreadable images (counted) instead of failing
};

struct TrainConfig {
  ArchSpec arch;  // num_classes / in_channels == -1: taken from the dataset
  DataSpec data;
  std::vector<Device> devices{Device::cpu()};  // more than one: DataParallel over them
  std::string bn = "sync";  // DataParallel BatchNorm: sync (SyncBatchNorm) or local (per replica)
  double bucket_mb = 25;    // DataParallel gradient bucket size (0: one bucket after backward)
  ProcessGroup group;       // several processes (mpirun): one replica each; rank 0 logs
  int64_t batch_size = 128;
  int64_t epochs = 1;
  int64_t max_steps = -1;  // stop after this many steps (-1: run all epochs)
  float lr = 0.1f;
  std::string lr_schedule = "cosine";
  int64_t warmup_steps = -1;    // -1: 5% of the steps, at most 200
  int64_t lr_step_size = 1000;  // step schedule
  float lr_gamma = 0.1f;
  float momentum = 0.9f;
  float weight_decay = 5e-4f;
  bool nesterov = false;
  // fp32; tf32: convolutions multiply TF32 operands; fp16 / bf16: convolutions and linear layers
  // round to 16 bits over fp32 master weights (kernels/amp.h); fp16 adds dynamic loss scaling
  // from loss_scale.
  std::string precision = "fp32";
  // Activations channels-last (Module::set_channels_last): on, off, or auto (on for fp16 and
  // bf16 on GPUs, where cuDNN's tensor-core convolutions want it).
  std::string channels_last = "auto";
  float loss_scale = 65536.0f;
  bool augment = false;  // random crop (pad 2 on 28x28, 4 otherwise) + horizontal flip; image
                         // folders always use RandomResizedCrop + flip when training
  uint64_t seed = 0;
  int threads = 0;           // 0: all cores
  std::string metrics_path;  // .jsonl or .csv; an .svg learning curve is written beside it
  // Checkpoints (rank 0 writes): the newest always at save_path; with keep > 1 the previous ones
  // are renamed to <stem>-step<N><ext> beside it, the newest keep - 1 of them kept.
  std::string save_path;
  std::string save_kind = "full";  // full (resumable) | weights
  int64_t save_every = 0;          // also every N steps (0: at epoch ends and at the end only)
  int64_t keep = 1;
  std::string init_from;  // weights to fine-tune from: .h5, .pth or .safetensors
  std::string resume;     // a checkpoint path, or "auto": the newest valid one beside save_path
  int64_t log_every = 0;  // 0: about 20 lines per run when not on a terminal
  // Preemption: when *stop turns non-zero (a signal number, set by the CLI's SIGTERM/SIGINT
  // handler) training finishes the current step, saves a full checkpoint to save_path and returns
  // with TrainResult::interrupted set. Under MPI the ranks agree on the step.
  const std::atomic<int>* stop = nullptr;
  bool progress_bar = true;  // on a terminal only
};

struct TrainResult {
  int64_t steps = 0;
  double train_loss = 0;  // mean over the last 10% of steps (at least the last step)
  double test_loss = -1;  // -1 when there is no test set
  double test_accuracy = -1;
  double images_per_second = 0;  // steady state, warm-up steps excluded
  double seconds = 0;            // whole run, evaluation included
  int64_t parameters = 0;
  double communication_seconds = -1;          // DataParallel: time in the gradient all-reduces
  double exposed_communication_seconds = -1;  // the part of it not hidden behind backward
  int64_t gradient_buckets = 0;
  // GPUs: the most device memory in tensors and held from the driver on the first GPU (the
  // caching allocator's peaks, as PyTorch's max_memory_allocated / max_memory_reserved).
  int64_t peak_gpu_bytes = 0, peak_gpu_reserved_bytes = 0;
  // The most host memory in tensors at once (core/tensor.h: host_tensor_memory), from the model
  // on: on CPU devices the model, its activations and the optimizer's state, plus the batches.
  int64_t peak_host_tensor_bytes = 0;
  std::string init_note;     // --init-from: what was loaded, renamed, re-initialised
  std::string resumed_from;  // the checkpoint training resumed from, if any
  int64_t resumed_step = 0;
  int64_t checkpoints_saved = 0;
  int64_t skipped_steps = 0;    // fp16: steps skipped because a gradient overflowed
  double loss_scale = 0;        // fp16: the loss scale at the end
  int interrupted = 0;          // the signal that stopped training early, else 0
  std::string interrupt_saved;  // the checkpoint written when it stopped ("" without --save)
  std::string svg_path;
  std::vector<std::string> bad_images;  // --skip-bad-images: "path: why" of each file left out
};

// --init-from: loads the weights of any checkpoint (.h5, .pth, .safetensors, any layout) into a
// freshly built model. A classifier (fc) of another size keeps its initialisation, and colour
// stem weights are summed over their input channels for a one-channel model; anything else that
// does not fit throws ConfigError. Returns one line saying what was done.
std::string init_from_checkpoint(Module& model, const std::string& path);

// Throws UsageError for bad settings, FileError for data problems, NumericError on NaN loss.
TrainResult train(TrainConfig cfg);

// The checkpoints beside `save_path` that --resume auto considers (save_path itself and its
// <stem>-step<N><ext> history), newest step first; unreadable ones are skipped.
std::vector<std::string> resume_candidates(const std::string& save_path);

// `dptrain eval`: a checkpoint of either kind on any device set, on the test set.
struct EvalConfig {
  std::string checkpoint;
  ArchSpec arch;            // weights-only checkpoints: the model to load them into
  bool arch_given = false;  // --model was passed
  bool strict = true;
  std::vector<Device> devices{Device::cpu()};
  std::string bn = "local";  // eval mode ignores it; DataParallel needs one
  DataSpec data;             // synthetic data (no split) is evaluated on the set itself
  uint64_t seed = 0;
  int64_t batch_size = 500;
  int threads = 0;
};
struct EvalReport {
  double accuracy = 0, loss = 0;
  int64_t samples = 0;
  std::string kind, layout, load;  // checkpoint kind and layout, what loading renamed
  std::vector<std::string> bad_images;
};
EvalReport evaluate_checkpoint(const EvalConfig& cfg);

}  // namespace dpt

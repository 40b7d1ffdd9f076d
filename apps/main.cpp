// dptrain: the command line. Parses flags into library configs and maps errors to exit codes:
// 0 success, 2 bad usage (with the usage line), 1 runtime failure (one line naming the reason),
// 75 training stopped by SIGTERM/SIGINT after saving a checkpoint (EX_TEMPFAIL: run it again
// with --resume auto), 128 + signal when a second signal ended it at once.
#include <malloc.h>
#include <unistd.h>
#include <CLI/CLI.hpp>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "apps/ckpt.h"
#include "apps/trainer.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "parallel/mpi.h"

namespace {

constexpr int kExitInterrupted = 75;

// The first SIGTERM or SIGINT asks the training loop to finish its step and save; a second one
// ends the process at once, before any rename, so the newest complete checkpoint stays as it was.
std::atomic<int> g_stop{0};

extern "C" void on_stop_signal(int sig) {
  if (g_stop.exchange(sig) != 0) {
    constexpr char msg[] =
        "dptrain: second signal: exiting now; the last checkpoint is untouched\n";
    [[maybe_unused]] ssize_t n = write(STDERR_FILENO, msg, sizeof msg - 1);
    _exit(128 + sig);
  }
  constexpr char msg[] =
      "dptrain: signal received: finishing this step and saving (again to exit at once)\n";
  [[maybe_unused]] ssize_t n = write(STDERR_FILENO, msg, sizeof msg - 1);
}

void install_stop_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
}

constexpr const char* kUsage =
    "usage: dptrain train [--model resnet18|34|50|101|152] [--data fashion-mnist|cifar10|cifar100|"
    "imagefolder|synthetic] [--data-dir DIR] "
    "[--devices cpu] [--batch-size N] [--epochs N] [--max-steps N] [--lr X] ... (dptrain --help)\n"
    "       dptrain model --model NAME [--num-classes N] [--in-channels N] [--stem imagenet|small]";

void add_model_flags(CLI::App& cmd, dpt::ArchSpec& arch) {
  cmd.add_option("--model", arch.arch, "resnet18, resnet34, resnet50, resnet101 or resnet152")
      ->capture_default_str();
  cmd.add_option("--stem", arch.stem, "imagenet (7x7/2 conv + max pool) or small (3x3/1 conv)")
      ->capture_default_str();
  cmd.add_option("--num-classes", arch.num_classes, "classifier outputs (default: the dataset's)");
  cmd.add_option("--in-channels,--channels", arch.in_channels,
                 "input channels (default: the dataset's; synthetic: 3)");
  cmd.add_flag("--zero-init-residual", arch.zero_init_residual,
               "start each residual branch's last BatchNorm at zero");
}

void add_data_flags(CLI::App& cmd, dpt::DataSpec& d, bool train) {
  cmd.add_option("--data", d.kind, "fashion-mnist, cifar10, cifar100, imagefolder or synthetic")
      ->capture_default_str();
  cmd.add_option("--data-dir", d.dir,
                 train ? "the dataset's directory: IDX files, CIFAR .bin files, or an image "
                         "folder DIR/<class>/<image> (default: Debian's Fashion-MNIST)"
                       : "the dataset's directory; an image folder is evaluated whole");
  if (train)
    cmd.add_option("--val-dir", d.val_dir, "imagefolder: a folder evaluated after each epoch");
  if (train)
    cmd.add_option("--train-limit", d.train_limit, "use only the first N training samples");
  cmd.add_option("--test-limit", d.test_limit, "use only the first N test samples");
  cmd.add_option("--synthetic-size", d.synthetic_size, "samples in the synthetic dataset")
      ->capture_default_str();
  cmd.add_option("--image-size", d.image_size, "synthetic image side")->capture_default_str();
  cmd.add_option("--crop-size", d.crop, "imagefolder: RandomResizedCrop / CenterCrop size")
      ->capture_default_str();
  cmd.add_option("--resize-size", d.resize, "imagefolder: evaluation Resize before CenterCrop")
      ->capture_default_str();
  cmd.add_option("--workers", d.workers, "threads decoding and augmenting images")
      ->capture_default_str();
  cmd.add_flag("--skip-bad-images", d.skip_bad,
               "imagefolder: leave out files that cannot be decoded (counted) instead of failing");
}

// One line about the image files left out by --skip-bad-images.
void report_bad_images(const std::vector<std::string>& bad) {
  if (bad.empty()) return;
  std::fprintf(stderr, "dptrain: skipped %zu unreadable image file(s), first: %s\n", bad.size(),
               bad[0].c_str());
}

int run(int argc, char** argv, const dpt::MpiRuntime* mpi) {
  CLI::App app{"dptrain: a C++ ResNet trainer with PyTorch DataParallel's naming"};
  app.require_subcommand(1);
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.set_version_flag("--version", "dptrain 0.1.0");

  dpt::TrainConfig cfg;
  cfg.arch.arch = "resnet152";
  cfg.arch.stem = "imagenet";
  cfg.arch.num_classes = -1;  // -1: the dataset's
  cfg.arch.in_channels = -1;
  std::string devices = "cpu";
  bool json = false;
  auto* train = app.add_subcommand("train", "train a model and report test accuracy");
  add_model_flags(*train, cfg.arch);
  add_data_flags(*train, cfg.data, true);
  train->add_option("--devices", devices, "device list: cpu, cpu:1, cuda:0, ...")
      ->capture_default_str();
  train
      ->add_option("--bn", cfg.bn,
                   "BatchNorm across DataParallel replicas: sync (as one device) or local "
                   "(per-replica statistics, PyTorch DataParallel)")
      ->capture_default_str();
  train
      ->add_option("--bucket-mb", cfg.bucket_mb,
                   "DataParallel gradient bucket size in MiB, reduced while backward runs "
                   "(0: one bucket after backward)")
      ->capture_default_str();
  train->add_option("--batch-size", cfg.batch_size, "samples per step (all devices together)")
      ->capture_default_str();
  train->add_option("--epochs", cfg.epochs, "passes over the training set")->capture_default_str();
  train->add_option("--max-steps", cfg.max_steps, "stop after N steps");
  train->add_option("--lr", cfg.lr, "peak learning rate")->capture_default_str();
  train->add_option("--lr-schedule", cfg.lr_schedule, "constant, step or cosine (after warmup)")
      ->capture_default_str();
  train->add_option("--warmup-steps", cfg.warmup_steps, "linear warmup steps (default 5%, <=200)");
  train->add_option("--lr-step-size", cfg.lr_step_size, "step schedule: decay every N steps")
      ->capture_default_str();
  train->add_option("--lr-gamma", cfg.lr_gamma, "step schedule: decay factor")
      ->capture_default_str();
  train->add_option("--momentum", cfg.momentum, "SGD momentum")->capture_default_str();
  train->add_option("--weight-decay", cfg.weight_decay, "L2 penalty")->capture_default_str();
  train->add_flag("--nesterov", cfg.nesterov, "Nesterov momentum");
  train
      ->add_option("--precision", cfg.precision,
                   "fp32; tf32: convolutions on TF32 tensor cores; fp16 / bf16: matrix ops "
                   "rounded to 16 bits over fp32 master weights")
      ->capture_default_str();
  train->add_option("--loss-scale", cfg.loss_scale, "fp16: the initial dynamic loss scale")
      ->capture_default_str();
  train
      ->add_option("--channels-last", cfg.channels_last,
                   "activations in channels-last order: on, off, or auto (on for fp16/bf16 on "
                   "GPUs, for cuDNN's tensor-core convolutions)")
      ->capture_default_str();
  train->add_flag("--augment", cfg.augment, "random crop + horizontal flip");
  train->add_option("--seed", cfg.seed, "seed for weights, shuffling and augmentation")
      ->capture_default_str();
  train->add_option("--threads", cfg.threads, "CPU threads (0: all cores)")->capture_default_str();
  train->add_option("--metrics", cfg.metrics_path, "write metrics to PATH (.jsonl or .csv) + .svg");
  train->add_option("--log-every", cfg.log_every, "log a line every N steps (no terminal)");
  train->add_option("--save", cfg.save_path,
                    "write a checkpoint here at each epoch end, every --save-every steps and at "
                    "the end (atomically)");
  train->add_option("--save-kind", cfg.save_kind, "full (resumable) or weights")
      ->capture_default_str();
  train->add_option("--save-every", cfg.save_every, "also save every N steps");
  train
      ->add_option("--keep", cfg.keep,
                   "keep this many newest checkpoints (older ones as <stem>-step<N>.h5)")
      ->capture_default_str();
  train->add_option("--init-from", cfg.init_from,
                    "start from the weights of any checkpoint (.h5, .pth, .safetensors) and "
                    "fine-tune; a classifier of another size is re-initialised");
  train->add_option("--resume", cfg.resume,
                    "resume from a full checkpoint, or 'auto': the newest valid one beside --save");
  train->add_flag("--json", json, "print one JSON object with the results on stdout");

  dpt::EvalConfig ev;
  ev.arch.arch = "resnet152";
  ev.arch.stem = "imagenet";
  ev.arch.num_classes = -1;
  ev.arch.in_channels = -1;
  std::string eval_devices = "cpu";
  bool no_strict = false;
  auto* eval = app.add_subcommand("eval", "evaluate a checkpoint on the test set");
  eval->add_option("--checkpoint", ev.checkpoint,
                   "checkpoint file: .h5, or a .pth / .safetensors state dict with --model")
      ->required();
  add_model_flags(*eval, ev.arch);
  eval->add_option("--devices,--map-location", eval_devices,
                   "where to run: any device list, whatever the checkpoint was saved from")
      ->capture_default_str();
  add_data_flags(*eval, ev.data, false);
  eval->add_option("--seed", ev.seed, "synthetic dataset seed")->capture_default_str();
  eval->add_option("--batch-size", ev.batch_size, "samples per forward")->capture_default_str();
  eval->add_option("--threads", ev.threads, "CPU threads (0: all cores)");
  eval->add_flag("--no-strict", no_strict, "load matching keys only; report the others");
  eval->add_flag("--json", json, "print one JSON object with the results on stdout");

  std::string ck_a, ck_b, layout, from_format = "auto", to_format = "auto";
  bool weights_only = false;
  auto* ckpt = app.add_subcommand("ckpt", "inspect, convert, diff or verify checkpoints");
  ckpt->require_subcommand(1);
  auto* inspect =
      ckpt->add_subcommand("inspect", "format, kind, layout, architecture and every key");
  inspect->add_option("path", ck_a, "checkpoint (.h5, .pth, .safetensors)")->required();
  inspect->add_option("--format", from_format, "auto (from the content), h5, pth or safetensors")
      ->capture_default_str();
  inspect->add_flag("--json", json, "one JSON object instead of text");
  auto* convert = ckpt->add_subcommand(
      "convert", "rewrite a checkpoint in another format (by extension), layout or kind");
  convert->add_option("in", ck_a, "input: .h5, .pth (torch.save) or .safetensors")->required();
  convert->add_option("out", ck_b, "output: .pth/.pt, .safetensors, anything else HDF5")
      ->required();
  convert
      ->add_option("--from", from_format,
                   "input format: auto (from the content), h5, pth, "
                   "safetensors")
      ->capture_default_str();
  convert
      ->add_option("--to", to_format,
                   "output format: auto (from the extension), h5, pth, "
                   "safetensors")
      ->capture_default_str();
  convert->add_option("--layout", layout, "plain (no prefix) or module (DataParallel's)");
  convert->add_flag("--weights-only", weights_only, "drop architecture and training state");
  std::string convert_kind;
  convert->add_option("--kind", convert_kind, "weights: same as --weights-only");
  auto* diff = ckpt->add_subcommand("diff", "per-tensor max |a - b| after name normalisation");
  diff->add_option("a", ck_a, "checkpoint")->required();
  diff->add_option("b", ck_b, "checkpoint")->required();
  diff->add_flag("--json", json, "one JSON object instead of text");
  auto* verify = ckpt->add_subcommand("verify", "check a checkpoint's integrity and contents");
  verify->add_option("path", ck_a, "checkpoint")->required();

  dpt::ArchSpec show;
  show.num_classes = 1000;
  auto* model_cmd =
      app.add_subcommand("model", "print a model's architecture description and size");
  add_model_flags(*model_cmd, show);

  const std::string first = argc > 1 ? argv[1] : "";
  if (!first.empty() && first[0] != '-' && first != "train" && first != "model" &&
      first != "eval" && first != "ckpt")
    throw dpt::UsageError(std::string("unknown command '") + argv[1] +
                          "': expected train, eval, ckpt or model");
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "dptrain: error: %s\n%s\n", e.what(), kUsage);
    return 2;
  }

  if (*model_cmd) {
    auto m = dpt::make_model(show, 0);
    nlohmann::json j{{"architecture", show.to_json()},
                     {"parameters", m->num_parameters()},
                     {"state_dict_entries", m->state_dict().size()}};
    std::cout << j.dump(2) << std::endl;
    return 0;
  }
  if (*eval) {
    ev.devices = dpt::parse_devices(eval_devices);
    ev.arch_given = eval->count("--model") > 0;
    ev.strict = !no_strict;
    dpt::EvalReport r = dpt::evaluate_checkpoint(ev);
    report_bad_images(r.bad_images);
    std::fprintf(stderr, "%s (%s, layout %s; %s): accuracy %.2f%%, loss %.4f on %lld samples\n",
                 ev.checkpoint.c_str(), r.kind.c_str(), r.layout.c_str(), r.load.c_str(),
                 100 * r.accuracy, r.loss, (long long)r.samples);
    if (json)
      std::cout << nlohmann::json{{"accuracy", r.accuracy},
                                  {"loss", r.loss},
                                  {"samples", r.samples},
                                  {"kind", r.kind},
                                  {"layout", r.layout},
                                  {"load", r.load},
                                  {"skipped_images", r.bad_images.size()}}
                       .dump()
                << std::endl;
    return 0;
  }
  if (*ckpt) {
    if (*inspect) {
      nlohmann::json j = dpt::ckpt_inspect(ck_a, dpt::parse_file_format(from_format));
      if (json) {
        std::cout << j.dump() << std::endl;
      } else {
        std::cout << ck_a << ": " << j["format"].get<std::string>() << " file, "
                  << (j["found_under"].get<std::string>().empty()
                          ? ""
                          : "state dict under '" + j["found_under"].get<std::string>() + "', ")
                  << j["kind"].get<std::string>() << " checkpoint, layout "
                  << j["layout"].get<std::string>() << ", " << j["keys"].size() << " tensors ("
                  << j["tensor_bytes"] << " bytes), saved "
                  << (j["saved_at"].get<std::string>().empty()
                          ? ""
                          : j["saved_at"].get<std::string>() + " ")
                  << "from " << j["saved_from"].dump() << "\n";
        if (!j["architecture"].is_null())
          std::cout << "architecture: " << j["architecture"].dump() << "\n";
        if (!j["trainer"].is_null()) std::cout << "trainer: " << j["trainer"].dump() << "\n";
        for (auto& k : j["keys"])
          std::cout << "  " << k["key"].get<std::string>() << " " << k["shape"].dump() << " "
                    << k["dtype"].get<std::string>() << " " << k["bytes"] << "\n";
      }
    } else if (*convert) {
      if (!convert_kind.empty())
        weights_only = weights_only ||
                       dpt::parse_checkpoint_kind(convert_kind) == dpt::CheckpointKind::Weights;
      std::fprintf(
          stderr, "%s -> %s: %s\n", ck_a.c_str(), ck_b.c_str(),
          dpt::ckpt_convert(ck_a, ck_b, layout, weights_only, dpt::parse_file_format(from_format),
                            dpt::parse_file_format(to_format))
              .c_str());
    } else if (*diff) {
      nlohmann::json j = dpt::ckpt_diff(ck_a, ck_b);
      if (json) {
        std::cout << j.dump() << std::endl;
      } else {
        for (auto& t : j["tensors"])
          std::cout << t["key"].get<std::string>() << " "
                    << (t.contains("max_abs_diff") ? t["max_abs_diff"].dump() : "shape differs")
                    << "\n";
        std::cout << "max |a - b| = " << j["max_abs_diff"]
                  << "; only in a: " << j["only_in_a"].size()
                  << ", only in b: " << j["only_in_b"].size() << "\n";
      }
    } else if (*verify) {
      dpt::verify_checkpoint(ck_a);  // digest or CRCs
      dpt::ckpt_inspect(ck_a);       // then every object validated
      std::fprintf(stderr, "%s: ok\n", ck_a.c_str());
    }
    return 0;
  }
  cfg.devices = dpt::parse_devices(devices);
  if (mpi) {
    // One replica per process (DistributedDataParallel style): "auto" means this rank's share,
    // the GPU numbered by its rank on the node (or the only one it sees, when the launcher gives
    // each rank its own CUDA_VISIBLE_DEVICES), or the CPU without GPUs.
    if (devices == "auto" && cfg.devices[0].is_cuda()) {
      const int gpus = int(cfg.devices.size());
      if (gpus == 1)
        cfg.devices.resize(1);
      else if (mpi->local_size() > gpus)
        throw dpt::UsageError("--devices auto: " + std::to_string(mpi->local_size()) +
                              " ranks on this node but " + std::to_string(gpus) +
                              " GPU(s); start at most one rank per GPU");
      else
        cfg.devices = {cfg.devices[size_t(mpi->local_rank())]};
    } else if (devices == "auto") {
      cfg.devices = {dpt::Device::cpu()};
    }
    if (cfg.devices.size() != 1)
      throw dpt::UsageError(
          "under mpirun each process drives one device; pass --devices cpu, cuda:N or auto, "
          "not " +
          devices);
    cfg.group = cfg.devices[0].is_cuda() ? mpi->nccl_group(cfg.devices[0]) : mpi->group();
    if (cfg.threads == 0)
      cfg.threads = std::max(1, int(std::thread::hardware_concurrency()) / mpi->local_size());
  }
  const bool logger = !mpi || mpi->rank() == 0;
  install_stop_handlers();
  cfg.stop = &g_stop;
  dpt::TrainResult r = dpt::train(cfg);
  if (!logger) return r.interrupted ? kExitInterrupted : 0;
  report_bad_images(r.bad_images);
  if (r.interrupted)
    std::fprintf(stderr, "dptrain: stopped by %s after step %lld: %s\n",
                 r.interrupted == SIGINT ? "SIGINT" : "SIGTERM", (long long)r.steps,
                 r.interrupt_saved.empty()
                     ? "no --save path, nothing saved"
                     : ("saved " + r.interrupt_saved + "; continue with --resume auto").c_str());
  std::fprintf(stderr, "done: %lld steps in %.1f s, train loss %.4f, %.1f img/s",
               (long long)r.steps, r.seconds, r.train_loss, r.images_per_second);
  if (r.test_accuracy >= 0) std::fprintf(stderr, ", test accuracy %.2f%%", 100 * r.test_accuracy);
  std::fprintf(stderr, "\n");
  if (!r.svg_path.empty()) std::fprintf(stderr, "learning curve: %s\n", r.svg_path.c_str());
  if (json) {
    nlohmann::json j{{"steps", r.steps},
                     {"train_loss", r.train_loss},
                     {"images_per_second", r.images_per_second},
                     {"seconds", r.seconds},
                     {"parameters", r.parameters},
                     {"peak_host_tensor_bytes", r.peak_host_tensor_bytes}};
    if (r.communication_seconds >= 0) {
      j["communication_seconds"] = r.communication_seconds;
      j["exposed_communication_seconds"] = r.exposed_communication_seconds;
      j["gradient_buckets"] = r.gradient_buckets;
    }
    if (r.peak_gpu_reserved_bytes > 0) {
      j["peak_gpu_bytes"] = r.peak_gpu_bytes;
      j["peak_gpu_reserved_bytes"] = r.peak_gpu_reserved_bytes;
    }
    if (!r.init_note.empty()) j["init_from"] = r.init_note;
    if (!r.resumed_from.empty()) {
      j["resumed_from"] = r.resumed_from;
      j["resumed_step"] = r.resumed_step;
    }
    if (r.checkpoints_saved > 0) j["checkpoints_saved"] = r.checkpoints_saved;
    if (r.loss_scale > 0) {
      j["loss_scale"] = r.loss_scale;
      j["skipped_steps"] = r.skipped_steps;
    }
    if (!r.bad_images.empty()) j["skipped_images"] = r.bad_images.size();
    if (r.interrupted) j["interrupted"] = r.interrupted == SIGINT ? "SIGINT" : "SIGTERM";
    if (r.test_accuracy >= 0) {
      j["test_accuracy"] = r.test_accuracy;
      j["test_loss"] = r.test_loss;
    }
    std::cout << j.dump() << std::endl;
  }
  return r.interrupted ? kExitInterrupted : 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Activations are allocated and freed every step: keep freed blocks up to 32 MiB (glibc's
  // maximum) in the heap instead of returning them to the kernel, which costs page faults.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 512 << 20);
  std::unique_ptr<dpt::MpiRuntime> mpi;
  // Under mpirun any failure brings every rank down (MPI_Abort) rather than leaving them waiting.
  auto fail = [&](int code, const char* what, bool usage) {
    if (mpi && mpi->size() > 1) mpi->abort(what);
    std::fprintf(stderr, "dptrain: error: %s\n%s", what, usage ? kUsage : "");
    if (usage) std::fprintf(stderr, "\n");
    return code;
  };
  try {
    if (dpt::MpiRuntime::launched()) mpi = std::make_unique<dpt::MpiRuntime>(&argc, &argv);
    return run(argc, argv, mpi.get());
  } catch (const dpt::UsageError& e) {
    return fail(2, e.what(), true);
  } catch (const dpt::ConfigError& e) {
    return fail(2, e.what(), false);
  } catch (const std::exception& e) {
    return fail(1, e.what(), false);
  }
}

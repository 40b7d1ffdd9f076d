#include "apps/trainer.h"

#include <omp.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <map>

#include "apps/metrics.h"
#include "core/allocator.h"
#include "data/dataset.h"
#include "io/checkpoint.h"
#include "io/file.h"
#include "kernels/loss.h"
#include "models/optimizer.h"
#include "parallel/data_parallel.h"

namespace dpt {

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::string hms(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  char buf[32];
  int64_t t = int64_t(s + 0.5);
  std::snprintf(buf, sizeof buf, "%lld:%02lld", (long long)(t / 60), (long long)(t % 60));
  return buf;
}

// A progress bar on a terminal, plain log lines otherwise; both on stderr.
class Progress {
 public:
  Progress(int64_t total, int64_t log_every, bool bar, bool quiet)
      : quiet_(quiet),
        total_(total),
        bar_(bar && isatty(2)),
        every_(log_every > 0 ? log_every : std::max<int64_t>(1, total / 20)) {}
  void step(int64_t step, double loss, double ips, double eta) {
    if (quiet_) return;
    if (bar_) {
      if (since(last_) < 0.1 && step != total_) return;
      last_ = Clock::now();
      const int width = 28;
      int filled = int(width * step / std::max<int64_t>(total_, 1));
      std::fprintf(stderr, "\r[%s%s] %lld/%lld loss %.4f %.1f img/s ETA %s ",
                   std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                   (long long)step, (long long)total_, loss, ips, hms(eta).c_str());
      std::fflush(stderr);
    } else if (step % every_ == 0 || step == total_ || step == 1) {
      std::fprintf(stderr, "step %lld/%lld loss %.4f %.1f img/s ETA %s\n", (long long)step,
                   (long long)total_, loss, ips, hms(eta).c_str());
    }
  }
  void line(const std::string& s) {
    if (quiet_) return;
    if (bar_) std::fprintf(stderr, "\r%-90s\r", "");
    std::fprintf(stderr, "%s\n", s.c_str());
  }

 private:
  bool quiet_;  // not rank 0 of several processes
  int64_t total_;
  bool bar_;
  int64_t every_;
  Clock::time_point last_{};
};

std::string devices_str(const std::vector<Device>& devs, BnMode bn, const ProcessGroup& g) {
  std::string s;
  for (const Device& d : devs) {
    if (!s.empty()) s += ',';
    s += d.str();
  }
  if (g.processes > 1) s += " in each of " + std::to_string(g.processes) + " processes";
  if (devs.size() > 1 || g.processes > 1)
    s += std::string(" (DataParallel, ") + (bn == BnMode::Sync ? "sync" : "local") + " BN)";
  return s;
}

// The batch itself when it already lives on dev, else a copy there.
Tensor on_device(const Tensor& t, const Device& dev) {
  return t.device() == dev ? t.share() : t.to(dev);
}

struct EvalResult {
  double loss = 0, accuracy = 0;
};

EvalResult evaluate(Module& model, const Dataset& test, const LoaderOptions& base,
                    const Device& dev, int64_t batch = 500) {
  LoaderOptions o = base;
  o.batch_size = std::min<int64_t>(batch, test.size());
  o.shuffle = false;
  o.drop_last = false;
  o.augment = Augment{};
  Loader loader(test, o);
  loader.start_epoch(0);
  model.eval();
  Batch b;
  double loss = 0;
  int64_t correct = 0, seen = 0;
  while (loader.next(b)) {
    Tensor logits = model.forward(on_device(b.images, dev));
    int64_t hits = 0;
    Tensor labels = on_device(b.labels, dev);
    loss += double(softmax_cross_entropy(logits, labels, nullptr, 1.0f, &hits)) *
            double(b.labels.numel());
    correct += hits;
    seen += b.labels.numel();
  }
  model.train();
  return {loss / double(std::max<int64_t>(seen, 1)),
          double(correct) / double(std::max<int64_t>(seen, 1))};
}

namespace fs = std::filesystem;

// Whether every value of a float32 tensor is finite (integer test of the exponent bits, which
// vectorises; a device tensor is checked in a host copy; other dtypes pass).
bool all_finite(const Tensor& t) {
  if (t.dtype() != DType::F32) return true;
  if (!t.device().is_cpu()) return all_finite(t.to(Device::cpu()));
  const uint32_t* u = static_cast<const uint32_t*>(t.raw());
  uint32_t bad = 0;
  for (int64_t i = 0; i < t.numel(); ++i) bad |= uint32_t((u[i] & 0x7f800000u) == 0x7f800000u);
  return bad == 0;
}

}  // namespace

std::string init_from_checkpoint(Module& model, const std::string& path) {
  Checkpoint ck = read_checkpoint(path);
  StateDict mine = model.state_dict();
  StateDict use;
  std::vector<std::string> skipped, notes;
  if (!ck.found_under.empty()) notes.push_back("state dict under '" + ck.found_under + "'");
  for (auto& [key, t] : with_prefix(ck.state, "").entries) {
    const Tensor* m = mine.find(key);
    if (m && m->shape() != t.shape() && (key == "fc.weight" || key == "fc.bias")) {
      skipped.push_back(key);
      if (key == "fc.weight")
        notes.push_back("fc re-initialised: the checkpoint has " + std::to_string(t.dim(0)) +
                        " classes, this model " + std::to_string(m->dim(0)));
      continue;
    }
    if (m && key == "conv1.weight" && t.ndim() == 4 && m->ndim() == 4 && m->dim(1) == 1 &&
        t.dim(1) > 1 && t.dim(0) == m->dim(0) && t.dim(2) == m->dim(2) && t.dim(3) == m->dim(3)) {
      // A colour stem for grey images: one channel that sees the sum of the colour filters.
      const Tensor w = t.to(DType::F32);
      Tensor g({t.dim(0), 1, t.dim(2), t.dim(3)});
      const int64_t c = t.dim(1), hw = t.dim(2) * t.dim(3);
      for (int64_t o = 0; o < t.dim(0); ++o)
        for (int64_t k = 0; k < hw; ++k) {
          float sum = 0;
          for (int64_t i = 0; i < c; ++i) sum += w.data<float>()[(o * c + i) * hw + k];
          g.data<float>()[o * hw + k] = sum;
        }
      notes.push_back("conv1: the checkpoint's " + std::to_string(c) +
                      " input channels summed into 1");
      use.entries.emplace_back(key, std::move(g));
      continue;
    }
    use.entries.emplace_back(key, t.share());
  }
  NormalizedLoad nl;
  try {
    nl = load_normalized(model, use, false);
  } catch (const ConfigError& e) {
    DPT_THROW(ConfigError, path, " does not fit this model: ", e.what(),
              "; check --model, --stem and --in-channels");
  }
  std::vector<std::string> missing;
  for (const std::string& k : nl.report.missing)
    if (std::find(skipped.begin(), skipped.end(), k) == skipped.end()) missing.push_back(k);
  DPT_CHECK(missing.empty() && nl.report.unexpected.empty(), ConfigError, path,
            " does not fit this model: ", LoadReport{missing, nl.report.unexpected}.str(),
            "; check --model, --stem and --in-channels");
  std::string out = path + ": " + std::to_string(use.size()) + " tensors loaded (" +
                    std::string(format_name(ck.format)) + ", layout " + ck.layout() + ")";
  for (const std::string& n : notes) out += "; " + n;
  return out;
}

namespace {

// <stem>-step<N><ext> beside the checkpoint path: the history kept by --keep.
fs::path history_path(const fs::path& save, int64_t step) {
  return save.parent_path() /
         (save.stem().string() + "-step" + std::to_string(step) + save.extension().string());
}

// History files beside save, by step.
std::map<int64_t, fs::path> history(const fs::path& save) {
  std::map<int64_t, fs::path> out;
  const std::string head = save.stem().string() + "-step", ext = save.extension().string();
  std::error_code ec;
  const fs::path dir = save.parent_path().empty() ? fs::path(".") : save.parent_path();
  for (auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(head, 0) != 0 || name.size() <= head.size() + ext.size() ||
        name.substr(name.size() - ext.size()) != ext)
      continue;
    const std::string digits = name.substr(head.size(), name.size() - head.size() - ext.size());
    if (digits.empty() || digits.size() > 15 ||
        digits.find_first_not_of("0123456789") != std::string::npos)
      continue;
    out[std::stoll(digits)] = e.path();
  }
  return out;
}

// Replicas start from the wrapped model's state, so the factory's seed does not matter.
std::unique_ptr<Module> wrap_data_parallel(std::unique_ptr<Module> model, const ArchSpec& arch,
                                           const std::vector<Device>& devices,
                                           DataParallelOptions opt) {
  return std::make_unique<DataParallel>(
      std::move(model), [arch] { return make_model(arch, 0); }, devices, std::move(opt));
}

struct Data {
  std::unique_ptr<Dataset> train, test;  // synthetic: no test set
  std::vector<float> mean, std;
  std::shared_ptr<BadImages> bad;  // image folders: files left out
};

// need_train: the training set and the evaluated one (image folders: --val-dir, if given);
// otherwise only the evaluated one (image folders: --data-dir itself).
Data load_data(const DataSpec& s, const ArchSpec& arch, uint64_t seed, bool need_train) {
  DPT_CHECK(s.workers >= 1 && s.workers <= 256, UsageError, "--workers must be in 1..256, got ",
            s.workers);
  Data d;
  if (s.kind == "fashion-mnist") {
    const std::string dir = s.dir.empty() ? "/usr/share/datasets/fashion-mnist" : s.dir;
    if (need_train) d.train = load_fashion_mnist(dir, true, s.train_limit);
    d.test = load_fashion_mnist(dir, false, s.test_limit);
    d.mean = {0.2860f};
    d.std = {0.3530f};
  } else if (s.kind == "cifar10" || s.kind == "cifar100") {
    DPT_CHECK(!s.dir.empty(), UsageError, "--data ", s.kind,
              " needs --data-dir DIR: the directory of the binary version's .bin files");
    const int classes = s.kind == "cifar10" ? 10 : 100;
    if (need_train) d.train = load_cifar(s.dir, classes, true, s.train_limit);
    d.test = load_cifar(s.dir, classes, false, s.test_limit);
    if (classes == 10) {
      d.mean = {0.4914f, 0.4822f, 0.4465f};
      d.std = {0.2470f, 0.2435f, 0.2616f};
    } else {
      d.mean = {0.5071f, 0.4865f, 0.4409f};
      d.std = {0.2673f, 0.2564f, 0.2762f};
    }
  } else if (s.kind == "imagefolder") {
    DPT_CHECK(!s.dir.empty(), UsageError,
              "--data imagefolder needs --data-dir DIR, laid out as DIR/<class>/<image>");
    DPT_CHECK(s.train_limit < 0 && s.test_limit < 0, UsageError,
              "--train-limit and --test-limit apply to fashion-mnist and cifar, not imagefolder");
    ImageFolderOptions o;
    o.crop = s.crop;
    o.resize = s.resize;
    o.skip_bad = s.skip_bad;
    o.threads = s.workers;
    d.bad = std::make_shared<BadImages>();
    if (need_train) d.train = load_image_folder(s.dir, o, d.bad);
    o.train = false;
    if (!need_train || !s.val_dir.empty())
      d.test = load_image_folder(need_train ? s.val_dir : s.dir, o, d.bad);
    DPT_CHECK(!d.train || !d.test || d.train->num_classes() == d.test->num_classes(), FileError,
              "--val-dir ", s.val_dir, " has ", d.test ? d.test->num_classes() : 0,
              " class folders but --data-dir ", s.dir, " has ",
              d.train ? d.train->num_classes() : 0, ": they must hold the same classes");
    d.mean = {0.485f, 0.456f, 0.406f};  // ImageNet's, as torchvision's examples
    d.std = {0.229f, 0.224f, 0.225f};
  } else if (s.kind == "synthetic") {
    const int64_t classes = arch.num_classes != -1 ? arch.num_classes : 10;
    const int64_t channels = arch.in_channels != -1 ? arch.in_channels : 3;
    d.train = make_synthetic(s.synthetic_size, channels, s.image_size, classes, seed);
    d.mean.assign(size_t(channels), 0.5f);
    d.std.assign(size_t(channels), 0.25f);
  } else {
    DPT_THROW(UsageError, "unknown --data '", s.kind,
              "': expected fashion-mnist, cifar10, cifar100, imagefolder or synthetic");
  }
  DPT_CHECK(s.val_dir.empty() || s.kind == "imagefolder", UsageError,
            "--val-dir is for --data imagefolder");
  return d;
}

// Fills the dataset's class and channel counts where the arch leaves them open (-1); checks fit.
void resolve_arch(ArchSpec& arch, const Dataset& data) {
  if (arch.num_classes == -1) arch.num_classes = data.num_classes();
  if (arch.in_channels == -1) arch.in_channels = data.channels();
  arch.validate();
  DPT_CHECK(arch.in_channels == data.channels(), UsageError, "the model takes ", arch.in_channels,
            " input channels but ", data.name(), " has ", data.channels());
  DPT_CHECK(arch.num_classes >= data.num_classes(), UsageError, "the model has ", arch.num_classes,
            " classes, fewer than the ", data.num_classes(), " classes of ", data.name());
}

}  // namespace

std::vector<std::string> resume_candidates(const std::string& save_path) {
  std::vector<std::string> out;
  std::error_code ec;
  if (fs::exists(save_path, ec)) out.push_back(save_path);
  auto h = history(save_path);
  for (auto it = h.rbegin(); it != h.rend(); ++it) out.push_back(it->second.string());
  return out;
}

TrainResult train(TrainConfig cfg) {
  const auto t0 = Clock::now();
  DPT_CHECK(cfg.batch_size >= 1, UsageError, "--batch-size must be at least 1, got ",
            cfg.batch_size);
  DPT_CHECK(cfg.epochs >= 1, UsageError, "--epochs must be at least 1, got ", cfg.epochs);
  DPT_CHECK(cfg.max_steps == -1 || cfg.max_steps >= 1, UsageError,
            "--max-steps must be at least 1");
  DPT_CHECK(std::isfinite(cfg.lr) && cfg.lr > 0, UsageError, "--lr must be a positive number");
  DPT_CHECK(cfg.momentum >= 0 && cfg.momentum < 1, UsageError, "--momentum must be in [0, 1)");
  DPT_CHECK(cfg.weight_decay >= 0, UsageError, "--weight-decay must not be negative");
  DPT_CHECK(cfg.threads >= 0, UsageError, "--threads must not be negative");
  DPT_CHECK(!cfg.devices.empty(), UsageError, "--devices lists no device");
  DPT_CHECK(cfg.save_every >= 0, UsageError, "--save-every must not be negative");
  DPT_CHECK(cfg.keep >= 1, UsageError, "--keep must be at least 1, got ", cfg.keep);
  const CheckpointKind save_kind = parse_checkpoint_kind(cfg.save_kind);
  DPT_CHECK(cfg.resume != "auto" || !cfg.save_path.empty(), UsageError,
            "--resume auto looks for checkpoints beside --save PATH: pass --save too");
  if (!cfg.save_path.empty()) {  // fail now, not after the first hours of training
    std::error_code ec;
    const fs::path save(cfg.save_path);
    const fs::path dir = save.parent_path().empty() ? fs::path(".") : save.parent_path();
    DPT_CHECK(!fs::is_directory(save, ec), FileError, "--save ", cfg.save_path,
              " is a directory: name the checkpoint file");
    DPT_CHECK(fs::is_directory(dir, ec), FileError, "--save ", cfg.save_path, ": directory ",
              dir.string(), " does not exist");
    DPT_CHECK(access(dir.c_str(), W_OK) == 0, FileError, "--save ", cfg.save_path,
              ": cannot write to directory ", dir.string(), ": ", errno_str());
  }
  const Device dev = cfg.devices[0];  // where batches go and outputs are gathered
  for (const Device& d : cfg.devices) {
    std::string why;
    DPT_CHECK(device_available(d, &why), DeviceError, why);
  }
  const BnMode bn_mode = parse_bn_mode(cfg.bn);
  const Precision precision = parse_precision(cfg.precision);
  const bool fp16 = precision == Precision::FP16;
  DPT_CHECK(cfg.channels_last == "auto" || cfg.channels_last == "on" || cfg.channels_last == "off",
            UsageError, "unknown --channels-last '", cfg.channels_last,
            "': expected auto, on or off");
  const bool channels_last =
      cfg.channels_last == "on" || (cfg.channels_last == "auto" && dev.is_cuda() &&
                                    (precision == Precision::FP16 || precision == Precision::BF16));
  GradScaler scaler(cfg.loss_scale);
  if (cfg.threads > 0) omp_set_num_threads(cfg.threads);
  const LrSchedule::Kind schedule_kind = LrSchedule::parse(cfg.lr_schedule);

  Data data = load_data(cfg.data, cfg.arch, cfg.seed, true);
  std::unique_ptr<Dataset>&train_set = data.train, &test_set = data.test;
  const std::vector<float>&mean = data.mean, &stdev = data.std;
  resolve_arch(cfg.arch, *train_set);

  LoaderOptions lo;
  lo.batch_size = cfg.batch_size;
  lo.seed = cfg.seed;
  lo.mean = mean;
  lo.std = stdev;
  lo.workers = cfg.data.workers;
  lo.pin_for = dev;
  if (cfg.augment) lo.augment = Augment{train_set->height() <= 28 ? 2 : 4, true};

  std::unique_ptr<Module> model = make_model(cfg.arch, cfg.seed);
  TrainResult res;
  if (!cfg.init_from.empty()) res.init_note = init_from_checkpoint(*model, cfg.init_from);
  DataParallel* dp = nullptr;
  if (cfg.devices.size() > 1 || cfg.group.processes > 1) {
    DataParallelOptions dpo{
        .bn = bn_mode, .threads = cfg.threads, .bucket_mb = cfg.bucket_mb, .group = cfg.group};
    model = wrap_data_parallel(std::move(model), cfg.arch, cfg.devices, dpo);
    dp = static_cast<DataParallel*>(model.get());
  } else {
    model->to(dev);
  }
  // After wrapping: DataParallel passes it on to every replica.
  model->set_precision(precision);
  model->set_channels_last(channels_last);
  model->train();
  res.parameters = model->num_parameters();
  int64_t step = 0;
  // Under MPI each process decodes only the rows of each batch that its replicas take.
  if (dp && cfg.group.processes > 1) lo.rows = [dp](int64_t n) { return dp->local_rows(n); };
  Loader loader(*train_set, lo);

  const int64_t per_epoch = loader.batches_per_epoch();
  const int64_t total =
      cfg.max_steps > 0 ? std::min(cfg.max_steps, cfg.epochs * per_epoch) : cfg.epochs * per_epoch;
  LrSchedule sched;
  sched.kind = schedule_kind;
  sched.base_lr = cfg.lr;
  sched.warmup_steps =
      cfg.warmup_steps >= 0 ? cfg.warmup_steps : std::min<int64_t>(200, total / 20);
  sched.total_steps = total;
  sched.step_size = cfg.lr_step_size;
  sched.gamma = cfg.lr_gamma;
  std::vector<Sgd> opts;  // one per replica: each applies the same step to its own copy
  for (size_t r = 0; r < cfg.devices.size(); ++r)
    opts.emplace_back(SgdParams{cfg.lr, cfg.momentum, 0.0f, cfg.weight_decay, cfg.nesterov});

  const bool logger = cfg.group.rank == 0;  // only rank 0 of several processes writes
  MetricsWriter metrics(logger ? cfg.metrics_path : "");
  Progress progress(total, cfg.log_every, cfg.progress_bar, !logger);

  // ---- resume ----
  int64_t start_epoch = 0, skip = 0, last_saved = -1;
  if (!cfg.resume.empty()) {
    Checkpoint ck;
    std::string from;
    if (cfg.resume == "auto") {
      for (const std::string& cand : resume_candidates(cfg.save_path)) {
        try {
          ck = read_checkpoint(cand);
          from = cand;
          break;
        } catch (const FileError& e) {
          progress.line(std::string("resume: skipping ") + e.what());
        }
      }
      if (from.empty())
        progress.line("resume: no checkpoint beside " + cfg.save_path +
                      " yet; starting from scratch");
    } else {
      ck = read_checkpoint(cfg.resume);
      from = cfg.resume;
    }
    if (!from.empty()) {
      DPT_CHECK(ck.kind == CheckpointKind::Full && !ck.trainer.is_null(), ConfigError, from,
                " has no trainer state (it is a weights checkpoint or was not written by dptrain "
                "train), so training cannot resume from it");
      DPT_CHECK(ck.arch && ck.arch->to_json() == cfg.arch.to_json(), ConfigError, from, " holds ",
                ck.arch ? ck.arch->to_json().dump() : "no model", ", not ",
                cfg.arch.to_json().dump(), ": resume with the same model options");
      const nlohmann::json& t = ck.trainer;
      const std::string where = from + " (trainer state)";
      const int64_t batch_size = json_integer(t, "batch_size", where);
      DPT_CHECK(batch_size == cfg.batch_size, ConfigError, from, " was trained with --batch-size ",
                batch_size, "; resume with the same batch size");
      const nlohmann::json seed = t.value("seed", nlohmann::json());
      const std::string trained_on = t.value("data", nlohmann::json()).is_string()
                                         ? t["data"].get<std::string>()
                                         : std::string("?");
      DPT_CHECK(seed.is_number_unsigned() && seed.get<uint64_t>() == cfg.seed &&
                    trained_on == cfg.data.kind,
                ConfigError, from, " was trained on ", trained_on, " with --seed ", seed.dump(),
                "; resume with the same data and seed");
      const std::string trained_in = t.value("precision", std::string("fp32"));
      DPT_CHECK(trained_in == cfg.precision, ConfigError, from, " was trained with --precision ",
                trained_in, "; resume with the same precision");
      if (fp16) {
        const nlohmann::json scale = t.value("loss_scale", nlohmann::json());
        DPT_CHECK(scale.is_number(), ConfigError, where, ": 'loss_scale' is ", scale.dump(),
                  ", not a number");
        scaler.restore(scale.get<float>(), json_integer(t, "loss_scale_good_steps", where));
      }
      NormalizedLoad nl = load_normalized(*model, ck.state, true);
      for (size_t r = 0; r < opts.size(); ++r) {
        const Device d = dp ? dp->devices()[r] : dev;
        for (auto& [name, m] : ck.momentum.entries) opts[r].buffers()[name] = m.to(d);
      }
      step = json_integer(t, "step", where);
      start_epoch = json_integer(t, "epoch", where);
      skip = json_integer(t, "position", where);
      DPT_CHECK(step >= 0 && start_epoch >= 0 && skip >= 0 && skip <= per_epoch, ConfigError, from,
                " records an impossible position (step ", step, ", epoch ", start_epoch, ", batch ",
                skip, ")");
      if (fs::path(from) == fs::path(cfg.save_path)) last_saved = step;
      res.resumed_from = from;
      res.resumed_step = step;
      progress.line("resumed from " + from + " at step " + std::to_string(step) + " (" + nl.str() +
                    ")");
    }
  }

  progress.line("dptrain: " + cfg.arch.arch + " (" + std::to_string(res.parameters) +
                " parameters) on " + devices_str(cfg.devices, bn_mode, cfg.group) + ", " +
                train_set->name() + " " + std::to_string(train_set->size()) + " samples, batch " +
                std::to_string(cfg.batch_size) + ", " + std::to_string(total) + " steps, " +
                std::to_string(omp_get_max_threads()) + " threads");
  if (!res.init_note.empty()) progress.line("init from " + res.init_note);

  // ---- saving (rank 0 only) ----
  auto save_now = [&](int64_t next_epoch, int64_t position, CheckpointKind kind) {
    if (cfg.save_path.empty() || !logger || last_saved == step) return;
    Checkpoint c = make_checkpoint(*model, kind);
    c.saved_from.clear();
    for (const Device& d : cfg.devices) c.saved_from.push_back(d.str());
    c.world_size = int64_t(cfg.devices.size()) * cfg.group.processes;
    if (kind == CheckpointKind::Full) {
      c.optimizer = {{"name", "sgd"},
                     {"lr", cfg.lr},
                     {"momentum", cfg.momentum},
                     {"weight_decay", cfg.weight_decay},
                     {"nesterov", cfg.nesterov}};
      for (auto& [n, t] : opts[0].buffers()) c.momentum.entries.emplace_back(n, t.share());
      c.trainer = {{"step", step},
                   {"epoch", next_epoch},
                   {"position", position},
                   {"batch_size", cfg.batch_size},
                   {"seed", cfg.seed},
                   {"data", cfg.data.kind},
                   {"total_steps", total},
                   {"lr_schedule",
                    {{"kind", cfg.lr_schedule},
                     {"base_lr", cfg.lr},
                     {"warmup_steps", sched.warmup_steps},
                     {"step_size", cfg.lr_step_size},
                     {"gamma", cfg.lr_gamma}}},
                   {"rng",
                    {{"loader", {{"seed", cfg.seed}, {"epoch", next_epoch}, {"batch", position}}},
                     {"init_seed", cfg.seed}}},
                   {"precision", cfg.precision},
                   {"loss_scale", fp16 ? scaler.scale() : 1.0},
                   {"loss_scale_good_steps", fp16 ? scaler.good_steps() : 0}};
    }
    // A NaN or an infinity in the weights (a gradient can blow up while the loss is still finite)
    // is never saved: training stops and the newest checkpoint stays the last good state.
    for (const StateDict* sd : {&c.state, &c.momentum})
      for (auto& [name, t] : sd->entries)
        DPT_CHECK(all_finite(t), NumericError, name, " became non-finite by step ", step,
                  ": training diverged and nothing was saved; lower --lr (now ", cfg.lr,
                  ") or raise --warmup-steps, and resume from the last checkpoint");
    const fs::path path(cfg.save_path);
    std::error_code ec;
    if (cfg.keep > 1 && last_saved >= 0 && fs::exists(path, ec)) {
      fs::rename(path, history_path(path, last_saved), ec);
      DPT_CHECK(!ec, FileError, "cannot keep ", cfg.save_path, " as ",
                history_path(path, last_saved).string(), ": ", ec.message());
      auto h = history(path);
      while (int64_t(h.size()) > cfg.keep - 1) {
        fs::remove(h.begin()->second, ec);
        h.erase(h.begin());
      }
    }
    try {
      write_checkpoint(c, cfg.save_path);
    } catch (const FileError& e) {
      if (last_saved < 0) throw;
      const fs::path kept = cfg.keep > 1 ? history_path(path, last_saved) : path;
      throw FileError(std::string(e.what()) + "; the checkpoint of step " +
                      std::to_string(last_saved) + " (" + kept.string() +
                      ") is intact: make room, then --resume auto");
    }
    last_saved = step;
    ++res.checkpoints_saved;
  };

  // The peak memory reported is this run's, from the model on.
  if (dev.is_cuda()) cuda_allocator().reset_peak(dev.index);
  reset_host_peak();
  const int64_t warm = std::min<int64_t>(3, total / 5);  // steps excluded from the img/s figure
  Clock::time_point steady_start = Clock::now();
  double eval_seconds = 0;
  int64_t steady_images = 0;
  std::deque<double> recent;
  const size_t keep = size_t(std::max<int64_t>(1, total / 10));
  auto run_eval = [&](double epoch) {
    if (!test_set) return;
    auto te = Clock::now();
    EvalResult ev = evaluate(*model, *test_set, lo, dev);
    eval_seconds += since(te);
    res.test_loss = ev.loss;
    res.test_accuracy = ev.accuracy;
    metrics.add({"test", step, epoch, ev.loss, ev.accuracy, 0, 0, since(t0)});
    char buf[160];
    std::snprintf(buf, sizeof buf, "epoch %.2f step %lld: test loss %.4f, test accuracy %.2f%%",
                  epoch, (long long)step, ev.loss, 100 * ev.accuracy);
    progress.line(buf);
  };

  // Preemption: every rank must stop after the same step, so under MPI the ranks sum their
  // flags after each step (one 4-byte all-reduce).
  std::unique_ptr<Communicator> stop_comm;
  if (cfg.stop && cfg.group.processes > 1) stop_comm = cfg.group.make(cfg.group.processes);
  int stop_signal = 0;
  auto stop_requested = [&] {
    if (!cfg.stop) return false;
    stop_signal = cfg.stop->load();
    if (stop_comm) {
      Tensor flag = Tensor::full({1}, float(stop_signal), dev);  // on the GPU for NCCL
      stop_comm->all_reduce_sum(cfg.group.rank, flag);
      if (flag.to_vector()[0] > 0 && stop_signal == 0) stop_signal = SIGTERM;  // another rank's
    }
    return stop_signal != 0;
  };

  Batch batch;
  int64_t next_epoch = start_epoch, position = skip;  // where the next step's batch comes from
  for (int64_t epoch = start_epoch; step < total; ++epoch) {
    loader.start_epoch(epoch, skip);
    skip = 0;
    while (step < total && loader.next(batch)) {
      const float lr = sched.lr_at(step);
      model->zero_grad();
      Tensor logits = model->forward(on_device(batch.images, dev));
      Tensor dlogits(logits.shape(), DType::F32, dev);
      Tensor labels = on_device(batch.labels, dev);
      const float loss = softmax_cross_entropy(logits, labels, &dlogits);
      DPT_CHECK(std::isfinite(loss), NumericError, "loss became ", loss, " at step ", step + 1,
                ": training diverged; lower --lr (now ", cfg.lr, ") or raise --warmup-steps");
      if (fp16) scaler.scale_loss_grad(dlogits);
      model->backward(std::move(dlogits));
      // fp16: every replica unscales its (all-reduced, hence equal) gradients; an overflow on
      // one is an overflow on all, and the step is skipped everywhere.
      std::vector<char> overflow(cfg.devices.size(), 0);
      if (dp) {
        dp->for_each_replica([&](Module& m, int r) {
          if (fp16 && (overflow[size_t(r)] = scaler.unscale(m))) return;
          opts[size_t(r)].set_lr(lr);
          opts[size_t(r)].step(m);
        });
      } else {
        if (!fp16 || !(overflow[0] = scaler.unscale(*model))) {
          opts[0].set_lr(lr);
          opts[0].step(*model);
        }
      }
      if (fp16) {
        const bool found_inf = overflow[0] != 0;
        DPT_ASSERT(std::all_of(overflow.begin(), overflow.end(),
                               [&](char o) { return (o != 0) == found_inf; }),
                   "replicas disagree on a gradient overflow");
        scaler.update(found_inf);
        res.skipped_steps += found_inf;
      }
      ++step;
      recent.push_back(loss);
      if (recent.size() > keep) recent.pop_front();
      if (step == warm) steady_start = Clock::now(), eval_seconds = 0;
      if (step > warm) steady_images += batch.labels.numel();
      const double steady = since(steady_start) - eval_seconds;
      const double ips = step > warm && steady > 0 ? double(steady_images) / steady : 0;
      const double per_step = step > warm ? steady / double(step - warm) : since(t0) / double(step);
      progress.step(step, loss, ips, per_step * double(total - step));
      const double ep = double(step) / double(per_epoch);
      if (step % std::max<int64_t>(1, total / 50) == 0 || step == total)
        metrics.add({"train", step, ep, loss, -1, lr, ips, since(t0)});
      const bool epoch_end = batch.index + 1 == per_epoch;
      next_epoch = epoch_end ? epoch + 1 : epoch;
      position = epoch_end ? 0 : batch.index + 1;
      if (epoch_end && step < total) run_eval(ep);
      if (step < total && (epoch_end || (cfg.save_every > 0 && step % cfg.save_every == 0)))
        save_now(next_epoch, position, save_kind);
      if (step < total && stop_requested()) {
        res.interrupted = stop_signal;
        if (save_kind != CheckpointKind::Full) last_saved = -1;  // a weights file cannot resume
        save_now(next_epoch, position, CheckpointKind::Full);    // resumable whatever --save-kind
        if (last_saved == step) res.interrupt_saved = cfg.save_path;
        break;
      }
    }
    if (res.interrupted) break;
  }
  if (!res.interrupted) {
    save_now(next_epoch, position, save_kind);
    run_eval(double(step) / double(per_epoch));
  }
  res.steps = step;
  if (fp16) res.loss_scale = scaler.scale();
  double s = 0;
  for (double v : recent) s += v;
  res.train_loss = s / double(std::max<size_t>(recent.size(), 1));
  const double steady = since(steady_start) - eval_seconds;
  res.images_per_second = steady_images > 0 && steady > 0 ? double(steady_images) / steady : 0;
  res.seconds = since(t0);
  if (dp) {
    res.communication_seconds = dp->communication_seconds();
    res.exposed_communication_seconds = dp->exposed_communication_seconds();
    res.gradient_buckets = int64_t(dp->buckets().size());
  }
  res.peak_host_tensor_bytes = host_tensor_memory().peak;
  if (dev.is_cuda()) {
    const AllocatorStats mem = cuda_allocator().stats(dev.index);
    res.peak_gpu_bytes = mem.peak_in_use;
    res.peak_gpu_reserved_bytes = mem.peak_reserved;
  }
  res.svg_path = metrics.write_svg();
  if (data.bad) res.bad_images = data.bad->list();
  return res;
}

EvalReport evaluate_checkpoint(const EvalConfig& cfg) {
  DPT_CHECK(!cfg.devices.empty(), UsageError, "--devices lists no device");
  for (const Device& d : cfg.devices) {
    std::string why;
    DPT_CHECK(device_available(d, &why), DeviceError, why);
  }
  DPT_CHECK(cfg.batch_size >= 1, UsageError, "--batch-size must be at least 1");
  if (cfg.threads > 0) omp_set_num_threads(cfg.threads);
  Checkpoint ck = read_checkpoint(cfg.checkpoint);
  ArchSpec arch = cfg.arch;
  if (ck.kind == CheckpointKind::Full) {
    arch = *ck.arch;  // the checkpoint knows its model; --model is not needed
  } else {
    DPT_CHECK(cfg.arch_given, ConfigError, cfg.checkpoint,
              " holds weights only: pass --model (and --num-classes, --in-channels, --stem as "
              "trained) to say which model they belong to");
  }
  Data data = load_data(cfg.data, arch, cfg.seed, false);
  const Dataset& test = data.test ? *data.test : *data.train;
  resolve_arch(arch, test);
  std::unique_ptr<Module> model = make_model(arch, 0);
  model->to(cfg.devices[0]);
  EvalReport rep;
  rep.kind = kind_name(ck.kind);
  rep.layout = ck.layout();
  rep.load = load_normalized(*model, ck.state, cfg.strict).str();
  if (cfg.devices.size() > 1)
    model = wrap_data_parallel(std::move(model), arch, cfg.devices,
                               {.bn = parse_bn_mode(cfg.bn), .threads = cfg.threads});
  LoaderOptions lo;
  lo.mean = data.mean;
  lo.std = data.std;
  lo.batch_size = cfg.batch_size;
  lo.workers = cfg.data.workers;
  lo.pin_for = cfg.devices[0];
  EvalResult ev = evaluate(*model, test, lo, cfg.devices[0], cfg.batch_size);
  rep.accuracy = ev.accuracy;
  rep.loss = ev.loss;
  rep.samples = test.size();
  if (data.bad) rep.bad_images = data.bad->list();
  return rep;
}

}  // namespace dpt

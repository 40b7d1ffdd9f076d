#include "apps/trainer.h"

#include <omp.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <deque>

#include "apps/metrics.h"
#include "data/dataset.h"
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
                    const Device& dev) {
  LoaderOptions o = base;
  o.batch_size = std::min<int64_t>(500, test.size());
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

}  // namespace

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
  const Device dev = cfg.devices[0];  // where batches go and outputs are gathered
  for (const Device& d : cfg.devices) {
    std::string why;
    DPT_CHECK(device_available(d, &why), DeviceError, why);
  }
  const BnMode bn_mode = parse_bn_mode(cfg.bn);
  if (cfg.threads > 0) omp_set_num_threads(cfg.threads);
  const LrSchedule::Kind schedule_kind = LrSchedule::parse(cfg.lr_schedule);

  std::unique_ptr<Dataset> train_set, test_set;
  std::vector<float> mean, stdev;
  if (cfg.data == "fashion-mnist") {
    train_set = load_fashion_mnist(cfg.data_dir, true, cfg.train_limit);
    test_set = load_fashion_mnist(cfg.data_dir, false, cfg.test_limit);
    mean = {0.2860f};
    stdev = {0.3530f};
  } else if (cfg.data == "synthetic") {
    const int64_t classes = cfg.arch.num_classes != -1 ? cfg.arch.num_classes : 10;
    const int64_t channels = cfg.arch.in_channels != -1 ? cfg.arch.in_channels : 3;
    train_set = make_synthetic(cfg.synthetic_size, channels, cfg.image_size, classes, cfg.seed);
    mean.assign(size_t(channels), 0.5f);
    stdev.assign(size_t(channels), 0.25f);
  } else {
    DPT_THROW(UsageError, "unknown --data '", cfg.data, "': expected fashion-mnist or synthetic");
  }
  if (cfg.arch.num_classes == -1) cfg.arch.num_classes = train_set->num_classes();
  if (cfg.arch.in_channels == -1) cfg.arch.in_channels = train_set->channels();
  cfg.arch.validate();
  DPT_CHECK(cfg.arch.in_channels == train_set->channels(), UsageError, "the model takes ",
            cfg.arch.in_channels, " input channels but ", train_set->name(), " has ",
            train_set->channels());
  DPT_CHECK(cfg.arch.num_classes >= train_set->num_classes(), UsageError, "--num-classes ",
            cfg.arch.num_classes, " is fewer than the ", train_set->num_classes(), " classes of ",
            train_set->name());

  LoaderOptions lo;
  lo.batch_size = cfg.batch_size;
  lo.seed = cfg.seed;
  lo.mean = mean;
  lo.std = stdev;
  if (cfg.augment) lo.augment = Augment{train_set->height() <= 28 ? 2 : 4, true};
  Loader loader(*train_set, lo);

  std::unique_ptr<Module> model = make_model(cfg.arch, cfg.seed);
  DataParallel* dp = nullptr;
  if (cfg.devices.size() > 1 || cfg.group.processes > 1) {
    DataParallelOptions dpo{
        .bn = bn_mode, .threads = cfg.threads, .bucket_mb = cfg.bucket_mb, .group = cfg.group};
    auto wrapped = std::make_unique<DataParallel>(
        std::move(model), [&] { return make_model(cfg.arch, cfg.seed); }, cfg.devices, dpo);
    dp = wrapped.get();
    model = std::move(wrapped);
  } else {
    model->to(dev);
  }
  model->train();
  TrainResult res;
  res.parameters = model->num_parameters();

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
  progress.line("dptrain: " + cfg.arch.arch + " (" + std::to_string(res.parameters) +
                " parameters) on " + devices_str(cfg.devices, bn_mode, cfg.group) + ", " +
                train_set->name() + " " + std::to_string(train_set->size()) + " samples, batch " +
                std::to_string(cfg.batch_size) + ", " + std::to_string(total) + " steps, " +
                std::to_string(omp_get_max_threads()) + " threads");

  const int64_t warm = std::min<int64_t>(3, total / 5);  // steps excluded from the img/s figure
  Clock::time_point steady_start = Clock::now();
  double eval_seconds = 0;
  int64_t steady_images = 0, step = 0;
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

  Batch batch;
  for (int64_t epoch = 0; step < total; ++epoch) {
    loader.start_epoch(epoch);
    while (step < total && loader.next(batch)) {
      const float lr = sched.lr_at(step);
      model->zero_grad();
      Tensor logits = model->forward(on_device(batch.images, dev));
      Tensor dlogits(logits.shape(), DType::F32, dev);
      Tensor labels = on_device(batch.labels, dev);
      const float loss = softmax_cross_entropy(logits, labels, &dlogits);
      DPT_CHECK(std::isfinite(loss), NumericError, "loss became ", loss, " at step ", step + 1,
                ": training diverged; lower --lr (now ", cfg.lr, ") or raise --warmup-steps");
      model->backward(std::move(dlogits));
      if (dp) {
        dp->for_each_replica([&](Module& m, int r) {
          opts[size_t(r)].set_lr(lr);
          opts[size_t(r)].step(m);
        });
      } else {
        opts[0].set_lr(lr);
        opts[0].step(*model);
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
      if (step % per_epoch == 0 && step < total) run_eval(ep);
    }
  }
  run_eval(double(step) / double(per_epoch));
  res.steps = step;
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
  res.svg_path = metrics.write_svg();
  return res;
}

}  // namespace dpt

// The batch loader: a seeded per-epoch shuffle, per-sample augmentation (random crop after zero
// padding, horizontal flip) drawn from a counter-based RNG keyed by (seed, epoch, sample index),
// per-channel normalisation, and a background producer thread that keeps up to `prefetch` batches
// ready in a bounded queue. Batch contents depend only on (dataset, options, epoch, batch index),
// never on thread timing.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "core/rng.h"
#include "data/dataset.h"

namespace dpt {
namespace {

constexpr uint64_t kShuffleStream = 0x5eed0000u;         // + epoch
constexpr uint64_t kAugmentKey = 0xA5A5A5A5A5A5A5A5ull;  // seed ^ this
constexpr int64_t kMaxSamples = int64_t(1) << 32;        // sample index fits the low 32 bits
constexpr int64_t kMaxEpoch = (int64_t(1) << 31) - 1;    // epoch fits the high 32 bits

}  // namespace

struct Loader::Impl {
  Impl(const Dataset& d, LoaderOptions o) : data(d), opt(std::move(o)) {}

  const Dataset& data;
  LoaderOptions opt;
  int64_t n = 0, c = 0, h = 0, w = 0, num_classes = 0;
  bool started = false;

  // Producer state, guarded by mu (stop is also read without the lock to cut a batch short).
  std::thread producer;
  std::mutex mu;
  std::condition_variable not_full, not_empty;
  std::deque<Batch> queue;
  bool done = true;  // the producer has queued its last batch, failed, or was never started
  std::exception_ptr error;
  std::atomic<bool> stop{false};

  int64_t batches_per_epoch() const {
    return opt.drop_last ? n / opt.batch_size : (n + opt.batch_size - 1) / opt.batch_size;
  }

  std::vector<int64_t> epoch_order(int64_t epoch) const {
    std::vector<int64_t> order(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) order[size_t(i)] = i;
    if (opt.shuffle) {
      Rng rng(opt.seed, kShuffleStream + uint64_t(epoch));
      for (int64_t i = n - 1; i > 0; --i) {
        const auto j = int64_t(rng.below(uint64_t(i) + 1));
        std::swap(order[size_t(i)], order[size_t(j)]);
      }
    }
    return order;
  }

  // Stops and joins the producer and drops whatever it had prepared. Safe to call repeatedly.
  void stop_producer() noexcept {
    {
      std::lock_guard<std::mutex> lk(mu);
      stop = true;
    }
    not_full.notify_all();
    if (producer.joinable()) producer.join();
    std::lock_guard<std::mutex> lk(mu);
    stop = false;
    queue.clear();
    error = nullptr;
    done = true;
  }

  // Writes dataset sample `index`, augmented for `epoch` and normalised, to dst (c*h*w floats).
  void fill_sample(int64_t epoch, int64_t index, float* dst, int64_t* label) const {
    const int64_t chw = c * h * w;
    const int pad = opt.augment.crop_pad;
    const bool augment = pad > 0 || opt.augment.hflip;
    if (!augment) {
      *label = data.get(index, dst);
    } else {
      thread_local std::vector<float> scratch;
      scratch.resize(size_t(chw));
      *label = data.get(index, scratch.data());
      Rng rng(opt.seed ^ kAugmentKey, (uint64_t(epoch) << 32) | uint64_t(index));
      int64_t dy = 0, dx = 0;  // crop offset in [0, 2*pad], relative to the unpadded image
      if (pad > 0) {
        dy = int64_t(rng.below(2 * uint64_t(pad) + 1)) - pad;
        dx = int64_t(rng.below(2 * uint64_t(pad) + 1)) - pad;
      }
      const bool flip = opt.augment.hflip && (rng.next_u32() & 1u);
      for (int64_t ch = 0; ch < c; ++ch) {
        const float* src = scratch.data() + ch * h * w;
        float* out = dst + ch * h * w;
        for (int64_t y = 0; y < h; ++y) {
          const int64_t sy = y + dy;
          for (int64_t x = 0; x < w; ++x) {
            const int64_t sx = (flip ? w - 1 - x : x) + dx;
            const bool inside = sy >= 0 && sy < h && sx >= 0 && sx < w;
            out[y * w + x] = inside ? src[sy * w + sx] : 0.0f;
          }
        }
      }
    }
    DPT_ASSERT(*label >= 0 && *label < num_classes, "dataset ", data.name(), " gave label ", *label,
               " for sample ", index, " (", num_classes, " classes)");
    if (!opt.mean.empty()) {
      const int64_t hw = h * w;
      for (int64_t ch = 0; ch < c; ++ch) {
        const float m = opt.mean[size_t(ch)], inv = 1.0f / opt.std[size_t(ch)];
        float* p = dst + ch * hw;
        for (int64_t k = 0; k < hw; ++k) p[k] = (p[k] - m) * inv;
      }
    }
  }

  // Builds batch b of the epoch. Returns early (with a partial batch) when stop is requested.
  Batch make_batch(int64_t epoch, const std::vector<int64_t>& order, int64_t b) const {
    const int64_t first = b * opt.batch_size;
    const int64_t bs = std::min(opt.batch_size, n - first);
    Batch batch;
    batch.images = Tensor({bs, c, h, w}, DType::F32);
    batch.labels = Tensor({bs}, DType::I64);
    batch.index = b;
    float* images = batch.images.data<float>();
    int64_t* labels = batch.labels.data<int64_t>();
    const int64_t chw = c * h * w;
    for (int64_t j = 0; j < bs && !stop.load(std::memory_order_relaxed); ++j)
      fill_sample(epoch, order[size_t(first + j)], images + j * chw, labels + j);
    return batch;
  }

  void run(int64_t epoch, std::vector<int64_t> order, int64_t first_batch) {
    const int64_t nb = batches_per_epoch();
    try {
      for (int64_t b = first_batch; b < nb; ++b) {
        if (stop) return;
        Batch batch = make_batch(epoch, order, b);
        std::unique_lock<std::mutex> lk(mu);
        not_full.wait(lk, [&] { return stop || int64_t(queue.size()) < opt.prefetch; });
        if (stop) return;
        queue.push_back(std::move(batch));
        lk.unlock();
        not_empty.notify_one();
      }
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu);
      error = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> lk(mu);
      done = true;
    }
    not_empty.notify_all();
  }
};

Loader::Loader(const Dataset& data, LoaderOptions opt)
    : impl_(std::make_unique<Impl>(data, std::move(opt))) {
  Impl& m = *impl_;
  const LoaderOptions& o = m.opt;
  m.n = data.size();
  m.c = data.channels();
  m.h = data.height();
  m.w = data.width();
  m.num_classes = data.num_classes();
  DPT_CHECK(m.n >= 1, ConfigError, "dataset ", data.name(), " is empty");
  DPT_CHECK(m.n < kMaxSamples, ConfigError, "dataset ", data.name(), " has ", m.n,
            " samples; the loader supports fewer than ", kMaxSamples);
  DPT_CHECK(m.c >= 1 && m.h >= 1 && m.w >= 1, ConfigError, "dataset ", data.name(),
            " has an empty image shape ", m.c, "x", m.h, "x", m.w);
  DPT_CHECK(m.num_classes >= 1, ConfigError, "dataset ", data.name(), " has no classes");

  DPT_CHECK(o.batch_size >= 1, UsageError, "batch size must be at least 1, got ", o.batch_size);
  DPT_CHECK(!(o.drop_last && o.batch_size > m.n), UsageError, "batch size ", o.batch_size,
            " is larger than the ", m.n, " samples of ", data.name(),
            ", and with drop_last the only, partial batch would be dropped: use a batch size of at "
            "most ",
            m.n, " or keep the last partial batch");
  DPT_CHECK(o.prefetch >= 1, UsageError, "prefetch must be at least 1 batch, got ", o.prefetch);
  DPT_CHECK(o.augment.crop_pad >= 0 && o.augment.crop_pad <= std::min(m.h, m.w), UsageError,
            "crop padding must be between 0 and the image side (", std::min(m.h, m.w), "), got ",
            o.augment.crop_pad);
  DPT_CHECK(o.mean.empty() == o.std.empty(), UsageError,
            "normalisation needs both a mean and a std per channel (got ", o.mean.size(),
            " means and ", o.std.size(), " stds)");
  if (!o.mean.empty()) {
    DPT_CHECK(int64_t(o.mean.size()) == m.c && int64_t(o.std.size()) == m.c, UsageError,
              "normalisation needs one mean and one std per channel: ", data.name(), " has ", m.c,
              " channel(s), got ", o.mean.size(), " mean(s) and ", o.std.size(), " std(s)");
    for (size_t i = 0; i < o.mean.size(); ++i) {
      DPT_CHECK(std::isfinite(o.mean[i]), UsageError, "normalisation mean of channel ", i,
                " is not finite (", o.mean[i], ")");
      DPT_CHECK(std::isfinite(o.std[i]) && o.std[i] > 0, UsageError,
                "normalisation std of channel ", i, " must be positive, got ", o.std[i]);
    }
  }
}

Loader::~Loader() {
  if (impl_) impl_->stop_producer();
}

void Loader::start_epoch(int64_t epoch, int64_t skip) {
  Impl& m = *impl_;
  DPT_CHECK(epoch >= 0 && epoch <= kMaxEpoch, UsageError, "epoch must be in 0..", kMaxEpoch,
            ", got ", epoch);
  const int64_t nb = m.batches_per_epoch();
  DPT_CHECK(skip >= 0 && skip <= nb, UsageError, "cannot skip ", skip, " batches of an epoch of ",
            nb, " batches");
  m.stop_producer();
  std::vector<int64_t> order = m.epoch_order(epoch);
  {
    std::lock_guard<std::mutex> lk(m.mu);
    m.done = false;
  }
  m.started = true;
  try {
    m.producer = std::thread(
        [&m, epoch, skip, o = std::move(order)]() mutable { m.run(epoch, std::move(o), skip); });
  } catch (...) {
    std::lock_guard<std::mutex> lk(m.mu);
    m.done = true;
    throw;
  }
}

bool Loader::next(Batch& out) {
  Impl& m = *impl_;
  DPT_ASSERT(m.started, "Loader::next called before start_epoch");
  std::unique_lock<std::mutex> lk(m.mu);
  m.not_empty.wait(lk, [&] { return !m.queue.empty() || m.done; });
  if (!m.queue.empty()) {
    out = std::move(m.queue.front());
    m.queue.pop_front();
    lk.unlock();
    m.not_full.notify_one();
    return true;
  }
  if (m.error) {
    std::exception_ptr e = m.error;
    m.error = nullptr;  // reported once; later calls see the end of the epoch
    std::rethrow_exception(e);
  }
  return false;
}

int64_t Loader::batches_per_epoch() const {
  return impl_->batches_per_epoch();
}

std::vector<int64_t> Loader::epoch_order(int64_t epoch) const {
  DPT_CHECK(epoch >= 0 && epoch <= kMaxEpoch, UsageError, "epoch must be in 0..", kMaxEpoch,
            ", got ", epoch);
  return impl_->epoch_order(epoch);
}

}  // namespace dpt

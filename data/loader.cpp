// The batch loader: a seeded per-epoch shuffle, per-sample augmentation (random crop after zero
// padding, horizontal flip) drawn from a counter-based RNG keyed by (seed, epoch, sample index),
// per-channel normalisation, and a pool of worker threads that fills up to `prefetch` batches
// ahead, sample by sample (several workers share a batch). Batch contents depend only on
// (dataset, options, epoch, batch index), never on thread timing or the number of workers.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>

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

  // A batch being built: samples are claimed in runs by the workers, and it is ready when the
  // last claimed run is filled. An error is kept with the batch it happened in, so the batches
  // before it are still delivered in order.
  struct Slot {
    Batch batch;
    int64_t rows = 0, first = 0, last = 0;  // batch size; the rows this process fills
    int64_t claimed = 0, filled = 0;        // among [first, last)
    std::exception_ptr error;
  };

  // Epoch state, guarded by mu; `stop` is also read without the lock to cut work short.
  std::mutex mu;
  std::condition_variable work, ready;
  std::vector<std::thread> workers;
  std::map<int64_t, Slot> slots;  // open batches by index
  // Image tensors handed out recently (second handles): once the consumer has dropped its handle
  // the buffer is reused for a new batch, sparing the page faults of fresh memory.
  std::deque<Tensor> handed_out;
  std::vector<int64_t> order;
  int64_t epoch = 0, next_open = 0, next_out = 0, end_batch = 0;
  bool failed = false;  // an error was delivered: the epoch is over
  std::atomic<bool> stop{false};

  int64_t batches_per_epoch() const {
    return opt.drop_last ? n / opt.batch_size : (n + opt.batch_size - 1) / opt.batch_size;
  }

  std::vector<int64_t> epoch_order(int64_t e) const {
    std::vector<int64_t> out(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) out[size_t(i)] = i;
    if (opt.shuffle) {
      Rng rng(opt.seed, kShuffleStream + uint64_t(e));
      for (int64_t i = n - 1; i > 0; --i) {
        const auto j = int64_t(rng.below(uint64_t(i) + 1));
        std::swap(out[size_t(i)], out[size_t(j)]);
      }
    }
    return out;
  }

  // Stops and joins the workers and drops whatever they had prepared. Safe to call repeatedly.
  void stop_workers() noexcept {
    {
      std::lock_guard<std::mutex> lk(mu);
      stop = true;
    }
    work.notify_all();
    for (auto& t : workers)
      if (t.joinable()) t.join();
    workers.clear();
    std::lock_guard<std::mutex> lk(mu);
    stop = false;
    slots.clear();
    next_open = next_out = end_batch = 0;
    failed = false;
  }

  // Writes dataset sample `index`, augmented for `epoch` and normalised, to dst (c*h*w floats).
  void fill_sample(int64_t index, float* dst, int64_t* label) const {
    const int64_t chw = c * h * w;
    const int pad = opt.augment.crop_pad;
    const bool augment = pad > 0 || opt.augment.hflip;
    Rng rng(opt.seed ^ kAugmentKey, (uint64_t(epoch) << 32) | uint64_t(index));
    if (data.augments()) {
      *label = data.get_augmented(index, rng, dst);
    } else if (!augment) {
      *label = data.get(index, dst);
    } else {
      thread_local std::vector<float> scratch;
      scratch.resize(size_t(chw));
      *label = data.get(index, scratch.data());
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

  // Opens batch b (under the lock): tensors allocated, every label known, images of the rows
  // this process does not use left zero.
  Slot& open(int64_t b) {
    Slot& s = slots[b];
    const int64_t first = b * opt.batch_size;
    s.rows = std::min(opt.batch_size, n - first);
    for (auto it = handed_out.begin(); it != handed_out.end(); ++it)
      if (it->sole_owner() && it->dim(0) == s.rows) {
        s.batch.images = std::move(*it);
        handed_out.erase(it);
        break;
      }
    if (!s.batch.images.defined())  // reused above when possible (page-locking is slow)
      s.batch.images = opt.pin_for.is_cuda() ? Tensor::pinned({s.rows, c, h, w}, opt.pin_for)
                                             : Tensor({s.rows, c, h, w}, DType::F32);
    s.batch.labels = Tensor({s.rows}, DType::I64);  // small: not worth page-locking anew
    s.batch.index = b;
    s.first = 0;
    s.last = s.rows;
    if (opt.rows) {
      std::tie(s.first, s.last) = opt.rows(s.rows);
      DPT_ASSERT(0 <= s.first && s.first <= s.last && s.last <= s.rows, "rows ", s.first, "..",
                 s.last, " outside a batch of ", s.rows);
      if (s.first > 0 || s.last < s.rows) s.batch.images.zero_();
    }
    int64_t* labels = s.batch.labels.data<int64_t>();
    for (int64_t j = 0; j < s.rows; ++j) labels[j] = data.label(order[size_t(first + j)]);
    return s;
  }

  // A worker: claims runs of samples from the oldest open batch with work left (opening a new
  // batch when fewer than `prefetch` are waiting), fills them without the lock, reports back.
  void run_worker() {
    std::unique_lock<std::mutex> lk(mu);
    while (!stop) {
      Slot* s = nullptr;
      int64_t b = -1;
      for (auto& [k, sl] : slots)
        if (sl.claimed < sl.last - sl.first && !sl.error) {
          s = &sl;
          b = k;
          break;
        }
      if (!s && next_open < end_batch && next_open - next_out < opt.prefetch) {
        b = next_open++;
        try {
          s = &open(b);
        } catch (...) {
          slots[b].error = std::current_exception();
          ready.notify_all();
          continue;
        }
      }
      if (!s) {
        work.wait(lk);
        continue;
      }
      const int64_t todo = s->last - s->first - s->claimed;
      const int64_t run = std::max<int64_t>(1, std::min(todo, s->rows / (4 * opt.workers)));
      const int64_t j0 = s->first + s->claimed;
      s->claimed += run;
      lk.unlock();
      std::exception_ptr err;
      try {
        const int64_t chw = c * h * w, base = b * opt.batch_size;
        float* images = s->batch.images.data<float>();
        for (int64_t j = j0; j < j0 + run && !stop.load(std::memory_order_relaxed); ++j) {
          int64_t label = 0;
          fill_sample(order[size_t(base + j)], images + j * chw, &label);
        }
      } catch (...) {
        err = std::current_exception();
      }
      lk.lock();
      s->filled += run;
      if (err && !s->error) s->error = err;
      if (s->filled == s->last - s->first || err) ready.notify_all();
    }
  }

  bool slot_done(const Slot& s) const { return s.error || s.filled == s.last - s.first; }
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
  DPT_CHECK(o.workers >= 1 && o.workers <= 256, UsageError,
            "workers must be between 1 and 256, got ", o.workers);
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
  if (impl_) impl_->stop_workers();
}

void Loader::start_epoch(int64_t epoch, int64_t skip) {
  Impl& m = *impl_;
  DPT_CHECK(epoch >= 0 && epoch <= kMaxEpoch, UsageError, "epoch must be in 0..", kMaxEpoch,
            ", got ", epoch);
  const int64_t nb = m.batches_per_epoch();
  DPT_CHECK(skip >= 0 && skip <= nb, UsageError, "cannot skip ", skip, " batches of an epoch of ",
            nb, " batches");
  m.stop_workers();
  {
    std::lock_guard<std::mutex> lk(m.mu);
    m.order = m.epoch_order(epoch);
    m.epoch = epoch;
    m.next_open = m.next_out = skip;
    m.end_batch = nb;
  }
  m.started = true;
  try {
    for (int t = 0; t < m.opt.workers; ++t) m.workers.emplace_back([&m] { m.run_worker(); });
  } catch (...) {
    m.stop_workers();
    throw;
  }
}

bool Loader::next(Batch& out) {
  Impl& m = *impl_;
  DPT_ASSERT(m.started, "Loader::next called before start_epoch");
  std::unique_lock<std::mutex> lk(m.mu);
  if (m.failed || m.next_out >= m.end_batch) return false;
  auto it = m.slots.end();
  m.ready.wait(lk, [&] {
    it = m.slots.find(m.next_out);
    return it != m.slots.end() && m.slot_done(it->second);
  });
  if (it->second.error) {
    std::exception_ptr e = it->second.error;
    m.failed = true;  // reported once; later calls see the end of the epoch
    m.stop = true;
    lk.unlock();
    m.work.notify_all();
    std::rethrow_exception(e);
  }
  out = std::move(it->second.batch);
  m.slots.erase(it);
  m.handed_out.push_back(out.images.share());
  if (m.handed_out.size() > size_t(m.opt.prefetch) + 2) m.handed_out.pop_front();
  ++m.next_out;
  lk.unlock();
  m.work.notify_all();
  return true;
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

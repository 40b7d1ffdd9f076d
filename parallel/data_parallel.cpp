#include "parallel/data_parallel.h"

#include <omp.h>

#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>

#include "models/layers.h"

namespace dpt {

BnMode parse_bn_mode(const std::string& s) {
  if (s == "local") return BnMode::Local;
  if (s == "sync") return BnMode::Sync;
  DPT_THROW(UsageError, "unknown --bn '", s, "': expected local or sync");
}

namespace {

// Rows [start, start + n) of t as a new tensor on dev.
Tensor rows(const Tensor& t, int64_t start, int64_t n, const Device& dev) {
  Shape s = t.shape();
  s[0] = n;
  Tensor out(s, t.dtype(), dev);
  const size_t row_bytes = t.nbytes() / size_t(t.dim(0));
  device_copy(dev, out.raw(), t.device(), static_cast<const char*>(t.raw()) + start * row_bytes,
              out.nbytes());
  return out;
}

// The tensors stacked along dim 0 on dev.
Tensor cat_rows(const std::vector<Tensor>& parts, const Device& dev) {
  Shape s = parts[0].shape();
  s[0] = 0;
  for (auto& p : parts) s[0] += p.dim(0);
  Tensor out(s, parts[0].dtype(), dev);
  size_t at = 0;
  for (auto& p : parts) {
    device_copy(dev, static_cast<char*>(out.raw()) + at, p.device(), p.raw(), p.nbytes());
    at += p.nbytes();
  }
  return out;
}

}  // namespace

// SyncBatchNorm: the replicas taking part in a step exchange (mean, var, count) per channel and
// combine them exactly (in double); backward sums the per-channel gradient sums.
class SyncBatchNormHook : public BatchNormSync {
 public:
  SyncBatchNormHook(DataParallel& dp, int rank) : dp_(dp), rank_(rank) {}

  void reduce_stats(Tensor& mean, Tensor& var, int64_t& count) override {
    const int64_t C = mean.numel();
    const int k = int(dp_.active());
    std::vector<float> m = mean.to_vector(), v = var.to_vector();
    Tensor mine({2 * C + 1});
    float* p = mine.data<float>();
    std::copy(m.begin(), m.end(), p);
    std::copy(v.begin(), v.end(), p + C);
    p[2 * C] = float(count);
    Tensor all({k * (2 * C + 1)});
    dp_.comm(k).all_gather(rank_, mine, all);
    const float* a = all.data<float>();
    double total = 0;
    for (int r = 0; r < k; ++r) total += a[r * (2 * C + 1) + 2 * C];
    Tensor gm({C}), gv({C});
    for (int64_t c = 0; c < C; ++c) {
      double mu = 0, sq = 0;
      for (int r = 0; r < k; ++r) {
        const float* q = a + r * (2 * C + 1);
        const double n = q[2 * C];
        mu += n * q[c];
        sq += n * (double(q[C + c]) + double(q[c]) * q[c]);
      }
      mu /= total;
      gm.data<float>()[c] = float(mu);
      gv.data<float>()[c] = float(std::max(0.0, sq / total - mu * mu));
    }
    mean.copy_from(gm);
    var.copy_from(gv);
    count = int64_t(total);
  }

  void reduce_grad_sums(Tensor& sum_dy, Tensor& sum_dy_xhat) override {
    const int64_t C = sum_dy.numel();
    std::vector<float> a = sum_dy.to_vector(), b = sum_dy_xhat.to_vector();
    Tensor buf({2 * C});
    std::copy(a.begin(), a.end(), buf.data<float>());
    std::copy(b.begin(), b.end(), buf.data<float>() + C);
    dp_.comm(int(dp_.active())).all_reduce_sum(rank_, buf);
    Tensor head({C}), tail({C});
    std::copy(buf.data<float>(), buf.data<float>() + C, head.data<float>());
    std::copy(buf.data<float>() + C, buf.data<float>() + 2 * C, tail.data<float>());
    sum_dy.copy_from(head);
    sum_dy_xhat.copy_from(tail);
  }

 private:
  DataParallel& dp_;
  int rank_;
};

// One thread per replica, each with its share of the OpenMP threads; run() hands every thread
// the same task and waits for all of them. The first failure aborts the communicators, so
// replicas blocked in a collective fail too instead of hanging; run() then resets them and
// rethrows that first failure.
struct DataParallel::Workers {
  Workers(int n, int omp_threads, std::function<void()> on_failure)
      : abort_collectives(std::move(on_failure)) {
    for (int r = 0; r < n; ++r)
      threads.emplace_back([this, r, omp_threads] { loop(r, omp_threads); });
  }
  ~Workers() {
    {
      std::lock_guard<std::mutex> lk(mu);
      quit = true;
    }
    start.notify_all();
    for (auto& t : threads) t.join();
  }
  void loop(int r, int omp_threads) {
    omp_set_num_threads(omp_threads);
    uint64_t seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> lk(mu);
      start.wait(lk, [&] { return quit || generation != seen; });
      if (quit) return;
      seen = generation;
      const std::function<void(int)>* f = task;
      lk.unlock();
      std::exception_ptr error;
      try {
        (*f)(r);
      } catch (...) {
        error = std::current_exception();
      }
      lk.lock();
      if (error && !first_error) {
        first_error = error;
        abort_collectives();
      }
      if (--pending == 0) done.notify_all();
    }
  }
  void run(const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> lk(mu);
    task = &f;
    first_error = nullptr;
    pending = int(threads.size());
    ++generation;
    start.notify_all();
    done.wait(lk, [&] { return pending == 0; });
    if (first_error) std::rethrow_exception(first_error);
  }

  std::function<void()> abort_collectives;
  std::mutex mu;
  std::condition_variable start, done;
  const std::function<void(int)>* task = nullptr;
  uint64_t generation = 0;
  int pending = 0;
  bool quit = false;
  std::exception_ptr first_error;
  std::vector<std::thread> threads;
};

DataParallel::DataParallel(std::unique_ptr<Module> module, const Factory& make_replica,
                           std::vector<Device> devices, BnMode bn, int threads)
    : devices_(std::move(devices)), bn_(bn) {
  DPT_CHECK(!devices_.empty(), UsageError, "DataParallel needs at least one device");
  for (const Device& d : devices_) {
    std::string why;
    DPT_CHECK(device_available(d, &why), DeviceError, why);
    DPT_CHECK(d.is_cpu(), DeviceError, "DataParallel on ", d.str(),
              " needs the NCCL communicator, which this build does not have yet");
  }
  module->to(devices_[0]);
  Module& first = register_module("module", std::move(module));
  replicas_.push_back(&first);
  StateDict sd = first.state_dict();
  for (size_t r = 1; r < devices_.size(); ++r) {
    std::unique_ptr<Module> rep = make_replica();
    rep->to(devices_[r]);
    rep->load_state_dict(sd, true);  // the broadcast: every replica starts from replica 0
    rep->train(first.is_training());
    replicas_.push_back(rep.get());
    owned_.push_back(std::move(rep));
  }
  const int n = num_replicas();
  for (int k = 1; k <= n; ++k) comms_[k] = make_inprocess_communicator(k);
  if (bn_ == BnMode::Sync) {
    for (int r = 0; r < n; ++r) {
      hooks_.push_back(std::make_unique<SyncBatchNormHook>(*this, r));
      for (auto& [name, m] : replicas_[size_t(r)]->named_modules())
        if (auto* b = dynamic_cast<BatchNorm2d*>(m)) b->set_sync(hooks_.back().get());
    }
  }
  flat_grads_.resize(size_t(n));
  const int total = threads > 0 ? threads : omp_get_max_threads();
  workers_ = std::make_unique<Workers>(n, std::max(1, total / n), [this] {
    for (auto& [k, c] : comms_) c->abort();
  });
}

DataParallel::~DataParallel() = default;

std::vector<int64_t> DataParallel::chunk_sizes(int64_t n) const {
  const int64_t d = int64_t(devices_.size()), chunk = (n + d - 1) / d;
  std::vector<int64_t> sizes;
  for (int64_t at = 0; at < n; at += chunk) sizes.push_back(std::min(chunk, n - at));
  return sizes;
}

std::vector<int64_t> DataParallel::chunk_offsets() const {
  std::vector<int64_t> offsets(sizes_.size(), 0);
  for (size_t r = 1; r < sizes_.size(); ++r) offsets[r] = offsets[r - 1] + sizes_[r - 1];
  return offsets;
}

void DataParallel::for_each_replica(const std::function<void(Module&, int)>& f) {
  run([&](int r) { f(*replicas_[size_t(r)], r); });
}

void DataParallel::run(const std::function<void(int)>& f) {
  try {
    workers_->run(f);
  } catch (...) {
    for (auto& [k, c] : comms_) c->reset();
    throw;
  }
}

Tensor DataParallel::forward(Tensor x) {
  DPT_CHECK(x.ndim() >= 1 && x.dim(0) >= 1, ConfigError, "DataParallel got an empty batch ",
            shape_str(x.shape()));
  sizes_ = chunk_sizes(x.dim(0));
  const int k = int(sizes_.size());
  const std::vector<int64_t> offsets = chunk_offsets();
  std::vector<Tensor> outs(static_cast<size_t>(k));
  run([&](int r) {
    if (r >= k) return;
    outs[size_t(r)] = replicas_[size_t(r)]->forward(
        rows(x, offsets[size_t(r)], sizes_[size_t(r)], devices_[size_t(r)]));
  });
  if (is_training() && bn_ == BnMode::Local) {
    auto keep = replicas_[0]->named_buffers();
    for (size_t r = 1; r < replicas_.size(); ++r) {
      auto other = replicas_[r]->named_buffers();
      for (size_t i = 0; i < keep.size(); ++i) other[i].second->copy_from(*keep[i].second);
    }
  }
  return cat_rows(outs, devices_[0]);
}

void DataParallel::all_reduce_grads(int rank) {
  if (num_replicas() == 1) return;
  const auto t0 = std::chrono::steady_clock::now();
  auto params = replicas_[size_t(rank)]->named_parameters();
  int64_t total = 0;
  for (auto& [n, p] : params) total += p->grad.numel();
  Tensor& flat = flat_grads_[size_t(rank)];
  if (!flat.defined() || flat.numel() != total) flat = Tensor({total});
  int64_t at = 0;
  for (auto& [n, p] : params) {
    device_copy(flat.device(), flat.data<float>() + at, p->grad.device(), p->grad.raw(),
                p->grad.nbytes());
    at += p->grad.numel();
  }
  comm(num_replicas()).all_reduce_sum(rank, flat);
  at = 0;
  for (auto& [n, p] : params) {
    device_copy(p->grad.device(), p->grad.raw(), flat.device(), flat.data<float>() + at,
                p->grad.nbytes());
    at += p->grad.numel();
  }
  if (rank == 0)
    comm_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

Tensor DataParallel::backward(Tensor dy) {
  DPT_ASSERT(!sizes_.empty(), "DataParallel::backward without a forward");
  const int k = int(sizes_.size());
  const std::vector<int64_t> offsets = chunk_offsets();
  std::vector<Tensor> dxs(static_cast<size_t>(k));
  run([&](int r) {
    if (r < k)
      dxs[size_t(r)] = replicas_[size_t(r)]->backward(
          rows(dy, offsets[size_t(r)], sizes_[size_t(r)], devices_[size_t(r)]));
    all_reduce_grads(r);
  });
  if (!dxs[0].defined()) return Tensor();
  return cat_rows(dxs, devices_[0]);
}

void DataParallel::train(bool on) {
  Module::train(on);
  for (Module* m : replicas_) m->train(on);
}

void DataParallel::zero_grad() {
  for (Module* m : replicas_) m->zero_grad();
}

void DataParallel::to(const Device& d) {
  DPT_CHECK(d == devices_[0], ConfigError, "a DataParallel model lives on ", devices_[0].str(),
            " and its replicas' devices; it cannot move to ", d.str());
}

void DataParallel::release() {
  for (Module* m : replicas_)
    for (auto& [n, sub] : m->named_modules()) sub->release();
}

}  // namespace dpt

#include "parallel/reducer.h"

#include <algorithm>
#include <chrono>

namespace dpt {

GradReducer::GradReducer(Module& replica, int rank, Communicator& comm, size_t bucket_bytes,
                         bool overlap)
    : rank_(rank), device_(replica.device()), comm_(comm), overlap_(overlap) {
  auto params = replica.named_parameters();
  std::reverse(params.begin(), params.end());
  size_t bytes = 0;
  for (auto& [name, p] : params) {
    const size_t b = size_t(p->grad.numel()) * sizeof(float);
    if (buckets_.empty() || (bucket_bytes > 0 && bytes > 0 && bytes + b > bucket_bytes)) {
      buckets_.emplace_back();
      bytes = 0;
    }
    buckets_.back().names.push_back(name);
    buckets_.back().params.push_back(p);
    bytes += b;
  }
  // Each gradient starts 256 bytes into its bucket's multiple (cuDNN's and the vector kernels'
  // fast paths want aligned operands); the padding between them stays 0.
  auto aligned = [](int64_t n) { return (n + 63) / 64 * 64; };
  for (size_t i = 0; i < buckets_.size(); ++i) {
    Bucket& bk = buckets_[i];
    int64_t n = 0;
    for (Parameter* p : bk.params) n += aligned(p->grad.numel());
    bk.flat = Tensor::zeros({n}, DType::F32, replica.device());
    n = 0;
    for (Parameter* p : bk.params) {
      DPT_ASSERT(p->grad.dtype() == DType::F32 && p->grad.device() == device_,
                 "gradient buckets hold float32 gradients on the replica's device");
      Tensor view = bk.flat.view(n, p->grad.shape());
      view.copy_from(p->grad);
      p->grad = std::move(view);
      n += aligned(p->grad.numel());
      bucket_of_.emplace_back(p, int(i));
    }
  }
  std::sort(bucket_of_.begin(), bucket_of_.end());
  ready_.assign(buckets_.size(), false);
  for (auto& [name, m] : replica.named_modules())
    if (!m->own_parameters().empty())
      m->set_grad_ready_hook([this](Module& mod) { grads_ready(mod); });
  thread_ = std::thread([this] { loop(); });
}

GradReducer::~GradReducer() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    quit_ = true;
    cancelled_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

std::vector<std::vector<std::string>> GradReducer::bucket_names() const {
  std::vector<std::vector<std::string>> out;
  for (const Bucket& b : buckets_) out.push_back(b.names);
  return out;
}

void GradReducer::begin() {
  wait_idle();
  std::lock_guard<std::mutex> lk(mu_);
  for (Bucket& b : buckets_) b.pending = int(b.params.size());
  ready_.assign(buckets_.size(), false);
  all_in_ = false;
  cancelled_ = false;
  error_ = nullptr;
  ++step_;
  cv_.notify_all();
}

void GradReducer::grads_ready(Module& m) {
  bool wake = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (Parameter* p : m.own_parameters()) {
      auto it = std::lower_bound(bucket_of_.begin(), bucket_of_.end(), std::make_pair(p, 0));
      DPT_ASSERT(it != bucket_of_.end() && it->first == p, "a gradient outside every bucket");
      if (--buckets_[size_t(it->second)].pending == 0) {
        mark_ready(size_t(it->second));
        wake = true;
      }
    }
  }
  if (wake) cv_.notify_all();
}

void GradReducer::mark_ready(size_t b) {
  buckets_[b].written.record(device_);
  ready_[b] = true;
}

void GradReducer::finish() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (size_t b = 0; b < buckets_.size(); ++b)  // unused parameters: their gradients stay 0
      if (!ready_[b]) mark_ready(b);
    all_in_ = true;
  }
  cv_.notify_all();
  device_sync(device_);  // GPU: backward has run; what is left to wait for is communication
  const auto t0 = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return done_ == step_; });
  exposed_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (error_) std::rethrow_exception(error_);
}

void GradReducer::cancel() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    cancelled_ = true;
  }
  cv_.notify_all();
}

void GradReducer::wait_idle() {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return done_ == step_; });
}

void GradReducer::loop() {
  // A GPU replica's thread works on its device from the start, so that its first CUDA call (an
  // event wait) makes no context on cuda:0. A device that fails here fails the first collective.
  try {
    if (device_.is_cuda()) device_sync(device_);
  } catch (const Error&) {
  }
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return quit_ || step_ != seen; });
    if (quit_) return;
    seen = step_;
    try {
      for (size_t b = 0; b < buckets_.size(); ++b) {
        cv_.wait(lk, [&] { return (ready_[b] && (overlap_ || all_in_)) || cancelled_; });
        if (cancelled_) break;
        lk.unlock();
        auto t0 = std::chrono::steady_clock::now();
        try {
          buckets_[b].written.wait();  // GPU: the backward kernels that wrote it have run
          t0 = std::chrono::steady_clock::now();
          comm_.all_reduce_sum(rank_, buckets_[b].flat);
        } catch (...) {
          lk.lock();
          throw;
        }
        const auto t1 = std::chrono::steady_clock::now();
        lk.lock();
        comm_seconds_ += std::chrono::duration<double>(t1 - t0).count();
      }
    } catch (...) {
      error_ = std::current_exception();
    }
    done_ = seen;
    cv_.notify_all();
  }
}

}  // namespace dpt

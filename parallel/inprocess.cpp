// In-process communicator: the ranks are threads sharing memory. Each collective publishes the
// ranks' buffers, waits at a barrier, lets every rank work on its own slice of the result, and
// waits again so no buffer is reused before all ranks are done with it.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "parallel/communicator.h"

namespace dpt {

namespace {

// A reusable barrier that abort() breaks: waiters throw rather than hang when a peer has died.
// Waiters spin and yield for a while before sleeping: SyncBatchNorm meets here twice per layer
// and step, and a futex sleep and wake-up on every meeting costs more than the work between them.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait() {
    check_not_aborted();
    const uint64_t phase = phase_.load(std::memory_order_acquire);
    if (waiting_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      waiting_.store(0, std::memory_order_relaxed);
      {
        std::lock_guard<std::mutex> lk(mu_);
        phase_.store(phase + 1, std::memory_order_release);
      }
      cv_.notify_all();
      return;
    }
    // Spin, then yield the core to any other runnable thread, for up to 2 ms before sleeping:
    // waking a sleeping thread costs 50-100 us on a VM, far more than most waits here.
    const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(2);
    for (int spin = 0;; ++spin) {
      if (phase_.load(std::memory_order_acquire) != phase) return;
      if (aborted_.load(std::memory_order_acquire)) break;
      if (spin >= 2000) {
        if (std::chrono::steady_clock::now() > until) break;
        std::this_thread::yield();
      }
    }
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return phase_.load() != phase || aborted_.load(); });
    if (phase_.load() == phase) check_not_aborted();
  }
  void abort() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      aborted_ = true;
    }
    cv_.notify_all();
  }
  void reset() {
    std::lock_guard<std::mutex> lk(mu_);
    aborted_ = false;
    waiting_ = 0;
    phase_.fetch_add(1);
  }

 private:
  void check_not_aborted() const {
    DPT_CHECK(!aborted_.load(std::memory_order_acquire), Error,
              "collective aborted: another replica failed");
  }
  std::mutex mu_;
  std::condition_variable cv_;
  const int n_;
  std::atomic<int> waiting_{0};
  std::atomic<uint64_t> phase_{0};
  std::atomic<bool> aborted_{false};
};

class InProcessCommunicator : public Communicator {
 public:
  explicit InProcessCommunicator(int n)
      : n_(n), barrier_(n), slots_(size_t(n)), bytes_(size_t(n)) {}
  int size() const override { return n_; }
  std::string kind() const override { return "in-process"; }

  void all_reduce_sum(int rank, Tensor& t) override {
    check(rank, t);
    slots_[size_t(rank)] = t.data<float>();
    barrier_.arrive_and_wait();
    const int64_t n = t.numel(), lo = n * rank / n_, hi = n * (rank + 1) / n_;
    float* acc = slots_[0];
    for (int r = 1; r < n_; ++r) {
      const float* src = slots_[size_t(r)];
      for (int64_t i = lo; i < hi; ++i) acc[i] += src[i];
    }
    for (int r = 1; r < n_; ++r)
      std::memcpy(slots_[size_t(r)] + lo, acc + lo, size_t(hi - lo) * sizeof(float));
    barrier_.arrive_and_wait();
  }

  void reduce_sum(int rank, Tensor& t, int root) override {
    check(rank, t);
    DPT_ASSERT(root >= 0 && root < n_, "reduce root ", root);
    slots_[size_t(rank)] = t.data<float>();
    barrier_.arrive_and_wait();
    // Every rank sums its slice of the elements in rank order, straight into root's tensor.
    const int64_t n = t.numel(), lo = n * rank / n_, hi = n * (rank + 1) / n_;
    float* acc = slots_[size_t(root)];
    for (int64_t i = lo; i < hi; ++i) {
      float s = slots_[0][i];
      for (int r = 1; r < n_; ++r) s += slots_[size_t(r)][i];
      acc[i] = s;
    }
    barrier_.arrive_and_wait();
  }

  void broadcast(int rank, Tensor& t, int root) override {
    DPT_ASSERT(rank >= 0 && rank < n_ && t.device().is_cpu(), "broadcast on rank ", rank);
    DPT_ASSERT(root >= 0 && root < n_, "broadcast root ", root);
    bytes_[size_t(rank)] = t.raw();
    barrier_.arrive_and_wait();
    if (rank != root) std::memcpy(t.raw(), bytes_[size_t(root)], t.nbytes());
    barrier_.arrive_and_wait();
  }

  void abort(const std::string&) override { barrier_.abort(); }
  void reset() override { barrier_.reset(); }

  void all_gather(int rank, const Tensor& in, Tensor& out) override {
    check(rank, in);
    DPT_ASSERT(out.numel() == in.numel() * n_, "all_gather: out has ", out.numel(), " values");
    slots_[size_t(rank)] = in.data<float>();
    barrier_.arrive_and_wait();
    for (int r = 0; r < n_; ++r)
      std::memcpy(out.data<float>() + r * in.numel(), slots_[size_t(r)], in.nbytes());
    barrier_.arrive_and_wait();
  }

 private:
  void check(int rank, const Tensor& t) const {
    DPT_ASSERT(rank >= 0 && rank < n_ && t.device().is_cpu() && t.dtype() == DType::F32,
               "in-process collectives take float32 cpu tensors (rank ", rank, ")");
  }
  int n_;
  Barrier barrier_;
  std::vector<float*> slots_;
  std::vector<void*> bytes_;
};

}  // namespace

std::unique_ptr<Communicator> make_inprocess_communicator(int size) {
  DPT_CHECK(size >= 1, ConfigError, "a communicator needs at least one rank, got ", size);
  return std::make_unique<InProcessCommunicator>(size);
}

}  // namespace dpt

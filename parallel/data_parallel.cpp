#include "parallel/data_parallel.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>

#include "kernels/batchnorm.h"
#include "models/layers.h"
#include "parallel/reducer.h"

namespace dpt {

BnMode parse_bn_mode(const std::string& s) {
  if (s == "local") return BnMode::Local;
  if (s == "sync") return BnMode::Sync;
  DPT_THROW(UsageError, "unknown --bn '", s, "': expected local or sync");
}

namespace {

// Rows [start, start + n) of t as a new tensor on dev (in its layout: dim 0 is outermost in
// channels-last order too).
Tensor rows(const Tensor& t, int64_t start, int64_t n, const Device& dev) {
  Shape s = t.shape();
  s[0] = n;
  Tensor out(s, t.dtype(), dev);
  out.set_channels_last(t.channels_last());
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
  out.set_channels_last(parts[0].channels_last());
  size_t at = 0;
  for (auto& p : parts) {
    DPT_ASSERT(p.channels_last() == out.channels_last(), "DataParallel: parts in two layouts");
    device_copy(dev, static_cast<char*>(out.raw()) + at, p.device(), p.raw(), p.nbytes());
    at += p.nbytes();
  }
  return out;
}

}  // namespace

// SyncBatchNorm: the replicas taking part in a step exchange their per-channel (mean, var) and
// combine them exactly (batchnorm_combine_stats, in double), each weighted by its chunk's rows
// (its count of values over the same H*W); backward sums the per-channel gradient sums.
// Everything stays on the replica's device: on a GPU no value goes through the host (the row
// counts are copied there only when the chunk sizes change).
class SyncBatchNormHook : public BatchNormSync {
 public:
  SyncBatchNormHook(DataParallel& dp, int rank, Device device)
      : dp_(dp), rank_(rank), device_(device) {}

  void reduce_stats(Tensor& mean, Tensor& var, int64_t& count) override {
    const int64_t C = mean.numel();
    const int k = dp_.active();
    const std::vector<int64_t>& chunk_rows = dp_.last_chunk_sizes();
    const int64_t mine_rows = chunk_rows[size_t(rank_)], per_row = count / mine_rows;  // H*W
    DPT_ASSERT(per_row * mine_rows == count, "SyncBatchNorm on ", count,
               " values per channel for a chunk of ", mine_rows, " rows");
    if (weight_rows_ != chunk_rows) {
      weight_rows_ = chunk_rows;
      Tensor w({k}, DType::I64);
      std::copy(chunk_rows.begin(), chunk_rows.end(), w.data<int64_t>());
      weights_ = device_.is_cpu() ? std::move(w) : w.to(device_);
    }
    count = 0;
    for (int64_t n_rows : chunk_rows) count += n_rows * per_row;
    Tensor mine({2 * C}, DType::F32, device_), all({k * 2 * C}, DType::F32, device_);
    mine.view(0, {C}).copy_from(mean);
    mine.view(C, {C}).copy_from(var);
    dp_.comm(k).all_gather(rank_, mine, all);
    batchnorm_combine_stats(all, weights_, mean, var);
  }

  void reduce_grad_sums(Tensor& sum_dy, Tensor& sum_dy_xhat) override {
    const int64_t C = sum_dy.numel();
    Tensor both({2 * C}, DType::F32, device_);
    both.view(0, {C}).copy_from(sum_dy);
    both.view(C, {C}).copy_from(sum_dy_xhat);
    dp_.comm(dp_.active()).all_reduce_sum(rank_, both);
    sum_dy.copy_from(both.view(0, {C}));
    sum_dy_xhat.copy_from(both.view(C, {C}));
  }

 private:
  DataParallel& dp_;
  int rank_;
  Device device_;
  std::vector<int64_t> weight_rows_;  // the chunk sizes that weights_ holds
  Tensor weights_;                    // int64, on device_
};

// One thread per replica, each with its share of the OpenMP threads; run() hands every thread
// the same task and waits for all of them. The first failure aborts the communicators, so
// replicas blocked in a collective fail too instead of hanging; run() then resets them and
// rethrows that first failure.
struct DataParallel::Workers {
  Workers(int n, int omp_threads, std::function<void(const std::string&)> on_failure)
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
        abort_collectives(message(error));
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

  static std::string message(const std::exception_ptr& e) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      return x.what();
    } catch (...) {
      return "unknown failure";
    }
  }

  std::function<void(const std::string&)> abort_collectives;
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
                           std::vector<Device> devices, DataParallelOptions opt)
    : devices_(std::move(devices)), opt_(std::move(opt)) {
  DPT_CHECK(!devices_.empty(), UsageError, "DataParallel needs at least one device");
  for (const Device& d : devices_) {
    std::string why;
    DPT_CHECK(device_available(d, &why), DeviceError, why);
    DPT_CHECK(d.type == devices_[0].type, UsageError, "DataParallel replicas are all on GPUs or ",
              "all on CPU devices, not on both ", devices_[0].str(), " and ", d.str());
    DPT_CHECK(std::count(devices_.begin(), devices_.end(), d) == 1, UsageError, "device ", d.str(),
              " is listed twice");
  }
  DPT_CHECK(opt_.bucket_mb >= 0 && opt_.bucket_mb <= 65536, UsageError,
            "--bucket-mb must be between 0 and 65536, got ", opt_.bucket_mb);
  const ProcessGroup& g = opt_.group;
  DPT_CHECK(g.processes == 1 || devices_.size() == 1, UsageError,
            "with several processes each process drives one device, but this one was given ",
            devices_.size());
  output_ = opt_.output_device.value_or(devices_[0]);
  {
    std::string why;
    DPT_CHECK(device_available(output_, &why), DeviceError, "output device: ", why);
  }
  if (devices_[0].is_cuda() && g.processes == 1) {  // NCCL among the first k GPUs
    const std::vector<Device> gpus = devices_;
    opt_.group.make = [gpus](int k) {
      return make_nccl_communicator(std::vector<Device>(gpus.begin(), gpus.begin() + k));
    };
  }
  const int n = int(devices_.size());
  world_ = g.processes * n;
  first_ = g.rank * n;
  module->to(devices_[0]);
  Module& first = register_module("module", std::move(module));
  replicas_.push_back(&first);
  if (g.processes > 1) {  // the broadcast from global rank 0
    for (auto& [name, t] : first.state_dict().entries) comm(world_).broadcast(first_, t, 0);
  }
  StateDict sd = first.state_dict();
  for (int r = 1; r < n; ++r) {
    std::unique_ptr<Module> rep = make_replica();
    rep->to(devices_[size_t(r)]);
    rep->load_state_dict(sd, true);  // every local replica starts from replica 0
    rep->train(first.is_training());
    replicas_.push_back(rep.get());
    owned_.push_back(std::move(rep));
  }
  grad_comm_ = g.make(world_);
  const size_t bucket_bytes = size_t(opt_.bucket_mb * (1 << 20));
  // GPUs with SyncBatchNorm: backward's statistics collectives and the gradient buckets would be
  // two NCCL communicators in flight at once, which NCCL may deadlock on when ranks launch them
  // in different orders; the buckets then wait for the end of backward.
  const bool overlap = !(devices_[0].is_cuda() && opt_.bn == BnMode::Sync);
  for (int r = 0; r < n; ++r)
    reducers_.push_back(std::make_unique<GradReducer>(*replicas_[size_t(r)], first_ + r,
                                                      *grad_comm_, bucket_bytes, overlap));
  if (opt_.bn == BnMode::Sync) {
    for (int r = 0; r < n; ++r) {
      hooks_.push_back(std::make_unique<SyncBatchNormHook>(*this, first_ + r, devices_[size_t(r)]));
      for (auto& [name, m] : replicas_[size_t(r)]->named_modules())
        if (auto* b = dynamic_cast<BatchNorm2d*>(m)) b->set_sync(hooks_.back().get());
    }
  }
  const int total = opt_.threads > 0 ? opt_.threads : omp_get_max_threads();
  workers_ = std::make_unique<Workers>(n, std::max(1, total / n),
                                       [this](const std::string& why) { abort_all(why); });
}

DataParallel::~DataParallel() = default;

Communicator& DataParallel::comm(int k) {
  auto it = comms_.find(k);
  if (it == comms_.end()) it = comms_.emplace(k, opt_.group.make(k)).first;
  DPT_ASSERT(it->second, "this process has no replica among the first ", k, " ranks");
  return *it->second;
}

std::vector<int64_t> DataParallel::chunk_sizes(int64_t n) const {
  const int64_t d = world_, chunk = (n + d - 1) / d;
  std::vector<int64_t> sizes;
  for (int64_t at = 0; at < n; at += chunk) sizes.push_back(std::min(chunk, n - at));
  return sizes;
}

std::pair<int64_t, int64_t> DataParallel::local_rows(int64_t n) const {
  const std::vector<int64_t> sizes = chunk_sizes(n);
  const int local = int(replicas_.size());
  int64_t first = 0, last = 0;
  for (int g = 0; g < int(sizes.size()); ++g) {
    if (g < first_) first += sizes[size_t(g)];
    if (g < first_ + local) last += sizes[size_t(g)];
  }
  return {first, last};
}

std::vector<int64_t> DataParallel::chunk_offsets() const {
  std::vector<int64_t> offsets(sizes_.size(), 0);
  for (size_t r = 1; r < sizes_.size(); ++r) offsets[r] = offsets[r - 1] + sizes_[r - 1];
  return offsets;
}

std::vector<std::vector<std::string>> DataParallel::buckets() const {
  return reducers_[0]->bucket_names();
}
double DataParallel::communication_seconds() const {
  return reducers_[0]->comm_seconds();
}
double DataParallel::exposed_communication_seconds() const {
  return reducers_[0]->exposed_seconds();
}

void DataParallel::for_each_replica(const std::function<void(Module&, int)>& f) {
  run([&](int r) { f(*replicas_[size_t(r)], r); });
}

void DataParallel::abort_all(const std::string& why) {
  for (auto& r : reducers_) r->cancel();
  grad_comm_->abort(why);
  for (auto& [k, c] : comms_)
    if (c) c->abort(why);
}

void DataParallel::run(const std::function<void(int)>& f) {
  try {
    // A task is over when its GPU work is: the caller then reads outputs and buffers directly.
    workers_->run([&](int r) {
      f(r);
      device_sync(devices_[size_t(r)]);
    });
  } catch (...) {
    // Every replica has left the task; wait for their communication threads to leave theirs
    // (aborted collectives throw) before the communicators are made usable again. A reset that
    // fails (NCCL across processes cannot recover) must not hide the failure being reported.
    for (auto& r : reducers_) r->wait_idle();
    try {
      grad_comm_->reset();
      for (auto& [k, c] : comms_)
        if (c) c->reset();
    } catch (...) {
    }
    throw;
  }
}

// The shape of global rank 0's `t` (rank -1 dims: undefined) on every process. Only needed when
// some processes have no chunk this step and so cannot know it themselves.
namespace {
Shape shape_of_rank0(Communicator& world, int rank, const Tensor& t, const Device& dev) {
  Tensor s = Tensor::zeros({9}, DType::I64);
  int64_t* p = s.data<int64_t>();
  p[0] = t.defined() ? t.ndim() : -1;
  DPT_ASSERT(p[0] <= 8, "gather of a tensor with ", p[0], " dims");
  for (int i = 0; i < t.ndim() && t.defined(); ++i) p[1 + i] = t.dim(i);
  Tensor shared = s.to(dev);  // where the communicator takes it (the GPU for NCCL)
  world.broadcast(rank, shared, 0);
  s = shared.to(Device::cpu());
  p = s.data<int64_t>();
  if (p[0] < 0) return {-1};
  return Shape(p + 1, p + 1 + p[0]);
}
}  // namespace

Tensor DataParallel::gather(std::vector<Tensor>& local) {
  const int k = active();
  if (opt_.group.processes == 1) {
    if (!local[0].defined()) return Tensor();
    local.resize(size_t(k));
    return cat_rows(local, output_);
  }
  // One replica per process: every process contributes its chunk, padded to the largest.
  Tensor& mine = local[0];
  const Device& dev = devices_[0];
  Shape shape = k < world_ ? shape_of_rank0(comm(world_), first_, mine, dev) : Shape{};
  if (k == world_) {
    if (!mine.defined()) return Tensor();
    shape = mine.shape();
  }
  if (shape == Shape{-1}) return Tensor();
  DPT_ASSERT(!mine.defined() || (mine.dtype() == DType::F32 && !mine.channels_last()),
             "DataParallel gathers float32 across processes, not channels-last");
  const int64_t row = shape_numel(shape) / shape[0], most = sizes_[0];
  Tensor padded = Tensor::zeros({most * row}, DType::F32, dev);
  if (mine.defined()) device_copy(dev, padded.raw(), mine.device(), mine.raw(), mine.nbytes());
  Tensor all({world_ * most * row}, DType::F32, dev);
  comm(world_).all_gather(first_, padded, all);
  Shape out_shape = shape;
  out_shape[0] = 0;
  for (int64_t s : sizes_) out_shape[0] += s;
  Tensor out(out_shape, DType::F32, output_);
  int64_t at = 0;
  for (int g = 0; g < k; ++g) {
    device_copy(output_, static_cast<float*>(out.raw()) + at * row, dev,
                static_cast<const float*>(all.raw()) + g * most * row,
                size_t(sizes_[size_t(g)] * row) * sizeof(float));
    at += sizes_[size_t(g)];
  }
  return out;
}

std::vector<Tensor> DataParallel::scatter(const Tensor& t) const {
  int64_t n = 0;
  for (int64_t s : sizes_) n += s;
  DPT_CHECK(t.ndim() >= 1 && t.dim(0) == n, ConfigError, "DataParallel expected ", n,
            " rows (the last forward's batch), got ", shape_str(t.shape()));
  const std::vector<int64_t> offsets = chunk_offsets();
  std::vector<Tensor> chunks(replicas_.size());
  for (size_t r = 0; r < replicas_.size(); ++r) {
    const size_t g = size_t(first_) + r;
    if (g < sizes_.size()) chunks[r] = rows(t, offsets[g], sizes_[g], devices_[r]);
  }
  return chunks;
}

void DataParallel::copy_buffers_from_rank0() {
  auto keep = replicas_[0]->named_buffers();
  if (opt_.group.processes > 1) {
    std::vector<Tensor*> floats;
    for (auto& [name, t] : keep) {
      if (t->dtype() == DType::F32)
        floats.push_back(t);
      else
        comm(world_).broadcast(first_, *t, 0);
    }
    broadcast(comm(world_), first_, floats, 0, size_t(4) << 20);
  }
  for (size_t r = 1; r < replicas_.size(); ++r) {
    auto other = replicas_[r]->named_buffers();
    for (size_t i = 0; i < keep.size(); ++i) other[i].second->copy_from(*keep[i].second);
  }
}

Tensor DataParallel::forward(Tensor x) {
  DPT_CHECK(x.ndim() >= 1 && x.dim(0) >= 1, ConfigError, "DataParallel got an empty batch ",
            shape_str(x.shape()));
  sizes_ = chunk_sizes(x.dim(0));
  const int k = active();
  // SyncBatchNorm's communicator for this k, made here, on every process (it is collective).
  if (is_training() && opt_.bn == BnMode::Sync && !comms_.count(k))
    comms_.emplace(k, opt_.group.make(k));
  // The chunks are copied here, before any replica queues work: a copy between GPUs waits for
  // everything queued on its source GPU. They are kept until backward is over, so that the
  // thread that allocated them frees them.
  inputs_.clear();  // the last batch's chunks go before this one's are made
  inputs_ = scatter(x);
  std::vector<Tensor> outs(replicas_.size());
  run([&](int r) {
    if (inputs_[size_t(r)].defined())
      outs[size_t(r)] = replicas_[size_t(r)]->forward(inputs_[size_t(r)].share());
  });
  if (is_training() && opt_.bn == BnMode::Local) copy_buffers_from_rank0();
  if (!is_training()) inputs_.clear();  // no backward will need them
  return gather(outs);
}

Tensor DataParallel::backward(Tensor dy) {
  DPT_ASSERT(!sizes_.empty(), "DataParallel::backward without a forward");
  const std::vector<Tensor> inputs = std::move(inputs_);  // freed when backward ends, or throws
  std::vector<Tensor> dys = scatter(dy);
  std::vector<Tensor> dxs(replicas_.size());
  for (auto& r : reducers_) r->begin();
  run([&](int r) {
    Module& m = *replicas_[size_t(r)];
    if (dys[size_t(r)].defined())
      dxs[size_t(r)] = m.backward(dys[size_t(r)].share());
    else
      m.zero_grad();  // no chunk this step: contributes nothing to the sum
    reducers_[size_t(r)]->finish();
  });
  return gather(dxs);
}

LoadReport DataParallel::load_state_dict(const StateDict& sd, bool strict) {
  LoadReport rep = Module::load_state_dict(sd, strict);
  StateDict first = replicas_[0]->state_dict();
  for (size_t r = 1; r < replicas_.size(); ++r) replicas_[r]->load_state_dict(first, true);
  return rep;
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

void DataParallel::set_precision(Precision p) {
  Module::set_precision(p);
  for (Module* m : replicas_) m->set_precision(p);
}

void DataParallel::set_channels_last(bool on) {
  Module::set_channels_last(on);
  for (Module* m : replicas_) m->set_channels_last(on);
}

void DataParallel::release() {
  inputs_.clear();
  for (Module* m : replicas_)
    for (auto& [n, sub] : m->named_modules()) sub->release();
}

}  // namespace dpt

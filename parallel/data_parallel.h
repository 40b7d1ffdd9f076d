// DataParallel: PyTorch's nn.DataParallel from the outside, DistributedDataParallel inside.
//
// The wrapped module is replica 0 and is registered as the child "module", so
// named_parameters(), named_buffers() and state_dict() carry PyTorch's "module." prefix
// ("module.module." when wrapped twice). The other replicas are built once by the factory, get
// replica 0's parameters and buffers, and stay resident on their devices: no per-step
// re-replication. forward() splits the batch along dim 0 with torch.chunk semantics (chunks of
// ceil(N / devices), the last one smaller, fewer replicas when N is small), runs the replicas in
// parallel, one thread each, and gathers the outputs on the first device. backward() scatters dy
// the same way and then all-reduces (sums) the gradients, so every replica holds the gradient of
// the whole batch and applies the same optimizer step (for_each_replica).
//
// BatchNorm: BnMode::Local is PyTorch DataParallel's behaviour (each replica normalises with its
// own chunk's statistics; replica 0's running statistics are kept and copied to the others after
// every training forward, so replicas never drift). BnMode::Sync is SyncBatchNorm: per-channel
// statistics and gradient sums are reduced across the replicas, so N replicas train exactly like
// one device on the whole batch, up to floating-point rounding.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "models/module.h"
#include "parallel/communicator.h"

namespace dpt {

enum class BnMode { Local, Sync };
BnMode parse_bn_mode(const std::string& s);  // "local" | "sync"

class DataParallel : public Module {
 public:
  using Factory = std::function<std::unique_ptr<Module>()>;
  // threads: CPU threads shared among the replicas (0: all cores).
  DataParallel(std::unique_ptr<Module> module, const Factory& make_replica,
               std::vector<Device> devices, BnMode bn = BnMode::Local, int threads = 0);
  ~DataParallel() override;

  std::string kind() const override { return "DataParallel"; }
  Tensor forward(Tensor x) override;
  Tensor backward(Tensor dy) override;
  void train(bool on = true) override;
  void zero_grad() override;
  void to(const Device& d) override;
  void release() override;

  Module& module() { return *replicas_[0]; }
  Module& replica(int r) { return *replicas_.at(size_t(r)); }
  int num_replicas() const { return int(replicas_.size()); }
  const std::vector<Device>& devices() const { return devices_; }
  BnMode bn_mode() const { return bn_; }
  // torch.chunk sizes for a batch of n rows over this group's devices.
  std::vector<int64_t> chunk_sizes(int64_t n) const;
  // Runs f(replica, rank) for every replica on its own thread and waits for all of them.
  void for_each_replica(const std::function<void(Module&, int)>& f);
  // The communicator among the first k replicas, and k for the current step (the replicas that
  // received a chunk of the last forward's batch).
  Communicator& comm(int k) { return *comms_.at(k); }
  int active() const { return int(sizes_.size()); }
  // Seconds replica 0 has spent in the gradient all-reduce (not overlapped with backward yet).
  double communication_seconds() const { return comm_seconds_; }

 private:
  struct Workers;
  void run(const std::function<void(int)>& f);  // on every replica's thread; rethrows a failure
  void all_reduce_grads(int rank);
  std::vector<int64_t> chunk_offsets() const;  // first row of each chunk of the last forward

  std::vector<Device> devices_;
  BnMode bn_;
  std::vector<Module*> replicas_;  // [0] is the registered child "module"
  std::vector<std::unique_ptr<Module>> owned_;
  std::map<int, std::unique_ptr<Communicator>> comms_;
  std::vector<std::unique_ptr<class SyncBatchNormHook>> hooks_;
  std::vector<Tensor> flat_grads_;
  std::vector<int64_t> sizes_;  // chunk sizes of the last forward
  double comm_seconds_ = 0;
  std::unique_ptr<Workers> workers_;
};

}  // namespace dpt

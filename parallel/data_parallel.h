// DataParallel: PyTorch's nn.DataParallel from the outside, DistributedDataParallel inside.
//
// The wrapped module is replica 0 and is registered as the child "module", so
// named_parameters(), named_buffers() and state_dict() carry PyTorch's "module." prefix
// ("module.module." when wrapped twice). The other replicas are built once by the factory, get
// replica 0's parameters and buffers (the broadcast) and stay resident on their devices: no
// per-step re-replication. forward() splits the batch along dim 0 with torch.chunk semantics
// (chunks of ceil(N / replicas), the last one smaller, fewer replicas when N is small), runs the
// replicas in parallel, one thread each, and gathers the outputs on the first device. backward()
// scatters dy the same way; each replica's GradReducer all-reduces (sums) its gradients bucket by
// bucket while backward runs, so every replica ends with the gradient of the whole batch and
// applies the same optimizer step (for_each_replica).
//
// Replicas are all on CPU devices (the in-process communicator, each replica with its share of
// the cores) or all on GPUs (NCCL; one host thread per GPU queues its replica's kernels, and each
// task ends once its GPU work has, so outputs and buffers can be read across devices).
//
// Several processes (mpirun): each process holds one replica of the job and passes the same
// global batch; it runs its own chunk and the outputs are all-gathered, so every process sees the
// whole batch's output exactly as with in-process replicas.
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
#include <optional>
#include <string>
#include <vector>

#include "models/module.h"
#include "parallel/communicator.h"

namespace dpt {

enum class BnMode { Local, Sync };
BnMode parse_bn_mode(const std::string& s);  // "local" | "sync"

struct DataParallelOptions {
  BnMode bn = BnMode::Local;
  int threads = 0;          // CPU threads shared among this process's replicas (0: all cores)
  double bucket_mb = 25;    // gradient bucket size in MiB; 0: one bucket after backward
  ProcessGroup group = {};  // several processes: one device each
  // Where forward's outputs (and backward's input gradients) are gathered, as PyTorch's
  // output_device; default: the first device.
  std::optional<Device> output_device = {};
};

class DataParallel : public Module {
 public:
  using Factory = std::function<std::unique_ptr<Module>()>;
  DataParallel(std::unique_ptr<Module> module, const Factory& make_replica,
               std::vector<Device> devices, DataParallelOptions opt = {});
  ~DataParallel() override;

  std::string kind() const override { return "DataParallel"; }
  Tensor forward(Tensor x) override;
  Tensor backward(Tensor dy) override;
  void train(bool on = true) override;
  void zero_grad() override;
  void to(const Device& d) override;
  void set_precision(Precision p) override;  // on every replica
  void set_channels_last(bool on) override;  // on every replica
  void release() override;
  const ArchSpec* arch() const override { return replicas_[0]->arch(); }
  // Loads into replica 0 ("module." keys) and copies the result to every other replica.
  LoadReport load_state_dict(const StateDict& sd, bool strict = true) override;

  Module& module() { return *replicas_[0]; }
  // This process's replicas (all of them unless several processes share the job).
  Module& replica(int r) { return *replicas_.at(size_t(r)); }
  int num_replicas() const { return int(replicas_.size()); }
  int world_size() const { return world_; }  // replicas in all processes
  int first_rank() const { return first_; }  // global rank of replica(0)
  const std::vector<Device>& devices() const { return devices_; }
  const Device& output_device() const { return output_; }
  BnMode bn_mode() const { return opt_.bn; }
  // torch.chunk sizes for a batch of n rows over all replicas of the job.
  std::vector<int64_t> chunk_sizes(int64_t n) const;
  // The rows [first, second) of a batch of n rows that this process's replicas take.
  std::pair<int64_t, int64_t> local_rows(int64_t n) const;
  // Runs f(replica, r) for every replica of this process on its own thread and waits for all.
  void for_each_replica(const std::function<void(Module&, int)>& f);
  // The communicator among global ranks [0, k) (created on first use, collectively), and k for
  // the current step: the replicas that received a chunk of the last forward's batch.
  Communicator& comm(int k);
  int active() const { return int(sizes_.size()); }
  const std::vector<int64_t>& last_chunk_sizes() const { return sizes_; }  // by global rank
  // Gradient buckets of replica(0), each a list of parameter names (without "module.").
  std::vector<std::vector<std::string>> buckets() const;
  // Seconds replica 0 has spent in gradient all-reduces, and the part of them not hidden behind
  // backward (the time backward's end waited for the last buckets).
  double communication_seconds() const;
  double exposed_communication_seconds() const;

 private:
  struct Workers;
  void run(const std::function<void(int)>& f);  // on every replica's thread; rethrows a failure
  void abort_all(const std::string& why);
  std::vector<int64_t> chunk_offsets() const;  // first row of each chunk of the last forward
  Tensor gather(std::vector<Tensor>& local);   // this process's outputs -> the whole batch's
  // This process's chunks of a batch (rows of the last forward's chunk sizes), each on its
  // replica's device; undefined for replicas without a chunk.
  std::vector<Tensor> scatter(const Tensor& t) const;
  void copy_buffers_from_rank0();

  std::vector<Device> devices_;
  DataParallelOptions opt_;
  Device output_;
  int world_ = 1, first_ = 0;
  std::vector<Module*> replicas_;  // [0] is the registered child "module"
  std::vector<std::unique_ptr<Module>> owned_;
  std::map<int, std::unique_ptr<Communicator>> comms_;  // null: none of our ranks is in [0, k)
  std::unique_ptr<Communicator> grad_comm_;             // all ranks; used by the reducers only
  std::vector<std::unique_ptr<class GradReducer>> reducers_;
  std::vector<std::unique_ptr<class SyncBatchNormHook>> hooks_;
  std::vector<int64_t> sizes_;  // chunk sizes of the last forward
  std::vector<Tensor> inputs_;  // its chunks, until backward is over
  std::unique_ptr<Workers> workers_;
};

}  // namespace dpt

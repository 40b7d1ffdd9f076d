// NCCL communicator: the ranks are GPUs of this process, one replica thread each (so no NCCL
// group calls are needed), created together with ncclCommInitAll. Each collective is enqueued on
// the rank's own non-blocking stream after the work the calling thread has queued on that GPU
// (an event on its per-thread stream, which also follows the GPU's legacy-stream copies), and
// waited for before returning, as the Communicator contract says. Being non-blocking, the NCCL
// streams never hold up legacy-stream copies (cudaMemcpy) that other replicas make meanwhile.
// NCCL's ring reductions give every rank the same bits. Compiled when CUDA and NCCL are found.
#include "parallel/communicator.h"

#include <cstring>
#include <mutex>

#include "core/cuda_check.h"

#ifdef DPTRAIN_HAVE_CUDA
#include <nccl.h>
#endif

namespace dpt {

#ifdef DPTRAIN_HAVE_CUDA

namespace {

#define DPT_NCCL(call)                                              \
  do {                                                              \
    const ncclResult_t dpt_nccl_rc = (call);                        \
    DPT_CHECK(dpt_nccl_rc == ncclSuccess, DeviceError, #call, ": ", \
              ncclGetErrorString(dpt_nccl_rc));                     \
  } while (0)

// Local ranks [first, first + devices.size()) of a communicator of `size` ranks: all of them
// (ncclCommInitAll, one process), or one rank of a communicator spanning processes.
class NcclCommunicator : public Communicator {
 public:
  explicit NcclCommunicator(std::vector<Device> devices)
      : devices_(std::move(devices)), size_(int(devices_.size())) {
    init();
  }
  NcclCommunicator(const ncclUniqueId& id, int rank, int size, const Device& device)
      : devices_{device}, first_(rank), size_(size), id_(id), spans_processes_(true) {
    init();
  }
  ~NcclCommunicator() override { destroy(); }
  int size() const override { return size_; }
  std::string kind() const override { return "nccl"; }

  void all_reduce_sum(int rank, Tensor& t) override {
    enqueue(rank, t, true, [&](ncclComm_t c, cudaStream_t s) {
      return ncclAllReduce(t.raw(), t.raw(), size_t(t.numel()), ncclFloat32, ncclSum, c, s);
    });
  }
  void reduce_sum(int rank, Tensor& t, int root) override {
    enqueue(rank, t, true, [&](ncclComm_t c, cudaStream_t s) {
      return ncclReduce(t.raw(), t.raw(), size_t(t.numel()), ncclFloat32, ncclSum, root, c, s);
    });
  }
  void broadcast(int rank, Tensor& t, int root) override {
    enqueue(rank, t, false, [&](ncclComm_t c, cudaStream_t s) {
      return ncclBroadcast(t.raw(), t.raw(), t.nbytes(), ncclUint8, root, c, s);
    });
  }
  void all_gather(int rank, const Tensor& in, Tensor& out) override {
    DPT_ASSERT(out.numel() == in.numel() * size(), "all_gather: out has ", out.numel(), " values");
    enqueue(rank, in, true, [&](ncclComm_t c, cudaStream_t s) {
      return ncclAllGather(in.raw(), out.raw(), size_t(in.numel()), ncclFloat32, c, s);
    });
  }
  // Called from a failing replica's thread while others may be inside a collective: each rank's
  // communicator is aborted (its queued operations end) and cleared under that rank's lock, so
  // no thread enqueues on a freed one. NCCL communicators cannot be revived: reset() makes new
  // ones.
  void abort(const std::string&) override {
    for (size_t r = 0; r < comms_.size(); ++r) {
      std::lock_guard<std::mutex> lk(locks_[r]);
      if (comms_[r]) ncclCommAbort(comms_[r]);
      comms_[r] = nullptr;
    }
  }
  void reset() override {
    DPT_CHECK(!spans_processes_, DeviceError,
              "an NCCL communicator across processes cannot recover from a failure; restart the "
              "job (--resume auto)");
    destroy();
    init();
  }

 private:
  void init() {
    std::vector<int> ids;
    for (const Device& d : devices_) {
      DPT_CHECK(d.is_cuda(), DeviceError, "the NCCL communicator needs CUDA devices, got ",
                d.str());
      ids.push_back(d.index);
    }
    comms_.assign(ids.size(), nullptr);
    locks_ = std::vector<std::mutex>(ids.size());
    if (spans_processes_) {
      DPT_CUDA(cudaSetDevice(ids[0]));
      const ncclResult_t rc = ncclCommInitRank(&comms_[0], size_, id_, first_);
      DPT_CHECK(rc == ncclSuccess, DeviceError, "NCCL rank ", first_, " of ", size_, " on ",
                devices_[0].str(), ": ", ncclGetErrorString(rc),
                " (two ranks on one GPU? under mpirun, --devices auto gives each rank of a node "
                "its own GPU)");
    } else {
      DPT_NCCL(ncclCommInitAll(comms_.data(), int(ids.size()), ids.data()));
    }
    streams_.assign(ids.size(), nullptr);
    events_.assign(ids.size(), nullptr);
    for (size_t r = 0; r < ids.size(); ++r) {
      DPT_CUDA(cudaSetDevice(ids[r]));
      DPT_CUDA(cudaStreamCreateWithFlags(&streams_[r], cudaStreamNonBlocking));
      DPT_CUDA(cudaEventCreateWithFlags(&events_[r], cudaEventDisableTiming));
    }
  }
  void destroy() noexcept {
    for (size_t r = 0; r < comms_.size(); ++r) {
      if (comms_[r]) ncclCommDestroy(comms_[r]);
      if (r < streams_.size() && streams_[r]) cudaStreamDestroy(streams_[r]);
      if (r < events_.size() && events_[r]) cudaEventDestroy(events_[r]);
    }
    comms_.clear();
    streams_.clear();
    events_.clear();
  }
  size_t local(int rank) const { return size_t(rank - first_); }
  // Queues op(comm, stream) for rank after the calling thread's work on its GPU (the collective
  // reads what the caller's kernels and copies wrote), then waits for it outside the lock, so
  // that abort() can end it.
  template <typename Op>
  void enqueue(int rank, const Tensor& t, bool f32, Op&& op) {
    DPT_ASSERT(rank >= first_ && local(rank) < devices_.size(), "NCCL collective on rank ", rank,
               ", not one of this process's");
    const size_t r = local(rank);
    DPT_ASSERT(t.device() == devices_[r] && (!f32 || t.dtype() == DType::F32), "NCCL rank ", rank,
               " takes tensors on ", devices_[r].str());
    {
      std::lock_guard<std::mutex> lk(locks_[r]);
      DPT_CHECK(comms_[r] != nullptr, DeviceError,
                "NCCL collective after the communicator was aborted by a failing replica");
      DPT_CUDA(cudaSetDevice(devices_[r].index));
      DPT_CUDA(cudaEventRecord(events_[r], cudaStreamPerThread));
      DPT_CUDA(cudaStreamWaitEvent(streams_[r], events_[r], 0));
      DPT_NCCL(op(comms_[r], streams_[r]));
    }
    DPT_CUDA(cudaStreamSynchronize(streams_[r]));
  }

  std::vector<Device> devices_;
  int first_ = 0, size_ = 0;
  ncclUniqueId id_{};
  bool spans_processes_ = false;
  std::vector<ncclComm_t> comms_;
  std::vector<cudaStream_t> streams_;
  std::vector<cudaEvent_t> events_;  // per rank: where the caller's stream stood
  std::vector<std::mutex> locks_;    // per rank: enqueueing against abort()
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(const std::vector<Device>& devices) {
  std::string why;
  const int n = cuda_device_count(&why);
  DPT_CHECK(n > 0, DeviceError, "the NCCL communicator needs GPUs: ", why);
  for (const Device& d : devices)
    DPT_CHECK(d.is_cuda() && d.index < n, DeviceError, d.str(), " is not one of the ", n,
              " visible GPUs");
  return std::make_unique<NcclCommunicator>(devices);
}

NcclId nccl_unique_id() {
  ncclUniqueId id;
  DPT_NCCL(ncclGetUniqueId(&id));
  static_assert(sizeof(id) == sizeof(NcclId));
  NcclId out;
  std::memcpy(out.data(), &id, sizeof id);
  return out;
}

std::unique_ptr<Communicator> make_nccl_rank_communicator(const NcclId& id, int rank, int size,
                                                          const Device& device) {
  std::string why;
  const int n = cuda_device_count(&why);
  DPT_CHECK(n > 0 && device.is_cuda() && device.index < n, DeviceError, "NCCL rank ", rank, " on ",
            device.str(), ": ", n == 0 ? why : std::to_string(n) + " GPU(s) visible");
  ncclUniqueId raw;
  std::memcpy(&raw, id.data(), sizeof raw);
  return std::make_unique<NcclCommunicator>(raw, rank, size, device);
}

#else

NcclId nccl_unique_id() {
  DPT_THROW(DeviceError, "this build of dptrain has no NCCL");
}
std::unique_ptr<Communicator> make_nccl_rank_communicator(const NcclId&, int, int, const Device&) {
  DPT_THROW(DeviceError, "this build of dptrain has no NCCL");
}

std::unique_ptr<Communicator> make_nccl_communicator(const std::vector<Device>&) {
  DPT_THROW(DeviceError,
            "this build of dptrain has no NCCL (CUDA toolkit and NCCL were not found at build "
            "time)");
}

#endif

}  // namespace dpt

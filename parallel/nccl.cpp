// NCCL communicator: the ranks are GPUs of this process, one replica thread each (so no NCCL
// group calls are needed), created together with ncclCommInitAll. Each collective is enqueued on
// the rank's own stream and waited for before returning, as the Communicator contract says.
// NCCL's ring reductions give every rank the same bits. Compiled when CUDA and NCCL are found.
#include "parallel/communicator.h"

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

class NcclCommunicator : public Communicator {
 public:
  explicit NcclCommunicator(std::vector<Device> devices) : devices_(std::move(devices)) { init(); }
  ~NcclCommunicator() override { destroy(); }
  int size() const override { return int(devices_.size()); }
  std::string kind() const override { return "nccl"; }

  void all_reduce_sum(int rank, Tensor& t) override {
    check(rank, t, true);
    DPT_NCCL(ncclAllReduce(t.raw(), t.raw(), size_t(t.numel()), ncclFloat32, ncclSum,
                           comms_[size_t(rank)], streams_[size_t(rank)]));
    wait(rank);
  }
  void reduce_sum(int rank, Tensor& t, int root) override {
    check(rank, t, true);
    DPT_NCCL(ncclReduce(t.raw(), t.raw(), size_t(t.numel()), ncclFloat32, ncclSum, root,
                        comms_[size_t(rank)], streams_[size_t(rank)]));
    wait(rank);
  }
  void broadcast(int rank, Tensor& t, int root) override {
    check(rank, t, false);
    DPT_NCCL(ncclBroadcast(t.raw(), t.raw(), t.nbytes(), ncclUint8, root, comms_[size_t(rank)],
                           streams_[size_t(rank)]));
    wait(rank);
  }
  void all_gather(int rank, const Tensor& in, Tensor& out) override {
    check(rank, in, true);
    DPT_ASSERT(out.numel() == in.numel() * size(), "all_gather: out has ", out.numel(), " values");
    DPT_NCCL(ncclAllGather(in.raw(), out.raw(), size_t(in.numel()), ncclFloat32,
                           comms_[size_t(rank)], streams_[size_t(rank)]));
    wait(rank);
  }
  // NCCL communicators cannot be revived after an abort: reset() makes new ones.
  void abort(const std::string&) override {
    for (ncclComm_t c : comms_)
      if (c) ncclCommAbort(c);
    comms_.assign(comms_.size(), nullptr);
  }
  void reset() override {
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
    DPT_NCCL(ncclCommInitAll(comms_.data(), int(ids.size()), ids.data()));
    streams_.assign(ids.size(), nullptr);
    for (size_t r = 0; r < ids.size(); ++r) {
      DPT_CUDA(cudaSetDevice(ids[r]));
      DPT_CUDA(cudaStreamCreateWithFlags(&streams_[r], cudaStreamNonBlocking));
    }
  }
  void destroy() noexcept {
    for (size_t r = 0; r < comms_.size(); ++r) {
      if (comms_[r]) ncclCommDestroy(comms_[r]);
      if (r < streams_.size() && streams_[r]) cudaStreamDestroy(streams_[r]);
    }
    comms_.clear();
    streams_.clear();
  }
  void check(int rank, const Tensor& t, bool f32) const {
    DPT_ASSERT(rank >= 0 && rank < size() && comms_[size_t(rank)] != nullptr,
               "NCCL collective on rank ", rank, " (aborted or out of range)");
    DPT_ASSERT(t.device() == devices_[size_t(rank)] && (!f32 || t.dtype() == DType::F32),
               "NCCL rank ", rank, " takes tensors on ", devices_[size_t(rank)].str());
  }
  void wait(int rank) { DPT_CUDA(cudaStreamSynchronize(streams_[size_t(rank)])); }

  std::vector<Device> devices_;
  std::vector<ncclComm_t> comms_;
  std::vector<cudaStream_t> streams_;
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

#else

std::unique_ptr<Communicator> make_nccl_communicator(const std::vector<Device>&) {
  DPT_THROW(DeviceError,
            "this build of dptrain has no NCCL (CUDA toolkit and NCCL were not found at build "
            "time)");
}

#endif

}  // namespace dpt

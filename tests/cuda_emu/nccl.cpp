// The CUDA emulator's NCCL: communicators over the emulated GPUs of one process, one thread per
// rank (as parallel/nccl.cpp drives them). A collective is posted by each rank; the last rank to
// post it carries it out (sums in rank order, so every rank gets the same bits), and each rank's
// cudaStreamSynchronize on the stream it named waits until it is done, as on a GPU, where the
// call only enqueues. The ranks must agree on the collective, its count and root, and each
// buffer must lie in emulated device memory, else the call fails (ncclInvalidUsage) and the
// clique is aborted. ncclCommAbort ends the waits. ncclCommInitRank joins the ranks of one id
// within this process (up to 60 s): the emulator does not span processes.
#include <nccl.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <vector>

#include "tests/cuda_emu/emu.h"

namespace {

struct Post {
  const void* send = nullptr;
  void* recv = nullptr;
};
// What every rank must agree on: the collective, its count and its root.
struct Call {
  int kind = 0;
  size_t count = 0;
  int root = 0;
  bool operator==(const Call&) const = default;
};
struct Round {
  Call call;
  std::vector<Post> posts;
  int posted = 0;
  bool done = false;
};
struct Clique {
  explicit Clique(int n) : size(n) {}
  const int size;
  std::mutex m;
  std::condition_variable cv;
  std::map<uint64_t, Round> rounds;
  bool aborted = false;
  int joined = 0;  // ncclCommInitRank
};

std::mutex ids_mutex;
std::map<std::string, std::shared_ptr<Clique>> by_id;

}  // namespace

struct ncclComm {
  std::shared_ptr<Clique> clique;
  int rank = 0;
  uint64_t seq = 0;
};

namespace {

// Posts this rank's part of the next collective (send_bytes and recv_bytes long); `run(posts)`
// carries it out once all are in.
template <typename Run>
ncclResult_t post(ncclComm* c, Call call, const void* send, size_t send_bytes, void* recv,
                  size_t recv_bytes, cudaStream_t stream, Run run) {
  if (!c) return ncclInvalidArgument;
  auto clique = c->clique;
  const uint64_t seq = ++c->seq;
  {
    std::lock_guard<std::mutex> lk(clique->m);
    if (clique->aborted) return ncclInvalidUsage;
    Round& r = clique->rounds[seq];
    if (r.posts.empty()) r.posts.resize(size_t(clique->size)), r.call = call;
    if (!(r.call == call) || (send && !dpt_emu::device_range(send, send_bytes)) ||
        (recv && !dpt_emu::device_range(recv, recv_bytes))) {
      std::fprintf(stderr,
                   "emulated NCCL: rank %d's collective disagrees with the others' or its "
                   "buffers are not device memory\n",
                   c->rank);
      clique->aborted = true;
      clique->cv.notify_all();
      return ncclInvalidUsage;
    }
    r.posts[size_t(c->rank)] = {send, recv};
    if (++r.posted == clique->size) {
      run(r.posts);
      r.done = true;
      clique->cv.notify_all();
    }
  }
  dpt_emu::on_synchronize(stream, [clique, seq] {
    std::unique_lock<std::mutex> lk(clique->m);
    clique->cv.wait(lk, [&] { return clique->aborted || clique->rounds[seq].done; });
  });
  return ncclSuccess;
}

}  // namespace

extern "C" {

const char* ncclGetErrorString(ncclResult_t r) {
  return r == ncclSuccess ? "no error" : "invalid usage (emulated NCCL)";
}
ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  static std::mt19937_64 rng(std::random_device{}());
  std::memset(id, 0, sizeof *id);
  for (size_t i = 0; i + 8 <= 32; i += 8) {
    const uint64_t v = rng();
    std::memcpy(id->internal + i, &v, 8);
  }
  return ncclSuccess;
}
ncclResult_t ncclCommInitAll(ncclComm_t* comms, int n, const int*) {
  if (n < 1) return ncclInvalidArgument;
  auto clique = std::make_shared<Clique>(n);
  for (int r = 0; r < n; ++r) comms[r] = new ncclComm{clique, r, 0};
  return ncclSuccess;
}
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int n, ncclUniqueId id, int rank) {
  if (n < 1 || rank < 0 || rank >= n) return ncclInvalidArgument;
  std::shared_ptr<Clique> clique;
  {
    std::lock_guard<std::mutex> lk(ids_mutex);
    auto& slot = by_id[std::string(id.internal, sizeof id.internal)];
    if (!slot) slot = std::make_shared<Clique>(n);
    clique = slot;
  }
  std::unique_lock<std::mutex> lk(clique->m);
  ++clique->joined;
  clique->cv.notify_all();
  if (!clique->cv.wait_for(lk, std::chrono::seconds(60),
                           [&] { return clique->joined >= clique->size; }))
    return ncclSystemError;
  *comm = new ncclComm{clique, rank, 0};
  return ncclSuccess;
}
ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  delete comm;
  return ncclSuccess;
}
ncclResult_t ncclCommAbort(ncclComm_t comm) {
  if (comm) {
    std::lock_guard<std::mutex> lk(comm->clique->m);
    comm->clique->aborted = true;
    comm->clique->cv.notify_all();
  }
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, ncclDataType_t type,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
  if (type != ncclFloat32 || op != ncclSum) return ncclInvalidArgument;
  return post(comm, {1, count, 0}, send, 4 * count, recv, 4 * count, stream,
              [count](std::vector<Post>& p) {
                std::vector<float> sum(count, 0.0f);
                for (const Post& q : p)
                  for (size_t i = 0; i < count; ++i) sum[i] += static_cast<const float*>(q.send)[i];
                for (const Post& q : p) std::memcpy(q.recv, sum.data(), count * sizeof(float));
              });
}
ncclResult_t ncclReduce(const void* send, void* recv, size_t count, ncclDataType_t type,
                        ncclRedOp_t op, int root, ncclComm_t comm, cudaStream_t stream) {
  if (type != ncclFloat32 || op != ncclSum || !comm || root < 0 || root >= comm->clique->size)
    return ncclInvalidArgument;
  const bool is_root = comm->rank == root;
  return post(comm, {2, count, root}, send, 4 * count, is_root ? recv : nullptr,
              is_root ? 4 * count : 0, stream, [count, root](std::vector<Post>& p) {
                std::vector<float> sum(count, 0.0f);
                for (const Post& q : p)
                  for (size_t i = 0; i < count; ++i) sum[i] += static_cast<const float*>(q.send)[i];
                std::memcpy(p[size_t(root)].recv, sum.data(), count * sizeof(float));
              });
}
ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, ncclDataType_t type,
                           int root, ncclComm_t comm, cudaStream_t stream) {
  if (type != ncclUint8 || !comm || root < 0 || root >= comm->clique->size)
    return ncclInvalidArgument;
  return post(comm, {3, count, root}, comm->rank == root ? send : nullptr, count, recv, count,
              stream, [count, root](std::vector<Post>& p) {
                std::vector<char> data(static_cast<const char*>(p[size_t(root)].send),
                                       static_cast<const char*>(p[size_t(root)].send) + count);
                for (const Post& q : p) std::memcpy(q.recv, data.data(), count);
              });
}
ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, ncclDataType_t type,
                           ncclComm_t comm, cudaStream_t stream) {
  if (type != ncclFloat32 || !comm) return ncclInvalidArgument;
  return post(comm, {4, count, 0}, send, 4 * count, recv, 4 * count * size_t(comm->clique->size),
              stream, [count](std::vector<Post>& p) {
                std::vector<float> all;
                for (const Post& q : p)
                  all.insert(all.end(), static_cast<const float*>(q.send),
                             static_cast<const float*>(q.send) + count);
                for (const Post& q : p) std::memcpy(q.recv, all.data(), all.size() * sizeof(float));
              });
}

}  // extern "C"

// Collective operations among the ranks (replicas) of one data-parallel group.
//
// Every rank calls the same collectives in the same order, each passing its own tensors; a call
// returns on a rank once that rank's result is complete. Every rank ends up with bit-identical
// results (sums are taken in one order and then distributed), so replicas never drift apart.
// Implementations: in-process (threads sharing memory, CPU devices; inprocess.cpp), NCCL (GPUs of
// one process; nccl.cpp) and MPI (processes, possibly on several nodes; mpi.cpp).
#pragma once

#include <array>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace dpt {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int size() const = 0;
  virtual std::string kind() const = 0;
  // t (float32, same shape on every rank) becomes the elementwise sum over ranks on every rank.
  virtual void all_reduce_sum(int rank, Tensor& t) = 0;
  // Rank root's t (float32) becomes the sum over ranks; the other ranks' t are left unchanged.
  virtual void reduce_sum(int rank, Tensor& t, int root) = 0;
  // Every rank's t (any dtype) becomes a copy of rank `root`'s t.
  virtual void broadcast(int rank, Tensor& t, int root) = 0;
  // out (size() * in.numel() floats) becomes the concatenation of every rank's `in`, in rank order.
  virtual void all_gather(int rank, const Tensor& in, Tensor& out) = 0;
  // Called when a rank fails. In-process: every rank waiting in (or later entering) a collective
  // throws instead of waiting forever, until reset() makes the communicator usable again.
  // Across processes: the whole job is brought down with `why` on stderr (MPI_Abort).
  virtual void abort(const std::string& why) = 0;
  virtual void reset() = 0;
};

// A communicator for `size` ranks that are threads of this process (CPU devices).
std::unique_ptr<Communicator> make_inprocess_communicator(int size);
// A communicator among these GPUs of this process, rank r on devices[r], one thread per rank
// (NCCL, ncclCommInitAll; parallel/nccl.cpp). DeviceError without CUDA/NCCL or the GPUs.
std::unique_ptr<Communicator> make_nccl_communicator(const std::vector<Device>& devices);
// NCCL across processes and nodes: one process makes an id, every process receives it (MPI
// broadcasts it: MpiRuntime::nccl_group) and makes its rank of the `size`-rank communicator.
using NcclId = std::array<char, 128>;
NcclId nccl_unique_id();
std::unique_ptr<Communicator> make_nccl_rank_communicator(const NcclId& id, int rank, int size,
                                                          const Device& device);

// The processes of a data-parallel job: this one is `rank` of `processes`, and drives global
// replica ranks [rank * local, (rank + 1) * local) when each process has `local` devices.
// make(k) returns a new communicator among global ranks [0, k), or nullptr when none of this
// process's replicas is among them; with several processes every process must call make with the
// same k at the same point (it is collective: MPI_Comm_split).
struct ProcessGroup {
  int rank = 0;
  int processes = 1;
  std::function<std::unique_ptr<Communicator>(int k)> make = make_inprocess_communicator;
};

// The same collectives over lists of float32 tensors, coalesced: the tensors are packed into
// flat buffers of at most bucket_bytes (a larger tensor goes alone), one collective per buffer.
void all_reduce_sum(Communicator& c, int rank, const std::vector<Tensor*>& ts, size_t bucket_bytes);
void reduce_sum(Communicator& c, int rank, const std::vector<Tensor*>& ts, int root,
                size_t bucket_bytes);
void broadcast(Communicator& c, int rank, const std::vector<Tensor*>& ts, int root,
               size_t bucket_bytes);
// outs[i] (size() * ins[i]->numel() floats) gathers every rank's ins[i], in rank order.
void all_gather(Communicator& c, int rank, const std::vector<const Tensor*>& ins,
                const std::vector<Tensor*>& outs, size_t bucket_bytes);

}  // namespace dpt

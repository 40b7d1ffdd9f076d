// Collective operations among the ranks (replicas) of one data-parallel group.
//
// Every rank calls the same collectives in the same order, each passing its own tensors; a call
// returns on a rank once that rank's result is complete. Sums are taken in rank order, so results
// are bit-identical from run to run. Implementations: in-process (threads, CPU devices) here;
// NCCL and MPI belong beside it behind the same interface.
#pragma once

#include <memory>
#include <string>

#include "core/tensor.h"

namespace dpt {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int size() const = 0;
  virtual std::string kind() const = 0;
  // t (float32, same shape on every rank) becomes the elementwise sum over ranks on every rank.
  virtual void all_reduce_sum(int rank, Tensor& t) = 0;
  // Every rank's t becomes a copy of rank `root`'s t.
  virtual void broadcast(int rank, Tensor& t, int root) = 0;
  // out (size() * in.numel() floats) becomes the concatenation of every rank's `in`, in rank order.
  virtual void all_gather(int rank, const Tensor& in, Tensor& out) = 0;
  // Called when a rank fails: every rank waiting in (or later entering) a collective throws
  // instead of waiting forever, until reset() makes the communicator usable again.
  virtual void abort() = 0;
  virtual void reset() = 0;
};

// A communicator for `size` ranks that are threads of this process (CPU devices).
std::unique_ptr<Communicator> make_inprocess_communicator(int size);

}  // namespace dpt

// MPI: one data-parallel replica per process (DistributedDataParallel style), for jobs started
// with `mpirun -np N dptrain ...`, on one node or several.
//
// MpiRuntime is owned by main(): it initialises MPI (MPI_THREAD_MULTIPLE, because gradient
// buckets are reduced on a thread of their own while backward runs) and finalises it. Without
// MPI in the build, launched() still detects mpirun and the constructor throws a clear error.
#pragma once

#include <string>

#include "parallel/communicator.h"

namespace dpt {

class MpiRuntime {
 public:
  // Whether this process was started by an MPI launcher (mpirun, srun) as one of several ranks.
  static bool launched();
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }  // among the ranks on this node
  int local_size() const { return local_size_; }
  // The ranks as a process group whose communicators are MPI communicators.
  ProcessGroup group() const;
  // The same ranks with NCCL communicators on `device` (this rank's GPU), bootstrapped over MPI:
  // the first rank of each group makes the NCCL id and MPI broadcasts it.
  ProcessGroup nccl_group(const Device& device) const;
  // Prints "dptrain: error: rank R: why" and brings every rank of the job down (MPI_Abort).
  [[noreturn]] void abort(const std::string& why) const;

 private:
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
};

}  // namespace dpt

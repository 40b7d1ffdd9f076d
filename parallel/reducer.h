// GradReducer: bucketed gradient all-reduce for one replica, overlapped with its backward.
//
// The replica's parameters are grouped, in reverse registration order (about the order backward
// produces their gradients), into buckets of about bucket_bytes; each gradient becomes a view
// into its bucket's flat buffer, so reducing a bucket needs no copies. Every layer reports when
// its gradients are written (Module::set_grad_ready_hook); once all gradients of a bucket are
// in, the bucket is handed to this replica's communication thread, which all-reduces buckets in
// index order (the same order on every rank) while backward goes on. finish() waits for the last
// bucket. The gradients are SUMMED over ranks: a loss scaled by 1/global batch then yields the
// gradient of the whole batch's mean loss, whatever the chunk sizes.
//
// Every backward reduces the gradients as they are then: accumulating gradients over several
// backward calls without zero_grad would sum already reduced values again, so is not supported.
//
// On a GPU, "written" means queued on the replica thread's stream: a bucket becomes ready with a
// mark at that point of the stream, and the communication thread waits for the mark before the
// collective reads the bucket.
#pragma once

#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "models/module.h"
#include "parallel/communicator.h"

namespace dpt {

class GradReducer {
 public:
  // bucket_bytes 0: a single bucket, reduced once backward is over (no overlap). overlap false:
  // buckets wait for the end of backward all the same (no collective during backward).
  GradReducer(Module& replica, int rank, Communicator& comm, size_t bucket_bytes,
              bool overlap = true);
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  void begin();      // before backward: every bucket waits for its gradients
  void finish();     // after backward: reduces what is left, waits; rethrows a collective's failure
  void cancel();     // a failure elsewhere: stop waiting for gradients (returns at once)
  void wait_idle();  // until the communication thread has left the current step

  size_t num_buckets() const { return buckets_.size(); }
  // Parameter names of each bucket, in bucket order (for tests and logs).
  std::vector<std::vector<std::string>> bucket_names() const;
  double comm_seconds() const { return comm_seconds_; }  // inside the all-reduces
  // finish() waiting for them once backward is over (on a GPU: once its kernels have run)
  double exposed_seconds() const { return exposed_seconds_; }

 private:
  struct Bucket {
    std::vector<std::string> names;
    std::vector<Parameter*> params;
    Tensor flat;
    int pending = 0;
    StreamMark written;  // recorded when the last gradient of this step was queued
  };
  void grads_ready(Module& m);
  void loop();

  void mark_ready(size_t b);  // under mu_, on the replica's thread

  int rank_;
  Device device_;
  Communicator& comm_;
  std::vector<Bucket> buckets_;
  std::vector<std::pair<Parameter*, int>> bucket_of_;  // sorted by Parameter*

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<bool> ready_;       // per bucket, this step
  uint64_t step_ = 0, done_ = 0;  // begin() counts steps; the thread marks the one it finished
  bool overlap_;
  bool all_in_ = false;  // finish() was called this step
  bool cancelled_ = false, quit_ = false;
  std::exception_ptr error_;
  double comm_seconds_ = 0, exposed_seconds_ = 0;
  std::thread thread_;
};

}  // namespace dpt

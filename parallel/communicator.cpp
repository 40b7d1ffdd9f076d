// Coalesced collectives: lists of tensors are packed into flat float32 buffers of at most
// bucket_bytes so that many small tensors cost a few large collectives instead of many small ones.
// The buffers live where the tensors do (all on one device: host memory, or one GPU for NCCL).
#include "parallel/communicator.h"

#include <algorithm>

namespace dpt {

namespace {

// Splits ts into consecutive groups whose float32 sizes add up to at most bucket_bytes (a tensor
// larger than that forms a group alone) and calls f(first, last) for each group.
template <typename T, typename F>
void for_each_bucket(const std::vector<T*>& ts, size_t bucket_bytes, F&& f) {
  size_t begin = 0, bytes = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    DPT_ASSERT(ts[i]->dtype() == DType::F32 && ts[i]->device() == ts[0]->device(),
               "coalesced collectives take float32 tensors on one device");
    const size_t b = ts[i]->nbytes();
    if (i > begin && bytes + b > bucket_bytes) {
      f(begin, i);
      begin = i;
      bytes = 0;
    }
    bytes += b;
  }
  if (begin < ts.size()) f(begin, ts.size());
}

template <typename T>
int64_t total_numel(const std::vector<T*>& ts, size_t first, size_t last) {
  int64_t n = 0;
  for (size_t i = first; i < last; ++i) n += ts[i]->numel();
  return n;
}

template <typename T>
void pack(const std::vector<T*>& ts, size_t first, size_t last, Tensor& flat) {
  float* at = static_cast<float*>(flat.raw());
  for (size_t i = first; i < last; ++i) {
    device_copy(flat.device(), at, ts[i]->device(), ts[i]->raw(), ts[i]->nbytes());
    at += ts[i]->numel();
  }
}

void unpack(const Tensor& flat, const std::vector<Tensor*>& ts, size_t first, size_t last) {
  const float* at = static_cast<const float*>(flat.raw());
  for (size_t i = first; i < last; ++i) {
    device_copy(ts[i]->device(), ts[i]->raw(), flat.device(), at, ts[i]->nbytes());
    at += ts[i]->numel();
  }
}

// Packs each bucket, runs op on it and unpacks the result (into the same tensors).
template <typename Op>
void coalesced(const std::vector<Tensor*>& ts, size_t bucket_bytes, Op&& op) {
  for_each_bucket(ts, bucket_bytes, [&](size_t first, size_t last) {
    Tensor flat({total_numel(ts, first, last)}, DType::F32, ts[0]->device());
    pack(ts, first, last, flat);
    op(flat);
    unpack(flat, ts, first, last);
  });
}

}  // namespace

void all_reduce_sum(Communicator& c, int rank, const std::vector<Tensor*>& ts,
                    size_t bucket_bytes) {
  coalesced(ts, bucket_bytes, [&](Tensor& flat) { c.all_reduce_sum(rank, flat); });
}

void reduce_sum(Communicator& c, int rank, const std::vector<Tensor*>& ts, int root,
                size_t bucket_bytes) {
  coalesced(ts, bucket_bytes, [&](Tensor& flat) { c.reduce_sum(rank, flat, root); });
}

void broadcast(Communicator& c, int rank, const std::vector<Tensor*>& ts, int root,
               size_t bucket_bytes) {
  coalesced(ts, bucket_bytes, [&](Tensor& flat) { c.broadcast(rank, flat, root); });
}

void all_gather(Communicator& c, int rank, const std::vector<const Tensor*>& ins,
                const std::vector<Tensor*>& outs, size_t bucket_bytes) {
  DPT_ASSERT(ins.size() == outs.size(), "all_gather: ", ins.size(), " inputs, ", outs.size(),
             " outputs");
  for (size_t i = 0; i < ins.size(); ++i)
    DPT_ASSERT(outs[i]->numel() == ins[i]->numel() * c.size(), "all_gather: output ", i, " has ",
               outs[i]->numel(), " values");
  const auto& in = ins;
  const int n = c.size();
  for_each_bucket(in, bucket_bytes, [&](size_t first, size_t last) {
    const int64_t m = total_numel(in, first, last);
    const Device dev = in[0]->device();
    Tensor flat({m}, DType::F32, dev), all({m * n}, DType::F32, dev);
    pack(in, first, last, flat);
    c.all_gather(rank, flat, all);
    const float* src = static_cast<const float*>(all.raw());
    for (int r = 0; r < n; ++r)
      for (size_t i = first; i < last; ++i) {
        const int64_t k = in[i]->numel();
        device_copy(outs[i]->device(), static_cast<float*>(outs[i]->raw()) + r * k, dev, src,
                    size_t(k) * sizeof(float));
        src += k;
      }
  });
}

}  // namespace dpt

// CUDA SGD step with PyTorch's update rule (see kernels/optim.h); p and buf updated in place.
// Multi-tensor: one launch steps up to kSgdSlotsPerLaunch parameters, their addresses passed in
// the kernel's arguments; blockIdx.y picks the parameter, blocks along x stride over its values.
#include "kernels/cuda/common.h"
#include "kernels/optim.h"

namespace dpt::cuda {
namespace {

struct SlotTable {
  float* p[kSgdSlotsPerLaunch];
  const float* grad[kSgdSlotsPerLaunch];
  float* buf[kSgdSlotsPerLaunch];  // null without momentum
  int64_t n[kSgdSlotsPerLaunch];
  bool first[kSgdSlotsPerLaunch];
};

__global__ void sgd(SlotTable t, SgdParams h) {
  const int s = int(blockIdx.y);
  float *p = t.p[s], *buf = t.buf[s];
  const float* grad = t.grad[s];
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < t.n[s];
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = sgd_update(p[i], grad[i], buf ? buf + i : nullptr, h, t.first[s]);
}

}  // namespace

void sgd_step(const std::vector<SgdSlot>& slots, const SgdParams& h) {
  const Device dev = slots[0].p->device();
  for (const SgdSlot& s : slots) {
    check_operands("sgd_step", {s.p, s.grad});
    DPT_ASSERT((s.buf != nullptr) == (h.momentum != 0), "sgd: a momentum buffer without momentum");
    if (s.buf) check_operands("sgd_step", {s.p, s.buf});
    DPT_ASSERT(s.p->device() == dev, "sgd_step: parameters on ", dev.str(), " and ",
               s.p->device().str());
    DPT_ASSERT(s.grad->numel() == s.p->numel(), "sgd: grad shape");
  }
  DPT_CUDA(cudaSetDevice(dev.index));
  for (size_t first = 0; first < slots.size(); first += kSgdSlotsPerLaunch) {
    const size_t count = std::min(slots.size() - first, size_t(kSgdSlotsPerLaunch));
    SlotTable t{};
    int64_t most = 0;
    for (size_t i = 0; i < count; ++i) {
      const SgdSlot& s = slots[first + i];
      t.p[i] = s.p->data<float>();
      t.grad[i] = s.grad->data<float>();
      t.buf[i] = s.buf ? s.buf->data<float>() : nullptr;
      t.n[i] = s.p->numel();
      t.first[i] = s.first_step;
      most = std::max(most, t.n[i]);
    }
    if (most == 0) continue;
    const dim3 grid(std::min(blocks_for(most), 512u), unsigned(count));
    sgd<<<grid, kThreads, 0, cudaStreamPerThread>>>(t, h);
    check_launch("sgd_step");
  }
}

}  // namespace dpt::cuda

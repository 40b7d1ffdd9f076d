// The device dispatch point every op goes through: DPT_ON_DEVICE(dev, fn(args)) calls
// cpu::fn(args) or cuda::fn(args). A build without the CUDA backend throws DeviceError instead.
#pragma once

#include "core/device.h"
#include "core/error.h"

namespace dpt::detail {
[[noreturn]] inline void no_backend(const Device& d, const char* op) {
  DPT_THROW(DeviceError, "op ", op, " cannot run on ", d.str(),
            ": this build of dptrain has no CUDA backend");
}
}  // namespace dpt::detail

#ifdef DPTRAIN_WITH_CUDA
#define DPT_ON_DEVICE(dev, fn, ...)                  \
  do {                                               \
    if ((dev).is_cpu()) return cpu::fn(__VA_ARGS__); \
    return cuda::fn(__VA_ARGS__);                    \
  } while (0)
#else
#define DPT_ON_DEVICE(dev, fn, ...)                  \
  do {                                               \
    if ((dev).is_cpu()) return cpu::fn(__VA_ARGS__); \
    ::dpt::detail::no_backend((dev), #fn);           \
  } while (0)
#endif

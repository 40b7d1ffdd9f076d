// One-GPU training throughput of a ResNet at 224x224 in precision P (fp32 with TF32 off, tf32,
// fp16 with loss scaling, bf16; as `dptrain train --precision`): forward, cross-entropy, backward
// and SGD with momentum on cuda:0, batch B, S timed steps after 3 warm-up steps.
// Prints {"images_per_second", "step_ms", "peak_bytes", "peak_reserved_bytes", "device_bytes",
// "conv_algorithms"}:
// peak_bytes and peak_reserved_bytes are the caching allocator's peaks over the timed steps
// (blocks handed out to tensors, and held from the driver), the figures PyTorch reports as
// max_memory_allocated and max_memory_reserved; device_bytes is the most device memory in use
// (cudaMemGetInfo less the CUDA context: cuDNN workspaces and library handles included) seen in
// the warm-up; conv_algorithms the cuDNN algorithms chosen (kernels/conv.h). Driven by
// gpu_step.py, which times torchvision's model the same way beside it (scripts/gpu-check.sh).
//
// With "dp", the model is wrapped in DataParallel over every visible GPU (NCCL, local BatchNorm,
// 25 MiB gradient buckets reduced while backward runs), fed the same batch on cuda:0; the JSON
// adds "replicas" and, per timed step, "communication_ms" (inside the all-reduces) and
// "exposed_communication_ms" (the part backward's end waited for).
//
// With "nchw", fp16 and bf16 keep NCHW activations (channels-last off), for comparison.
//
//   bench_gpu MODEL BATCH STEPS [fp32|tf32|fp16|bf16] [dp|nchw]
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>

#include "core/allocator.h"
#include "core/cuda_check.h"
#include "core/rng.h"
#include "kernels/conv.h"
#include "kernels/loss.h"
#include "models/arch.h"
#include "models/optimizer.h"
#include "parallel/data_parallel.h"

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: bench_gpu MODEL BATCH STEPS [fp32|tf32|fp16|bf16] [dp]\n");
    return 2;
  }
  try {
    const dpt::Device gpu = dpt::Device::cuda(0);
    dpt::ArchSpec spec;
    spec.arch = argv[1];
    spec.num_classes = 1000;
    spec.in_channels = 3;
    spec.stem = "imagenet";
    const int64_t batch = std::atoll(argv[2]), steps = std::atoll(argv[3]);
    DPT_CUDA(cudaSetDevice(0));
    DPT_CUDA(cudaFree(nullptr));  // the context first: it is not part of the model's memory
    size_t total = 0, free_bytes = 0, peak = 0;
    DPT_CUDA(cudaMemGetInfo(&free_bytes, &total));
    const size_t baseline = total - free_bytes;
    const std::string precision = argc > 4 ? argv[4] : "fp32";
    std::unique_ptr<dpt::Module> model = dpt::make_model(spec, 0);
    dpt::DataParallel* dp = nullptr;
    if (argc > 5 && std::string(argv[5]) == "dp") {
      std::vector<dpt::Device> gpus;
      for (int i = 0; i < dpt::cuda_device_count(); ++i) gpus.push_back(dpt::Device::cuda(i));
      model = std::make_unique<dpt::DataParallel>(
          std::move(model), [spec] { return dpt::make_model(spec, 0); }, gpus);
      dp = static_cast<dpt::DataParallel*>(model.get());
    } else {
      model->to(gpu);
    }
    model->set_precision(dpt::parse_precision(precision));
    // As dptrain train --channels-last auto: channels-last activations in fp16 and bf16.
    const bool nchw = argc > 5 && std::string(argv[5]) == "nchw";
    model->set_channels_last(!nchw && (precision == "fp16" || precision == "bf16"));
    const int replicas = dp ? dp->num_replicas() : 1;
    dpt::GradScaler scaler;
    model->train();
    dpt::Tensor x({batch, 3, 224, 224}), t({batch}, dpt::DType::I64);
    dpt::Rng rng(1);
    for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = rng.normal();
    for (int64_t i = 0; i < batch; ++i) t.data<int64_t>()[i] = i % 1000;
    const dpt::Tensor gx = x.to(gpu), gt = t.to(gpu);
    std::vector<dpt::Sgd> opts;
    for (int r = 0; r < replicas; ++r)
      opts.emplace_back(dpt::SgdParams{0.1f, 0.9f, 0.0f, 1e-4f, false});
    // Every GPU's work done; the current device, which the replicas' copies and frees move, back
    // to cuda:0.
    auto sync_all = [&] {
      for (int r = replicas - 1; r >= 0; --r) {
        DPT_CUDA(cudaSetDevice(r));
        DPT_CUDA(cudaDeviceSynchronize());
      }
    };
    auto sample = [&] {  // cuda:0's memory, where the batch, the outputs and dlogits live too
      sync_all();
      DPT_CUDA(cudaMemGetInfo(&free_bytes, &total));
      peak = std::max(peak, total - free_bytes);
    };
    // measure: memory is sampled (with a device sync) only in the untimed warm-up steps.
    auto step = [&](bool measure) {
      model->zero_grad();
      dpt::Tensor z = model->forward(gx.clone());
      if (measure) sample();
      dpt::Tensor dz(z.shape(), dpt::DType::F32, gpu);
      dpt::softmax_cross_entropy(z, gt, &dz);
      if (precision == "fp16") scaler.scale_loss_grad(dz);
      model->backward(std::move(dz));
      if (measure) sample();
      std::vector<char> overflow(size_t(replicas), 0);
      auto update = [&](dpt::Module& m, int r) {
        if (precision == "fp16" && (overflow[size_t(r)] = scaler.unscale(m))) return;
        opts[size_t(r)].step(m);
      };
      if (dp)
        dp->for_each_replica(update);
      else
        update(*model, 0);
      if (precision == "fp16") scaler.update(overflow[0] != 0);
      if (measure) sample();
    };
    for (int k = 0; k < 3; ++k) step(true);
    dpt::cuda_allocator().reset_peak(0);
    const double comm0 = dp ? dp->communication_seconds() : 0,
                 exposed0 = dp ? dp->exposed_communication_seconds() : 0;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t k = 0; k < steps; ++k) step(false);
    sync_all();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const dpt::AllocatorStats mem = dpt::cuda_allocator().stats(0);
    nlohmann::json out{{"images_per_second", double(batch * steps) / s},
                       {"step_ms", 1000 * s / double(steps)},
                       {"peak_bytes", mem.peak_in_use},
                       {"peak_reserved_bytes", mem.peak_reserved},
                       {"device_bytes", peak - baseline},
                       {"replicas", replicas},
                       {"conv_algorithms", dpt::cuda::conv_algorithms_chosen()}};
    if (dp) {
      out["communication_ms"] = 1000 * (dp->communication_seconds() - comm0) / double(steps);
      out["exposed_communication_ms"] =
          1000 * (dp->exposed_communication_seconds() - exposed0) / double(steps);
    }
    std::printf("%s\n", out.dump().c_str());
  } catch (const dpt::Error& e) {
    std::fprintf(stderr, "bench_gpu: %s\n", e.what());
    return 1;
  }
  return 0;
}

#!/usr/bin/env python3
"""One-GPU training step of a ResNet at 224x224: dptrain's bench_gpu against torchvision's model
under PyTorch eager, same batch, same step (forward, cross-entropy, backward, SGD with momentum,
the loss read back every step), in one run, at fp32 (TF32 off), tf32 (convolutions on TF32
tensor cores, matmuls fp32: PyTorch's defaults), fp16 and bf16. PyTorch runs the
16-bit precisions as its users would: autocast, channels_last, GradScaler for fp16. Prints a table
with ratios. Then dptrain's DataParallel over every visible GPU (NCCL) at fp32 against the bare
model: the wrapper's overhead and how much of the gradient all-reduce backward hides. Last,
dptrain's fp16 with NCHW activations, against its default channels-last.

  python3 benchmarks/gpu_step.py --binary gpu-bundle/bin/bench_gpu [--model resnet152]
                                 [--batch 64] [--steps 20] [--markdown PATH]

Runs where the GPU is (scripts/gpu-check.sh); needs PyTorch with CUDA and torchvision.
"""
import argparse, json, subprocess, sys, time


def torch_step(model_name, batch, steps, precision):
    import torch, torchvision
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda:0")
    model = getattr(torchvision.models, model_name)(num_classes=1000).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    t = torch.arange(batch, device=dev) % 1000
    loss_fn = torch.nn.CrossEntropyLoss()
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if half is not None:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    scaler = torch.cuda.amp.GradScaler(enabled=precision == "fp16")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=half or torch.float32, enabled=half is not None):
            loss = loss_fn(model(x), t)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.item()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    s = time.perf_counter() - start
    return {"images_per_second": batch * steps / s, "step_ms": 1000 * s / steps,
            "peak_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--binary", required=True)
    p.add_argument("--model", default="resnet152")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--markdown")
    args = p.parse_args()
    import torch
    gpu = torch.cuda.get_device_name(0)
    lines = []

    def emit(line):  # printed at once, so that a run cut short by a timeout keeps its rows
        lines.append(line)
        print(line, flush=True)

    def ours_step(precision, *extra):
        r = subprocess.run(
            [args.binary, args.model, str(args.batch), str(args.steps), precision, *extra],
            capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            emit(f"| {' '.join((precision,) + extra)} | dptrain | error: {tail} | | | | |")
            return None
        return json.loads(r.stdout)

    emit("| precision | side | img/s | step ms | peak allocated | peak reserved | img/s vs PyTorch |")
    emit("|---|---|---|---|---|---|---|")
    device_bytes, bare = {}, {}
    for precision in ("fp32", "tf32", "fp16", "bf16"):
        ours = ours_step(precision)
        theirs = torch_step(args.model, args.batch, args.steps, precision)
        torch.cuda.empty_cache()
        rows = [("PyTorch eager", theirs)]
        if ours is not None:
            bare[precision] = ours
            device_bytes[precision] = ours["device_bytes"]
            rows.insert(0, ("dptrain", ours))
        for name, r in rows:
            emit(f"| {precision} | {name} | {r['images_per_second']:.1f} | {r['step_ms']:.1f} | "
                 f"{r['peak_bytes'] / 2**30:.2f} GiB | {r['peak_reserved_bytes'] / 2**30:.2f} GiB | "
                 f"{r['images_per_second'] / theirs['images_per_second']:.2f}x |")
    emit("")
    emit(f"{args.model}, batch {args.batch}, 224x224, {args.steps} timed steps after 3; {gpu}; "
         f"PyTorch {torch.__version__} (fp16/bf16: autocast + channels_last, GradScaler for "
         f"fp16). dptrain's fp16/bf16 store the activations in 16 bits and run the "
         f"convolutions on tensor cores (float32 sums), channels-last; tf32 switches cuDNN to its "
         f"tensor-core math for float32. Peak memory over the timed steps, from each "
         f"side's caching allocator: allocated = in tensors (PyTorch's max_memory_allocated), "
         f"reserved = held from the driver (max_memory_reserved). Ours with cuDNN workspaces "
         f"and handles (cudaMemGetInfo less the CUDA context, warm-up): " +
         ", ".join(f"{p} {b / 2**30:.2f} GiB" for p, b in device_bytes.items()) + ".")
    emit("")
    for precision, r in bare.items():  # what cuDNN ran: algorithm, math type -> convolution shapes
        emit(f"cuDNN algorithms, {precision}: " + ", ".join(
            f"{k} x{n}" for k, n in r.get("conv_algorithms", {}).items()) + ".")
    emit("")
    dp = ours_step("fp32", "dp")
    if dp is not None and "fp32" in bare:
        comm, exposed = dp["communication_ms"], dp["exposed_communication_ms"]
        emit(f"DataParallel on {dp['replicas']} GPU(s) through NCCL, fp32, batch {args.batch}: "
             f"step {dp['step_ms']:.1f} ms against {bare['fp32']['step_ms']:.1f} ms bare "
             f"(overhead {100 * (dp['step_ms'] / bare['fp32']['step_ms'] - 1):+.1f}%); gradient "
             f"all-reduce {comm:.2f} ms per step, {exposed:.2f} ms of it exposed "
             f"({100 * (1 - exposed / comm) if comm > 0 else 0:.0f}% hidden behind backward); "
             f"peak allocated {dp['peak_bytes'] / 2**30:.2f} GiB on cuda:0.")
    nchw = ours_step("fp16", "nchw")
    if nchw is not None and "fp16" in bare:
        emit("")
        emit(f"dptrain fp16 with NCHW activations (channels-last off): "
             f"{nchw['images_per_second']:.1f} img/s, peak allocated "
             f"{nchw['peak_bytes'] / 2**30:.2f} GiB, against "
             f"{bare['fp16']['images_per_second']:.1f} img/s channels-last.")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

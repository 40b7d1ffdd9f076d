#!/usr/bin/env python3
"""One-GPU training step of a ResNet at 224x224, fp32 with TF32 off: dptrain's bench_gpu against
torchvision's model under PyTorch eager, same batch, same step (forward, cross-entropy, backward,
SGD with momentum, the loss read back every step), in one run. Prints a table with ratios.

  python3 benchmarks/gpu_step.py --binary gpu-bundle/bin/bench_gpu [--model resnet152]
                                 [--batch 64] [--steps 20] [--markdown PATH]

Runs where the GPU is (scripts/gpu-check.sh); needs PyTorch with CUDA and torchvision.
"""
import argparse, json, subprocess, sys, time


def torch_step(model_name, batch, steps):
    import torch, torchvision
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda:0")
    model = getattr(torchvision.models, model_name)(num_classes=1000).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    t = torch.arange(batch, device=dev) % 1000
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), t)
        loss.backward()
        opt.step()
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
    ours = json.loads(subprocess.run([args.binary, args.model, str(args.batch), str(args.steps)],
                                     check=True, capture_output=True, text=True).stdout)
    theirs = torch_step(args.model, args.batch, args.steps)
    gpu = torch.cuda.get_device_name(0)
    rows = [("dptrain", ours), ("PyTorch eager", theirs)]
    lines = ["| fp32, TF32 off | img/s | step ms | peak allocated | peak reserved | img/s vs PyTorch |",
             "|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['images_per_second']:.1f} | {r['step_ms']:.1f} | "
                     f"{r['peak_bytes'] / 2**30:.2f} GiB | {r['peak_reserved_bytes'] / 2**30:.2f} GiB | "
                     f"{r['images_per_second'] / theirs['images_per_second']:.2f}x |")
    note = (f"{args.model}, batch {args.batch}, 224x224, {args.steps} timed steps after 3; {gpu}; "
            f"PyTorch {torch.__version__}. Peak memory over the timed steps, from each side's "
            f"caching allocator: allocated = in tensors (PyTorch's max_memory_allocated), reserved "
            f"= held from the driver (max_memory_reserved). Ours, cuDNN workspaces and handles "
            f"included (cudaMemGetInfo less the CUDA context, warm-up): "
            f"{ours['device_bytes'] / 2**30:.2f} GiB.")
    text = "\n".join(lines) + "\n\n" + note + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

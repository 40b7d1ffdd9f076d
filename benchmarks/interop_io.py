#!/usr/bin/python3
"""Import and export of a ResNet-152 state_dict: dptrain's .pth and safetensors against
torch.save / torch.load of the same dict.

The dict: ResNet-152 with 1000 classes (about 240 MB of float32). Every operation runs once in a
fresh process, as a user's command meets it (fresh memory is costly to touch on virtual machines,
and a process that loads the same file again and again reuses its heap and hides that), and the
best of N processes is kept. Torch: torch.save to a file followed by os.fsync (dptrain's saves
are durable: fsync and rename), and torch.load, each timed inside its own Python process after
`import torch`. Ours: build/benchmarks/bench_interop (write_checkpoint, read_checkpoint, every
check included), and our import of the file torch.save wrote. Loads come from the page cache.

  /usr/bin/python3 benchmarks/interop_io.py [--repeat 5] [--dir DIR] [--markdown PATH]
"""
import argparse, json, os, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_pytorch import ROOT, command_line, cpu_model, markdown_table, report  # noqa


def torch_once(op, path):
    import torch, torchvision
    if op == "save":
        sd = torchvision.models.resnet152().state_dict()
        t = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())
    else:
        t = time.perf_counter()
        torch.load(path)
    return time.perf_counter() - t


def best(cmd, repeats):
    return min(float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
               for _ in range(repeats))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "benchmarks", "bench_interop"))
    p.add_argument("--torch-once", nargs=2, metavar=("OP", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_once:
        print(torch_once(*args.torch_once))
        return 0
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"interop_io: {args.binary} is missing: build first")
    import torch
    me = ["/usr/bin/python3", os.path.abspath(__file__), "--torch-once"]
    paths = {f: os.path.join(args.dir, f"bench_interop.{f}") for f in ("pth", "safetensors")}
    torch_path = os.path.join(args.dir, "bench_interop_torch.pth")
    try:
        theirs = {op: best(me + [op, torch_path], args.repeat) for op in ("save", "load")}
        ours = {f: {op: best([args.binary, op, path], args.repeat) for op in ("save", "load")}
                for f, path in paths.items()}
        ours_torch_file = best([args.binary, "load", torch_path], args.repeat)
        size = os.path.getsize(paths["pth"])
    finally:
        for path in list(paths.values()) + [torch_path]:
            if os.path.exists(path):
                os.remove(path)
    rows = []
    for fmt in ("pth", "safetensors"):
        for op in ("save", "load"):
            s, t = ours[fmt][op], theirs[op]
            rows.append([f"{'export' if op == 'save' else 'import'} .{fmt}",
                         f"{s:.3f} s ({size / s / 1e9:.2f} GB/s)", f"{t:.3f} s", f"{t / s:.2f}x"])
    rows.append(["import torch.save's file", f"{ours_torch_file:.3f} s",
                 f"{theirs['load']:.3f} s", f"{theirs['load'] / ours_torch_file:.2f}x"])
    header = ["", "dptrain", "torch.save + fsync / torch.load", "torch time / ours"]
    note = (f"ResNet-152 state_dict, 1000 classes: {size / 1e6:.0f} MB; machine: {cpu_model()}, "
            f"{os.cpu_count()} cores; PyTorch {torch.__version__}; each operation in a fresh "
            f"process, best of {args.repeat}; files in {args.dir}.\nCommand: `{command_line()}`")
    report(markdown_table(header, rows), note, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

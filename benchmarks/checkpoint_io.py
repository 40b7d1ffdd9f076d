#!/usr/bin/python3
"""Checkpoint save and load: dptrain's HDF5 against torch.save / torch.load and raw I/O.

The same tensors on both sides: a ResNet-152 state_dict (1000 classes) plus one momentum buffer
per parameter, about 480 MB. Ours: build/bench_checkpoint (write_checkpoint: libhdf5 lays out
the file, the tensors are streamed in with O_DIRECT and XXH3-128, fsync,
rename; read_checkpoint: read, XXH3-128, parse, validate). Torch:
torch.save of {"model": state_dict, "momentum": {...}} followed by os.fsync (durable like ours),
and torch.load. Raw: the tensor bytes written with write + fsync, and read back. Best of N. Loads
come from the page cache (torch's file was just written through it; ours, which bypasses it, was
read once before); one more row gives our load straight after the save, from the disk.

  /usr/bin/python3 benchmarks/checkpoint_io.py [--repeat 3] [--dir DIR] [--markdown PATH]
"""
import argparse, json, os, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_pytorch import ROOT, command_line, cpu_model, markdown_table, report  # noqa


def torch_side(directory, repeats):
    import torch, torchvision
    model = torchvision.models.resnet152()
    obj = {"model": model.state_dict(),
           "momentum": {k: torch.randn_like(p) for k, p in model.named_parameters()}}
    path = os.path.join(directory, "bench_torch.pth")
    save = load = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        save = min(save, time.perf_counter() - t)
        t = time.perf_counter()
        torch.load(path)
        load = min(load, time.perf_counter() - t)
    size = os.path.getsize(path)
    os.remove(path)
    return {"save_seconds": save, "load_seconds": load, "file_bytes": size,
            "torch": torch.__version__}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "benchmarks", "bench_checkpoint"))
    p.add_argument("--torch-side", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_side:
        print(json.dumps(torch_side(args.dir, args.repeat)))
        return 0
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"checkpoint_io: {args.binary} is missing: build first")
    ours = json.loads(subprocess.run([args.binary, args.dir, str(args.repeat)], check=True,
                                     capture_output=True, text=True).stdout)
    theirs = json.loads(subprocess.run(["/usr/bin/python3", os.path.abspath(__file__), "--torch-side",
                                        "--dir", args.dir, "--repeat", str(args.repeat)],
                                       check=True, capture_output=True, text=True).stdout)
    mb = ours["file_bytes"] / 1e6
    gbs = lambda s: f"{ours['file_bytes'] / s / 1e9:.2f} GB/s"
    rows = [
        ["save", f"{ours['save_seconds']:.3f} s ({gbs(ours['save_seconds'])})",
         f"{theirs['save_seconds']:.3f} s", f"{ours['raw_write_seconds']:.3f} s",
         f"{theirs['save_seconds'] / ours['save_seconds']:.2f}x",
         f"{100 * (ours['save_seconds'] / ours['raw_write_seconds'] - 1):+.0f}%"],
        ["load (page cache)", f"{ours['load_seconds']:.3f} s ({gbs(ours['load_seconds'])})",
         f"{theirs['load_seconds']:.3f} s", f"{ours['raw_read_seconds']:.3f} s",
         f"{theirs['load_seconds'] / ours['load_seconds']:.2f}x",
         f"{100 * (ours['load_seconds'] / ours['raw_read_seconds'] - 1):+.0f}%"],
        ["load right after save (from disk)",
         f"{ours['load_after_save_seconds']:.3f} s ({gbs(ours['load_after_save_seconds'])})",
         "", "", "", ""],
    ]
    header = ["", "dptrain (HDF5)", "torch", "raw I/O", "torch time / ours", "ours vs raw"]
    command = command_line()
    note = (f"ResNet-152 full checkpoint with momentum: {mb:.0f} MB (torch file "
            f"{theirs['file_bytes'] / 1e6:.0f} MB); machine: {cpu_model()}, {os.cpu_count()} cores; "
            f"PyTorch {theirs['torch']}; best of {args.repeat}; files in {args.dir}.\n"
            f"Command: `{command}`")
    report(markdown_table(header, rows), note, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

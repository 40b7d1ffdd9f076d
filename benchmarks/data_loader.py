#!/usr/bin/python3
"""Image-folder loading: dptrain's Loader against torchvision's ImageFolder + DataLoader.

Both read the same generated folder of 500x375 JPEGs (10 classes, quality 90, smooth random
content that compresses like photographs), decode, apply RandomResizedCrop(224) + horizontal flip,
convert to float and normalise with ImageNet's mean and std, in batches of 64, with the same
number of workers (torchvision: worker processes, as users run it; ours: threads). One epoch is
timed after two warm-up batches; best of N runs each. Throughput per core is images per second
divided by the number of workers.

  /usr/bin/python3 benchmarks/data_loader.py [--images 1000] [--workers 1 2] [--repeat 3]
                                             [--dir DIR] [--markdown PATH]
"""
import argparse, json, os, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_pytorch import ROOT, command_line, cpu_model, markdown_table, report  # noqa


def torch_once(root, workers, batch):
    import torch
    from torchvision import datasets, transforms
    tf = transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ds = datasets.ImageFolder(root, tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=False, persistent_workers=False)
    it = iter(loader)
    for _ in range(2):
        next(it)
    t = time.perf_counter()
    n = 0
    for x, y in it:
        n += x.shape[0]
    return {"images": n, "seconds": time.perf_counter() - t,
            "images_per_second": n / (time.perf_counter() - t)}


def best(cmd, repeats):
    runs = [json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            for _ in range(repeats)]
    return max(r["images_per_second"] for r in runs)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", help="the image folder (generated there when empty or missing)")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "benchmarks", "bench_data"))
    p.add_argument("--torch-once", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_once:
        print(json.dumps(torch_once(args.torch_once[0], int(args.torch_once[1]),
                                    int(args.torch_once[2]))))
        return 0
    if not os.access(args.binary, os.X_OK):
        sys.exit(f"data_loader: {args.binary} is missing: build first")
    import torch, torchvision, PIL
    root = args.dir or os.path.join(tempfile.gettempdir(), f"dptrain-bench-jpegs-{args.images}")
    if not os.path.isdir(root) or not os.listdir(root):
        subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "tests", "data", "image_oracle.py"),
                        "bench", root, str(args.images)], check=True)
    me = ["/usr/bin/python3", os.path.abspath(__file__), "--torch-once", root]
    rows = []
    for w in args.workers:
        theirs = best(me + [str(w), str(args.batch)], args.repeat)
        ours = best([args.binary, root, str(w), str(args.batch)], args.repeat)
        rows.append([str(w), f"{ours:.0f} img/s ({ours / w:.0f} per core)",
                     f"{theirs:.0f} img/s ({theirs / w:.0f} per core)", f"{ours / theirs:.2f}x"])
    header = ["workers", "dptrain Loader", "torchvision ImageFolder + DataLoader", "ours / theirs"]
    note = (f"{args.images} JPEGs of 500x375 (quality 90) in {root}, decode + RandomResizedCrop(224)"
            f" + flip + normalise, batches of {args.batch}, one epoch after 2 warm-up batches, best "
            f"of {args.repeat}; machine: {cpu_model()}, {os.cpu_count()} cores; PyTorch "
            f"{torch.__version__}, torchvision {torchvision.__version__}, Pillow {PIL.__version__}."
            f"\nCommand: `{command_line()}`")
    report(markdown_table(header, rows), note, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

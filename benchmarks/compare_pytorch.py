#!/usr/bin/python3
"""Training throughput and peak memory of dptrain against PyTorch (CPU, eager, fp32).

For each config (model, batch size, square image size; imagenet stem, 3 channels, 10 classes)
this runs two child processes one after the other with the same thread count and step count:

  OURS     build/dptrain train --data synthetic ... --max-steps K --threads T --json
  PYTORCH  this file in --torch-worker mode, under /usr/bin/python3 (Debian's python3-torch):
           torchvision.models.<model>(num_classes=10), torch.set_num_threads(T),
           SGD(lr=0.01, momentum=0.9, weight_decay=5e-4), CrossEntropyLoss, model.train(), and
           each step does zero_grad, forward, loss, backward, optimizer step on one of 4 batches
           of random input generated up front with a fixed seed (dptrain's synthetic data comes
           from a prefetching loader, so on neither side is input generation on the critical path).

Both sides report images/second over the steady state only: the first min(3, steps // 5) steps
are excluded from the timing. Peak RSS is ru_maxrss of each child, from os.wait4 (KiB on Linux);
PyTorch's includes its interpreter and libraries, as a real training process would. With
--repeat N each side runs N times (alternating) and the best img/s and the largest RSS count.

  /usr/bin/python3 benchmarks/compare_pytorch.py [--configs resnet18-bs64-32 ...] [--steps 20]
      [--threads T] [--repeat N] [--markdown PATH]
"""
import argparse, json, os, shlex, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ["resnet18-bs64-32", "resnet50-bs32-32", "resnet152-bs32-32", "resnet152-bs8-224"]
NUM_CLASSES = 10


def warmup_steps(steps):
    return min(3, steps // 5)


def torch_worker(model_name, batch, size, steps, threads):
    import torch, torchvision
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(num_classes=NUM_CLASSES)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    batches = [(torch.randn(batch, 3, size, size), torch.randint(0, NUM_CLASSES, (batch,)))
               for _ in range(4)]
    warm = warmup_steps(steps)
    start, images, loss = time.perf_counter(), 0, None
    for step in range(1, steps + 1):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if step == warm:
            start = time.perf_counter()
        elif step > warm:
            images += batch
    seconds = time.perf_counter() - start
    print(json.dumps({"images_per_second": images / seconds if seconds > 0 else 0.0,
                      "steps": steps, "seconds": seconds, "train_loss": loss.item(),
                      "torch": torch.__version__}))


def run_child(cmd, env):
    """Runs cmd; returns (parsed last stdout line as JSON, peak RSS in MiB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)  # so Popen won't reap it again
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    lines = stdout.strip().splitlines()
    try:
        if code != 0 or not lines:
            raise ValueError(f"exit status {code}")
        result = json.loads(lines[-1])
    except ValueError as e:
        tail = "\n".join((stderr + stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{shlex.join(cmd)} failed ({e}); output tail:\n{tail}") from None
    return result, usage.ru_maxrss / 1024.0


def parse_config(name):
    try:
        model, bs, size = name.split("-")
        assert model.startswith("resnet") and bs.startswith("bs")
        return model, int(bs[2:]), int(size)
    except (ValueError, AssertionError):
        sys.exit(f"compare_pytorch: bad config '{name}': expected MODEL-bsB-SIZE, e.g. resnet18-bs64-32")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def markdown_table(header, rows):
    cells = [header] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [fmt(r) for r in rows])


def command_line():
    """The command that ran this script, for the report."""
    return shlex.join([sys.executable, os.path.relpath(os.path.abspath(sys.argv[0]))] + sys.argv[1:])


def report(table, note, markdown_path):
    """Prints the table and its note; also writes them to markdown_path when given."""
    print(table + "\n\n" + note)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(table + "\n\n" + note + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="MODEL-bsB-SIZE, space or comma separated (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads (default: all cores)")
    p.add_argument("--repeat", type=int, default=1, help="runs per side; best img/s counts")
    p.add_argument("--markdown", metavar="PATH", help="also write the table as Markdown here")
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "dptrain"))
    p.add_argument("--python", default="/usr/bin/python3", help="interpreter with torch")
    p.add_argument("--torch-worker", nargs=4, metavar=("MODEL", "BATCH", "SIZE", "STEPS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 1 or args.threads < 1 or args.repeat < 1:
        sys.exit("compare_pytorch: --steps, --threads and --repeat must be at least 1")
    if args.torch_worker:
        m, b, s, k = args.torch_worker
        return torch_worker(m, int(b), int(s), int(k), args.threads)

    configs = [parse_config(c) for arg in args.configs for c in arg.split(",") if c]
    if not (os.path.isfile(args.binary) and os.access(args.binary, os.X_OK)):
        sys.exit(f"compare_pytorch: dptrain binary {args.binary} is missing: build it first")
    probe = subprocess.run([args.python, "-c", "import torch, torchvision; print(torch.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"compare_pytorch: {args.python} cannot import torch and torchvision "
                 "(apt-get install python3-torch python3-torchvision)")
    torch_version = probe.stdout.strip()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))

    header = ["config", "ours img/s", "torch img/s", "ratio (ours/torch)",
              "ours peak RSS MiB", "torch peak RSS MiB", "ratio (ours/torch)"]
    rows, failed = [], False
    for model, batch, size in configs:
        name = f"{model}-bs{batch}-{size}"
        ours_cmd = [args.binary, "train", "--data", "synthetic", "--model", model,
                    "--stem", "imagenet", "--image-size", str(size), "--channels", "3",
                    "--num-classes", str(NUM_CLASSES), "--synthetic-size", str(batch * args.steps),
                    "--batch-size", str(batch), "--max-steps", str(args.steps),
                    "--threads", str(args.threads), "--lr", "0.01", "--json"]
        torch_cmd = [args.python, os.path.abspath(__file__), "--threads", str(args.threads),
                     "--torch-worker", model, str(batch), str(size), str(args.steps)]
        best = {"ours": [0.0, 0.0], "torch": [0.0, 0.0]}  # side -> [img/s, peak RSS MiB]
        try:
            for r in range(args.repeat):
                for side, cmd in (("ours", ours_cmd), ("torch", torch_cmd)):
                    print(f"{name}: {side} run {r + 1}/{args.repeat} ...", file=sys.stderr, flush=True)
                    res, rss = run_child(cmd, env)
                    best[side][0] = max(best[side][0], res["images_per_second"])
                    best[side][1] = max(best[side][1], rss)
        except RuntimeError as e:
            print(f"compare_pytorch: {name}: {e}", file=sys.stderr)
            rows.append([name] + ["failed"] * 6)
            failed = True
            continue
        (oi, orss), (ti, trss) = best["ours"], best["torch"]
        rows.append([name, f"{oi:.1f}", f"{ti:.1f}", f"{oi / ti:.2f}" if ti else "-",
                     f"{orss:.0f}", f"{trss:.0f}", f"{orss / trss:.2f}" if trss else "-"])

    command = command_line()
    machine = (f"Machine: {cpu_model()}, {os.cpu_count()} cores; PyTorch {torch_version}; "
               f"threads: {args.threads}; steps: {args.steps} (first {warmup_steps(args.steps)} "
               f"not timed), best of {args.repeat}.\nCommand: `{command}`")
    report(markdown_table(header, rows), machine, args.markdown)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

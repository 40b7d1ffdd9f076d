#!/usr/bin/python3
"""DataParallel on CPU devices: step time at 1 and 2 devices, communication, overlap, vs PyTorch.

One model and global batch (synthetic data, imagenet stem, 3 channels, 10 classes), all runs
with the same total thread count T, one after the other:

  ours 1 device          dptrain train --devices cpu --threads T
  ours 2 dev, sync BN    --devices cpu*2 --bn sync   (T/2 threads per replica; 25 MiB buckets)
  ours 2 dev, one bucket --devices cpu*2 --bn sync --bucket-mb 0   (reduced after backward)
  ours 2 dev, local BN   --devices cpu*2 --bn local
  ours mpirun -np 2      mpirun -np 2 dptrain train --bn local   (one replica per process)
  torch 1 process        torchvision model, T threads (compare_pytorch.py's worker)
  torch DDP 2 processes  DistributedDataParallel, gloo, T/2 threads each, half the batch each
                         (local BatchNorm: torch's SyncBatchNorm runs on GPUs only)

Columns: steady-state step time (first steps excluded), the time the gradient all-reduces take
per step, the part of it backward did not hide (the wait at the end of backward), and the
slowdown against our 1-device run on the same global batch (wrapper overhead plus any loss of
efficiency from running each replica on fewer threads).

  /usr/bin/python3 benchmarks/data_parallel.py [--config resnet152-bs32-32] [--steps 12]
      [--threads T] [--repeat N] [--markdown PATH]
"""
import argparse, json, os, shutil, socket, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_pytorch import (NUM_CLASSES, ROOT, command_line, cpu_model, markdown_table,  # noqa
                             parse_config, report, run_child, torch_worker, warmup_steps)


def ddp_worker(model_name, batch, size, steps, threads, rank, world, port):
    """One rank of torch DDP on CPU (gloo); rank 0 prints the steady-state images/second."""
    import torch, torch.distributed as dist, torchvision
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        getattr(torchvision.models, model_name)(num_classes=NUM_CLASSES), bucket_cap_mb=25)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    per = (batch + world - 1) // world
    mine = min(per, batch - rank * per)
    batches = [(torch.randn(mine, 3, size, size), torch.randint(0, NUM_CLASSES, (mine,)))
               for _ in range(4)]
    warm = warmup_steps(steps)
    start, images = time.perf_counter(), 0
    for step in range(1, steps + 1):
        x, y = batches[step % len(batches)]
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if step == warm:
            dist.barrier()
            start = time.perf_counter()
        elif step > warm:
            images += batch
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({"images_per_second": images / seconds, "steps": steps}))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="resnet152-bs32-32", help="MODEL-bsB-SIZE")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest counts")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--binary", default=os.path.join(ROOT, "build", "dptrain"))
    p.add_argument("--python", default="/usr/bin/python3")
    p.add_argument("--ddp-worker", nargs=7, help=argparse.SUPPRESS)
    p.add_argument("--torch-worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ddp_worker:
        m, b, s, k, t, r, port = args.ddp_worker
        return ddp_worker(m, int(b), int(s), int(k), int(t), int(r), 2, int(port))
    if args.torch_worker:
        m, b, s, k = args.torch_worker
        return torch_worker(m, int(b), int(s), int(k), args.threads)
    if args.steps < 5 or args.threads < 2:
        sys.exit("data_parallel: needs --steps >= 5 and --threads >= 2")
    model, batch, size = parse_config(args.config)
    half = max(1, args.threads // 2)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    ours = [args.binary, "train", "--data", "synthetic", "--model", model, "--stem", "imagenet",
            "--image-size", str(size), "--channels", "3", "--num-classes", str(NUM_CLASSES),
            "--synthetic-size", str(batch * args.steps), "--batch-size", str(batch),
            "--max-steps", str(args.steps), "--lr", "0.01", "--json"]
    runs = [
        ("ours, 1 device", ours + ["--threads", str(args.threads)]),
        ("ours, 2 devices, sync BN", ours + ["--devices", "cpu*2", "--threads", str(args.threads)]),
        ("ours, 2 devices, sync BN, one bucket",
         ours + ["--devices", "cpu*2", "--bucket-mb", "0", "--threads", str(args.threads)]),
        ("ours, 2 devices, local BN",
         ours + ["--devices", "cpu*2", "--bn", "local", "--threads", str(args.threads)]),
    ]
    mpirun = shutil.which("mpirun")
    if mpirun:
        runs.append(("ours, mpirun -np 2, local BN",
                     [mpirun, "-np", "2", "--bind-to", "none"] + ours +
                     ["--bn", "local", "--threads", str(half)]))
    me = [args.python, os.path.abspath(__file__)]
    runs.append(("torch, 1 process", me + ["--threads", str(args.threads), "--torch-worker", model,
                                          str(batch), str(size), str(args.steps)]))
    header = ["run", "step ms", "img/s", "vs ours 1 device", "all-reduce ms/step",
              "exposed ms/step", "hidden"]
    rows = []
    results = {}
    ddp = "torch DDP, 2 processes, local BN"

    def keep(name, res):  # the fastest run of each counts
        old = results.get(name)
        if res is not None and (old is None or res["images_per_second"] > old["images_per_second"]):
            results[name] = res
        else:
            results.setdefault(name, None)

    for rep in range(args.repeat):  # alternate, so slow phases of the machine hit every run
        for name, cmd in runs:
            print(f"{name} (run {rep + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
            try:
                res, _ = run_child(cmd, env)
            except RuntimeError as e:
                print(f"data_parallel: {e}", file=sys.stderr)
                res = None
            keep(name, res)
        # torch DDP: two worker processes, rank 0 reports.
        print(f"{ddp} (run {rep + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
        port = str(free_port())
        procs = [subprocess.Popen(me + ["--ddp-worker", model, str(batch), str(size),
                                        str(args.steps), str(half), str(r), port],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for r in range(2)]
        outs = [pr.communicate() for pr in procs]
        if all(pr.returncode == 0 for pr in procs):
            keep(ddp, json.loads(outs[0][0].strip().splitlines()[-1]))
        else:
            print("data_parallel: torch DDP failed:\n" + outs[0][1][-2000:], file=sys.stderr)
            keep(ddp, None)

    base = (results.get("ours, 1 device") or {}).get("images_per_second")
    for name, res in results.items():
        if res is None:
            rows.append([name] + ["failed"] * 6)
            continue
        ips = res["images_per_second"]
        step_ms = 1000.0 * batch / ips
        row = [name, f"{step_ms:.0f}", f"{ips:.1f}", f"{base / ips:.2f}x time" if base else "-"]
        if "communication_seconds" in res:
            comm = 1000.0 * res["communication_seconds"] / res["steps"]
            exposed = 1000.0 * res["exposed_communication_seconds"] / res["steps"]
            hidden = 1 - exposed / comm if comm > 0 else 0
            row += [f"{comm:.1f}", f"{exposed:.1f}", f"{100 * max(hidden, 0):.0f}%"]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    torch_version = subprocess.run([args.python, "-c", "import torch; print(torch.__version__)"],
                                   capture_output=True, text=True).stdout.strip()
    command = command_line()
    note = (f"Config {args.config}; machine: {cpu_model()}, {os.cpu_count()} cores; PyTorch "
            f"{torch_version}; {args.threads} threads in total per run; {args.steps} steps (first "
            f"{warmup_steps(args.steps)} not timed; all-reduce figures average every step); "
            f"fastest of {args.repeat}.\n"
            f"Command: `{command}`")
    report(markdown_table(header, rows), note, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""One benchmark process: gets the model's weights by one method, makes them
usable, reports to the rendezvous, runs the workload when told, exits when told.

Methods (what a serving process would do):
  runtime     imports torch and holds no weights (the per-process floor)
  load_file   safetensors.torch.load_file(f, backend="pread"): a private copy
  safe_open   safetensors.safe_open(f, framework="pt") + get_tensor: a private
              (copy-on-write) mmap of the file, i.e. shared page cache
  torch_mp    --holder: loads, share_memory_(), spawns N children with
              torch.multiprocessing (spawn) and hands each the state dict
              through a torch.multiprocessing SimpleQueue
  wbroker     attaches the model from wbrokerd with the Python client (host
              memfd, zero-copy); --device cuda:0 for the GPU arena

Times are time.monotonic() (CLOCK_MONOTONIC, one clock for every process on
the host); --t-spawn is when the starting process called spawn.
"""
import argparse
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from processes import die_with_parent  # noqa: E402
from rendezvous import Link  # noqa: E402


def load_weights(args):
    """The method's way to get every tensor; returns (tensors, extras for the report, keep-alive)."""
    if args.method == "runtime":
        return {}, {}, None
    if args.method == "load_file":
        from safetensors.torch import load_file
        tensors = {}
        for f in args.files:
            tensors.update(load_file(f, backend="pread"))
        return tensors, {}, None
    if args.method == "safe_open":
        from safetensors import safe_open
        tensors, handles = {}, []
        for f in args.files:
            h = safe_open(f, framework="pt")
            handles.append(h)
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
        return tensors, {}, handles
    if args.method == "wbroker":
        sys.path.insert(0, os.path.join(REPO, "python"))
        import wbroker
        client = wbroker.connect(args.socket, name=f"compare-{args.index}")
        t0 = time.monotonic()
        lease = client.attach(args.repo, revision=args.commit,
                              device=None if args.device == "cpu" else args.device)
        attach_s = time.monotonic() - t0
        tensors = {n: lease.tensors[n] for n in lease.tensors}
        return tensors, {"attach_s": attach_s, "backend": lease.backend}, (client, lease)
    raise ValueError(f"unknown method {args.method!r}")


def serve(link, index, t_spawn, t_start, t_imported, t_loaded, tensors, extras):
    """Touches the weights, reports ready, runs the workload on "go", returns on "exit"."""
    import torch
    from workload import Workload, touch
    checksum = touch(tensors)
    t_ready = time.monotonic()
    ready = {"type": "ready", "index": index, "pid": os.getpid(), "t_spawn": t_spawn, "t_start": t_start,
             "t_imported": t_imported, "t_loaded": t_loaded, "t_ready": t_ready, "checksum": checksum,
             "tensors": len(tensors), "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    ready.update(extras)
    if any(t.is_cuda for t in tensors.values()):
        free, total = torch.cuda.mem_get_info()
        ready["gpu_used_bytes"] = total - free
    workload = Workload(tensors)
    link.send(ready)
    while True:
        msg = link.recv()
        if msg["type"] == "go":
            ops, elapsed = workload.run(msg["seconds"])
            link.send({"type": "result", "index": index, "pid": os.getpid(), "ops": ops, "seconds": elapsed})
        elif msg["type"] == "exit":
            return


def shared_child(index, queue, rendezvous, t_spawn, threads):
    """torch_mp: a child spawned by the holder; the state dict comes through `queue`."""
    t_start = time.monotonic()
    die_with_parent()
    link = Link(rendezvous)
    try:
        import torch
        torch.set_num_threads(threads)
        t_imported = time.monotonic()
        tensors = queue.get()
        t_loaded = time.monotonic()
        serve(link, index, t_spawn, t_start, t_imported, t_loaded, tensors, {})
    except BaseException:
        link.send({"type": "error", "pid": os.getpid(), "message": traceback.format_exc()})
        raise


def holder(args, link, t_start):
    """torch_mp: the parent that loads once and shares with N spawned children."""
    import torch
    import torch.multiprocessing as tmp
    from safetensors.torch import load_file
    torch.set_num_threads(args.threads)
    t_imported = time.monotonic()
    tensors = {}
    for f in args.files:
        tensors.update(load_file(f))
    for t in tensors.values():
        t.share_memory_()  # moves the storage into shared memory (one copy, in shm)
    t_loaded = time.monotonic()
    ctx = tmp.get_context("spawn")
    queue = ctx.SimpleQueue()
    children = []
    for i in range(args.n):
        t_spawn = time.monotonic()
        p = ctx.Process(target=shared_child, args=(i, queue, args.rendezvous, t_spawn, args.threads))
        p.start()
        children.append(p)
    for _ in children:
        queue.put(tensors)
    link.send({"type": "holder", "pid": os.getpid(), "t_start": t_start, "t_imported": t_imported,
               "t_loaded": t_loaded, "load_s": t_loaded - t_imported, "children": [p.pid for p in children],
               "sharing_strategy": tmp.get_sharing_strategy()})
    while True:
        msg = link.recv(timeout=0.2)
        if msg is not None and msg["type"] == "exit":
            break
        for p in children:
            if p.exitcode is not None:
                raise RuntimeError(f"torch_mp child pid {p.pid} exited early with {p.exitcode}")
    for p in children:
        p.join(60)


def main():
    t_start = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True,
                    choices=("runtime", "load_file", "safe_open", "torch_mp", "wbroker"))
    ap.add_argument("--rendezvous", required=True, help="the benchmark's socket")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--t-spawn", type=float, required=True, help="time.monotonic() at spawn")
    ap.add_argument("--files", nargs="*", default=[], help="the model's safetensors files")
    ap.add_argument("--socket", help="wbrokerd's socket (wbroker)")
    ap.add_argument("--repo", help="model repo id (wbroker)")
    ap.add_argument("--commit", help="model commit (wbroker)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (wbroker)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--holder", action="store_true", help="torch_mp: be the loading parent")
    ap.add_argument("--n", type=int, default=1, help="torch_mp holder: children to spawn")
    args = ap.parse_args()
    link = Link(args.rendezvous)
    try:
        if args.method == "torch_mp":
            if not args.holder:
                raise SystemExit("torch_mp children are spawned by the holder (--holder)")
            holder(args, link, t_start)
            return 0
        import torch
        torch.set_num_threads(args.threads)
        t_imported = time.monotonic()
        tensors, extras, keep = load_weights(args)
        t_loaded = time.monotonic()
        serve(link, args.index, args.t_spawn, t_start, t_imported, t_loaded, tensors, extras)
        del keep
        return 0
    except BaseException:
        link.send({"type": "error", "pid": os.getpid(), "message": traceback.format_exc()})
        raise


if __name__ == "__main__":
    sys.exit(main())

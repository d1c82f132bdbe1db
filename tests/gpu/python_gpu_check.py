#!/usr/bin/env python3
"""GPU check for the Python client: N torch workers attach one cuda:0 arena.

Run by scripts/gpu-check on a lent GPU (needs torch with CUDA). Starts
wbrokerd on cuda:0 with the model preloaded, then N worker processes each
attach it through `wbroker` (cuda-vmm or cuda-ipc), build every tensor as a
torch CUDA tensor without a copy, and checksum all bytes on the GPU. The
parent compares the checksums with the safetensors files and reads each
process's device memory from nvidia-smi: the broker holds the arena, every
worker only its CUDA context. Writes one JSON object (--json) and exits 0
when every worker saw the right bytes and no worker holds a copy.
"""
import argparse
import json
import os
import struct
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "python"))

WORKER = r"""
import json, sys, time, torch, wbroker
sock, model, ready, go = sys.argv[1:5]
t0 = time.perf_counter()
client = wbroker.connect(sock)
lease = client.attach(model)
tensors = dict(lease.tensors)
t1 = time.perf_counter()
total = 0
for name in sorted(tensors):
    t = tensors[name]
    assert t.is_cuda, name
    if t.numel():
        total += int(t.reshape(-1).view(torch.uint8).to(torch.int64).sum().item())
torch.cuda.synchronize()
print(json.dumps({"attach_ms": (t1 - t0) * 1e3, "checksum": total, "backend": lease.backend,
                  "device": lease.device, "tensors": len(tensors)}), flush=True)
open(ready, "w").close()
while not __import__("os").path.exists(go):
    time.sleep(0.05)
"""


def host_checksum(snapshot):
    import torch
    total = 0
    for f in sorted(os.listdir(snapshot)):
        if not f.endswith(".safetensors"):
            continue
        with open(os.path.join(snapshot, f), "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            fh.read(n)
            while chunk := fh.read(64 << 20):
                # Bytes summed as unsigned, as the GPU side does.
                total += int(torch.frombuffer(bytearray(chunk), dtype=torch.uint8).sum(dtype=torch.int64))
    return total


def smi_used():
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30).stdout
    used = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            used[int(parts[0])] = int(parts[1]) * 2**20
    return used


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--wbrokerd", required=True)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--scratch", required=True)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    result = {"section": "python_gpu", "workers": args.workers, "ok": False}
    sock = os.path.join(args.scratch, "pygpu.sock")
    broker = subprocess.Popen([args.wbrokerd, "--socket", sock, "--cache-dir", args.cache, "--device", "cuda:0",
                               "--preload", args.model, "--log-level", "warn"])
    procs = []
    try:
        import wbroker
        for _ in range(600):
            try:
                c = wbroker.connect(sock)
                break
            except wbroker.BrokerUnavailable:
                time.sleep(0.1)
        lease = c.attach(args.model)  # waits for the preload
        snapshot, arena = str(lease.snapshot), lease.arena_size
        result.update(model=args.model, arena_bytes=arena, backend=lease.backend)
        lease.release()
        c.close()
        want = host_checksum(snapshot)
        for i in range(args.workers):
            ready, go = os.path.join(args.scratch, f"ready{i}"), os.path.join(args.scratch, "go")
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, sock, args.model, ready, go],
                                          stdout=subprocess.PIPE, text=True,
                                          env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "python"))))
        deadline = time.time() + 240
        while not all(os.path.exists(os.path.join(args.scratch, f"ready{i}")) for i in range(args.workers)):
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError("a worker failed or timed out")
            time.sleep(0.1)
        used = smi_used()
        result["broker_used_bytes"] = used.get(broker.pid)
        result["worker_used_bytes"] = [used.get(p.pid) for p in procs]
        open(os.path.join(args.scratch, "go"), "w").close()
        reports = [json.loads(p.communicate(timeout=60)[0].strip().splitlines()[-1]) for p in procs]
        result["attach_ms"] = [r["attach_ms"] for r in reports]
        result["checksums_ok"] = all(r["checksum"] == want for r in reports)
        # A worker holding a copy would use at least the arena on top of its context.
        wu = [u for u in result["worker_used_bytes"] if u is not None]
        result["one_copy"] = bool(wu) and all(u < 0.5 * arena + (1 << 30) for u in wu) if arena > (2 << 30) \
            else None
        result["ok"] = result["checksums_ok"] and result["one_copy"] is not False
    except Exception as e:  # reported in the JSON; the summary prints it
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        broker.terminate()
        broker.wait(30)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

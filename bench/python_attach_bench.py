#!/usr/bin/env python3
"""Python attach latency: wbroker.connect + attach of a 300-tensor model.

Starts wbrokerd on a generated HF cache, preloads the model, then times
(in one process, after one warm-up):
  attach         client.attach() on an open connection (reply, fd, mmap, manifest)
  attach+views   the same plus building all 300 torch tensors
  connect+attach a new connection (hello) plus attach
Prints a table and writes JSON (default bench/out/python_attach.json).

  bench/python_attach_bench.py [--build build] [--tensors 300] [--size 64MiB] [--runs 200]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "python"))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(REPO, "build"))
    ap.add_argument("--tensors", type=int, default=300)
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "out", "python_attach.json"))
    args = ap.parse_args()

    import torch  # noqa: F401  (imported before timing, as a worker would have)
    import wbroker

    with tempfile.TemporaryDirectory() as tmp:
        cache, sock = os.path.join(tmp, "hub"), os.path.join(tmp, "wb.sock")
        subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_hf_cache.py"), "--cache", cache,
                        "--model", "bench/attach", "--size", args.size, "--tensors", str(args.tensors)],
                       check=True, stdout=subprocess.DEVNULL)
        broker = subprocess.Popen([os.path.join(args.build, "broker", "wbrokerd"), "--socket", sock,
                                   "--cache-dir", cache, "--device", "cpu", "--preload", "bench/attach",
                                   "--log-level", "warn"])
        try:
            for _ in range(600):
                try:
                    wbroker.connect(sock).close()
                    break
                except wbroker.BrokerUnavailable:
                    time.sleep(0.05)
            client = wbroker.connect(sock)
            client.attach("bench/attach").release()  # warm-up (and wait for the preload)
            results = {"attach": [], "attach+views": [], "connect+attach": []}
            for _ in range(args.runs):
                t0 = time.perf_counter()
                lease = client.attach("bench/attach")
                t1 = time.perf_counter()
                results["attach"].append(t1 - t0)
                lease.release()
                t0 = time.perf_counter()
                lease = client.attach("bench/attach")
                views = [lease.tensors[n] for n in lease.tensors]
                t1 = time.perf_counter()
                results["attach+views"].append(t1 - t0)
                assert len(views) == args.tensors
                lease.release()
                t0 = time.perf_counter()
                c2 = wbroker.connect(sock)
                lease = c2.attach("bench/attach")
                t1 = time.perf_counter()
                results["connect+attach"].append(t1 - t0)
                c2.close()
            client.close()
        finally:
            broker.terminate()
            broker.wait()
    summary = {k: {"median_ms": statistics.median(v) * 1e3, "p90_ms": pct(v, 0.9) * 1e3,
                   "max_ms": max(v) * 1e3} for k, v in results.items()}
    out = {"tensors": args.tensors, "size": args.size, "runs": args.runs, "python": sys.version.split()[0],
           "results": summary}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"{'case':<16}{'median ms':>10}{'p90 ms':>10}{'max ms':>10}")
    for k, v in summary.items():
        print(f"{k:<16}{v['median_ms']:>10.2f}{v['p90_ms']:>10.2f}{v['max_ms']:>10.2f}")


if __name__ == "__main__":
    main()

"""The broker's control plane: the first attach that loads the model, and
attach/release round trips per second with 1, 64, 1000 concurrent clients.

The clients are attach_load.py processes (a few, each with many
connections), so the figure is what one wbrokerd answers while the load
generators share the same CPUs.
"""
import os
import statistics
import sys
import time
from pathlib import Path

from broker import Broker
from processes import ProcessSet
from rendezvous import Rendezvous

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "python"))

import wbroker  # noqa: E402


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def generator_count(clients):
    """Processes that hold `clients` connections: one for one client, else a
    few (half the cores, at least 2, at most 8)."""
    if clients <= 1:
        return 1
    return min(clients, max(2, min(8, (os.cpu_count() or 2) // 2)))


def first_attach(broker, model):
    """Attach with load_on_attach on a broker that has not loaded the model,
    then one more attach: (first, second) in seconds. No tensor is touched."""
    with wbroker.connect(broker.socket, name="bench-compare-first") as c:
        t0 = time.monotonic()
        lease = c.attach(model["repo"], revision=model["commit"])
        first = time.monotonic() - t0
        lease.release()
        t0 = time.monotonic()
        c.attach(model["repo"], revision=model["commit"]).release()
        return first, time.monotonic() - t0


def round_trips(python, broker, model, clients, seconds, tmp, timeout):
    """attach/release round trips/s of `clients` connections for `seconds`."""
    gens = generator_count(clients)
    split = [clients // gens + (1 if i < clients % gens else 0) for i in range(gens)]
    logs = Path(tmp) / f"cp-{clients}"
    logs.mkdir()
    procs = ProcessSet(logs)
    rv = Rendezvous(logs / "rv.sock")
    try:
        for i, k in enumerate(split):
            procs.start(f"attach_load-{i}", [python, str(HERE / "attach_load.py"), "--socket", broker.socket,
                                             "--repo", model["repo"], "--commit", model["commit"],
                                             "--clients", str(k), "--rendezvous", rv.path])
        rv.gather("ready", gens, timeout, procs.check_alive)
        rv.broadcast({"type": "go", "seconds": seconds})
        results = rv.gather("result", gens, seconds + timeout, procs.check_alive)
        rv.broadcast({"type": "exit"})
        procs.wait_all(30)
    finally:
        procs.kill_all()
        rv.close()
    pairs = sum(r["pairs"] for r in results)
    lat = [x for r in results for x in r["latency_ms"]]
    return {"clients": clients, "processes": gens, "seconds": seconds, "round_trips": pairs,
            "round_trips_per_s": pairs / seconds, "median_ms": statistics.median(lat) if lat else None,
            "p99_ms": percentile(lat, 0.99), "samples": len(lat)}


def measure(python, wbrokerd, model, levels, seconds, tmp, timeout, log):
    """First attach (load on attach) and the round-trip rates; one broker for all."""
    logs = Path(tmp) / "cp-broker"
    logs.mkdir()
    procs = ProcessSet(logs)
    broker = Broker(procs, wbrokerd, Path(tmp) / "cp.sock", model["cache"])
    out = {"levels": []}
    try:
        broker.start()
        first, second = first_attach(broker, model)
        out["first_attach_s"], out["second_attach_s"] = first, second
        log(f"control plane: first attach (loads the model) {first:.2f} s, next attach {second * 1e3:.1f} ms")
        for clients in levels:
            r = round_trips(python, broker, model, clients, seconds, tmp, timeout)
            procs.check_alive()
            out["levels"].append(r)
            log(f"control plane: {clients:>5} clients ({r['processes']} processes): "
                f"{r['round_trips_per_s']:,.0f} attach+release/s, median {r['median_ms']:.2f} ms, "
                f"p99 {r['p99_ms']:.2f} ms")
    finally:
        broker.stop()
        procs.kill_all()
    return out

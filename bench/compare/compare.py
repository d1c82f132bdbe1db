#!/usr/bin/env python3
"""wbroker against the usual ways to give N processes the same weights, side by side.

For N = 1, 2, 4, 8, 16 processes on one generated model (a random Qwen2,
1.12 GiB of fp32 weights, in a generated HF cache; --quick: 64 MiB, N = 1,
2, 4), each method in turn:

  runtime    python + torch only, no weights (the per-process floor)
  load_file  A: safetensors.torch.load_file(backend="pread"), a private copy each
  safe_open  B: safetensors.safe_open(framework="pt"), mmap: shared page cache
  torch_mp   C: one parent loads, share_memory_(), spawned children get the
             tensors through a torch.multiprocessing queue
  wbroker    a real wbrokerd (model loaded once, timed), each process attaches
             with the Python client and gets zero-copy tensors
  wbroker_gpu  the same on cuda:0, only where torch.cuda.is_available()

and measures: total PSS of every process of the configuration (broker and
parent included) once all N hold their weights; time from spawn to weights
usable (every page touched, checksum); per-process ops/s of the same matmul
workload while all N run. Then the broker's control plane: the first attach
(load on attach) and attach/release round trips/s with 1, 64 and 1000 clients.

Writes OUT/result.json and the plots; unless --no-doc, the plots go to
docs/img/compare-*.png and the tables to docs/benchmarks.md between
<!-- compare:begin --> and <!-- compare:end -->. --render RESULT_JSON redraws
those from an earlier run's result.json without measuring. Exit status 1 if a
configuration failed (skipped ones, for lack of memory, are not failures).

  bench/compare/run.sh [--quick] [--build build-cmp] [--no-doc] [--doc FILE] [--out DIR]
"""
import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import control_plane  # noqa: E402
import machine  # noqa: E402
import report  # noqa: E402
from memory import meminfo, pids_in_groups, total_pss  # noqa: E402
from methods import GiB, Run, all_methods  # noqa: E402
from model import ensure_model  # noqa: E402
from processes import ProcessSet  # noqa: E402
from rendezvous import Rendezvous  # noqa: E402

DEFAULT_RUNTIME_BYTES = 400 << 20  # a torch process without weights, until measured


def log(msg):
    print(msg, flush=True)


def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "max": max(xs), "min": min(xs)}


def warm_page_cache(files):
    """Reads every model file once so that every method starts from a warm
    page cache (caches are never dropped: the machine is shared)."""
    t0 = time.monotonic()
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(16 << 20):
                pass
    return time.monotonic() - t0


def probe_gpu(python):
    """(available, reason) from torch.cuda in a child process; also pulls
    torch's libraries into the page cache before anything is timed."""
    r = subprocess.run([python, "-c", "import torch, safetensors; print(int(torch.cuda.is_available()), "
                        "torch.cuda.device_count())"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"python with torch does not start: {r.stderr[-2000:]}")
    available, count = r.stdout.split()
    if available == "1":
        return True, f"{count} CUDA device(s)"
    return False, "no GPU on this machine (torch.cuda.is_available() is False)"


def run_config(method, n, args, model, tmp, runtime_bytes):
    """One method with N processes; returns its row for result.json."""
    row = {"method": method.key, "label": method.label, "n": n, "loadavg": os.getloadavg()}
    need = method.memory_need(n, model["bytes"], runtime_bytes)
    avail = meminfo()["MemAvailable"]
    row["mem_available"] = avail
    margin = max(2 * GiB, int(0.1 * meminfo()["MemTotal"]))
    if need * 1.1 + margin > avail:
        row["status"] = "skipped"
        row["reason"] = (f"skipped: needs {need / GiB:.1f} GiB (+{margin / GiB:.1f} GiB margin), "
                         f"{avail / GiB:.1f} available")
        return row
    d = Path(tmp) / f"{method.key}-{n}"
    d.mkdir()
    procs = ProcessSet(d)
    rv = Rendezvous(d / "rv.sock")
    run = Run(sys.executable, args.wbrokerd, model, d, args.threads, rv, procs)
    try:
        row["one_time"] = method.start(run, n)
        readies = rv.gather("ready", n, args.timeout, procs.check_alive)
        holder = rv.gather("holder", 1, args.timeout, procs.check_alive)[0] if method.holder else None
        pids = pids_in_groups(procs.pgids())
        mem = total_pss(pids)
        rv.broadcast({"type": "go", "seconds": args.seconds})
        results = rv.gather("result", n, args.seconds + args.timeout, procs.check_alive)
        rv.broadcast({"type": "exit"})
        method.stop()
        late = procs.wait_all(60)
        if late:
            raise RuntimeError(f"processes did not exit when told: {', '.join(late)}")
    except Exception as e:  # one failed configuration must not stop the others
        row["status"] = "failed"
        row["reason"] = f"{type(e).__name__}: {e}"[:4000]
        return row
    finally:
        method.stop()
        procs.kill_all()
        rv.close()
    if holder:
        row["one_time"].update(holder_load_s=holder["load_s"], holder_start_s=holder["t_imported"] - holder["t_start"],
                               sharing_strategy=holder["sharing_strategy"])
    special = {row["one_time"].get("broker_pid"), holder["pid"] if holder else None} - {None}
    row["status"] = "ok"
    row["memory"] = {k: v for k, v in mem.items() if k != "per_pid"}
    row["memory"]["server_pss"] = sum(v for p, v in mem["per_pid"].items() if p in special)
    row["ready_s"] = stats([r["t_ready"] - r["t_spawn"] for r in readies])
    row["start_s"] = stats([r["t_imported"] - r["t_spawn"] for r in readies])
    row["load_s"] = stats([r["t_ready"] - r["t_imported"] for r in readies])
    if any("attach_s" in r for r in readies):
        row["attach_ms"] = stats([r["attach_s"] * 1e3 for r in readies if "attach_s" in r])
    gpu = [r["gpu_used_bytes"] for r in readies if "gpu_used_bytes" in r]
    if gpu:
        row["gpu_used_bytes"] = max(gpu)
    row["tensors"] = readies[0]["tensors"]
    row["weight_bytes"] = readies[0]["bytes"]
    row["checksums"] = sorted({r["checksum"] for r in readies})
    if row["tensors"]:
        rates = [r["ops"] / r["seconds"] for r in results]
        row["ops_per_s"] = dict(stats(rates), sum=sum(rates))
    return row


def describe_row(row):
    if row["status"] == "skipped":
        return row["reason"]
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason'][:300]}"
    s = (f"PSS {row['memory']['pss'] / GiB:.2f} GiB, ready median {row['ready_s']['median']:.2f} s "
         f"max {row['ready_s']['max']:.2f} s (after imports {row['load_s']['median']:.2f} s)")
    if "ops_per_s" in row:
        s += f", {row['ops_per_s']['median']:.2f} ops/s per process"
    if row.get("one_time", {}).get("broker_load_s") is not None:
        s += f", broker load {row['one_time']['broker_load_s']:.2f} s"
    if row.get("one_time", {}).get("holder_load_s") is not None:
        s += f", parent load+share {row['one_time']['holder_load_s']:.2f} s"
    return s


def render(result, out_dir, no_doc, doc):
    """The plots (into OUT, or img/ next to the doc) and, unless no_doc, the doc section."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = report.plots(result, out_dir if no_doc else doc.parent / "img")
    if not no_doc:
        report.update_doc(result, doc, images)
    log(f"compare: plots {', '.join(str(p) for p in images)}" + ("" if no_doc else f"; {doc} updated"))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="64 MiB model, N = 1,2,4, short windows; never writes docs/ (implies --no-doc)")
    ap.add_argument("--build", default=os.environ.get("WBROKER_BINARY_DIR", str(REPO / "build")),
                    help="build dir with broker/wbrokerd (default $WBROKER_BINARY_DIR, else build)")
    ap.add_argument("--cache", default=str(REPO / "bench" / "out" / "compare-hub"),
                    help="HF hub cache for the generated model (kept and reused)")
    ap.add_argument("--out", help="result.json and plots (default bench/out/compare, quick: compare-quick)")
    ap.add_argument("--no-doc", action="store_true", help="leave docs/ alone (plots go to --out)")
    ap.add_argument("--doc", help="the document whose compare section is replaced (default "
                    "docs/benchmarks.md; plots go to img/ next to it); with --quick, only a doc "
                    "named here is written (bench/run-all --quick passes a temp copy)")
    ap.add_argument("--ns", help="comma-separated process counts (default 1,2,4,8,16; quick 1,2,4)")
    ap.add_argument("--methods", help="comma-separated subset of " +
                    ",".join(m.key for m in all_methods()))
    ap.add_argument("--seconds", type=float, help="workload window per configuration (default 10; quick 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    ap.add_argument("--cp-clients", default="1,64,1000", help="control-plane client counts")
    ap.add_argument("--cp-seconds", type=float, help="window per control-plane level (default 5; quick 1)")
    ap.add_argument("--timeout", type=float, help="seconds a configuration may take to get ready "
                    "(default 900; quick 180)")
    ap.add_argument("--render", metavar="RESULT_JSON",
                    help="measure nothing: redraw the plots and the doc section from a result.json")
    args = ap.parse_args()
    args.out = args.out or str(REPO / "bench" / "out" / ("compare-quick" if args.quick else "compare"))
    # Quick numbers never replace the documented ones unless a doc is named.
    args.no_doc = args.no_doc or (args.quick and not args.doc)
    args.doc = Path(args.doc or REPO / "docs" / "benchmarks.md")
    if args.render:
        return render(json.loads(Path(args.render).read_text()), Path(args.out), args.no_doc, args.doc)
    t_begin = time.monotonic()
    spec = "quick" if args.quick else "full"
    ns = [int(x) for x in (args.ns or ("1,2,4" if args.quick else "1,2,4,8,16")).split(",")]
    args.seconds = args.seconds or (1.0 if args.quick else 10.0)
    args.cp_seconds = args.cp_seconds or (1.0 if args.quick else 5.0)
    args.timeout = args.timeout or (180.0 if args.quick else 900.0)
    cp_levels = [int(x) for x in args.cp_clients.split(",") if x]
    args.wbrokerd = Path(args.build).resolve() / "broker" / "wbrokerd"
    if not args.wbrokerd.exists():
        sys.exit(f"compare: {args.wbrokerd} is not built "
                 f"(cmake --build {args.build} --target wbrokerd wbrokerctl)")
    methods = all_methods()
    if args.methods:
        keys = args.methods.split(",")
        unknown = set(keys) - {m.key for m in methods}
        if unknown:
            sys.exit(f"compare: unknown method(s) {', '.join(sorted(unknown))}")
        methods = [m for m in methods if m.key in keys]

    # 1000 control-plane connections, and the broker's end of them, need fds;
    # children inherit the raised soft limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # SIGTERM unwinds like Ctrl-C, so every finally below runs (children, broker, temp dir).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="wbroker-compare-")
    result = {"version": 1, "quick": args.quick, "machine": machine.describe(),
              "command": shlex.join(["bench/compare/run.sh", *sys.argv[1:]]), "out": str(out_dir),
              "settings": {"ns": ns, "methods": [m.key for m in methods], "seconds": args.seconds,
                           "threads": args.threads, "cp_clients": cp_levels, "cp_seconds": args.cp_seconds},
              "loadavg_start": os.getloadavg(), "runs": []}
    failed = False
    try:
        log(f"compare: model ({spec}) in {args.cache} ...")
        model = ensure_model(sys.executable, args.cache, spec)
        model["cache"] = str(Path(args.cache).resolve())
        result["model"] = {k: v for k, v in model.items() if k != "files"}
        result["model"]["files"] = [Path(f).name for f in model["files"]]
        log(f"compare: {model['repo']}@{model['commit'][:8]}: {model['tensors']} tensors, "
            f"{model['bytes'] / GiB:.3f} GiB in {len(model['files'])} file(s)")
        result["page_cache_warm_s"] = warm_page_cache(model["files"])
        gpu, gpu_reason = probe_gpu(sys.executable)
        result["gpu"] = {"available": gpu, "reason": gpu_reason}
        log(f"compare: page cache warmed in {result['page_cache_warm_s']:.1f} s; GPU: {gpu_reason}")
        if not gpu and any(m.key == "wbroker_gpu" for m in methods):
            methods = [m for m in methods if m.key != "wbroker_gpu"]
            result["runs"].append({"method": "wbroker_gpu", "label": "wbroker GPU (cuda:0)", "n": None,
                                   "status": "no_gpu", "reason": gpu_reason})
        runtime_bytes = DEFAULT_RUNTIME_BYTES
        for n in ns:
            for method in methods:
                row = run_config(method, n, args, model, tmp, runtime_bytes)
                result["runs"].append(row)
                failed |= row["status"] == "failed"
                log(f"N={n:<2} {method.key:<11} {describe_row(row)}")
                if method.key == "runtime" and row["status"] == "ok":
                    runtime_bytes = max(200 << 20, row["memory"]["pss"] // n)
        if cp_levels:
            try:
                result["control_plane"] = control_plane.measure(sys.executable, args.wbrokerd, model, cp_levels,
                                                                args.cp_seconds, tmp, args.timeout, log)
            except Exception as e:
                failed = True
                result["control_plane"] = {"error": f"{type(e).__name__}: {e}"[:4000]}
                log(f"control plane failed: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sums = {tuple(r["checksums"]) for r in result["runs"] if r.get("status") == "ok" and r.get("tensors")}
    result["checksums_agree"] = len(sums) <= 1 and all(len(s) == 1 for s in sums)
    result["loadavg_end"] = os.getloadavg()
    result["total_seconds"] = time.monotonic() - t_begin
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    log(f"compare: wrote {out_dir / 'result.json'}")
    render(result, out_dir, args.no_doc, args.doc)
    if not result["checksums_agree"]:
        log("compare: checksums differ between methods")
        failed = True
    log(f"compare: total run time {result['total_seconds']:.0f} s"
        f"{'; some configurations FAILED (see result.json)' if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The generated sections of docs/benchmarks.md: markdown from the benchmarks'
JSON, and splicing a section into the doc between its markers.

Each section lives between `<!-- NAME:begin -->` and `<!-- NAME:end -->`;
everything outside the markers is hand-written prose and is never touched.
bench/run-all drives this; by hand:

  bench/doc_sections.py render NAME [--stamp TEXT] [--input FILE...] > section.md
  bench/doc_sections.py splice DOC NAME section.md
  bench/doc_sections.py names DOC          (the sections a doc has, in order)

Sections rendered here: machine, load, python-attach, python-memory, worker,
worker-memory, gpu (bench/compare writes its own `compare` section).
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH / "compare"))
import machine as machine_info  # noqa: E402  (bench/compare/machine.py)

GiB = 1 << 30
MiB = 1 << 20


def markers(name):
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def wrap(name, lines):
    begin, end = markers(name)
    return "\n".join([begin, *lines, end]) + "\n"


def splice(doc_text, name, section):
    """`doc_text` with the section `name` replaced by `section` (markers included).
    Raises KeyError when the doc lacks the markers, ValueError when `section`
    does not carry them."""
    begin, end = markers(name)
    if not (section.startswith(begin) and section.rstrip("\n").endswith(end)):
        raise ValueError(f"the new {name} section does not start with {begin} and end with {end}")
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end) + r"\n?", re.S)
    if not pattern.search(doc_text):
        raise KeyError(f"no {begin} ... {end} in the document")
    return pattern.sub(lambda _: section if section.endswith("\n") else section + "\n", doc_text, count=1)


def section_names(doc_text):
    return re.findall(r"<!-- ([a-z0-9-]+):begin -->", doc_text)


def fmt_ms(x):
    return f"{x:.2f} ms"


def verdict(met):
    return "**met**" if met else "**not met**"


# --- machine ---

def gpu_description():
    """"NAME, MEM" per GPU from nvidia-smi, or None when there is no usable GPU."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return gpus if out.returncode == 0 and gpus else None


def render_machine(args):
    mc = machine_info.describe()
    load_start = float(args.load_start) if args.load_start else None
    load_end = os.getloadavg()[0]
    # The end figure includes the benchmark's own processes (bench/compare
    # runs up to 16 at once): only the start says whether others were busy.
    busy = (load_start if load_start is not None else load_end) > (mc["cores"] or 1)
    gpus = gpu_description()
    command = "bench/run-all" + (" --quick" if args.mode == "quick" else "")
    if args.only:
        intro = (f"The last run, `{command} --only {args.only}`, rewrote only these sections: "
                 + ", ".join(args.only.split(",")) + ". Every other section between generated markers "
                 "was written by an earlier `bench/run-all` and keeps the date and commit in its own "
                 "*Measured* line; the prose around them is hand-written.")
    else:
        intro = (f"Every section between generated markers below was written by `{command}` "
                 "(see the top of `bench/run-all`); the prose around them is hand-written.")
    lines = ["## The run these numbers come from", "", intro, "",
             f"- Date {args.stamp}, total run time {float(args.seconds) / 60:.1f} min"
             + (" - **a quick run (small models, few repeats): a smoke test, not the documented "
                "figures**." if args.mode == "quick" else "."),
             f"- Machine: {mc['cpu']}, {mc['cores']} cores, {mc['ram_bytes'] / GiB:.1f} GiB RAM, "
             f"Linux {mc['kernel']} ({mc['os']}); shmem THP `{mc['shmem_thp']}`.",
             f"- Software: Python {mc['python']}, torch {mc['torch']}, transformers {mc['transformers']}, "
             f"safetensors {mc['safetensors']}.",
             "- GPU: " + ("; ".join(gpus) if gpus else "none (no `nvidia-smi` device): the GPU sections "
                          "say *not measured on this machine*."),
             f"- Load average (1 min) at start {load_start:.2f}, at end {load_end:.2f} (the end "
             "includes the benchmark's own processes)"
             if load_start is not None else f"- Load average (1 min) at end {load_end:.2f}"]
    lines[-1] += (" - **the machine was busy with other work: treat times and rates as rough**."
                  if busy else ".")
    return wrap("machine", lines)


# --- load: bench/run_load_bench.sh (wbroker-bench-load) ---

def render_load(args):
    r = json.loads(Path(args.inputs[0]).read_text())
    configs = r["configs"]
    lines = [f"Measured {args.stamp}. Model: {r['tensors']} tensors, {r['file_bytes'] / GiB:.2f} GiB "
             f"fp16 in the page cache; each figure is the median of {r['repeats']} run(s).", ""]
    if len(configs) > 1 or r.get("shmem_enabled_at_start") != configs[0]["shmem_enabled"]:
        lines += [f"The kernel's shmem huge page setting was `{r.get('shmem_enabled_at_start') or 'absent'}`; "
                  "the benchmark set `shmem_enabled` to each value below before each load "
                  f"(`bench/run-all --shmem-enabled {','.join(c['shmem_enabled'] for c in configs)}`, "
                  "as root) and put it back at the end.", ""]
    lines += [f"| what ({r['file_bytes'] / GiB:.2f} GiB, page cache warm) | threads | seconds | GB/s |",
              "| --- | --- | --- | --- |"]
    best = max(((row, load) for row in r["load"] for load in row["loads"]),
               key=lambda rl: rl[1]["load_gbps"])[1]
    for row in r["load"]:
        t = row["threads"]
        read_what = ("page-cache read, `pread` 1 MiB at a time into one reused buffer"
                     if "memory_copy_gbps" in row else "page-cache read, `pread` into one reused 16 MiB buffer")
        lines += [f"| {read_what} | {t} | "
                  f"{row['page_cache_read_s']:.3f} | {row['page_cache_read_gbps']:.2f} |",
                  f"| read into fresh anonymous memory (what each process does when it loads its own "
                  f"copy) | {t} | {row['fresh_memory_read_s']:.3f} | {row['fresh_memory_read_gbps']:.2f} |"]
        if "memory_write_gbps" in row:
            lines.append(f"| `memset` of as many bytes into memory already mapped (the rate at which this "
                         f"machine writes memory at all) | {t} | {row['memory_write_s']:.3f} | "
                         f"{row['memory_write_gbps']:.2f} |")
        if "memory_copy_gbps" in row:
            lines.append(f"| `memcpy` between two buffers already mapped (the rate at which this machine "
                         f"copies memory at all) | {t} | {row['memory_copy_s']:.3f} | "
                         f"{row['memory_copy_gbps']:.2f} |")
        for load in row["loads"]:
            star = load is best
            what = f"broker load: {configs[load['config']]['fill']}, sealed memfd"
            lines.append(f"| {'**' + what + '**' if star else what} | {t} | {load['load_s']:.3f} | "
                         + (f"**{load['load_gbps']:.2f}**" if star else f"{load['load_gbps']:.2f}") + " |")
    lines.append("")
    lines += ["Before each load above the benchmark touches and frees as much anonymous memory as the "
              "arena needs (untimed), so that the load gets memory the hypervisor already backs."]
    cold = [c for c in configs if "cold_load_gbps" in c]
    if cold:
        lines[-1] += (f" Cold loads, into memory left untouched for 4 s after the previous arena was freed "
                      f"(median of {r['cold_repeats']}, at each setting's best thread count): "
                      + "; ".join(f"{c['fill']}: {c['cold_load_gbps']:.2f} GB/s "
                                  f"({c['best_load_threads']} thread{'s' if c['best_load_threads'] != 1 else ''})" for c in cold) + ".")
        if r.get("free_page_reporting"):
            lines[-1] += (" This VM gives freed memory back to its hypervisor (virtio-balloon free page "
                          "reporting, in blocks of 2 MiB and more), so a cold load pays a host fault on its "
                          "first touch of each page. Where freed memory stays with the kernel (bare metal, VMs "
                          "without free page reporting) there is nothing to fault in again, and a cold load "
                          "should run like a warm one.")
    lines.append("")
    a = r.get("attach")
    if a:
        lines += [f"Attach latency, {a['tensors']}-tensor model, `Client::Attach` then `Lease::Release` "
                  f"against a real `wbrokerd` over its Unix socket, {a['round_trips']} round trips after 20 "
                  f"of warm-up: **median {fmt_ms(a['attach_ms_median'])}, p99 {fmt_ms(a['attach_ms_p99'])}**; "
                  f"release median {fmt_ms(a['release_ms_median'])}.", ""]
        if "attach_by_commit_ms_median" in a:
            lines[-2] += (" Those attaches name no revision, so the broker reads `refs/main` on a resolver "
                          "thread each time; attaches that name the loaded full commit skip the cache: median "
                          f"{fmt_ms(a['attach_by_commit_ms_median'])}, p99 {fmt_ms(a['attach_by_commit_ms_p99'])}.")
    lines += ["Against the issue's aims:", ""]
    if a:
        lines.append(f"- Attach < 1 ms: {verdict(a['attach_ms_median'] < 1)} "
                     f"(median {fmt_ms(a['attach_ms_median'])}).")
    lines.append(f"- Load >= 80% of the page-cache read rate (best page-cache read "
                 f"{r['best_page_cache_read_gbps']:.2f} GB/s; reading into fresh memory, what every process "
                 f"pays for its own copy, {r['best_fresh_memory_read_gbps']:.2f} GB/s):")
    if "best_memory_write_gbps" in r:
        lines[-1] = lines[-1][:-2] + (f"; writing memory that is already mapped, with nothing to read, "
                                      f"{r['best_memory_write_gbps']:.2f} GB/s, which no load can beat "
                                      f"since a load writes every byte once):")
    if "best_memory_copy_gbps" in r:
        copy = r["best_memory_copy_gbps"]
        lines.append(f"  - copy ceiling: `memcpy` between mapped buffers runs at {copy:.2f} GB/s, "
                     f"{100 * copy / r['best_page_cache_read_gbps']:.0f}% of the page-cache read rate. A load "
                     "copies every byte from the page cache into the arena, so whatever the method, its ratio "
                     "cannot rise much above this one on this machine.")
    for c in configs:
        vs_copy = (f"{100 * c['load_vs_copy']:.0f}% of `memcpy`; " if "load_vs_copy" in c else "")
        lines.append(f"  - {c['fill']}: {verdict(c['load_vs_read'] >= 0.8)}, {100 * c['load_vs_read']:.0f}% "
                     f"(best load {c['best_load_gbps']:.2f} GB/s; {vs_copy}{100 * c['load_vs_fresh_read']:.0f}% of "
                     f"reading into fresh memory).")
    return wrap("load", lines)


# --- python-attach: bench/python_attach_bench.py ---

def render_python_attach(args):
    r = json.loads(Path(args.inputs[0]).read_text())
    res = r["results"]
    lines = [f"Measured {args.stamp} (Python {r['python']}): {r['runs']} rounds after a warm-up; a "
             f"{r['tensors']}-tensor, {r['size']} model preloaded in `wbrokerd`.", "",
             "| what | median | p90 |", "| --- | --- | --- |",
             f"| `client.attach()` on an open connection (reply, fd, `mmap`, manifest checks) | "
             f"{fmt_ms(res['attach']['median_ms'])} | {fmt_ms(res['attach']['p90_ms'])} |",
             f"| attach + all {r['tensors']} `torch.Tensor` views built | "
             f"{fmt_ms(res['attach+views']['median_ms'])} | {fmt_ms(res['attach+views']['p90_ms'])} |",
             f"| new connection (hello) + attach | {fmt_ms(res['connect+attach']['median_ms'])} | "
             f"{fmt_ms(res['connect+attach']['p90_ms'])} |", "",
             f"Aim: attaching a {r['tensors']}-tensor model from Python < 20 ms: "
             f"{verdict(res['attach+views']['median_ms'] < 20)} "
             f"({fmt_ms(res['attach+views']['median_ms'])} with every tensor built)."]
    return wrap("python-attach", lines)


# --- worker: bench/worker_bench.py and wbroker-bench-runtime ---

def render_worker(args):
    w = json.loads(Path(args.inputs[0]).read_text())
    rt = json.loads(Path(args.inputs[1]).read_text()) if len(args.inputs) > 1 else None
    su, g = w["startup"], w["generation"]
    size = {k: m["weights_bytes"] for k, m in w["models"].items()}

    def ms(model, mode):
        return f"{su[model][mode]['median_s'] * 1000:,.0f} ms"

    lines = [f"Measured {args.stamp}; {w['cpus']} CPUs, load average {w['loadavg_before'][0]:.2f} before "
             f"and {w['loadavg_after'][0]:.2f} after.", "",
             f"**Start-up** (`bench/worker_bench.py`): exec of `wbroker-worker` to the first "
             f"`GET /readyz` = 200, median of {w.get('runs', '?')} interleaved starts after one untimed "
             "start of each (page cache and arena warm); `--from-disk` reads a private copy:", "",
             "| exec -> /readyz 200 | attached | `--from-disk` |", "| --- | --- | --- |",
             f"| tiny ({size['tiny'] / MiB:,.1f} MiB) | {ms('tiny', 'attached')} | {ms('tiny', 'from-disk')} |",
             f"| big ({size['big'] / MiB:,.0f} MiB) | {ms('big', 'attached')} | {ms('big', 'from-disk')} |",
             f"| big / tiny | **{su['attached_big_over_tiny']:.2f}x** | {su['from_disk_big_over_tiny']:.2f}x |",
             "",
             f"Aim: start-up within 1.2x of a tiny model's for a >= 1 GiB model: "
             + (verdict(su["attached_big_over_tiny"] <= 1.2) if size["big"] >= GiB else
                f"not judged (the big model here is {size['big'] / MiB:,.0f} MiB, below 1 GiB)") + ".", "",
             f"**Generation speed, shared vs private weights** (the big model, {g['max_tokens']} greedy "
             "tokens per request, median):", "",
             "| | broker-shared weights | private copy | ratio |", "| --- | --- | --- | --- |",
             f"| `bench/worker_bench.py`: two workers over HTTP, {g['requests']} requests alternating | "
             f"{g['attached']['tokens_per_s']:.2f} tokens/s | {g['from-disk']['tokens_per_s']:.2f} tokens/s "
             f"(`--from-disk`) | {g['ratio_attached_over_from_disk']:.2f} |"]
    if rt:
        lines.append(f"| `wbroker-bench-runtime`: one process, no HTTP, the same libtorch, {rt['rounds']} round(s) "
                     f"alternating (`OMP_NUM_THREADS={rt.get('omp_threads', '?')}`) | "
                     f"{rt['shared_tokens_per_s']:.2f} tokens/s | {rt['private_tokens_per_s']:.2f} tokens/s "
                     f"(`WeightsFromFiles(private_copy)`) | {rt['ratio']:.2f} |")
    ratios = [g["ratio_attached_over_from_disk"]] + ([rt["ratio"]] if rt else [])
    lines += ["", f"Aim: the shared weights cost nothing (ratio ~1.0; met when shared runs at >= 90% of "
              "private): "
              f"{verdict(all(0.9 <= x for x in ratios))}. Both variants generate identical tokens "
              "(both benchmarks check it)."]
    return wrap("worker", lines)


def render_missing(args):
    return wrap(args.name, [f"Not measured {args.stamp}: {args.reason}."])


# --- python-memory and worker-memory: the memory tests (pytest), run by bench/run-all ---

def render_python_memory(args):
    r = json.loads(Path(args.inputs[0]).read_text())
    copy, wb, base = r["copy_bytes"], r["wbroker_weights_pss"], r["baseline_weights_pss"]
    lines = [f"Measured {args.stamp}: a random Qwen2 of {r['parameters'] / 1e6:.1f} M parameters stored in "
             f"bf16 and served in fp32, {r['workers']} uvicorn workers under gunicorn, each warmed by one "
             "generate; weights PSS summed over the workers from `/proc/PID/smaps`:", "",
             f"| | weights PSS, {r['workers']} workers | copies |", "| --- | --- | --- |",
             f"| one fp32 copy | {copy / MiB:.1f} MiB | 1 |",
             f"| wbroker (`examples/fastapi_app`, broker `--dtype fp32`) | {wb / MiB:.1f} MiB (the arena "
             f"mapping) | **{wb / copy:.2f}** |",
             f"| the seed's app (`from_pretrained(..., dtype=float32)` per worker) | {base / MiB:.1f} MiB "
             f"(total PSS minus the non-weight PSS of the wbroker run) | **{base / copy:.2f}** |"]
    return wrap("python-memory", lines)


def render_worker_memory(args):
    r = json.loads(Path(args.inputs[0]).read_text())
    copy, res, wb, base = r["copy_bytes"], r["resident_bytes"], r["attached_weights_pss"], r["from_disk_weights_pss"]
    n = r["workers"]
    lines = [f"Measured {args.stamp}: a random Qwen2 of {copy / MiB:.1f} MiB fp32, {n} `wbroker-worker "
             "--reuse-port` on one port until each has served a request, PSS from `/proc/PID/smaps`:", "",
             f"| | weights PSS, {n} workers | copies |", "| --- | --- | --- |",
             f"| {n} workers attached to one broker | {wb / MiB:.1f} MiB (= {wb / res:.2f} x what one worker "
             f"has resident) | **{wb / copy:.2f}**" + (" (embedding rows of unseen tokens are never touched)"
                                                      if wb < 0.97 * copy else "") + " |",
             f"| {n} `--from-disk` workers | {base / MiB:.1f} MiB | **{base / copy:.2f}** |"]
    return wrap("worker-memory", lines)


# --- gpu ---

def render_gpu(args):
    gpus = gpu_description()
    if not gpus:
        return wrap("gpu", [f"**Not measured on this machine** ({args.stamp}): it has no GPU "
                            "(`nvidia-smi` lists none). Nothing here is estimated."])
    report = Path(args.inputs[0]).read_text().rstrip("\n") if args.inputs else ""
    if not report:
        return wrap("gpu", [f"**Not measured** ({args.stamp}) although this machine has {'; '.join(gpus)}: "
                            f"{args.reason or 'scripts/gpu-check produced no summary'}."])
    return wrap("gpu", [f"Measured {args.stamp} on {'; '.join(gpus)} by `scripts/gpu-check` "
                        "(its summary, as printed):", "", "```", report, "```"])


RENDERERS = {"machine": render_machine, "load": render_load, "python-attach": render_python_attach,
             "python-memory": render_python_memory, "worker": render_worker,
             "worker-memory": render_worker_memory, "gpu": render_gpu}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="print a section's markdown")
    r.add_argument("name", choices=sorted(RENDERERS))
    r.add_argument("--input", dest="inputs", action="append", default=[], metavar="FILE",
                   help="the benchmark's result (repeatable: worker takes worker.json, then "
                        "runtime.json; gpu takes gpu-check.txt)")
    r.add_argument("--stamp", default=machine_info.describe()["date"] + ", commit `"
                   + machine_info.git_describe() + "`", help="when and what was measured")
    r.add_argument("--mode", choices=["quick", "full"], default="full")
    r.add_argument("--seconds", default="0", help="machine: total run time")
    r.add_argument("--load-start", help="machine: 1-minute load average at the start")
    r.add_argument("--only", default="", help="machine: the sections this run rewrote, when not all")
    r.add_argument("--reason", default="", help="why a section was not measured")
    r.add_argument("--missing", action="store_true", help="say why the section was not measured (--reason)")
    s = sub.add_parser("splice", help="replace a section of DOC with the contents of FILE")
    s.add_argument("doc")
    s.add_argument("name")
    s.add_argument("file")
    n = sub.add_parser("names", help="list the generated sections of DOC")
    n.add_argument("doc")
    args = ap.parse_args()
    if args.cmd == "render":
        fn = render_missing if args.missing else RENDERERS[args.name]
        sys.stdout.write(fn(args))
    elif args.cmd == "splice":
        doc = Path(args.doc)
        try:
            doc.write_text(splice(doc.read_text(), args.name, Path(args.file).read_text()))
        except (KeyError, ValueError) as e:
            sys.exit(f"doc_sections: {doc}: {e.args[0]}")
    else:
        print("\n".join(section_names(Path(args.doc).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

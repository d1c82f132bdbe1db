"""What a run shows: three plots (matplotlib) and the compare section of
docs/benchmarks.md, both made from result.json alone."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GiB = 1 << 30
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
STYLE = {  # method -> (colour, marker, line style)
    "runtime": ("#999999", ".", "--"), "load_file": ("#d62728", "o", "-"), "safe_open": ("#ff7f0e", "s", "-"),
    "torch_mp": ("#9467bd", "^", "-"), "wbroker": ("#2ca02c", "D", "-"), "wbroker_gpu": ("#17becf", "v", "-"),
}


def _by_method(result):
    """method -> {"label", "rows": {n: row}} in run order (GPU placeholder left out)."""
    out = {}
    for row in result["runs"]:
        if row.get("n") is None:
            continue
        m = out.setdefault(row["method"], {"label": row["label"], "rows": {}})
        m["rows"][row["n"]] = row
    return out


def _plot(path, result, title, ylabel, value, methods=None, err=None, hline=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ns = result["settings"]["ns"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, m in _by_method(result).items():
        if methods and key not in methods:
            continue
        pts = [(n, m["rows"][n]) for n in ns if n in m["rows"] and m["rows"][n]["status"] == "ok"
               and value(m["rows"][n]) is not None]
        if not pts:
            continue
        colour, marker, ls = STYLE.get(key, ("black", "o", "-"))
        skipped = [str(n) for n in ns if n in m["rows"] and m["rows"][n]["status"] != "ok"]
        label = m["label"] + (f" (N={','.join(skipped)} {m['rows'][int(skipped[0])]['status']})" if skipped else "")
        xs, ys = [n for n, _ in pts], [value(r) for _, r in pts]
        if err:
            ax.errorbar(xs, ys, yerr=[[0] * len(pts), [err(r) - value(r) for _, r in pts]], color=colour,
                        marker=marker, ls=ls, label=label, capsize=3, lw=1.5, ms=5)
        else:
            ax.plot(xs, ys, color=colour, marker=marker, ls=ls, label=label, lw=1.5, ms=5)
    if hline:
        ax.axhline(hline[0], color="black", lw=0.8, ls=":", label=hline[1])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("processes (N)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90, pil_kwargs={"optimize": True})
    plt.close(fig)
    return path


def plots(result, img_dir):
    """Writes compare-{memory,ready,throughput}.png into img_dir; returns their paths."""
    img_dir = Path(img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    model_gib = result["model"]["bytes"] / GiB
    cores = result["machine"]["cores"]
    return [
        _plot(img_dir / "compare-memory.png", result,
              f"Total PSS, all processes incl. broker/parent ({model_gib:.2f} GiB model)", "GiB",
              lambda r: r["memory"]["pss"] / GiB, hline=(model_gib, "one copy of the weights")),
        _plot(img_dir / "compare-ready.png", result,
              "Spawn to weights usable (median, bar to max)", "seconds",
              lambda r: r["ready_s"]["median"], err=lambda r: r["ready_s"]["max"]),
        _plot(img_dir / "compare-throughput.png", result,
              f"Workload ops/s per process, all N concurrent ({cores} cores)", "ops/s (median)",
              lambda r: r.get("ops_per_s", {}).get("median"),
              methods=[k for k in STYLE if k != "runtime"]),
    ]


def _cell(row, fmt):
    if row is None:
        return "-"
    if row["status"] == "skipped":
        return row["reason"]
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason'].splitlines()[0][:120]}"
    return fmt(row)


def _table(result, header, fmt, methods=None):
    ns = result["settings"]["ns"]
    lines = [f"| {header} | " + " | ".join(f"N={n}" for n in ns) + " |", "| --- |" + " --- |" * len(ns)]
    for key, m in _by_method(result).items():
        if methods and key not in methods:
            continue
        lines.append(f"| {m['label']} | " + " | ".join(_cell(m["rows"].get(n), fmt) for n in ns) + " |")
    return "\n".join(lines)


def _breakdown(result):
    lines = ["| method | N | total | anon | file | shmem |", "| --- | --- | --- | --- | --- | --- |"]
    for m in _by_method(result).values():
        ok = [r for n, r in sorted(m["rows"].items()) if r["status"] == "ok"]
        if ok:
            r = ok[-1]
            mem = r["memory"]
            lines.append(f"| {m['label']} | {r['n']} | " + " | ".join(
                f"{mem[k] / GiB:.2f}" for k in ("pss", "pss_anon", "pss_file", "pss_shmem")) + " |")
    return "\n".join(lines)


def _relative(path):
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def section(result, images):
    """The markdown between the markers."""
    mc, md, st = result["machine"], result["model"], result["settings"]
    by = _by_method(result)
    # The end figure includes the benchmark's own N processes: only the start
    # says whether other work was running.
    busy = result["loadavg_start"][0] > mc["cores"]
    imgs = {Path(p).stem: f"img/{Path(p).name}" for p in images}
    out = [BEGIN, "## Side by side: wbroker against per-process loading (`bench/compare`)", "",
           f"Written by `{result['command']}` (this section and `docs/img/compare-*.png` are replaced by "
           "every run of `bench/compare/run.sh`, which `bench/run-all` runs; `--no-doc` leaves them alone, "
           "`--quick` is the 64 MiB development version; `--help` lists the options).", "",
           f"- Date {mc['date']}, commit `{mc['commit']}`. Total run time {result['total_seconds'] / 60:.1f} min.",
           f"- Machine: {mc['cpu']}, {mc['cores']} cores, {mc['ram_bytes'] / GiB:.1f} GiB RAM, Linux {mc['kernel']}"
           f" ({mc['os']}), shmem THP `{mc['shmem_thp']}`; Python {mc['python']}, torch {mc['torch']}, "
           f"safetensors {mc['safetensors']}, transformers {mc['transformers']}.",
           f"- Load average (1 min) at start {result['loadavg_start'][0]:.2f}, at end "
           f"{result['loadavg_end'][0]:.2f} (the end includes the benchmark's own processes)"
           + (" - **the machine was busy with other work during the run: "
                                                "treat times and rates as rough**." if busy else "."),
           f"- Model: a random {md['arch']} built with transformers from its config "
           f"({md['parameters'] / 1e6:.0f} M parameters, {md['bytes'] / GiB:.2f} GiB fp32 in {md['tensors']} "
           f"tensors, {len(md['files'])} file(s)) in a generated HF cache (refs/, snapshots/ symlinks, blobs/); "
           "nothing downloaded.",
           "- The page cache was warmed once before all methods (every model file read once); caches are "
           "never dropped (the machine is shared), so no method reads the disk. Every process runs torch "
           f"with {st['threads']} thread(s), and all of them stay in the benchmark's session (one scheduler "
           "autogroup), so every method gets the same share of the CPUs.",
           "",
           "Methods (N fresh Python processes each, all started at once):", "",
           "- **runtime only**: python + torch, no weights: the floor every method pays per process.",
           "- **A: load_file**: `safetensors.torch.load_file(f, backend=\"pread\")`, a private copy in every "
           "process. (`load_file()` with its default backend in safetensors 0.8 is a private *mmap* of the file, "
           "the same thing as B; copies appear whenever a worker converts the dtype or moves weights to a GPU.)",
           "- **B: safe_open mmap**: `safe_open(f, framework=\"pt\")` and `get_tensor` of every tensor: "
           "copy-on-write mappings of the file, so the processes share the page cache (which the kernel may "
           "drop and re-read under memory pressure).",
           "- **C: torch.multiprocessing**: one parent `load_file`s and `share_memory_()`s every tensor, spawns "
           "N children (spawn context) and hands each the state dict through a torch.multiprocessing "
           "`SimpleQueue`; the parent's start and load are a one-time cost, below.",
           "- **wbroker host**: a fresh `wbrokerd` per configuration loads the model once (one-time cost, "
           "below), every process attaches with the Python client (`wbroker.connect().attach()`) and builds "
           "zero-copy tensors over the read-only memfd.",
           "", "Every process then touches every page of every tensor (a float64 checksum over one element "
           "per 4 KiB page; the checksums of all methods "
           + ("agree" if result["checksums_agree"] else "**DISAGREE**") + "), reports ready, and waits.", "",
           "### Memory", "",
           "Sum of `Pss` from `/proc/PID/smaps_rollup` over every process of the configuration (the broker "
           "or the parent included), sampled once all N hold their weights. Library pages (torch's "
           "shared objects) are also shared with any other process on the machine that maps them, so the "
           "runtime part moves a little between runs; the weights' part (anon for A, file for B, shmem for C "
           "and wbroker, in the second table) does not.", "",
           _table(result, "total PSS", lambda r: f"{r['memory']['pss'] / GiB:.2f} GiB"), "",
           "Where that memory is, at the largest N each method ran (`Pss_Anon`: private copies and the "
           "runtime's heap; `Pss_File`: page cache and libraries; `Pss_Shmem`: a memfd or shm), GiB:", "",
           _breakdown(result), "",
           f"![memory vs N]({imgs.get('compare-memory', '')})", "",
           "### Time to ready", "",
           "From spawn (the parent's `Popen`/`Process.start`) until the process holds every tensor and has "
           "touched it; median / max over the N processes, seconds:", "",
           _table(result, "spawn to ready", lambda r: f"{r['ready_s']['median']:.2f} / {r['ready_s']['max']:.2f}"),
           "", "Of which after `import torch` (getting the weights and touching them), median / max:", "",
           _table(result, "weights part", lambda r: f"{r['load_s']['median']:.2f} / {r['load_s']['max']:.2f}",
                  methods=[k for k in by if k != "runtime"]), "",
           f"![time to ready vs N]({imgs.get('compare-ready', '')})", "",
           "### Throughput while all N run", "",
           "One op is `x @ W.T` for every 2-D weight W (x: 8 rows), so it reads every weight once; each "
           f"process runs ops for {st['seconds']:.0f} s after all N are told to go. Per-process ops/s, "
           "median (min):", "",
           _table(result, "ops/s per process",
                  lambda r: f"{r['ops_per_s']['median']:.2f} ({r['ops_per_s']['min']:.2f})",
                  methods=[k for k in by if k != "runtime"]), "",
           f"With {mc['cores']} cores, every method is CPU-bound once N > {mc['cores']} (with one torch thread "
           "per process): per-process rates fall as about cores/N for all of them, and differences between "
           "methods at large N are mostly noise and memory-bandwidth sharing."
           + (" The machine was busy during this run: rates of one method vary between runs by more than "
              "the differences between methods here." if busy else ""), "",
           f"![throughput vs N]({imgs.get('compare-throughput', '')})", "",
           "### One-time costs", ""]
    wb = [r for r in by.get("wbroker", {}).get("rows", {}).values() if r["status"] == "ok"]
    if wb:
        out.append(f"- wbroker: the broker's load of the model (its `load_seconds`, median of {len(wb)} fresh "
                   f"brokers) **{_median([r['one_time']['broker_load_s'] for r in wb]):.2f} s** "
                   f"({_median([r['one_time']['broker_load_wall_s'] for r in wb]):.2f} s for the whole `load` "
                   f"request); one attach from Python (in the worker, `client.attach()`) median "
                   f"**{_median([r['attach_ms']['median'] for r in wb]):.1f} ms**.")
    mp = [r for r in by.get("torch_mp", {}).get("rows", {}).values() if r["status"] == "ok"]
    if mp:
        out.append(f"- torch.multiprocessing: the parent's `load_file` + `share_memory_()` median "
                   f"**{_median([r['one_time']['holder_load_s'] for r in mp]):.2f} s**, after its own start "
                   f"(`import torch`) of {_median([r['one_time']['holder_start_s'] for r in mp]):.2f} s; "
                   f"sharing strategy `{mp[0]['one_time']['sharing_strategy']}`.")
    cp = result.get("control_plane") or {}
    if "first_attach_s" in cp:
        out.append(f"- Load on first attach (`load_on_attach`, model not loaded yet): the first attach took "
                   f"**{cp['first_attach_s']:.2f} s**, the next one {cp['second_attach_s'] * 1e3:.1f} ms.")
    gpu = [r for r in result["runs"] if r["method"] == "wbroker_gpu"]
    if gpu and gpu[0]["status"] == "no_gpu":
        out.append(f"- wbroker GPU: {gpu[0]['reason']}.")
    elif any(r.get("gpu_used_bytes") for r in gpu):
        out.append("- wbroker GPU: device memory in use (whole device, `torch.cuda.mem_get_info`) with all N "
                   "attached: " + ", ".join(f"N={r['n']} {r['gpu_used_bytes'] / GiB:.2f} GiB" for r in gpu
                                            if r.get("gpu_used_bytes")) + " (host PSS in the tables above).")
    out += ["", "### Control plane", ""]
    if cp.get("levels"):
        out += ["attach + release round trips against one `wbrokerd` (model loaded), raw protocol, each "
                "connection back to back; the clients run in a few `attach_load.py` processes (selectors, many "
                f"sockets each) on the same {mc['cores']} cores as the broker, for {st['cp_seconds']:.0f} s per row:",
                "", "| clients | client processes | round trips/s | median ms | p99 ms |",
                "| --- | --- | --- | --- | --- |"]
        for lv in cp["levels"]:
            out.append(f"| {lv['clients']} | {lv['processes']} | {lv['round_trips_per_s']:,.0f} | "
                       f"{lv['median_ms']:.2f} | {lv['p99_ms']:.2f} |")
    elif "error" in cp:
        out.append(f"Control plane failed: {cp['error'].splitlines()[0]}")
    out += ["", f"Raw numbers: `{_relative(result['out'])}/result.json` of the run.", END]
    return "\n".join(out) + "\n"


def update_doc(result, doc, images):
    """Replaces the compare section of `doc` (appends it the first time)."""
    doc = Path(doc)
    text = doc.read_text()
    new = section(result, images)
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: new, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + new
    doc.write_text(text)

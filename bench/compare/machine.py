"""The machine and code a run measured: CPU, cores, RAM, kernel, versions, commit."""
import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _first(path, prefix):
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip() if ":" in line else line[len(prefix):].strip()
    except OSError:
        pass
    return None


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_describe():
    # bench/run-all describes the tree once, before it rewrites the doc
    # (which would make every later step's tree "-dirty").
    if os.environ.get("WBROKER_BENCH_COMMIT"):
        return os.environ["WBROKER_BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], check=True,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe():
    os_release = (_first("/etc/os-release", "PRETTY_NAME=") or "").strip('"')
    try:
        shmem_thp = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read_text().strip()
    except OSError:
        shmem_thp = None
    with open("/proc/meminfo") as f:
        mem_total = int(f.readline().split()[1]) * 1024
    return {
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "ram_bytes": mem_total,
        "kernel": platform.release(),
        "os": os_release,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "safetensors": _version("safetensors"),
        "transformers": _version("transformers"),
        "shmem_thp": shmem_thp,
        "commit": git_describe(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }

"""What the processes of a configuration cost in memory, and what is left.

Proportional set size (PSS) from /proc/PID/smaps_rollup: a page shared by k
processes counts 1/k in each, so the sum over all processes of a
configuration is what they cost together, whether the weights are private
copies (anonymous), shared page cache (file) or a shared memfd/shm (shmem).
"""
import os

ROLLUP_FIELDS = {"Rss:": "rss", "Pss:": "pss", "Pss_Anon:": "pss_anon", "Pss_File:": "pss_file",
                 "Pss_Shmem:": "pss_shmem"}


def meminfo():
    """/proc/meminfo in bytes, e.g. meminfo()["MemAvailable"]."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, rest = line.split(":", 1)
            parts = rest.split()
            out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def pids_in_groups(pgids):
    """Every live process whose process group is one of `pgids`."""
    wanted = set(pgids)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited while we looked
        # comm (field 2) may hold spaces and parentheses: split after its last ')'.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) in wanted:  # fields: state, ppid, pgrp, ...
            found.append(int(entry))
    return sorted(found)


def rollup(pid):
    """{rss, pss, pss_anon, pss_file, pss_shmem} of one process in bytes (None if it is gone)."""
    out = dict.fromkeys(ROLLUP_FIELDS.values(), 0)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                key = ROLLUP_FIELDS.get(parts[0]) if parts else None
                if key:
                    out[key] = int(parts[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return out


def total_pss(pids):
    """Sums of rollup() over `pids`, plus "processes" (how many were read) and "per_pid"."""
    total = dict.fromkeys(ROLLUP_FIELDS.values(), 0)
    per_pid = {}
    for pid in pids:
        r = rollup(pid)
        if r is None:
            continue
        per_pid[pid] = r["pss"]
        for k, v in r.items():
            total[k] += v
    total["processes"] = len(per_pid)
    total["per_pid"] = per_pid
    return total

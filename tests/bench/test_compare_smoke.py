"""bench/compare as a smoke test: one --quick --no-doc run (N = 1, 2, to stay
near a minute) into a temp dir, then checks that result.json has every
method at every N with sane fields, that the shared methods hold one copy of
the weights, and that the plots were made. No timing is asserted.

The generated 64 MiB model is kept in $WBROKER_COMPARE_CACHE (ctest: the
build tree) so that reruns skip transformers; without it, a temp dir.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BINARY_DIR = Path(os.environ.get("WBROKER_BINARY_DIR", REPO / "build"))
METHODS = ["runtime", "load_file", "safe_open", "torch_mp", "wbroker"]
NS = [1, 2]
CP_CLIENTS = [1, 64, 1000]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    cache = os.environ.get("WBROKER_COMPARE_CACHE") or str(tmp / "hub")
    out = tmp / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "compare" / "compare.py"), "--quick", "--no-doc",
                           "--build", str(BINARY_DIR), "--cache", cache, "--out", str(out),
                           "--ns", ",".join(map(str, NS)), "--cp-clients", ",".join(map(str, CP_CLIENTS))],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1500)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-6000:]
    return json.loads((out / "result.json").read_text()), out


def rows(result):
    return {(r["method"], r["n"]): r for r in result["runs"]}


def test_every_method_and_n_is_measured(run):
    result, _ = run
    model = result["model"]
    assert 50 << 20 < model["bytes"] < 80 << 20, model
    by = rows(result)
    for method in METHODS:
        for n in NS:
            r = by[(method, n)]
            assert r["status"] == "ok", r
            assert r["memory"]["pss"] > 0 and r["memory"]["rss"] >= r["memory"]["pss"], r["memory"]
            extra = {"torch_mp": 1, "wbroker": 1}.get(method, 0)  # the parent, the broker
            assert r["memory"]["processes"] >= n + extra, r["memory"]
            assert 0 < r["ready_s"]["min"] <= r["ready_s"]["median"] <= r["ready_s"]["max"], r["ready_s"]
            assert r["load_s"]["min"] >= 0, r["load_s"]
            if method == "runtime":
                assert r["tensors"] == 0 and "ops_per_s" not in r
            else:
                assert r["tensors"] == model["tensors"] and r["weight_bytes"] == model["bytes"], r
                assert r["ops_per_s"]["min"] > 0, r["ops_per_s"]
                assert len(r["checksums"]) == 1, r["checksums"]
    for n in NS:
        assert by[("wbroker", n)]["one_time"]["broker_load_s"] > 0
        assert by[("wbroker", n)]["attach_ms"]["median"] > 0
        assert by[("torch_mp", n)]["one_time"]["holder_load_s"] > 0
    assert result["checksums_agree"] is True


def test_gpu_line_is_measured_or_says_there_is_none(run):
    result, _ = run
    gpu = [r for r in result["runs"] if r["method"] == "wbroker_gpu"]
    if result["gpu"]["available"]:
        assert [r["n"] for r in gpu] == NS
    else:
        assert len(gpu) == 1 and gpu[0]["status"] == "no_gpu"
        assert "no GPU on this machine" in gpu[0]["reason"]


def test_shared_methods_hold_one_copy_and_load_file_one_per_process(run):
    result, _ = run
    by = rows(result)
    weights = result["model"]["bytes"]
    n = NS[-1]
    # wbroker's memfd and torch's shm are the only shmem here: one copy in all.
    for method in ("wbroker", "torch_mp"):
        shmem = by[(method, n)]["memory"]["pss_shmem"]
        assert 0.95 * weights <= shmem <= 1.1 * weights, (method, shmem, weights)
    # load_file: a private (anonymous) copy in each process, above the runtime floor.
    anon = by[("load_file", n)]["memory"]["pss_anon"] - by[("runtime", n)]["memory"]["pss_anon"]
    assert anon >= 0.9 * n * weights, (anon, weights)


def test_control_plane_levels(run):
    result, _ = run
    cp = result["control_plane"]
    assert cp["first_attach_s"] > 0 and cp["second_attach_s"] > 0
    assert [lv["clients"] for lv in cp["levels"]] == CP_CLIENTS
    for lv in cp["levels"]:
        assert lv["round_trips"] > 0 and lv["samples"] > 0, lv
        assert 0 < lv["median_ms"] <= lv["p99_ms"], lv


def test_plots_are_small_pngs(run):
    _, out = run
    for name in ("memory", "ready", "throughput"):
        png = out / f"compare-{name}.png"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", png
        assert len(data) < 100 * 1024, (png, len(data))

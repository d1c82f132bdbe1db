"""Child processes of one benchmark configuration: start, watch, kill.

Every process leads its own process group (so it and whatever it spawns, e.g.
torch.multiprocessing children, die with one killpg) but stays in the
benchmark's session: with sched_autogroup the kernel shares the CPU fairly
between sessions, so a process in a session of its own would get more CPU
than N children that share their parent's. Every process also gets SIGKILL
if the benchmark itself dies (PR_SET_PDEATHSIG). Output goes
to a log file per process, whose tail is quoted when something fails.
"""
import ctypes
import os
import signal
import subprocess
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent(sig=signal.SIGKILL):
    """Asks the kernel to send `sig` to this process when its parent exits, so
    no benchmark process outlives a benchmark killed with SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))


class ProcessFailed(RuntimeError):
    """A benchmark process exited early or did not answer in time."""


class ProcessSet:
    """The processes of one configuration, each the leader of its own process group."""

    def __init__(self, log_dir):
        self.log_dir = Path(log_dir)  # one NAME.log per process
        self.procs = []  # every Popen started, each the leader of its process group

    def start(self, name, argv, env=None):
        """Starts argv with output in LOG_DIR/NAME.log; returns the Popen."""
        log = open(self.log_dir / f"{name}.log", "wb")
        try:
            # process_group=0: one killpg reaches the process and everything it
            # spawns, in the same session (see above); preexec: die with the benchmark.
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env=env, process_group=0, preexec_fn=die_with_parent)
        finally:
            log.close()
        p.wb_name = name
        self.procs.append(p)
        return p

    def log_tail(self, p, chars=3000):
        path = self.log_dir / f"{p.wb_name}.log"
        try:
            return path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self):
        """Raises ProcessFailed naming the first process that has exited."""
        for p in self.procs:
            if p.poll() is not None:
                raise ProcessFailed(f"{p.wb_name} (pid {p.pid}) exited with status {p.returncode}:\n"
                                    f"{self.log_tail(p)}")

    def pgids(self):
        return [p.pid for p in self.procs]

    def wait_all(self, timeout):
        """Waits for every process to exit on its own; returns the names of those that did not."""
        deadline = time.monotonic() + timeout
        late = []
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                late.append(p.wb_name)
        return late

    def kill_all(self):
        """SIGKILLs every process group started here (idempotent) and reaps the leaders."""
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass

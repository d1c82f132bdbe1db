"""How each method puts the model's weights into N processes.

A Method starts the processes of one configuration (and whatever serves them:
the torch.multiprocessing parent, wbrokerd), says how much memory that may
take, and stops what does not stop on its own. Every process reports to the
rendezvous (see rendezvous.py and child.py).
"""
import time
from pathlib import Path

from broker import Broker

HERE = Path(__file__).resolve().parent
CHILD = HERE / "child.py"
GiB = 1 << 30


class Run:
    """What a method needs to start one configuration."""

    def __init__(self, python, wbrokerd, model, tmp, threads, rendezvous, processes):
        self.python = python  # the interpreter for every benchmark process
        self.wbrokerd = wbrokerd  # the broker binary
        self.model = model  # model.py's description (repo, commit, files, bytes, ...)
        self.tmp = Path(tmp)  # this configuration's scratch dir
        self.threads = threads  # torch intra-op threads per process
        self.rendezvous = rendezvous  # the Rendezvous the processes report to
        self.processes = processes  # the ProcessSet that owns every process

    def child_argv(self, method, index, extra=()):
        return [self.python, str(CHILD), "--method", method, "--index", str(index), "--rendezvous",
                self.rendezvous.path, "--t-spawn", repr(time.monotonic()), "--threads", str(self.threads),
                *extra]


class Method:
    """A way to give N processes the weights; subclasses fill in the details."""

    key = ""  # the name in results and on the command line
    label = ""  # the name in tables and plots
    holder = False  # one extra process reports {"type": "holder"} (torch_mp)

    def memory_need(self, n, weights, runtime):
        """Bytes the configuration may take: `weights` is the model, `runtime`
        what one process with torch costs without weights."""
        raise NotImplementedError

    def start(self, run, n):
        """Starts the configuration; returns facts for the report (e.g. a one-time load)."""
        for i in range(n):
            run.processes.start(f"{self.key}-{i}", run.child_argv(self.key, i, ["--files", *run.model["files"]]))
        return {}

    def stop(self):
        """Stops what does not exit on the rendezvous's "exit" (a broker)."""


class RuntimeOnly(Method):
    key = "runtime"
    label = "runtime only (python + torch, no weights)"

    def memory_need(self, n, weights, runtime):
        return n * runtime


class LoadFile(Method):
    key = "load_file"
    label = "A: load_file (private copy each)"

    def memory_need(self, n, weights, runtime):
        return n * (weights + runtime)


class SafeOpen(Method):
    key = "safe_open"
    label = "B: safe_open mmap (page cache)"

    def memory_need(self, n, weights, runtime):
        return weights + n * runtime


class TorchMultiprocessing(Method):
    key = "torch_mp"
    label = "C: torch.multiprocessing (shm)"
    holder = True

    def memory_need(self, n, weights, runtime):
        # The parent's load_file mapping and its shm copy exist together for a moment.
        return 2 * weights + (n + 1) * runtime

    def start(self, run, n):
        run.processes.start("torch_mp-holder", run.child_argv(
            self.key, 0, ["--holder", "--n", str(n), "--files", *run.model["files"]]))
        return {}


class Wbroker(Method):
    key = "wbroker"
    label = "wbroker host (memfd)"
    device = "cpu"  # the broker's --device and the attach's device

    def __init__(self):
        self.broker = None  # the configuration's wbrokerd

    def memory_need(self, n, weights, runtime):
        return weights + n * runtime

    def start(self, run, n):
        """A fresh wbrokerd, the model loaded once (timed), then N attaching processes."""
        self.broker = Broker(run.processes, run.wbrokerd, run.tmp / "wbroker.sock", run.model["cache"],
                             device=self.device).start()
        wall, load_seconds = self.broker.load(run.model["repo"], run.model["commit"])
        m = run.model
        for i in range(n):
            run.processes.start(f"{self.key}-{i}", run.child_argv(
                "wbroker", i, ["--socket", self.broker.socket, "--repo", m["repo"], "--commit", m["commit"],
                               "--device", self.device]))
        return {"broker_load_wall_s": wall, "broker_load_s": load_seconds, "broker_pid": self.broker.pid}

    def stop(self):
        if self.broker is not None:
            self.broker.stop()
            self.broker = None


class WbrokerGpu(Wbroker):
    key = "wbroker_gpu"
    label = "wbroker GPU (cuda:0)"
    device = "cuda:0"

    def memory_need(self, n, weights, runtime):
        return n * runtime  # the weights live on the GPU


def all_methods():
    """Every method, in the order they run for each N."""
    return [RuntimeOnly(), LoadFile(), SafeOpen(), TorchMultiprocessing(), Wbroker(), WbrokerGpu()]

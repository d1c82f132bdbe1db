"""Broker restart and crash: host arenas outlive the broker and are adopted.

With a service manager, wbrokerd keeps each sealed memfd in the fd store
(FDSTORE=1) and a restarted broker takes it back from LISTEN_FDS instead of
loading the model again. Without one, clients hand their memfd back when they
re-register ("reattach") and the broker adopts it after checking memfd, seals,
size and every byte. FakeSystemd plays the service manager: a datagram socket
as NOTIFY_SOCKET that keeps the stored fds, and a fork+exec that passes them
to the next broker at fd 3.. with LISTEN_PID set to that broker's pid.
"""
import array
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "python"))
sys.path.insert(0, str(REPO / "python"))
from conftest import WBROKERD  # noqa: E402  (the Python suites' build dir)

import wbroker  # noqa: E402
from wbroker.errors import BrokerError  # noqa: E402
from wbroker.protocol import PROTOCOL_VERSION, Connection, _close_all  # noqa: E402

MODEL = "demo/adopt"
ALL_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


@pytest.fixture
def cache(tmp_path):
    """A hub cache with demo/adopt: 2 shards of float16 tensors, 4 MiB."""
    hub = tmp_path / "hub"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_hf_cache.py"), "--cache", str(hub),
                    "--model", MODEL, "--size", "4MiB", "--tensors", "24", "--shards", "2"],
                   check=True, stdout=subprocess.DEVNULL)
    return hub


def snapshot_tensors(cache):
    snap = next((cache / "models--demo--adopt" / "snapshots").iterdir())
    out = {}
    for f in sorted(snap.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_lease_matches(lease, ref):
    """Every tensor of `lease` holds the snapshot's bytes (read through the mapping)."""
    assert set(lease.manifest) == set(ref)
    for name, want in ref.items():
        got = lease.arrays[name]
        assert got.tobytes() == want.tobytes(), name


class FakeSystemd:
    """The parts of PID 1 the broker talks to: sd_notify and the fd store."""

    def __init__(self, tmp):
        self.path = str(tmp / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.store = {}  # FDNAME -> fd (ours)
        self.removed = []
        self.messages = []

    def collect(self):
        """Handles every datagram received so far."""
        while True:
            try:
                data, anc, _flags, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except BlockingIOError:
                return
            fds = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            name = fields.get("FDNAME", "stored")
            if fields.get("FDSTORE") == "1":
                for fd in fds:
                    self.store.setdefault(name, fd)
                continue
            _close_all(fds)
            if fields.get("FDSTOREREMOVE") == "1":
                self.removed.append(name)
                fd = self.store.pop(name, None)
                if fd is not None:
                    os.close(fd)

    def close(self):
        _close_all(self.store.values())
        self.sock.close()


class BrokerProc:
    """wbrokerd started by fork+exec, with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES
    naming `passed` (name -> fd) at fds 3.., as systemd would pass them."""

    def __init__(self, tmp, cache, notify=None, passed=None, tag="b"):
        self.socket = str(tmp / "wbroker.sock")
        self.log = tmp / f"wbrokerd-{tag}.log"
        args = [str(WBROKERD), "--socket", self.socket, "--cache-dir", str(cache), "--device", "cpu",
                "--log-level", "info"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
        if notify:
            env["NOTIFY_SOCKET"] = notify
        names = list(passed or {})
        fds = [passed[n] for n in names]
        log_fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        pid = os.fork()
        if pid == 0:  # child: only async-signal-safe-ish work, then exec
            try:
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                # Move the fds above the target range first, so that no dup2
                # overwrites one that is still to be placed (close-on-exec:
                # only the copies at 3.. reach the broker).
                high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in fds]
                for i, fd in enumerate(high):
                    os.dup2(fd, 3 + i, inheritable=True)
                if fds:
                    env["LISTEN_FDS"] = str(len(fds))
                    env["LISTEN_PID"] = str(os.getpid())
                    env["LISTEN_FDNAMES"] = ":".join(names)
                os.execve(args[0], args, env)
            finally:
                os._exit(127)
        os.close(log_fd)
        self.pid = pid
        self._wait_listening()

    def _wait_listening(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.pid = None
                raise RuntimeError(f"wbrokerd exited ({status}):\n{self.log.read_text()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.socket)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"wbrokerd did not listen on {self.socket}:\n{self.log.read_text()}")

    def bytes_read(self):
        """rchar of /proc/PID/io: every byte the broker read through a syscall."""
        for line in open(f"/proc/{self.pid}/io"):
            if line.startswith("rchar:"):
                return int(line.split()[1])
        raise AssertionError("no rchar in /proc/PID/io")

    def stop(self, sig=signal.SIGTERM):
        if self.pid is None:
            return
        os.kill(self.pid, sig)
        os.waitpid(self.pid, 0)
        self.pid = None

    def status_model(self):
        with wbroker.connect(self.socket, reconnect=False) as c:
            models = [m for m in c.status()["models"] if m["model"] == MODEL]
        assert len(models) == 1, models
        return models[0]


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        p.stop(signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["crash", "restart"])
def test_fd_store_gives_the_next_broker_the_same_memfd(tmp_path, cache, procs, sig):
    ref = snapshot_tensors(cache)
    systemd = FakeSystemd(tmp_path)
    try:
        first = BrokerProc(tmp_path, cache, notify=systemd.path, tag="first")
        procs.append(first)
        client = wbroker.connect(first.socket, reconnect_attempts=100, backoff_max=0.1)
        lease = client.attach(MODEL)
        assert_lease_matches(lease, ref)
        held = os.fstat(lease._fd)
        systemd.collect()
        names = sorted(systemd.store)
        assert [n.split("-")[1] for n in names] == ["arena", "meta"], systemd.messages
        assert os.fstat(systemd.store[names[0]]).st_ino == held.st_ino

        first.stop(sig)
        systemd.collect()
        # A stop (or a crash) keeps the arena for the next broker.
        assert systemd.removed == []
        # The worker keeps serving from its mapping while no broker runs.
        assert_lease_matches(lease, ref)

        second = BrokerProc(tmp_path, cache, notify=systemd.path, passed=dict(systemd.store),
                            tag="second")
        procs.append(second)
        row = second.status_model()
        assert row["state"] == "ready" and row["adopted"] is True and row["load_seconds"] == 0
        assert "adopted" in second.log.read_text()
        # Only headers were read: far less than the weights.
        assert second.bytes_read() < lease.arena_size // 2

        with wbroker.connect(second.socket) as other:
            again = other.attach(MODEL)
            # The very memfd the old client maps: still one copy.
            assert os.fstat(again._fd).st_ino == held.st_ino
            assert_lease_matches(again, ref)
            # The old client reconnects and re-registers its lease.
            client.ping()
            assert second.status_model()["leases"] == 2
            assert lease.released is False
            assert_lease_matches(lease, ref)
        client.close()
    finally:
        systemd.close()


def test_unload_removes_the_arena_from_the_fd_store(tmp_path, cache, procs):
    systemd = FakeSystemd(tmp_path)
    try:
        b = BrokerProc(tmp_path, cache, notify=systemd.path)
        procs.append(b)
        with wbroker.connect(b.socket) as c:
            c.attach(MODEL).release()
            systemd.collect()
            assert len(systemd.store) == 2
            c.unload(MODEL)
        deadline = time.monotonic() + 10
        while systemd.store and time.monotonic() < deadline:
            time.sleep(0.05)
            systemd.collect()
        assert systemd.store == {}
        assert sorted(n.split("-")[1] for n in systemd.removed) == ["arena", "meta"]
    finally:
        systemd.close()


def test_a_bad_stored_arena_is_dropped_and_the_model_loads(tmp_path, cache, procs):
    systemd = FakeSystemd(tmp_path)
    try:
        first = BrokerProc(tmp_path, cache, notify=systemd.path, tag="first")
        procs.append(first)
        with wbroker.connect(first.socket) as c:
            c.attach(MODEL).release()
        systemd.collect()
        first.stop(signal.SIGKILL)
        # Swap the arena for a memfd of the same size without seals.
        arena_name = next(n for n in systemd.store if n.startswith("wbroker-arena-"))
        size = os.fstat(systemd.store[arena_name]).st_size
        fake = os.memfd_create("wbroker:fake", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fake, size)
        os.close(systemd.store[arena_name])
        systemd.store[arena_name] = fake

        second = BrokerProc(tmp_path, cache, notify=systemd.path, passed=dict(systemd.store),
                            tag="second")
        procs.append(second)
        log = second.log.read_text()
        assert "lacks arena seals" in log and "not adopting" in log
        systemd.collect()
        assert arena_name in systemd.removed
        with wbroker.connect(second.socket) as c:
            lease = c.attach(MODEL)
            assert_lease_matches(lease, snapshot_tensors(cache))
        assert second.status_model()["adopted"] is False
    finally:
        systemd.close()


def test_reattach_without_fd_store_adopts_the_clients_memfd(tmp_path, cache, procs):
    ref = snapshot_tensors(cache)
    first = BrokerProc(tmp_path, cache, tag="first")
    procs.append(first)
    client = wbroker.connect(first.socket, reconnect_attempts=100, backoff_max=0.1)
    lease = client.attach(MODEL)
    held = os.fstat(lease._fd)
    first.stop(signal.SIGKILL)
    assert_lease_matches(lease, ref)

    second = BrokerProc(tmp_path, cache, tag="second")
    procs.append(second)
    client.ping()  # reconnects and re-registers
    row = second.status_model()
    assert row["state"] == "ready" and row["adopted"] is True and row["leases"] == 1
    with wbroker.connect(second.socket) as other:
        assert os.fstat(other.attach(MODEL)._fd).st_ino == held.st_ino
    assert_lease_matches(lease, ref)
    client.close()


def sealed_memfd(data, seals=ALL_SEALS, size=None):
    fd = os.memfd_create("wbroker:forged", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, len(data) if size is None else size)
    os.pwrite(fd, data, 0)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_reattach_refuses_memfds_that_are_not_the_model(tmp_path, cache, procs):
    first = BrokerProc(tmp_path, cache, tag="first")
    procs.append(first)
    with wbroker.connect(first.socket) as c:
        lease = c.attach(MODEL)
        commit, genuine = lease.revision, bytes(lease._mmap)
        victim = lease.manifest[sorted(lease.manifest)[3]]
    first.stop(signal.SIGKILL)
    second = BrokerProc(tmp_path, cache, tag="second")
    procs.append(second)

    forged = bytearray(genuine)
    forged[victim.offset + 1] ^= 0x40  # one bit of one tensor
    cases = {
        "differ from": sealed_memfd(bytes(forged)),
        "lacks arena seals": sealed_memfd(genuine, seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW),
        "the snapshot's layout needs": sealed_memfd(genuine, size=len(genuine) + 4096),
    }
    plain = tmp_path / "plain.bin"
    plain.write_bytes(genuine)
    cases["is not a memfd"] = os.open(plain, os.O_RDONLY | os.O_CLOEXEC)
    conn = Connection(second.socket)
    try:
        conn.call({"op": "hello", "protocol": PROTOCOL_VERSION, "client": "forger"})
        for text, fd in cases.items():
            with pytest.raises(BrokerError) as err:
                conn.call({"op": "reattach", "model": MODEL, "revision": commit, "device": "cpu"},
                          fds=[fd])
            assert text in str(err.value), (text, str(err.value))
            os.close(fd)
        with wbroker.connect(second.socket) as c:
            assert [m for m in c.status()["models"] if m["model"] == MODEL] == []
        # The same bytes, sealed, in a memfd the broker never made: adopted.
        good = sealed_memfd(genuine)
        reply, fds = conn.call({"op": "reattach", "model": MODEL, "revision": commit,
                                "device": "cpu"}, fds=[good])
        _close_all(fds)
        assert reply["adopted"] is True and isinstance(reply["lease"], int)
        with wbroker.connect(second.socket) as c:
            assert os.fstat(c.attach(MODEL)._fd).st_ino == os.fstat(good).st_ino
        os.close(good)
    finally:
        conn.close()
    log = second.log.read_text()
    assert "refused to adopt" in log


def test_reattach_needs_the_full_commit_and_its_fd(tmp_path, cache, procs):
    b = BrokerProc(tmp_path, cache)
    procs.append(b)
    conn = Connection(b.socket)
    try:
        with wbroker.connect(b.socket) as c:
            lease = c.attach(MODEL)
            conn.call({"op": "hello", "protocol": PROTOCOL_VERSION})
            with pytest.raises(BrokerError, match="full commit"):
                conn.call({"op": "reattach", "model": MODEL, "revision": "main"}, fds=[lease._fd])
            with pytest.raises(BrokerError, match="takes 1 fd"):
                conn.call({"op": "reattach", "model": MODEL, "revision": lease.revision})
            # The model is loaded: a memfd that is not its arena is another copy.
            other = sealed_memfd(bytes(lease._mmap))
            with pytest.raises(BrokerError, match="another copy"):
                conn.call({"op": "reattach", "model": MODEL, "revision": lease.revision}, fds=[other])
            os.close(other)
            reply, _ = conn.call({"op": "reattach", "model": MODEL, "revision": lease.revision},
                                 fds=[lease._fd])
            assert reply["adopted"] is False and reply["lease"] >= 1
    finally:
        conn.close()


def test_backoff_is_bounded_and_keeps_the_leases(tmp_path, cache, procs):
    first = BrokerProc(tmp_path, cache, tag="first")
    procs.append(first)
    client = wbroker.connect(first.socket, reconnect_attempts=3, backoff_initial=0.001)
    lease = client.attach(MODEL)
    first.stop(signal.SIGKILL)
    with pytest.raises(wbroker.BrokerUnavailable):
        client.ping()
    assert lease.released is False
    second = BrokerProc(tmp_path, cache, tag="second")
    procs.append(second)
    client.ping()
    assert second.status_model()["leases"] == 1
    client.close()


def test_an_fd_that_no_request_declares_drops_the_connection(tmp_path, cache, procs):
    from wbroker.protocol import encode_frame
    b = BrokerProc(tmp_path, cache)
    procs.append(b)
    conn = Connection(b.socket)
    try:
        conn.call({"op": "hello", "protocol": PROTOCOL_VERSION})
        devnull = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        socket.send_fds(conn._sock, [encode_frame({"op": "ping", "id": 99})], [devnull])
        os.close(devnull)
        reply, fds = conn._read_frame()
        _close_all(fds)
        assert reply.get("id") == 99 and reply["ok"] is True
        reply, fds = conn._read_frame()
        assert reply["ok"] is False
        assert "no request that declares them" in reply["error"]["message"]
        assert conn._sock.recv(1) == b""  # closed by the broker
    finally:
        conn.close()

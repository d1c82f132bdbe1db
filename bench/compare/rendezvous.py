"""The benchmark's rendezvous: one Unix socket where the processes of a
configuration report, and from which they are told to start and to stop.

Messages are JSON objects, one per line. A process sends {"type": "ready",
...} once its weights are usable, then waits for {"type": "go", "seconds": S},
runs the workload, sends {"type": "result", ...} and waits for {"type":
"exit"}. A process that fails sends {"type": "error", "message": ...}.
Rendezvous is the benchmark's side, Link a benchmark process's side.
"""
import json
import os
import selectors
import socket
import time


class RendezvousError(RuntimeError):
    """A process reported an error, or did not report in time."""


class _Peer:
    """One accepted connection and the bytes read from it that do not yet form a line."""

    def __init__(self, sock):
        self.sock = sock  # the accepted connection
        self.buffer = b""  # a partial line


class Rendezvous:
    """A listening AF_UNIX socket and the processes connected to it."""

    def __init__(self, path):
        self.path = str(path)  # the socket file (removed by close())
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(self.path)
        self.listener.listen(256)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()  # the listener and every peer
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.peers = []  # every accepted _Peer
        self.messages = []  # messages read but not yet taken by gather()

    def gather(self, kind, count, timeout, check_alive=None):
        """Returns `count` messages of type `kind` (in arrival order). Raises
        RendezvousError on an "error" message or when `timeout` seconds pass;
        check_alive() is called between reads and may raise."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages:
                if m.get("type") == "error":
                    raise RendezvousError(f"process {m.get('pid')} failed: {m.get('message')}")
            got = [m for m in self.messages if m.get("type") == kind]
            if len(got) >= count:
                taken = got[:count]
                self.messages = [m for m in self.messages if not any(m is t for t in taken)]
                return taken
            left = deadline - time.monotonic()
            if left <= 0:
                raise RendezvousError(f"only {len(got)} of {count} processes reported {kind!r} "
                                      f"within {timeout:.0f} s")
            if check_alive:
                check_alive()
            for key, _ in self.selector.select(min(left, 0.2)):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._read(key.data)

    def broadcast(self, message):
        """Sends `message` to every connected process (blocking; messages are small)."""
        line = (json.dumps(message) + "\n").encode()
        for peer in self.peers:
            try:
                peer.sock.sendall(line)
            except OSError:
                pass  # a process that is gone is noticed by gather()/check_alive()

    def _accept(self):
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(True)
        peer = _Peer(sock)
        self.peers.append(peer)
        self.selector.register(sock, selectors.EVENT_READ, peer)

    def _read(self, peer):
        try:
            data = peer.sock.recv(1 << 20)
        except OSError:
            data = b""
        if not data:
            self.selector.unregister(peer.sock)
            return
        peer.buffer += data
        *lines, peer.buffer = peer.buffer.split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
            except ValueError:
                msg = {"type": "error", "message": f"unparsable rendezvous line {line[:200]!r}"}
            self.messages.append(msg if isinstance(msg, dict) else
                                 {"type": "error", "message": f"rendezvous line is not an object: {line[:200]!r}"})

    def close(self):
        for peer in self.peers:
            peer.sock.close()
        self.selector.close()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Link:
    """A benchmark process's connection to the rendezvous."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        self.buffer = b""  # bytes after the last line returned by recv()

    def send(self, message):
        self.sock.sendall((json.dumps(message) + "\n").encode())

    def recv(self, timeout=None):
        """The next message; None on timeout. Raises ConnectionError when the benchmark is gone."""
        self.sock.settimeout(timeout)
        while b"\n" not in self.buffer:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not data:
                raise ConnectionError("the benchmark closed the rendezvous")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

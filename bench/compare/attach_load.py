#!/usr/bin/env python3
"""Control-plane load: one process holding --clients connections to wbrokerd,
each doing attach -> release round trips back to back for the time the
rendezvous says, over the raw protocol (the Python client's framing from
python/wbroker/protocol.py, one selectors loop instead of a thread per
connection). The attach reply's memfd is closed unmapped: this measures the
broker's request path, not mapping.

Reports {"type": "result", "pairs": round trips completed in the window,
"seconds", "latency_ms": a sample of round-trip times, "connections"}.
"""
import argparse
import array
import json
import os
import random
import resource
import selectors
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "python"))

from processes import die_with_parent  # noqa: E402
from rendezvous import Link  # noqa: E402
from wbroker.protocol import HEADER, MAX_FDS_PER_FRAME, PROTOCOL_VERSION, decode_header, encode_frame  # noqa: E402

SAMPLE = 20000  # round-trip times kept per process (reservoir)


def close_passed_fds(ancdata):
    """Closes every fd that came with a message (the attach reply's memfd)."""
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            for fd in array.array("i", data[:len(data) - len(data) % 4]):
                os.close(fd)


class Conn:
    """One connection: its socket, unparsed bytes, and where its round trip stands."""

    def __init__(self, path, name):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)  # to wbrokerd
        self.sock.connect(path)
        self.buf = bytearray()  # bytes of a frame not yet complete
        self.next_id = 1  # request id of the next request
        self.pending = None  # (op, id) awaiting its reply
        self.t0 = 0.0  # when the current attach was sent
        self.call({"op": "hello", "protocol": PROTOCOL_VERSION, "client": name})
        while True:  # hello synchronously, before the timed window
            reply = self.read_available()
            if reply is not None:
                return

    def call(self, request):
        request["id"] = self.next_id
        self.pending = (request["op"], self.next_id)
        self.next_id += 1
        self.sock.sendall(encode_frame(request))  # a small frame, one request in flight

    def read_available(self):
        """Reads what the socket has; returns the reply once a whole frame is in."""
        data, anc, flags, _ = self.sock.recvmsg(1 << 18, socket.CMSG_SPACE(MAX_FDS_PER_FRAME * 4))
        close_passed_fds(anc)
        if not data:
            raise ConnectionError("wbrokerd closed a control-plane connection")
        self.buf += data
        if len(self.buf) < HEADER.size:
            return None
        length = decode_header(bytes(self.buf[:HEADER.size]))
        if len(self.buf) < HEADER.size + length:
            return None
        reply = json.loads(self.buf[HEADER.size:HEADER.size + length])
        del self.buf[:HEADER.size + length]
        op, rid = self.pending
        if reply.get("id") != rid or not reply.get("ok"):
            raise RuntimeError(f"{op} failed: {json.dumps(reply)[:300]}")
        self.pending = None
        reply["_op"] = op
        return reply


def run(conns, repo, commit, seconds):
    """Attach/release round trips on every connection for `seconds`."""
    rng = random.Random(1)
    sel = selectors.DefaultSelector()
    attach = {"op": "attach", "model": repo, "revision": commit}
    start = time.monotonic()
    deadline = start + seconds
    pairs, seen, sample = 0, 0, []
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
        c.t0 = time.monotonic()
        c.call(dict(attach))
    active = len(conns)
    while active:
        if time.monotonic() > deadline + 60:
            raise RuntimeError(f"{active} connections still wait for wbrokerd 60 s after the window")
        for key, _ in sel.select(1.0):
            c = key.data
            reply = c.read_available()
            if reply is None:
                continue
            if reply["_op"] == "attach":
                c.call({"op": "release", "lease": reply["lease"]})
                continue
            now = time.monotonic()
            if now > deadline:
                active -= 1  # the window is over: this connection stops
                continue
            pairs += 1
            seen += 1
            ms = (now - c.t0) * 1e3
            if len(sample) < SAMPLE:
                sample.append(ms)
            elif (j := rng.randrange(seen)) < SAMPLE:
                sample[j] = ms
            c.t0 = now
            c.call(dict(attach))
    return pairs, seconds, sample


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--clients", type=int, required=True, help="connections held by this process")
    ap.add_argument("--rendezvous", required=True)
    args = ap.parse_args()
    die_with_parent()
    link = Link(args.rendezvous)
    try:
        # Each connection is an fd, and each attach reply brings one more for
        # a moment: make sure the soft limit allows them.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = args.clients + 64
        if soft != resource.RLIM_INFINITY and soft < want:
            if hard != resource.RLIM_INFINITY and hard < want:
                raise RuntimeError(f"RLIMIT_NOFILE hard limit {hard} < {want} fds for {args.clients} clients")
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        conns = [Conn(args.socket, f"compare-cp-{os.getpid()}-{i}") for i in range(args.clients)]
        link.send({"type": "ready", "pid": os.getpid(), "connections": len(conns)})
        msg = link.recv()
        while msg["type"] != "go":
            msg = link.recv()
        pairs, seconds, sample = run(conns, args.repo, args.commit, msg["seconds"])
        link.send({"type": "result", "pid": os.getpid(), "pairs": pairs, "seconds": seconds,
                   "latency_ms": sample, "connections": len(conns)})
        while link.recv()["type"] != "exit":
            pass
        return 0
    except BaseException as e:
        link.send({"type": "error", "pid": os.getpid(), "message": f"{type(e).__name__}: {e}"})
        raise


if __name__ == "__main__":
    sys.exit(main())

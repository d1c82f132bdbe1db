"""The wire protocol: framed JSON over a Unix socket, fds by SCM_RIGHTS.

A frame is a 12-byte header ("WBRK", u16 version, u16 flags = 0, u32 body
length, little-endian) followed by a JSON object. File descriptors travel
with the first byte of a frame's header; the body says how many ("fds": N).
Everything that comes from the broker is validated before it is used.
"""
import array
import itertools
import json
import os
import select
import socket
import struct
import threading

from .errors import BrokerUnavailable, ConnectionLost, ProtocolError, broker_error

MAGIC = b"WBRK"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<4sHHI")
MAX_FRAME_BYTES = 16 << 20  # the broker's default bound; a 100k-tensor manifest fits
MAX_FDS_PER_FRAME = 8
DEFAULT_SOCKET = "/run/wbroker/wbroker.sock"


def default_socket_path():
    """$WBROKER_SOCKET, else /run/wbroker/wbroker.sock (as the C++ client)."""
    return os.environ.get("WBROKER_SOCKET") or DEFAULT_SOCKET


def encode_frame(message):
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"request of {len(body)} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, 0, len(body)) + body


def decode_header(data):
    magic, version, flags, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r} (is this a wbroker socket?)")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"broker speaks protocol {version}, this client {PROTOCOL_VERSION}")
    if flags != 0:
        raise ProtocolError(f"frame flags {flags:#x} must be 0")
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    return length


def _close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _fds_from_ancdata(ancdata, flags):
    """The fds of one recvmsg, after checking level, type and length; a bad
    control message closes whatever fds came with it and raises."""
    fds = []
    problem = None
    for level, kind, data in ancdata:
        if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
            problem = f"unexpected control message level={level} type={kind}"
            continue
        usable = len(data) - len(data) % 4
        if usable != len(data):
            problem = f"SCM_RIGHTS payload of {len(data)} bytes is not a whole number of fds"
        fds.extend(array.array("i", data[:usable]))
    if flags & socket.MSG_CTRUNC:
        problem = "control data truncated (more fds than a frame may carry)"
    if problem:
        _close_all(fds)
        raise ProtocolError(problem)
    return fds


class Connection:
    """One socket to the broker: request/reply by id, one request at a time."""

    def __init__(self, path, timeout=None):
        self.path = path
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except FileNotFoundError:
            sock.close()
            raise BrokerUnavailable(path, "no such socket") from None
        except ConnectionRefusedError:
            sock.close()
            raise BrokerUnavailable(path, "connection refused (stale socket, broker not running)") from None
        except PermissionError as e:
            sock.close()
            raise BrokerUnavailable(path, f"permission denied ({e.strerror}; join the socket's group)") from None
        except OSError as e:
            sock.close()
            raise BrokerUnavailable(path, e.strerror or str(e)) from None
        self._sock = sock
        # Called with each unsolicited event frame (a dict with "event").
        self.on_event = None

    @property
    def closed(self):
        return self._sock is None

    def close(self):
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def fileno(self):
        return -1 if self._sock is None else self._sock.fileno()

    def call(self, request, fds=()):
        """Sends `request` (a dict with "op") and returns (reply, fds). A reply
        with ok=false raises the broker's error; received fds are the caller's.
        `fds` (borrowed) ride with the first byte; the body says how many."""
        with self._lock:
            if self._sock is None:
                raise ConnectionLost(f"connection to {self.path} is closed")
            rid = next(self._ids)
            msg = dict(request, id=rid)
            if fds:
                msg["fds"] = len(fds)
            try:
                data = encode_frame(msg)
                if fds:
                    sent = socket.send_fds(self._sock, [data], list(fds))
                    self._sock.sendall(data[sent:])
                else:
                    self._sock.sendall(data)
                reply, fds = self._read_frame()
                # Events may come before the reply: hand them on, keep reading.
                while "event" in reply and "ok" not in reply:
                    _close_all(fds)
                    self._event(reply)
                    reply, fds = self._read_frame()
            except (BrokenPipeError, ConnectionResetError, ConnectionLost) as e:
                self.close()
                raise ConnectionLost(f"wbrokerd at {self.path} closed the connection "
                                     f"during {request.get('op')!r}: {e}") from None
            except socket.timeout:
                self.close()
                raise ConnectionLost(f"no reply from wbrokerd at {self.path} to "
                                     f"{request.get('op')!r} within the timeout") from None
            except ProtocolError:
                self.close()
                raise
        if reply.get("id") != rid:
            _close_all(fds)
            self.close()
            raise ProtocolError(f"reply id {reply.get('id')!r} does not match request {rid}")
        if not reply.get("ok", False):
            _close_all(fds)
            err = reply.get("error") or {}
            raise broker_error(err.get("code", "internal"), err.get("message", "(no message)"),
                               request.get("op"))
        return reply, fds

    def poll_events(self):
        """Reads the frames already waiting without blocking and hands the
        events on. Returns at once when another thread is in a call."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            while self._sock is not None:
                readable, _, _ = select.select([self._sock], [], [], 0)
                if not readable:
                    return
                try:
                    frame, fds = self._read_frame()
                except (ConnectionLost, ConnectionResetError, OSError):
                    self.close()
                    raise ConnectionLost(f"wbrokerd at {self.path} closed the connection") from None
                _close_all(fds)
                if "event" in frame:
                    self._event(frame)
        finally:
            self._lock.release()

    def _event(self, frame):
        if self.on_event is not None:
            self.on_event(frame)

    def _read_frame(self):
        fds = []
        try:
            header = bytearray()
            while len(header) < HEADER.size:
                data, anc, flags, _ = self._sock.recvmsg(
                    HEADER.size - len(header), socket.CMSG_SPACE(MAX_FDS_PER_FRAME * 4),
                    socket.MSG_CMSG_CLOEXEC)
                got = _fds_from_ancdata(anc, flags)
                if got and header:
                    _close_all(got)
                    raise ProtocolError("fds arrived in the middle of a frame header")
                fds.extend(got)
                if not data:
                    raise ConnectionLost("end of stream")
                header += data
            length = decode_header(bytes(header))
            body = bytearray()
            while len(body) < length:
                chunk = self._sock.recv(min(length - len(body), 1 << 20))
                if not chunk:
                    raise ConnectionLost("end of stream inside a frame")
                body += chunk
            try:
                reply = json.loads(body)
            except ValueError as e:
                raise ProtocolError(f"frame body is not JSON: {e}") from None
            if not isinstance(reply, dict):
                raise ProtocolError("frame body is not a JSON object")
            want = reply.get("fds", 0)
            if not isinstance(want, int) or want != len(fds):
                raise ProtocolError(f"frame announces {want!r} fds but carried {len(fds)}")
            return reply, fds
        except BaseException:
            _close_all(fds)
            raise

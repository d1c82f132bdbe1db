"""Client: one connection to wbrokerd, attach/release, status and admin verbs.

  with wbroker.connect() as client:
      lease = client.attach("org/name", revision="3f6b9d2")
      w = lease.tensors["model.embed_tokens.weight"]   # zero-copy, read-only

Leases end with release(), with close(), or when the process exits (the
broker sees the connection close). If the broker restarts or crashes, the
mappings stay valid, and the next call (or recover()) reconnects with
exponential backoff and re-registers every live lease with the new broker
("reattach": for host arenas the memfd is handed back, so a broker without
systemd's fd store adopts it instead of loading the model again).
"""
import os
import sys
import time
import warnings
import weakref

from .dtypes import cast_name
from .errors import BrokerUnavailable, ConnectionLost
from .protocol import PROTOCOL_VERSION, Connection, _close_all, default_socket_path


class Client:
    """A connection to wbrokerd. Calls are serialized (one request at a time)."""

    def __init__(self, socket=None, name=None, timeout=None, reconnect=True, reconnect_attempts=10,
                 backoff_initial=0.05, backoff_max=2.0):
        self.socket_path = os.fspath(socket) if socket else default_socket_path()
        self.name = name or f"python:{os.path.basename(sys.argv[0]) or 'python'}:{os.getpid()}"
        self.timeout = timeout
        self.auto_reconnect = reconnect
        # Backoff: backoff_initial, doubling up to backoff_max, for at most
        # reconnect_attempts tries (about 12 s with the defaults).
        self.reconnect_attempts = max(1, int(reconnect_attempts))
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.broker = None
        self._conn = None
        self._leases = weakref.WeakSet()
        self._superseded = {}           # lease id -> "superseded" event, this connection
        self._superseded_callbacks = []
        self._connect()

    def _connect(self):
        conn = Connection(self.socket_path, self.timeout)
        conn.on_event = self._on_event
        self._superseded = {}
        try:
            reply, fds = conn.call({"op": "hello", "protocol": PROTOCOL_VERSION, "client": self.name,
                                    "events": ["superseded"]})
            _close_all(fds)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self.broker = reply.get("broker", {})

    def reconnect(self):
        """Drops the connection (ending its leases at the broker) and opens a new one."""
        if self._conn is not None:
            self._conn.close()
        for lease in list(self._leases):
            lease._released = True
            lease._close_fd()
        self._leases = weakref.WeakSet()
        self._connect()

    def recover(self):
        """Reconnects after the broker went away, with exponential backoff,
        and re-registers every live lease on the new connection. Returns the
        leases that could not be re-registered (they are marked released;
        their tensors stay valid). Raises BrokerUnavailable when every
        attempt failed."""
        if self._conn is not None:
            self._conn.close()
        delay = self.backoff_initial
        for attempt in range(self.reconnect_attempts):
            try:
                self._connect()
                break
            except BrokerUnavailable:
                if attempt + 1 == self.reconnect_attempts:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
        lost = []
        for lease in list(self._leases):
            if lease.released:
                continue
            try:
                lease._reregister()
            except ConnectionLost:
                raise
            except Exception as e:  # noqa: BLE001  (any refusal: the lease is lost, not the client)
                warnings.warn(f"wbroker: lease on {lease.model}@{lease.revision[:12]} could not be "
                              f"re-registered after reconnecting: {e}", RuntimeWarning, stacklevel=2)
                lease._released = True
                self._leases.discard(lease)
                lost.append(lease)
        return lost

    def _call(self, request):
        if self._conn is None or self._conn.closed:
            if not self.auto_reconnect:
                raise ConnectionLost(f"not connected to wbrokerd at {self.socket_path}")
            self.recover()
        try:
            return self._conn.call(request)
        except ConnectionLost:
            # The broker went away mid-call (restart, crash): reconnect,
            # re-register the leases, and send the request once more (attach
            # is idempotent; an attach's lease lived on the old connection).
            if not self.auto_reconnect:
                raise
            self.recover()
            return self._conn.call(request)

    def call(self, op, **fields):
        """Sends any request and returns the reply dict (fds are closed)."""
        reply, fds = self._call(dict(fields, op=op))
        _close_all(fds)
        return reply

    def attach(self, model, revision=None, device=None, dtype=None):
        """Attaches `model` ("org/name" or an absolute local dir) at `revision`
        (branch, tag, full or >= 7-hex short commit; None = main). Waits while
        the broker loads it. `dtype` asks for the broker's bf16/fp16/fp32 cast."""
        from .lease import Lease
        req = {"op": "attach", "model": os.fspath(model)}
        if revision:
            req["revision"] = revision
        if device:
            req["device"] = device
        cast = cast_name(dtype)
        if cast:
            req["dtype"] = cast
        reply, fds = self._call(req)
        try:
            reply["_request_model"], reply["_request_revision"] = req["model"], revision
            reply["_request_device"], reply["_request_dtype"] = device, cast
            lease = Lease(self, reply, fds)
        except BaseException:
            # The broker holds a lease for us; end it so nothing is leaked.
            if isinstance(reply.get("lease"), int) and not self._conn.closed:
                try:
                    self._conn.call({"op": "release", "lease": reply["lease"]})
                except Exception:
                    pass
            raise
        finally:
            # Mappings and imports hold their own references: the fds are done.
            _close_all(fds)
        self._leases.add(lease)
        return lease

    # --- events ---------------------------------------------------------
    def on_superseded(self, callback):
        """Calls `callback(lease, event)` when the broker replaces the revision
        a lease maps (`wbrokerctl load --replace`, a reloaded preload). It runs
        on the thread that reads the event, inside a client call or
        poll_events(): it must not call this client; note the lease and
        re-attach later (between requests). `event` holds model, revision,
        new_revision, device and release_first (release before re-attaching:
        the new revision waits for this memory)."""
        self._superseded_callbacks.append(callback)
        return callback

    def poll_events(self):
        """Reads events that have arrived, without waiting (every call reads
        them too). Lease.superseded polls by itself."""
        if self._conn is not None and not self._conn.closed:
            self._conn.poll_events()

    def _on_event(self, frame):
        if frame.get("event") != "superseded" or not isinstance(frame.get("lease"), int):
            return
        self._superseded[frame["lease"]] = frame
        lease = next((l for l in list(self._leases) if l.id == frame["lease"]), None)
        for cb in list(self._superseded_callbacks):
            cb(lease, frame)

    def _forget(self, lease):
        self._leases.discard(lease)

    def status(self):
        return self.call("status")

    def ping(self):
        self.call("ping")

    def load(self, model, revision=None, device=None, dtype=None, replace=False,
             allow_downtime=False):
        """Admin: loads a model without attaching it (root or the broker's uid).
        replace=True hot-swaps: the other loaded revisions of the model drain,
        their holders get a "superseded" event, new attaches get this one.
        allow_downtime=True (with replace) frees the old revision first when
        both do not fit."""
        fields = {"model": os.fspath(model)}
        if replace:
            fields["replace"] = True
        if allow_downtime:
            fields["allow_downtime"] = True
        if revision:
            fields["revision"] = revision
        if device:
            fields["device"] = device
        if cast_name(dtype):
            fields["dtype"] = cast_name(dtype)
        return self.call("load", **fields)

    def reload(self):
        """Admin: the broker re-reads its config and applies the preload list
        (changed revisions are hot-swapped). Returns {"preloads": [...]}."""
        return self.call("reload")

    def unload(self, model, revision=None, device=None, force=False):
        fields = {"model": os.fspath(model), "force": force}
        if revision:
            fields["revision"] = revision
        if device:
            fields["device"] = device
        return self.call("unload", **fields)

    def close(self):
        """Closes the connection; the broker ends every lease it carried."""
        for lease in list(self._leases):
            lease._released = True
            lease._close_fd()
        if self._conn is not None:
            self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<wbroker.Client {self.socket_path} broker={self.broker.get('version', '?')}>"


def connect(socket=None, name=None, timeout=None, reconnect=True, **backoff):
    """Connects to wbrokerd at `socket` (default $WBROKER_SOCKET, else
    /run/wbroker/wbroker.sock). Raises BrokerUnavailable naming the path.
    `backoff`: reconnect_attempts, backoff_initial, backoff_max (see Client)."""
    return Client(socket=socket, name=name, timeout=timeout, reconnect=reconnect, **backoff)

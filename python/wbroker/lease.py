"""A model attached from the broker: the mapping and its tensors.

The arena is mapped read-only (host memfd, sealed by the broker) or imported
into this process's CUDA context (GPU arenas). Tensors are views into that
mapping; they keep it alive, so a tensor stays valid after release() or after
the Lease object is gone. Nothing is copied.
"""
import mmap
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from .dtypes import SAFETENSORS_DTYPES, numpy_dtype, torch_dtype
from .errors import ConnectionLost, ProtocolError


class TensorInfo:
    """One manifest row: where a tensor lives in the arena."""

    __slots__ = ("name", "dtype", "shape", "offset", "nbytes")

    def __init__(self, name, dtype, shape, offset, nbytes):
        self.name, self.dtype, self.shape, self.offset, self.nbytes = name, dtype, shape, offset, nbytes

    def __repr__(self):
        return f"TensorInfo({self.name!r}, {self.dtype}, {self.shape}, offset={self.offset}, nbytes={self.nbytes})"


def parse_manifest(rows, arena_size):
    """Validates the broker's manifest: names unique, dtype known, shape and
    size consistent, every tensor inside the arena (no overflow games)."""
    if not isinstance(rows, list):
        raise ProtocolError("attach reply has no tensor manifest")
    out = {}
    for row in rows:
        if not (isinstance(row, list) and len(row) == 5):
            raise ProtocolError(f"manifest row {row!r} is not [name, dtype, shape, offset, nbytes]")
        name, dtype, shape, offset, nbytes = row
        if not isinstance(name, str) or name in out:
            raise ProtocolError(f"manifest names {name!r} twice or not as a string")
        if dtype not in SAFETENSORS_DTYPES:
            raise ProtocolError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offset, int) and isinstance(nbytes, int) and offset >= 0 and nbytes >= 0):
            raise ProtocolError(f"tensor {name!r}: bad offset/nbytes")
        elems = 1
        for d in shape:
            elems *= d
        bits = SAFETENSORS_DTYPES[dtype][0]
        if (elems * bits + 7) // 8 != nbytes:
            raise ProtocolError(f"tensor {name!r}: {nbytes} bytes do not hold {shape} x {dtype}")
        if offset + nbytes > arena_size:
            raise ProtocolError(f"tensor {name!r}: bytes {offset}..{offset + nbytes} lie outside "
                                f"the {arena_size}-byte arena")
        out[name] = TensorInfo(name, dtype, tuple(shape), offset, nbytes)
    return out


class _CudaArray:
    """__cuda_array_interface__ over a slice of a GPU arena, so torch.as_tensor
    wraps the device memory without a copy; holds the import alive."""

    def __init__(self, ptr, nbytes, owner):
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, True), "version": 3, "strides": None,
        }


class _TensorMap(Mapping):
    """Mapping[name, tensor], built lazily, in manifest order."""

    def __init__(self, lease, make):
        self._lease, self._make, self._cache = lease, make, {}

    def __getitem__(self, name):
        t = self._cache.get(name)
        if t is None:
            info = self._lease.manifest[name]  # KeyError names the tensor
            t = self._cache[name] = self._make(info)
        return t

    def __iter__(self):
        return iter(self._lease.manifest)

    def __len__(self):
        return len(self._lease.manifest)

    def __contains__(self, name):
        return name in self._lease.manifest


class Lease:
    """A model attached from the broker.

    `tensors` maps names to torch tensors (zero-copy, read-only memory),
    `arrays` to numpy arrays (non-writable; raw stand-ins for dtypes numpy
    lacks: see `dtypes`). release() ends the lease; closing the client or
    exiting the process does the same.
    """

    def __init__(self, client, reply, fds):
        self._client = client
        self._conn = client._conn
        self.id = reply["lease"]
        self.model = reply["model"]
        self.revision = reply["revision"]
        self.requested_revision = reply.get("requested_revision")
        self.snapshot = Path(reply["snapshot"]) if reply.get("snapshot") else None
        self.device = reply.get("device", "cpu")
        self.backend = reply.get("backend", "host")
        self.metadata = dict(reply.get("metadata") or {})
        self.requested = dict(model=reply.get("_request_model"), revision=reply.get("_request_revision"),
                              device=reply.get("_request_device"), dtype=reply.get("_request_dtype"))
        arena = reply.get("arena")
        if not isinstance(arena, dict) or not isinstance(arena.get("size"), int):
            raise ProtocolError("attach reply has no arena descriptor with a size")
        self.arena_kind = arena.get("kind")
        self.arena_size = arena["size"]
        self.manifest = parse_manifest(reply.get("tensors"), self.arena_size)
        self._released = False
        self._mmap = None
        self._device_import = None
        self._fd = -1  # host: a dup of the memfd, handed back by reattach after a broker restart
        self.broker_device = reply.get("device", "cpu")
        self.device_uuid = None
        if self.arena_kind == "memfd":
            if len(fds) != 1:
                raise ProtocolError(f"memfd arena needs exactly 1 fd, got {len(fds)}")
            st = os.fstat(fds[0])
            if st.st_size < self.arena_size:
                raise ProtocolError(f"memfd holds {st.st_size} bytes, the arena claims {self.arena_size}")
            # Read-only and shared: the broker sealed the memfd against writes,
            # so this mapping can never change the weights other workers see.
            self._mmap = mmap.mmap(fds[0], self.arena_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) \
                if self.arena_size else None
            self._fd = os.dup(fds[0])  # close-on-exec, like every dup in Python
            self.on_device = False
        elif self.arena_kind in ("cuda-vmm", "cuda-ipc"):
            from .cuda import DeviceImport
            self._device_import = DeviceImport(arena, fds)
            self.device_uuid = self._device_import.uuid
            # This process's numbering of the GPU (CUDA_VISIBLE_DEVICES may differ).
            self.device = f"cuda:{self._device_import.ordinal}"
            self.on_device = True
        else:
            raise ProtocolError(f"unknown arena kind {self.arena_kind!r}")
        self._torch_base = None
        self.tensors = _TensorMap(self, self._make_tensor)
        self.arrays = _TensorMap(self, self._make_array)

    # --- views ----------------------------------------------------------
    def dtypes(self):
        """name -> safetensors dtype name (the real type, also for raw stand-ins)."""
        return {n: i.dtype for n, i in self.manifest.items()}

    def _host_base(self):
        if self._torch_base is None:
            import torch
            if self._mmap is None:
                self._torch_base = torch.empty(0, dtype=torch.uint8)
            else:
                with warnings.catch_warnings():
                    # torch has no read-only tensors and warns about the
                    # non-writable buffer; the memory is PROT_READ, so a write
                    # faults (SIGSEGV) instead of corrupting other workers.
                    warnings.simplefilter("ignore", UserWarning)
                    self._torch_base = torch.frombuffer(self._mmap, dtype=torch.uint8)
        return self._torch_base

    def _make_tensor(self, info):
        import torch
        dt = torch_dtype(info.dtype)
        if self.on_device:
            raw = torch.as_tensor(_CudaArray(self._device_import.ptr + info.offset, info.nbytes,
                                             self._device_import), device=self.device)
        else:
            raw = self._host_base()[info.offset:info.offset + info.nbytes]
        if dt is None:
            return raw  # packed/unknown to this torch: raw bytes, see dtypes()
        return raw.view(dt).view(info.shape)

    def _make_array(self, info):
        import numpy as np
        if self.on_device:
            raise TypeError("numpy views exist only for host arenas; this lease is on " + self.device)
        dt, exact = numpy_dtype(info.dtype)
        if self._mmap is None or info.nbytes == 0:
            empty = np.empty(info.shape if exact else (0,), dtype=dt)
            empty.flags.writeable = False
            return empty
        arr = np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        if not exact and SAFETENSORS_DTYPES[info.dtype][0] % 8:
            return arr  # packed sub-byte: raw bytes
        return arr.view(dt).reshape(info.shape)

    # --- replacement ----------------------------------------------------
    @property
    def superseded(self):
        """The broker's "superseded" event (a dict with new_revision) once the
        revision this lease maps was replaced, else None. Reads pending events
        first; the mapping stays valid until release()."""
        if self._conn is self._client._conn and not self._released:
            try:
                self._client.poll_events()
            except ConnectionLost:
                pass
        if self._conn is not self._client._conn:
            return None
        return self._client._superseded.get(self.id)

    def renew(self):
        """A lease on the revision that replaced this one (the event's
        new_revision, so a lease pinned to a commit moves too; without an
        event, what the original attach request gets now); this lease is
        released afterwards, or first when the event says release_first."""
        event = self.superseded
        first = bool(event and event.get("release_first"))
        if first:
            self.release()
        revision = (event or {}).get("new_revision") or self.requested.get("revision")
        new = self._client.attach(self.requested.get("model") or self.model,
                                  revision=revision,
                                  device=self.requested.get("device"), dtype=self.requested.get("dtype"))
        if not first:
            self.release()
        return new

    # --- lifetime -------------------------------------------------------
    @property
    def released(self):
        return self._released

    def release(self):
        """Ends the lease at the broker. Tensors already made stay valid (they
        hold the mapping); the broker frees the arena once nobody holds it."""
        if self._released:
            return
        self._released = True
        self._close_fd()
        if self._conn is not None and not self._conn.closed and self._conn is self._client._conn:
            try:
                self._conn.call({"op": "release", "lease": self.id})
            except ConnectionLost:
                pass  # the broker dropped the connection: the lease ended with it
        self._client._forget(self)

    def _reregister(self):
        """Re-registers this lease with a restarted broker on the client's new
        connection (verb "reattach"): same model, full commit, dtype and
        device; a host lease hands back its memfd, which the broker checks
        (and adopts when it has not loaded the model). The mapping is kept."""
        req = {"op": "reattach", "model": self.model, "revision": self.revision,
               "device": f"cuda:{self.device_uuid}" if self.device_uuid else self.broker_device}
        if self.requested.get("dtype"):
            req["dtype"] = self.requested["dtype"]
        reply, fds = self._client._conn.call(req, fds=[self._fd] if self._fd >= 0 else [])
        from .protocol import _close_all
        _close_all(fds)
        self.id = reply["lease"]
        self._conn = self._client._conn
        return reply

    def _close_fd(self):
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self):
        self._close_fd()

    def reattach(self):
        """A new lease on the same model and full commit, reconnecting if the
        broker restarted. This lease is released first."""
        self.release()
        return self._client.attach(self.model, revision=self.revision,
                                   device=self.requested.get("device"), dtype=self.requested.get("dtype"))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __repr__(self):
        return (f"<wbroker.Lease {self.model}@{self.revision[:12]} {len(self.manifest)} tensors "
                f"{self.arena_size} bytes on {self.device} ({self.backend})"
                f"{' released' if self._released else ''}>")

"""GPU arenas: import cuda-vmm fds and cuda-ipc handles with the CUDA driver API.

Reached through ctypes on libcuda.so.1 (or $WBROKER_LIBCUDA, as the C++
client) and cuGetProcAddress, so no CUDA Python package is needed. The
memory is mapped in the device's primary context, the one PyTorch uses, so
the pointers are valid for torch tensors on that device.
"""
import ctypes
import os

from .errors import ProtocolError, WbrokerError

CUDA_VERSION = 12000
_CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1
_CU_MEM_ALLOCATION_TYPE_PINNED = 1
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_MEM_ACCESS_FLAGS_PROT_READ = 1
_CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1


class CudaError(WbrokerError):
    """A CUDA driver call failed."""


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int),
                ("location", _Location), ("win32HandleMetaData", ctypes.c_void_p),
                ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class _Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]


_SIGNATURES = {
    "cuInit": [ctypes.c_uint],
    "cuDeviceGetCount": [ctypes.POINTER(ctypes.c_int)],
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuDeviceGetUuid": [ctypes.POINTER(_Uuid), ctypes.c_int],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
    "cuDevicePrimaryCtxRelease": [ctypes.c_int],
    "cuCtxPushCurrent": [ctypes.c_void_p],
    "cuCtxPopCurrent": [ctypes.POINTER(ctypes.c_void_p)],
    "cuMemGetAllocationGranularity": [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(_AllocProp), ctypes.c_int],
    "cuMemImportFromShareableHandle": [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_int],
    "cuMemAddressReserve": [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_uint64],
    "cuMemAddressFree": [ctypes.c_uint64, ctypes.c_size_t],
    "cuMemMap": [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_uint64],
    "cuMemUnmap": [ctypes.c_uint64, ctypes.c_size_t],
    "cuMemSetAccess": [ctypes.c_uint64, ctypes.c_size_t, ctypes.POINTER(_AccessDesc), ctypes.c_size_t],
    "cuMemRelease": [ctypes.c_uint64],
    "cuIpcOpenMemHandle": [ctypes.POINTER(ctypes.c_uint64), _IpcHandle, ctypes.c_uint],
    "cuIpcCloseMemHandle": [ctypes.c_uint64],
    "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
}


class Driver:
    """The CUDA driver's entry points, resolved once per process."""

    _loaded = None

    @classmethod
    def get(cls):
        if cls._loaded is None:
            cls._loaded = cls()
        return cls._loaded

    def __init__(self):
        path = os.environ.get("WBROKER_LIBCUDA") or "libcuda.so.1"
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise CudaError(f"cannot load the CUDA driver {path}: {e}") from None
        get = lib.cuGetProcAddress_v2 if hasattr(lib, "cuGetProcAddress_v2") else lib.cuGetProcAddress
        get.restype = ctypes.c_int
        self._fns = {}
        for name, args in _SIGNATURES.items():
            pfn = ctypes.c_void_p()
            status = ctypes.c_int(0)
            # cuGetProcAddress picks the ABI version of each entry point
            # (e.g. cuDeviceGetUuid_v2), as the C++ client does.
            rc = get(name.encode(), ctypes.byref(pfn), ctypes.c_int(CUDA_VERSION), ctypes.c_uint64(0),
                     ctypes.byref(status))
            if rc != 0 or not pfn.value:
                continue
            self._fns[name] = ctypes.CFUNCTYPE(ctypes.c_int, *args)(pfn.value)
        for needed in ("cuInit", "cuDeviceGetCount", "cuDeviceGetUuid", "cuDevicePrimaryCtxRetain"):
            if needed not in self._fns:
                raise CudaError(f"the CUDA driver {path} lacks {needed}")
        self.call("cuInit", 0)

    def call(self, name, *args):
        fn = self._fns.get(name)
        if fn is None:
            raise CudaError(f"the CUDA driver lacks {name}")
        rc = fn(*args)
        if rc != 0:
            msg = ctypes.c_char_p()
            text = ""
            if "cuGetErrorString" in self._fns and self._fns["cuGetErrorString"](rc, ctypes.byref(msg)) == 0 and msg.value:
                text = msg.value.decode(errors="replace")
            raise CudaError(f"{name} failed: CUDA error {rc} {text}".strip())

    def ordinal_of_uuid(self, uuid):
        """This process's ordinal of the GPU with `uuid` ("GPU-xxxxxxxx-...")."""
        count = ctypes.c_int()
        self.call("cuDeviceGetCount", ctypes.byref(count))
        seen = []
        for i in range(count.value):
            dev = ctypes.c_int()
            self.call("cuDeviceGet", ctypes.byref(dev), i)
            u = _Uuid()
            self.call("cuDeviceGetUuid", ctypes.byref(u), dev)
            b = bytes(u.bytes).hex()
            text = f"GPU-{b[0:8]}-{b[8:12]}-{b[12:16]}-{b[16:20]}-{b[20:32]}"
            seen.append(text)
            if text == uuid:
                return i
        raise CudaError(f"GPU {uuid} is not visible to this process (it sees {seen or 'no GPU'}; "
                        f"check CUDA_VISIBLE_DEVICES)")


class _Context:
    """The device's primary context, retained for the import's lifetime."""

    def __init__(self, driver, ordinal):
        self.driver, self.ordinal = driver, ordinal
        self.ctx = ctypes.c_void_p()
        driver.call("cuDevicePrimaryCtxRetain", ctypes.byref(self.ctx), ordinal)

    def __enter__(self):
        self.driver.call("cuCtxPushCurrent", self.ctx)
        return self

    def __exit__(self, *exc):
        popped = ctypes.c_void_p()
        self.driver.call("cuCtxPopCurrent", ctypes.byref(popped))

    def release(self):
        if self.ctx is not None:
            self.ctx = None
            self.driver.call("cuDevicePrimaryCtxRelease", self.ordinal)


class DeviceImport:
    """A broker GPU arena mapped into this process; `ptr` is its device address.
    close() (or garbage collection) unmaps it."""

    def __init__(self, descriptor, fds):
        kind = descriptor.get("kind")
        uuid = descriptor.get("device_uuid")
        size = descriptor.get("size")
        if not isinstance(uuid, str) or not uuid:
            raise ProtocolError(f"{kind} arena descriptor without a device_uuid")
        if not isinstance(size, int) or size <= 0:
            raise ProtocolError(f"{kind} arena descriptor with bad size {size!r}")
        self.kind, self.uuid, self.size = kind, uuid, size
        self.ptr = 0
        self._ctx = None
        self._handle = None
        self._reserved = False
        self._mapped = False
        self._ipc = False
        self.driver = Driver.get()
        self.ordinal = self.driver.ordinal_of_uuid(uuid)
        try:
            self._ctx = _Context(self.driver, self.ordinal)
            with self._ctx:
                if kind == "cuda-vmm":
                    self._import_vmm(fds)
                elif kind == "cuda-ipc":
                    self._import_ipc(descriptor, fds)
                else:
                    raise ProtocolError(f"arena kind {kind!r} is not a GPU arena")
        except BaseException:
            self.close()
            raise

    def _import_vmm(self, fds):
        d = self.driver
        if len(fds) != 1:
            raise ProtocolError(f"cuda-vmm arena needs exactly 1 fd, got {len(fds)}")
        prop = _AllocProp(type=_CU_MEM_ALLOCATION_TYPE_PINNED,
                          requestedHandleTypes=_CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                          location=_Location(_CU_MEM_LOCATION_TYPE_DEVICE, self.ordinal))
        gran = ctypes.c_size_t()
        d.call("cuMemGetAllocationGranularity", ctypes.byref(gran), ctypes.byref(prop), 0)
        if gran.value == 0 or self.size % gran.value:
            raise ProtocolError(f"cuda-vmm arena size {self.size} is not a multiple of the "
                                f"allocation granularity {gran.value}")
        handle = ctypes.c_uint64()
        # The fd is passed by value (cast to a pointer-sized integer), as the
        # driver API wants for POSIX fds.
        d.call("cuMemImportFromShareableHandle", ctypes.byref(handle), ctypes.c_void_p(fds[0]),
               _CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR)
        self._handle = handle.value
        ptr = ctypes.c_uint64()
        d.call("cuMemAddressReserve", ctypes.byref(ptr), self.size, gran.value, 0, 0)
        self.ptr, self._reserved = ptr.value, True
        d.call("cuMemMap", self.ptr, self.size, 0, self._handle, 0)
        self._mapped = True
        # Read-only: a stray write into the shared weights faults in this
        # process instead of corrupting every other worker's model.
        access = _AccessDesc(_Location(_CU_MEM_LOCATION_TYPE_DEVICE, self.ordinal),
                             _CU_MEM_ACCESS_FLAGS_PROT_READ)
        d.call("cuMemSetAccess", self.ptr, self.size, ctypes.byref(access), 1)
        # The mapping holds the allocation now; drop our handle.
        d.call("cuMemRelease", self._handle)
        self._handle = None

    def _import_ipc(self, descriptor, fds):
        if fds:
            raise ProtocolError(f"cuda-ipc arena carries no fds, got {len(fds)}")
        text = descriptor.get("ipc_handle")
        try:
            raw = bytes.fromhex(text)
        except (TypeError, ValueError):
            raise ProtocolError("cuda-ipc arena without a hexadecimal ipc_handle") from None
        if len(raw) != 64:
            raise ProtocolError(f"ipc_handle has {len(raw)} bytes, expected 64")
        ptr = ctypes.c_uint64()
        # from_buffer_copy keeps every byte (a c_char field would stop at a NUL).
        self.driver.call("cuIpcOpenMemHandle", ctypes.byref(ptr), _IpcHandle.from_buffer_copy(raw),
                         _CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)
        self.ptr, self._ipc = ptr.value, True

    def close(self):
        d = self.driver
        try:
            if self._ctx is not None and self._ctx.ctx is not None:
                with self._ctx:
                    if self._ipc:
                        d.call("cuIpcCloseMemHandle", self.ptr)
                    if self._mapped:
                        d.call("cuMemUnmap", self.ptr, self.size)
                    if self._reserved:
                        d.call("cuMemAddressFree", self.ptr, self.size)
                    if self._handle is not None:
                        d.call("cuMemRelease", self._handle)
                self._ctx.release()
        finally:
            self._ipc = self._mapped = self._reserved = False
            self._handle = None
            self.ptr = 0

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

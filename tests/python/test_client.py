"""wbroker Python client: protocol, host arenas, dtypes, errors, reconnect."""
import ctypes
import json
import os
import signal
import socket as socketlib
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import wbroker
from conftest import FAKE_CUDA, REPO


def snapshot_tensors(snapshot):
    out = {}
    for f in sorted(os.listdir(snapshot)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(snapshot, f), "pt") as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k)
    return out


def raw(t):
    """A tensor's bytes (NaN-safe equality)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_attach_gives_zero_copy_read_only_tensors(broker, hub):
    with wbroker.connect(broker.socket) as client:
        lease = client.attach("demo/tensors")
        assert len(lease.tensors) == 300
        assert len(lease.revision) == 40
        ref = snapshot_tensors(lease.snapshot)
        assert set(ref) == set(lease.tensors)
        base = lease.tensors._lease._host_base().data_ptr()
        for name, t in lease.tensors.items():
            assert t.dtype == ref[name].dtype and t.shape == ref[name].shape
            assert raw(t) == raw(ref[name]), name
            # A view into the one mapping: no copy.
            assert base <= t.data_ptr() < base + lease.arena_size
        # The mapping is the broker's memfd, read-only.
        maps = open("/proc/self/maps").read().splitlines()
        arena = [m for m in maps if "memfd:wbroker" in m]
        assert arena and all(m.split()[1].startswith("r--s") for m in arena)


def test_short_revision_and_branch_resolve_to_the_full_commit(broker, hub):
    commit = hub["qwen2"]["commit"]
    with wbroker.connect(broker.socket) as client:
        assert client.attach("tiny/qwen2", revision=commit[:7]).revision == commit
        assert client.attach("tiny/qwen2", revision="main").revision == commit
        assert client.attach("tiny/qwen2").revision == commit


def test_every_dtype_maps_to_torch_and_numpy(broker_factory, tmp_path):
    from make_tiny_model import install_dir
    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bool": torch.rand(7, generator=g) > 0.5,
        "uint8": torch.randint(0, 255, (5, 3), dtype=torch.uint8, generator=g),
        "int8": torch.randint(-128, 127, (9,), dtype=torch.int8, generator=g),
        "int16": torch.randint(-1000, 1000, (4, 4), dtype=torch.int16, generator=g),
        "uint16": torch.arange(10, dtype=torch.int32).to(torch.uint16),
        "int32": torch.randint(-10**6, 10**6, (6,), dtype=torch.int32, generator=g),
        "uint32": torch.arange(10, dtype=torch.int64).to(torch.uint32),
        "int64": torch.randint(-10**9, 10**9, (3, 2), dtype=torch.int64, generator=g),
        "uint64": torch.arange(4, dtype=torch.int64).to(torch.uint64),
        "float16": torch.randn(8, 2, generator=g).half(),
        "bfloat16": torch.randn(8, 2, generator=g).bfloat16(),
        "float32": torch.randn(2, 3, 4, generator=g),
        "float64": torch.randn(5, generator=g).double(),
        "float8_e4m3fn": torch.randn(16, generator=g).to(torch.float8_e4m3fn),
        "float8_e5m2": torch.randn(16, generator=g).to(torch.float8_e5m2),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.5),
    }
    save_file(tensors, str(src / "model.safetensors"))
    cache = tmp_path / "hub"
    install_dir(str(src), str(cache), "demo/dtypes")
    b = broker_factory(cache)
    with wbroker.connect(b.socket) as client:
        lease = client.attach("demo/dtypes")
        names = lease.dtypes()
        assert names["bfloat16"] == "BF16" and names["float8_e4m3fn"] == "F8_E4M3"
        for name, ref in tensors.items():
            t = lease.tensors[name]
            assert t.dtype == ref.dtype and t.shape == ref.shape, name
            assert raw(t) == raw(ref), name
            a = lease.arrays[name]
            assert not a.flags.writeable
            assert a.tobytes() == raw(ref), name
        # numpy has no bf16/float8: raw unsigned ints of the same width.
        assert lease.arrays["bfloat16"].dtype == np.uint16
        assert lease.arrays["float8_e5m2"].dtype == np.uint8
        assert lease.arrays["float16"].dtype == np.float16
        with pytest.raises(ValueError):
            lease.arrays["float32"][0, 0, 0] = 1.0


WRITER = r"""
import faulthandler, sys
faulthandler.enable()
import wbroker
c = wbroker.connect(sys.argv[1])
lease = c.attach("demo/tensors")
t = next(iter(lease.tensors.values()))
print("writing", flush=True)
t.add_(1)
print("wrote", flush=True)
"""


def test_writing_a_shared_tensor_fails_loudly_and_others_see_no_change(broker, hub):
    with wbroker.connect(broker.socket) as client:
        lease = client.attach("demo/tensors")
        name, t = next(iter(lease.tensors.items()))
        before = raw(t)
        env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
        r = subprocess.run([sys.executable, "-c", WRITER, broker.socket], capture_output=True, text=True,
                           env=env, timeout=120)
        # The page is PROT_READ over a write-sealed memfd: the writer dies
        # with SIGSEGV (faulthandler names the line) instead of corrupting.
        assert r.returncode == -signal.SIGSEGV, (r.returncode, r.stdout, r.stderr)
        assert "writing" in r.stdout and "wrote" not in r.stdout
        assert "Segmentation fault" in r.stderr
        assert raw(t) == before
        assert raw(client.attach("demo/tensors").tensors[name]) == before


def test_release_and_close_end_leases(broker, hub):
    with wbroker.connect(broker.socket) as admin:
        with wbroker.connect(broker.socket, name="leaser") as client:
            lease = client.attach("demo/tensors")
            t = lease.tensors[next(iter(lease.tensors))]
            want = raw(t)
            status = admin.status()
            mine = [c for c in status["clients"] if c.get("client") == "leaser"]
            assert mine and mine[0]["leases"] == 1
            lease.release()
            assert lease.released
            status = admin.status()
            assert [c for c in status["clients"] if c.get("client") == "leaser"][0]["leases"] == 0
            # Tensors made before release stay readable: they hold the mapping.
            assert raw(t) == want
            client.attach("demo/tensors")
        status = admin.status()
        assert not [c for c in status["clients"] if c.get("client") == "leaser"]


def test_broker_not_running_names_the_socket(tmp_path):
    path = str(tmp_path / "nobody.sock")
    with pytest.raises(wbroker.BrokerUnavailable) as e:
        wbroker.connect(path)
    assert path in str(e.value) and "no such socket" in str(e.value)
    # A stale socket file with no listener.
    s = socketlib.socket(socketlib.AF_UNIX)
    s.bind(path)
    s.close()
    with pytest.raises(wbroker.BrokerUnavailable, match="refused"):
        wbroker.connect(path)


def test_default_socket_comes_from_the_environment(monkeypatch, broker):
    monkeypatch.setenv("WBROKER_SOCKET", broker.socket)
    with wbroker.connect() as client:
        assert client.socket_path == broker.socket
    monkeypatch.delenv("WBROKER_SOCKET")
    assert wbroker.default_socket_path() == "/run/wbroker/wbroker.sock"


def test_broker_restart_reconnects_and_reattaches(broker, hub):
    client = wbroker.connect(broker.socket)
    lease = client.attach("tiny/qwen2")
    name = "model.norm.weight"
    before = lease.tensors[name].clone()
    broker.restart()
    # The old mapping survives the broker (memfd pages live while mapped).
    assert torch.equal(lease.tensors[name], before)
    fresh = lease.reattach()
    assert fresh.revision == lease.revision
    assert torch.equal(fresh.tensors[name], before)
    assert client.status()["models"]
    client.close()


def test_model_that_fails_to_load_carries_the_brokers_message(broker_factory, tmp_path):
    from make_tiny_model import install_dir
    src = tmp_path / "bad"
    src.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    (src / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    cache = tmp_path / "hub"
    install_dir(str(src), str(cache), "demo/broken")
    b = broker_factory(cache)
    with wbroker.connect(b.socket) as client:
        with pytest.raises(wbroker.BrokerError) as e:
            client.attach("demo/broken")
        assert e.value.code == "corrupt_data", e.value
        assert "model.safetensors" in e.value.message
        with pytest.raises(wbroker.ModelNotFound, match="nobody/here"):
            client.attach("nobody/here")
        client.ping()  # the connection is still good


def fake_server(path, frames):
    """A socket that answers hello, then sends `frames` (bytes, fds) for the next request."""
    srv = socketlib.socket(socketlib.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def run():
        conn, _ = srv.accept()
        from wbroker.protocol import encode_frame, HEADER
        for data, fds in [(encode_frame({"ok": True, "id": 1, "broker": {}}), [])] + frames:
            hdr = conn.recv(HEADER.size)
            (n,) = struct.unpack("<I", hdr[8:12])
            while n:
                n -= len(conn.recv(n))
            socketlib.send_fds(conn, [data[:1]], fds) if fds else conn.sendall(data[:1])
            conn.sendall(data[1:])
        conn.recv(1)
        conn.close()
        srv.close()

    threading.Thread(target=run, daemon=True).start()


def open_fds():
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("case", ["bad_magic", "fd_count_mismatch", "not_object", "too_long"])
def test_hostile_broker_replies_are_refused_without_leaking_fds(tmp_path, case):
    from wbroker.protocol import encode_frame
    path = str(tmp_path / f"{case}.sock")
    r, w = os.pipe()
    frames = {
        "bad_magic": [(b"XXXX" + encode_frame({"ok": True, "id": 2})[4:], [])],
        "fd_count_mismatch": [(encode_frame({"ok": True, "id": 2, "fds": 0}), [r, w])],
        "not_object": [(encode_frame({"ok": True, "id": 2})[:8] + struct.pack("<I", 2) + b"[]", [])],
        "too_long": [(b"WBRK\x01\x00\x00\x00" + struct.pack("<I", 1 << 30), [])],
    }[case]
    fake_server(path, frames)
    client = wbroker.connect(path, reconnect=False)
    before = open_fds()
    with pytest.raises(wbroker.ProtocolError):
        client.status()
    os.close(r)
    os.close(w)
    # Whatever fds arrived were closed; only our pipe ends (closed above) differ.
    assert open_fds() <= before


@pytest.mark.skipif(not FAKE_CUDA.exists(), reason="built without the CUDA backends (no fake driver)")
@pytest.mark.parametrize("sharing", ["vmm", "ipc"])
def test_gpu_arenas_import_through_the_driver(broker_factory, hub, monkeypatch, sharing):
    # The fake driver keeps "device" memory in host memory shared between
    # processes, so the import path runs here and the bytes can be compared.
    env = {"WBROKER_LIBCUDA": str(FAKE_CUDA)}
    b = broker_factory(hub["cache"], ["--device", "cuda:0", "--cuda-sharing", sharing], env=env)
    monkeypatch.setenv("WBROKER_LIBCUDA", str(FAKE_CUDA))
    import wbroker.cuda as wcuda
    monkeypatch.setattr(wcuda.Driver, "_loaded", None)
    with wbroker.connect(b.socket) as client:
        lease = client.attach("tiny/qwen2")
        assert lease.on_device and lease.device == "cuda:0"
        assert lease.arena_kind == f"cuda-{sharing}" and lease.device_uuid.startswith("GPU-")
        ref = snapshot_tensors(lease.snapshot)
        imp = lease._device_import
        for name, info in lease.manifest.items():
            got = ctypes.string_at(imp.ptr + info.offset, info.nbytes)
            assert got == raw(ref[name]), name
        with pytest.raises(TypeError, match="host arenas"):
            lease.arrays[name]
        lease.release()
        imp.close()
        assert imp.ptr == 0


def test_hot_swap_tells_the_lease_and_renew_gets_the_new_revision(broker_factory, tmp_path):
    from make_tiny_model import install_dir
    revs, weights = [], []
    for seed in (1, 2):
        src = tmp_path / f"src{seed}"
        src.mkdir()
        w = {"w": torch.randn(64, 8, generator=torch.Generator().manual_seed(seed))}
        save_file(w, str(src / "model.safetensors"))
        weights.append(w["w"])
        revs.append(install_dir(str(src), str(tmp_path / "hub"), "demo/swap")["commit"])
    # refs/main stays on the first revision: the swap is the broker's doing.
    (tmp_path / "hub" / "models--demo--swap" / "refs" / "main").write_text(revs[0])
    b = broker_factory(tmp_path / "hub")
    with wbroker.connect(b.socket) as client, wbroker.connect(b.socket) as admin:
        seen = []
        client.on_superseded(lambda lease, event: seen.append((lease, event)))
        lease = client.attach("demo/swap")
        old_w = lease.tensors["w"]
        assert lease.revision == revs[0] and lease.superseded is None
        admin.load("demo/swap", revision=revs[1], replace=True)
        event = lease.superseded
        assert event is not None and event["new_revision"] == revs[1]
        assert event["revision"] == revs[0] and event["release_first"] is False
        assert len(seen) == 1 and seen[0][0] is lease
        new = lease.renew()
        assert lease.released and new.revision == revs[1] and new.superseded is None
        assert torch.equal(new.tensors["w"], weights[1])
        # Tensors taken before the swap keep the old mapping and bytes.
        assert torch.equal(old_w, weights[0])
        models = [(m["revision"], m["state"]) for m in admin.status()["models"]
                  if m["model"] == "demo/swap"]
        assert models == [(revs[1], "ready")]
    # A lease pinned to a (short) commit moves too: its old commit is refused now.
    b2 = broker_factory(tmp_path / "hub", sub="pinned")
    with wbroker.connect(b2.socket) as client, wbroker.connect(b2.socket) as admin:
        pinned = client.attach("demo/swap", revision=revs[0][:7])
        admin.load("demo/swap", revision=revs[1], replace=True)
        with pytest.raises(wbroker.WbrokerError):
            client.attach("demo/swap", revision=revs[0][:7])
        assert pinned.superseded is not None
        new = pinned.renew()
        assert pinned.released and new.revision == revs[1]
        assert torch.equal(new.tensors["w"], weights[1])

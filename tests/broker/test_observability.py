"""Issue 7, observability, end to end: a real wbrokerd with --metrics-listen on
a free port, wbrokerctl, and generated models in an HF cache.

- /metrics and `wbrokerctl metrics` are parsed with prometheus_client: families,
  types, HELP, labels and values (model bytes, leases, attaches, releases,
  errors by code, loads) follow what the clients did.
- `wbrokerctl --json load` prints one JSON event per line: progress with
  monotonic bytes_done and the right bytes_total, ending with "ready", or
  with "failed" naming the reason (and a non-zero exit).
- Subscribers that leave or stall mid-load do not disturb the broker.
- `wbrokerctl status --watch` repeats until SIGTERM and exits 0.
"""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "python"))
from conftest import BINARY_DIR, Broker  # noqa: E402  (the Python suites' broker helper)

import wbroker  # noqa: E402  (python/, put on sys.path by conftest)
from wbroker.protocol import decode_header, encode_frame  # noqa: E402

WBROKERCTL = BINARY_DIR / "tools" / "wbrokerctl"
BIG_SHARDS = 4


def make_model(cache, repo, size, tensors, shards=1):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "make_hf_cache.py"), "--cache", str(cache),
                          "--model", repo, "--size", size, "--tensors", str(tensors), "--shards", str(shards)],
                         check=True, capture_output=True, text=True)
    commit = out.stdout.strip()
    return {"repo": repo, "commit": commit,
            "snapshot": Path(cache) / ("models--" + repo.replace("/", "--")) / "snapshots" / commit}


def tensor_bytes(snapshot):
    """Sum of the tensors' sizes over the snapshot's safetensors files (their headers)."""
    total = 0
    for f in sorted(snapshot.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    models = {
        # 16 tensors of 512 KiB: multiples of the arena's 256-byte alignment,
        # so the arena holds exactly the tensor bytes.
        "small": make_model(cache, "demo/small", "8MiB", 16),
        # Big enough for a load that takes a few sampling intervals.
        "big": make_model(cache, "demo/big", "256MiB", 32, shards=BIG_SHARDS),
        "bad": make_model(cache, "demo/bad", "1MiB", 4),
    }
    # A truncated weight file: the header promises more data than there is.
    blob = (models["bad"]["snapshot"] / "model.safetensors").resolve()
    os.truncate(blob, 4096)
    models["cache"] = cache
    return models


@pytest.fixture(scope="module")
def broker(tmp_path_factory, hub):
    b = Broker(tmp_path_factory.mktemp("broker"), hub["cache"], args=["--metrics-listen", "127.0.0.1:0"])
    b.start()
    yield b
    b.stop()


def ctl(broker, *args, timeout=300):
    return subprocess.run([str(WBROKERCTL), "--socket", broker.socket, *args], capture_output=True,
                          text=True, timeout=timeout)


def status(broker):
    r = ctl(broker, "--json", "status")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def metrics_address(broker):
    address = status(broker)["broker"]["metrics_listen"]
    assert address.startswith("127.0.0.1:") and not address.endswith(":0"), address
    return address


def scrape_http(broker):
    with urllib.request.urlopen(f"http://{metrics_address(broker)}/metrics", timeout=30) as r:
        assert r.status == 200
        return r.read().decode()


def scrape_ctl(broker):
    r = ctl(broker, "metrics")
    assert r.returncode == 0, r.stderr
    return r.stdout


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams, family, sample=None, **labels):
    """The value of the sample of `family` whose labels include `labels`; None if absent."""
    f = fams.get(family)
    if f is None:
        return None
    name = sample or (family + "_total" if f.type == "counter" else family)
    for s in f.samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def eventually(check, timeout=60):
    """Retries `check` (which asserts) until it passes: for effects the broker
    applies asynchronously, like a lease ended by a closed connection."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def both(broker):
    """The families from /metrics and from `wbrokerctl metrics`."""
    return [families(scrape_http(broker)), families(scrape_ctl(broker))]


class Raw:
    """A protocol connection that sees every frame (events included)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(120)
        self.sock.connect(path)
        self.send({"op": "hello", "id": 0, "protocol": 1, "client": "pytest-raw"})
        hello = self.recv()
        assert hello["ok"], hello
        self.hello = hello

    def send(self, message):
        self.sock.sendall(encode_frame(message))

    def _exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return data

    def recv(self):
        length = decode_header(self._exact(12))
        return json.loads(self._exact(length))

    def close(self):
        self.sock.close()


def unload(broker, repo):
    ctl(broker, "unload", "--force", repo)


# --- metrics ---------------------------------------------------------------------

EXPECTED_TYPES = {
    "wbroker_build_info": "gauge",
    "wbroker_start_time_seconds": "gauge",
    "wbroker_uptime_seconds": "gauge",
    "wbroker_clients": "gauge",
    "wbroker_attaches": "counter",
    "wbroker_releases": "counter",
    "wbroker_model_bytes": "gauge",
    "wbroker_model_leases": "gauge",
    "wbroker_model_load_seconds": "gauge",
    "wbroker_model_load_bytes_per_second": "gauge",
    "wbroker_device_memory_total_bytes": "gauge",
    "wbroker_device_memory_free_bytes": "gauge",
    "wbroker_loads": "counter",
    "wbroker_load_bytes": "counter",
    "wbroker_load_seconds": "counter",
    "wbroker_load_duration_seconds": "histogram",
}


def test_metrics_follow_loads_attaches_and_releases(broker, hub):
    small = hub["small"]
    expected_bytes = tensor_bytes(small["snapshot"])
    assert expected_bytes == 8 << 20
    unload(broker, "demo/small")
    before = both(broker)
    r = ctl(broker, "load", "demo/small")
    assert r.returncode == 0, r.stderr

    clients = [wbroker.connect(broker.socket, name=f"obs-{i}") for i in range(3)]
    try:
        leases = [c.attach("demo/small") for c in clients]
        ids = dict(model="demo/small", revision=small["commit"], device="cpu", dtype="stored")
        for fams, old in zip(both(broker), before):
            for name, kind in EXPECTED_TYPES.items():
                assert name in fams, f"{name} missing"
                assert fams[name].type == kind, (name, fams[name].type)
                assert fams[name].documentation, f"{name} has no HELP"
            assert value(fams, "wbroker_build_info", version="0.1.0") == 1
            build = [s for s in fams["wbroker_build_info"].samples][0]
            assert build.labels["commit"] == status(broker)["broker"]["build"]
            assert value(fams, "wbroker_model_bytes", state="ready", **ids) == expected_bytes
            assert value(fams, "wbroker_model_leases", **ids) == 3
            assert value(fams, "wbroker_model_load_bytes_per_second", **ids) > 0
            assert value(fams, "wbroker_attaches") - (value(old, "wbroker_attaches") or 0) == 3
            assert value(fams, "wbroker_clients") >= 3
            assert value(fams, "wbroker_device_memory_total_bytes", device="cpu", backend="host") > 0
            assert value(fams, "wbroker_loads", result="ready") - value(old, "wbroker_loads", result="ready") == 1
            assert value(fams, "wbroker_load_duration_seconds", "wbroker_load_duration_seconds_count") >= 1
            assert value(fams, "wbroker_uptime_seconds") > 0
        # The same figures as status.
        row = [m for m in status(broker)["models"] if m["model"] == "demo/small"][0]
        assert row["bytes"] == expected_bytes and row["leases"] == 3

        mid = both(broker)
        leases[0].release()
        clients[1].close()  # a closed connection ends its lease too

        def released():
            for fams, old in zip(both(broker), mid):
                assert value(fams, "wbroker_model_leases", **ids) == 1
                assert value(fams, "wbroker_releases") - value(old, "wbroker_releases") == 2
                assert value(fams, "wbroker_attaches") == value(old, "wbroker_attaches")
        eventually(released)
    finally:
        for c in clients:
            c.close()


def test_errors_are_counted_by_code_and_failed_loads_show(broker, hub):
    before = both(broker)
    with wbroker.connect(broker.socket) as c:
        with pytest.raises(wbroker.BrokerError) as err:
            c.attach("demo/bad")
        assert err.value.code == "corrupt_data"
        with pytest.raises(wbroker.ModelNotFound):
            c.attach("demo/never-downloaded")
    for fams, old in zip(both(broker), before):
        assert value(fams, "wbroker_errors", code="corrupt_data") - (value(old, "wbroker_errors", code="corrupt_data") or 0) == 1
        assert value(fams, "wbroker_errors", code="not_found") - (value(old, "wbroker_errors", code="not_found") or 0) == 1
        assert value(fams, "wbroker_loads", result="failed") - value(old, "wbroker_loads", result="failed") == 1
        assert value(fams, "wbroker_model_bytes", model="demo/bad", state="failed") == 0


def test_http_and_verb_serve_the_same_families(broker):
    http, verb = both(broker)
    ours = lambda fams: {n: f.type for n, f in fams.items() if n.startswith("wbroker_")}  # noqa: E731
    assert ours(http) == ours(verb)
    # /metrics adds only the exposer's own families.
    assert all(n.startswith(("wbroker_", "exposer_")) for n in http), sorted(http)
    assert all(n.startswith("wbroker_") for n in verb), sorted(verb)


def test_a_taken_metrics_port_stops_the_start_with_the_reason(broker, tmp_path, hub):
    taken = metrics_address(broker)
    other = Broker(tmp_path, hub["cache"], args=["--metrics-listen", taken])
    with pytest.raises(RuntimeError) as err:
        other.start()
    assert taken in str(err.value)
    assert "cannot listen" in str(err.value)


# --- load progress -------------------------------------------------------------------

def json_lines(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


def test_json_load_streams_progress_then_ready(broker, hub):
    big = hub["big"]
    total = tensor_bytes(big["snapshot"])
    unload(broker, "demo/big")
    r = ctl(broker, "--json", "load", "demo/big")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    events = json_lines(r.stdout)
    kinds = [e["event"] for e in events]
    # At least the sample taken when the request arrived, then exactly one final event, last.
    assert kinds[0] == "progress" and kinds[-1] == "ready", kinds
    assert set(kinds[:-1]) == {"progress"}, kinds
    done = [e["bytes_done"] for e in events]
    assert done == sorted(done), done
    for e in events:
        assert e["model"] == "demo/big" and e["revision"] == big["commit"] and e["device"] == "cpu"
        assert "id" not in e
        for key in ("bytes_done", "bytes_total", "files_done", "files_total", "current_file",
                    "elapsed_seconds", "bytes_per_second"):
            assert key in e, (key, e)
        if e["bytes_total"]:  # 0 only before the broker opened the files
            assert e["bytes_total"] == total
            assert e["files_total"] == BIG_SHARDS
            assert 0 <= e["files_done"] <= BIG_SHARDS
    final = events[-1]
    assert final["bytes_done"] == final["bytes_total"] == total
    assert final["files_done"] == BIG_SHARDS and final["current_file"] == ""
    assert final["tensors"] == 32 and final["bytes"] == total
    assert final["bytes_per_second"] > 0 and final["load_seconds"] > 0


def test_json_load_of_a_ready_model_is_one_ready_line(broker, hub):
    assert ctl(broker, "load", "demo/small").returncode == 0
    r = ctl(broker, "--json", "load", "demo/small")
    assert r.returncode == 0, r.stderr
    events = json_lines(r.stdout)
    assert [e["event"] for e in events] == ["ready"]
    assert events[0]["bytes_done"] == events[0]["bytes_total"] == 8 << 20


def test_json_load_of_a_malformed_model_ends_with_failed(broker, hub):
    r = ctl(broker, "--json", "load", "demo/bad")
    assert r.returncode != 0
    events = json_lines(r.stdout)
    assert events[-1]["event"] == "failed"
    assert [e["event"] for e in events[:-1]] == ["progress"] * (len(events) - 1)
    error = events[-1]["error"]
    assert error["code"] == "corrupt_data"
    assert "model.safetensors" in error["message"] and "truncated" in error["message"]
    # Exit status and message as without --json.
    assert r.stderr.startswith("wbrokerctl: load demo/bad failed: ") and "truncated" in r.stderr
    plain = ctl(broker, "load", "demo/bad")
    assert plain.returncode == r.returncode and plain.stdout == ""
    assert plain.stderr == r.stderr


def test_json_load_of_an_unknown_model_ends_with_failed(broker):
    r = ctl(broker, "--json", "load", "demo/never-downloaded")
    assert r.returncode != 0
    events = json_lines(r.stdout)
    assert len(events) == 1 and events[0]["event"] == "failed"
    assert events[0]["error"]["code"] == "not_found"
    assert "demo/never-downloaded" in r.stderr


def test_plain_load_without_a_terminal_prints_one_line(broker, hub):
    unload(broker, "demo/big")
    r = ctl(broker, "load", "demo/big")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no progress bar: stderr is not a terminal
    assert r.stdout.splitlines() == [r.stdout.strip()]
    assert r.stdout.startswith(f"loaded demo/big @ {hub['big']['commit']}: 32 tensors, 256.00 MiB in ")


def test_events_only_for_who_asks_and_fields_are_checked(broker):
    raw = Raw(broker.socket)
    try:
        assert "load_progress" in raw.hello["features"] and "metrics" in raw.hello["features"]
        raw.send({"op": "load", "id": 7, "model": "demo/small"})
        reply = raw.recv()
        assert reply["ok"] and reply["id"] == 7 and "event" not in reply
        raw.send({"op": "load", "id": 8, "model": "demo/small", "progress": "yes"})
        reply = raw.recv()
        assert not reply["ok"] and reply["error"]["code"] == "invalid_argument"
        assert "\"progress\"" in reply["error"]["message"]
        raw.send({"op": "load", "id": 9, "model": "demo/small", "progress": True, "progress_interval_ms": 5})
        reply = raw.recv()
        assert not reply["ok"] and "progress_interval_ms" in reply["error"]["message"]
        raw.send({"op": "load", "id": 10, "model": "demo/small", "progress": True})
        ready, reply = raw.recv(), raw.recv()
        assert ready["event"] == "ready" and ready["id"] == 10 and "ok" not in ready
        assert reply["ok"] and reply["id"] == 10
    finally:
        raw.close()


def test_a_subscriber_that_leaves_mid_load_does_not_disturb_the_broker(broker, hub):
    unload(broker, "demo/big")
    raw = Raw(broker.socket)
    raw.send({"op": "load", "id": 1, "model": "demo/big", "progress": True, "progress_interval_ms": 50})
    first = raw.recv()
    assert first["event"] == "progress"
    raw.close()  # gone while the model loads
    r = ctl(broker, "--json", "load", "demo/big")  # joins the running load, or finds it ready
    assert r.returncode == 0, r.stderr
    assert json_lines(r.stdout)[-1]["event"] == "ready"
    row = [m for m in status(broker)["models"] if m["model"] == "demo/big"][0]
    assert row["state"] == "ready"
    assert broker.proc.poll() is None


def test_a_stalled_subscriber_does_not_block_anyone(broker, hub):
    """A client that asks for events and then does not read (while its
    socket is full of unread replies) must not hold up other clients, and
    still gets the final event right before its reply."""
    unload(broker, "demo/big")
    raw = Raw(broker.socket)
    raw.send({"op": "load", "id": "L", "model": "demo/big", "progress": True, "progress_interval_ms": 50})
    # Requests whose replies it will not read for a while: far more reply bytes
    # than a socket buffer holds. One write, so that the requests themselves fit.
    pings = 500
    raw.sock.sendall(b"".join(encode_frame({"op": "status", "id": i}) for i in range(pings)))
    try:
        deadline = time.monotonic() + 300
        state = None
        while state != "ready":  # other clients are served meanwhile
            assert time.monotonic() < deadline, "demo/big never became ready"
            rows = [m for m in status(broker)["models"] if m["model"] == "demo/big"]
            state = rows[0]["state"] if rows else None
            time.sleep(0.05)
        frames = []
        statuses = 0
        while statuses < pings or not any(f.get("id") == "L" and "ok" in f for f in frames):
            f = raw.recv()
            if f.get("id") == "L":
                frames.append(f)
            else:
                statuses += 1
        kinds = [f.get("event", "reply") for f in frames]
        assert kinds[-2:] == ["ready", "reply"], kinds
        assert set(kinds[:-2]) <= {"progress"}, kinds
        assert frames[-1]["ok"]
    finally:
        raw.close()


# --- status --watch --------------------------------------------------------------------

def test_status_watch_repeats_until_sigterm(broker):
    proc = subprocess.Popen([str(WBROKERCTL), "--socket", broker.socket, "status", "--watch", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        headers = 0
        seen = []
        deadline = time.monotonic() + 120
        while headers < 2:
            assert time.monotonic() < deadline
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            seen.append(line)
            headers += line.startswith("Every 0.2s: wbrokerctl status")
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
        out = "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "\x1b[2J" not in out  # not a terminal: plain output, no screen clearing
    assert "MODEL" in out and "demo/small" in out

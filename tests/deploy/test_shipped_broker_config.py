"""deploy/kubernetes's broker config and probe commands, run for real: the
ConfigMap's wbrokerd.toml (only its socket and cache_dir moved into a temp
dir) is accepted by the wbrokerd built here and loads its pinned [[preload]]
from a hub cache of that layout; the DaemonSet's probe command and the
workers' wait-for-broker script succeed against it, and fail or wait when the
broker is gone. ctest passes the binaries in WBROKERD / WBROKERCTL."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib

import pytest

import k8s_manifests as km

WBROKERD = os.environ.get("WBROKERD")
WBROKERCTL = os.environ.get("WBROKERCTL")
pytestmark = pytest.mark.skipif(
    not (WBROKERD and WBROKERCTL),
    reason="WBROKERD/WBROKERCTL not set: run through ctest (deploy_shipped_broker_config)")
# Upper bound for the broker to come up and load a 1 MiB model: a wait, not an assertion.
READY_DEADLINE_S = 60


def _set_key(toml_text, key, value):
    """The config with one top-level string key's value replaced."""
    pattern = rf'^{key} = "[^"]*"$'
    assert len(re.findall(pattern, toml_text, re.M)) == 1, f"wbrokerd.toml: one `{key} = ...` line"
    return re.sub(pattern, f'{key} = "{value}"', toml_text, flags=re.M)


def _here(command, sock, shipped_sock):
    """A manifest's command with the image's wbrokerctl and socket mapped to this test's."""
    return [a.replace("/usr/bin/wbrokerctl", WBROKERCTL).replace(shipped_sock, sock)
            for a in command]


@pytest.fixture
def shipped(tmp_path):
    """(objects, shipped socket path, local socket path, broker Popen, log path)."""
    for binary in (WBROKERD, WBROKERCTL):
        assert os.access(binary, os.X_OK), f"{binary} is not an executable (build it first)"
    objects = km.raw_objects(km.DEPLOY / "base") + km.raw_objects(km.DEPLOY / "fastapi")
    text = km.find(objects, "ConfigMap", km.BROKER_CONFIGMAP)["data"][km.BROKER_CONFIG_KEY]
    cfg = tomllib.loads(text)
    cache = tmp_path / "hub"
    for p in cfg["preload"]:
        subprocess.run([sys.executable, str(km.REPO / "scripts" / "make_hf_cache.py"),
                        "--cache", str(cache), "--model", p["model"], "--commit", p["revision"],
                        "--size", "1MiB", "--tensors", "4"], check=True, capture_output=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o750)
    sock = str(run_dir / "wbroker.sock")
    config = tmp_path / "wbrokerd.toml"
    config.write_text(_set_key(_set_key(text, "socket", sock), "cache_dir", str(cache)))
    log = tmp_path / "wbrokerd.log"
    with open(log, "w") as out:
        broker = subprocess.Popen([WBROKERD, "--config", str(config)], stdout=out,
                                  stderr=subprocess.STDOUT)
    yield objects, cfg["socket"], sock, broker, log
    if broker.poll() is None:
        broker.kill()
        broker.wait()


def _status(sock):
    proc = subprocess.run([WBROKERCTL, "--socket", sock, "--json", "status"],
                          capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def test_shipped_config_preloads_its_pins_and_the_probes_follow_the_broker(shipped):
    objects, shipped_sock, sock, broker, log = shipped
    _, container = km.broker_container(objects)
    probe = _here(container["readinessProbe"]["exec"]["command"], sock, shipped_sock)
    pins = {(p["model"], p["revision"]) for p in km.broker_config(objects)["preload"]}

    deadline = time.monotonic() + READY_DEADLINE_S
    ready = set()
    while ready != pins and time.monotonic() < deadline and broker.poll() is None:
        status = _status(sock) or {"models": []}
        ready = {(m["model"], m["revision"]) for m in status["models"] if m["state"] == "ready"}
        time.sleep(0.2)
    assert broker.poll() is None, f"wbrokerd exited {broker.returncode}:\n{log.read_text()}"
    assert ready == pins, f"preloaded {ready}, expected {pins}:\n{log.read_text()}"

    # The DaemonSet's probe command passes ...
    assert subprocess.run(probe, capture_output=True).returncode == 0, probe
    # ... and so does every worker's wait-for-broker init container at once.
    for d in km.workloads(objects, "Deployment"):
        for init in km.pod_spec(d).get("initContainers") or []:
            cmd = _here(init["command"] + init["args"], sock, shipped_sock)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                                  env={**os.environ, "NODE_NAME": "test-node"})
            assert done.returncode == 0, (d["metadata"]["name"], init["name"], done.stdout)

    # SIGTERM (pod deletion): a clean exit that leaves no socket file behind.
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(timeout=60) == 0, log.read_text()
    assert not os.path.exists(sock)

    # Without a broker the probe fails (liveness restarts the pod) ...
    assert subprocess.run(probe, capture_output=True).returncode != 0
    # ... and the init containers keep waiting, saying for what.
    for d in km.workloads(objects, "Deployment"):
        for init in km.pod_spec(d).get("initContainers") or []:
            cmd = _here(init["command"] + init["args"], sock, shipped_sock)
            with pytest.raises(subprocess.TimeoutExpired) as waited:
                subprocess.run(cmd, capture_output=True, text=True, timeout=3,
                               env={**os.environ, "NODE_NAME": "test-node"})
            assert f"waiting for wbrokerd on node test-node at {sock}" in (
                waited.value.stdout or b"").decode(), waited.value.stdout


def _limits_table():
    """{TOML key: (flag, default)} from docs/operations.md's "Limits" table."""
    text = (km.REPO / "docs" / "operations.md").read_text()
    section = text.split("\n## Limits\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for m in re.finditer(r"^\| [^|]+ \| `(\w+)` \| `(--[\w-]+)` \| (\d+)", section, re.M):
        rows[m.group(1)] = (m.group(2), int(m.group(3)))
    return rows


@pytest.mark.parametrize("configmap", [km.DEPLOY / "base" / "wbrokerd-config.yaml",
                                       km.DEPLOY / "overlays" / "gpu" / "wbrokerd-config-gpu.yaml"])
def test_shipped_limits_are_the_documented_defaults_and_have_flags(configmap):
    [cm] = [d for d in km.load_documents(configmap) if d["kind"] == "ConfigMap"]
    cfg = tomllib.loads(cm["data"][km.BROKER_CONFIG_KEY])
    limits = _limits_table()
    assert {"max_connections", "max_frame_bytes", "hello_timeout_ms", "idle_timeout_ms",
            "max_leases_per_client"} <= limits.keys(), limits
    help_text = subprocess.run([WBROKERD, "--help"], capture_output=True, text=True,
                               check=True).stdout
    for key, (flag, default) in limits.items():
        assert key in cfg, f"{configmap.name}: {key} is not spelled out"
        assert cfg[key] == default, f"{configmap.name}: {key} = {cfg[key]}, documented {default}"
        assert flag in help_text, f"wbrokerd --help does not list {flag}"
        assert f"(default {default}" in help_text.split(flag, 1)[1].split("\n  -", 1)[0], (
            f"wbrokerd --help does not give {flag}'s default {default}")

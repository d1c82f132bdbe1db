"""deploy/kubernetes, checked offline: every manifest against the Kubernetes
schemas (kubernetes-validate, strict), the kustomizations' file lists, and
what the broker and its workers must agree on (socket, HF cache, uids,
pinned models, probes, hardening), in the raw base and in each rendered
overlay (kubectl kustomize, when kubectl is installed)."""
import json
import posixpath
import re

import kubernetes_validate
import pytest

import k8s_manifests as km

# The one container allowed to run as root, with exactly these capabilities
# (test_every_container_is_hardened; docs/kubernetes.md).
ROOT_INIT_CONTAINER = ("DaemonSet", km.BROKER_DAEMONSET, "socket-dir")
ROOT_INIT_CAPABILITIES = {"CHOWN", "FOWNER"}
FULL_COMMIT = re.compile(r"^[0-9a-f]{40}$")


# --- object sets -------------------------------------------------------------

def _rendered(*entries):
    if not km.kubectl():
        pytest.skip("kubectl is not installed: rendered overlays not checked "
                    "(the raw base and every file are)")
    objects = []
    for e in entries:
        objects += km.render(e)
    return objects


OBJECT_SETS = {
    # The files as written (no patches), base plus the FastAPI add-on.
    "raw": lambda: km.raw_objects(km.DEPLOY / "base") + km.raw_objects(km.DEPLOY / "fastapi"),
    "cpu": lambda: _rendered("overlays/cpu", "fastapi"),
    "gpu": lambda: _rendered("overlays/gpu", "fastapi"),
}


@pytest.fixture(params=sorted(OBJECT_SETS), scope="module")
def objects(request):
    return OBJECT_SETS[request.param]()


# --- files and schemas -------------------------------------------------------

def test_kustomizations_list_existing_files():
    ks = km.kustomizations()
    assert {k.directory.relative_to(km.DEPLOY).as_posix() for k in ks} >= set(km.ENTRY_POINTS)
    for k in ks:
        for p in k.referenced():
            assert p.exists(), f"{k.path.relative_to(km.REPO)} lists {p}, which does not exist"
        for p in k.resources() + k.components():
            if p.is_dir():
                assert (p / "kustomization.yaml").is_file(), (
                    f"{k.path.relative_to(km.REPO)}: {p} is a directory without kustomization.yaml")


def test_every_manifest_is_listed_in_a_kustomization():
    listed = {p for k in km.kustomizations() for p in k.referenced()}
    for path in sorted(km.DEPLOY.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            assert path.resolve() in listed, (
                f"{path.relative_to(km.REPO)} is in no kustomization (dead file or a missing entry)")


def _validate_strict(doc, where):
    try:
        kubernetes_validate.validate(doc, km.KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        pytest.fail(f"{where}: {doc['kind']}/{doc['metadata']['name']}: {path}: {e.message} "
                    f"(Kubernetes {km.KUBERNETES_VERSION}, strict)")
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(f"{where}: {e.message}")


@pytest.mark.parametrize("path", km.resource_files(), ids=lambda p: p.relative_to(km.DEPLOY).as_posix())
def test_manifest_file_validates_strictly(path):
    docs = km.load_documents(path)
    assert docs, f"{path} holds no object"
    for doc in docs:
        _validate_strict(doc, path.relative_to(km.REPO))


@pytest.mark.parametrize("entry", km.ENTRY_POINTS)
def test_rendered_entry_point_validates_strictly(entry):
    docs = _rendered(entry)
    assert docs
    for doc in docs:
        _validate_strict(doc, f"kubectl kustomize deploy/kubernetes/{entry}")


def test_patches_name_objects_of_their_base():
    for k in km.kustomizations():
        base = []
        for p in k.resources():
            base += km.raw_objects(p) if p.is_dir() else km.load_documents(p)
        names = {(o["kind"], o["metadata"]["name"]) for o in base}
        for patch in k.patches():
            for doc in km.load_documents(patch):
                key = (doc["kind"], doc["metadata"]["name"])
                assert key in names, (
                    f"{patch.relative_to(km.REPO)} patches {key[0]}/{key[1]}, which "
                    f"{k.path.relative_to(km.REPO)}'s resources do not define")


# --- broker and workers agree ------------------------------------------------

def test_broker_and_workers_share_the_socket_directory(objects):
    cfg = km.broker_config(objects)
    sock = cfg["socket"]
    sock_dir = posixpath.dirname(sock)
    spec, broker = km.broker_container(objects)
    assert km.env_value(broker, "WBROKER_SOCKET") in (None, sock)
    found = km.mount_at(spec, broker, sock_dir)
    assert found, f"wbrokerd does not mount the socket directory {sock_dir} (config socket {sock})"
    mount, vol = found
    assert not mount.get("readOnly"), "wbrokerd must be able to bind in the socket directory"
    assert "hostPath" in vol, f"the socket directory is volume {vol['name']!r}, not a hostPath"
    assert vol["hostPath"].get("type") == "DirectoryOrCreate", vol
    host_dir = vol["hostPath"]["path"]

    workers = km.worker_containers(objects)
    assert workers, "no worker Deployment"
    for d, wspec, c in workers:
        where = f"Deployment/{d['metadata']['name']} container {c['name']}"
        wfound = km.mount_at(wspec, c, sock_dir)
        assert wfound, f"{where} does not mount {sock_dir}"
        assert wfound[1].get("hostPath", {}).get("path") == host_dir, (
            f"{where} mounts {wfound[1]} at {sock_dir}, not hostPath {host_dir}")


def test_worker_socket_flag_is_the_mounted_socket(objects):
    sock = km.broker_config(objects)["socket"]
    for d, _, c in km.worker_containers(objects):
        assert km.worker_socket_path(c) == sock, (
            f"Deployment/{d['metadata']['name']} {c['name']} connects to "
            f"{km.worker_socket_path(c)!r}, the broker listens on {sock!r}")
        for init in km.pod_spec(d).get("initContainers") or []:
            assert sock in " ".join(init.get("command", []) + init.get("args", [])), (
                f"{d['metadata']['name']} init container {init['name']} does not wait for {sock}")


def test_hf_cache_is_mounted_read_only_where_the_broker_has_it(objects):
    cache_dir = km.broker_config(objects)["cache_dir"]
    spec, broker = km.broker_container(objects)
    assert km.env_value(broker, "HF_HUB_CACHE") == cache_dir
    mounts = [(spec, broker, "wbrokerd")] + [
        (s, c, f"Deployment/{d['metadata']['name']}") for d, s, c in km.worker_containers(objects)]
    host_paths = set()
    for pspec, c, where in mounts:
        m = next((m for m in c.get("volumeMounts") or []
                  if cache_dir.startswith(m["mountPath"].rstrip("/") + "/")), None)
        # Workers read config/tokenizer files from the snapshot path the broker
        # sends: the same mountPath everywhere.
        assert m, f"{where} does not mount the HF cache {cache_dir}"
        assert m.get("readOnly") is True, f"{where} mounts the HF cache writable"
        host_paths.add((m["mountPath"], km.volume(pspec, m["name"])["hostPath"]["path"]))
        assert km.env_value(c, "HF_HUB_OFFLINE") == "1", f"{where} lacks HF_HUB_OFFLINE=1"
    assert len(host_paths) == 1, f"the HF cache is mounted differently: {host_paths}"


def test_uids_and_the_socket_group(objects):
    spec, broker = km.broker_container(objects)
    bctx = km.effective_security_context(spec, broker)
    broker_uid, broker_gid = bctx["runAsUser"], bctx["runAsGroup"]
    for d, wspec, c in km.worker_containers(objects):
        wctx = km.effective_security_context(wspec, c)
        where = f"Deployment/{d['metadata']['name']}"
        # The broker's uid has the admin verbs (load/unload): never a worker's.
        assert wctx["runAsUser"] != broker_uid, f"{where} runs as the broker's uid {broker_uid}"
        groups = set(wspec.get("securityContext", {}).get("supplementalGroups") or [])
        assert broker_gid in groups | {wctx["runAsGroup"]}, (
            f"{where} is not in the socket's group {broker_gid} (socket_mode 0660)")
    # The one root container hands the directory to exactly the broker's ids.
    init = next(c for c in spec["initContainers"] if c["name"] == ROOT_INIT_CONTAINER[2])
    script = " ".join(init["command"] + init["args"])
    sock_dir = posixpath.dirname(km.broker_config(objects)["socket"])
    assert f"chown {broker_uid}:{broker_gid} {sock_dir}" in script, script


def test_every_container_is_hardened(objects):
    for w in km.workloads(objects):
        spec = km.pod_spec(w)
        for c in km.all_containers(spec):
            where = f"{w['kind']}/{w['metadata']['name']} container {c['name']}"
            ctx = km.effective_security_context(spec, c)
            caps = ctx.get("capabilities") or {}
            assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"
            assert ctx.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert ctx.get("privileged") in (None, False), f"{where}: privileged"
            assert caps.get("drop") == ["ALL"], f"{where}: capabilities.drop {caps.get('drop')}"
            assert (ctx.get("seccompProfile") or {}).get("type") == "RuntimeDefault", (
                f"{where}: seccompProfile {ctx.get('seccompProfile')}")
            if (w["kind"], w["metadata"]["name"], c["name"]) == ROOT_INIT_CONTAINER:
                # kubelet creates the hostPath directory root-owned; this init
                # container chowns it and exits (docs/kubernetes.md).
                assert set(caps.get("add") or []) == ROOT_INIT_CAPABILITIES, f"{where}: {caps}"
                assert ctx.get("runAsUser") == 0 and ctx.get("runAsNonRoot") is False, where
                assert [m["mountPath"] for m in c["volumeMounts"]] == [
                    posixpath.dirname(km.broker_config(objects)["socket"])], where
                continue
            assert not caps.get("add"), f"{where}: adds capabilities {caps.get('add')}"
            assert ctx.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert isinstance(ctx.get("runAsUser"), int) and ctx["runAsUser"] > 0, (
                f"{where}: needs a fixed non-root runAsUser, has {ctx.get('runAsUser')}")
            assert isinstance(ctx.get("runAsGroup"), int) and ctx["runAsGroup"] > 0, (
                f"{where}: needs a fixed non-root runAsGroup, has {ctx.get('runAsGroup')}")


def test_pods_share_no_host_namespace(objects):
    # Host memfds and cuda-vmm fds cross pods over the Unix socket; only
    # legacy CUDA IPC would need hostPID/hostIPC (docs/kubernetes.md).
    for w in km.workloads(objects):
        spec = km.pod_spec(w)
        for field in ("hostPID", "hostIPC", "hostNetwork"):
            assert spec.get(field) in (None, False), f"{w['kind']}/{w['metadata']['name']}: {field}"
        assert spec.get("automountServiceAccountToken") is False, w["metadata"]["name"]


def test_every_container_has_resources(objects):
    for w in km.workloads(objects):
        for c in km.all_containers(km.pod_spec(w)):
            r = c.get("resources") or {}
            where = f"{w['metadata']['name']} container {c['name']}"
            assert {"cpu", "memory"} <= set(r.get("requests") or {}), f"{where}: requests {r}"
            assert "memory" in (r.get("limits") or {}), f"{where}: no memory limit"


def _config_keys_of_this_broker():
    """Top-level and [[preload]] keys that broker/config.cc accepts."""
    src = (km.REPO / "broker" / "config.cc").read_text()
    block = re.search(r"kKeys\s*=\s*\{(.*?)\};", src, re.S)
    assert block, "broker/config.cc: kKeys not found (the test reads the accepted keys from it)"
    top = set(re.findall(r'"([a-z_]+)"', block.group(1)))
    preload = set(re.findall(r'k\.str\(\) != "([a-z_]+)"', src))
    assert {"socket", "preload"} <= top and {"model", "revision"} <= preload, (top, preload)
    return top, preload


def test_broker_config_is_valid_for_this_broker_and_pins_revisions(objects):
    cfg = km.broker_config(objects)
    top, preload_keys = _config_keys_of_this_broker()
    assert set(cfg) <= top, f"keys wbrokerd does not know: {sorted(set(cfg) - top)}"
    assert cfg.get("preload"), "no [[preload]] model"
    for i, p in enumerate(cfg["preload"]):
        assert isinstance(p, dict), f"preload[{i}]: use a table with a pinned revision"
        assert set(p) <= preload_keys, f"preload[{i}]: unknown keys {sorted(set(p) - preload_keys)}"
        assert FULL_COMMIT.match(p.get("revision", "")), (
            f"preload[{i}] {p['model']}: revision {p.get('revision')!r} is not a full commit hash")


def test_workers_serve_a_preloaded_revision(objects):
    preloaded = {(p["model"], p["revision"]) for p in km.broker_config(objects)["preload"]}
    for d, _, c in km.worker_containers(objects):
        served = km.worker_model(c)
        assert served in preloaded, (
            f"Deployment/{d['metadata']['name']} serves {served}, not one of the broker's "
            f"[[preload]] entries {sorted(preloaded)}")


def test_probes_use_the_socket_and_the_health_endpoints(objects):
    sock = km.broker_config(objects)["socket"]
    _, broker = km.broker_container(objects)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = broker[probe]["exec"]["command"]
        assert cmd[0].endswith("/wbrokerctl") and km.flag_value(cmd, "--socket") == sock, cmd
        assert cmd[-1] == "status", cmd
    for d, _, c in km.worker_containers(objects):
        ports = {p["name"] for p in c.get("ports") or []} | {
            p["containerPort"] for p in c.get("ports") or []}
        native = c["command"][0].endswith("/wbroker-worker")
        expected = {"readinessProbe": "/readyz" if native else "/healthz",
                    "livenessProbe": "/healthz", "startupProbe": "/healthz"}
        for probe, path in expected.items():
            get = c[probe]["httpGet"]
            assert get["path"] == path and get["port"] in ports, (
                f"Deployment/{d['metadata']['name']} {probe}: {get}")


def test_workers_run_only_where_the_broker_runs(objects):
    bspec = km.pod_spec(km.find(objects, "DaemonSet", km.BROKER_DAEMONSET))
    bsel = bspec.get("nodeSelector") or {}
    assert bsel, "the broker DaemonSet needs a nodeSelector the workers can share"
    btol = bspec.get("tolerations") or []
    for d in km.workloads(objects, "Deployment"):
        spec = km.pod_spec(d)
        sel = spec.get("nodeSelector") or {}
        assert bsel.items() <= sel.items(), (
            f"Deployment/{d['metadata']['name']} nodeSelector {sel} lets it land on nodes "
            f"without wbrokerd ({bsel})")
        for t in spec.get("tolerations") or []:
            assert t in btol, f"Deployment/{d['metadata']['name']} tolerates {t}, wbrokerd does not"


def test_broker_has_a_priority_class_above_the_workers(objects):
    spec = km.pod_spec(km.find(objects, "DaemonSet", km.BROKER_DAEMONSET))
    pc = km.find(objects, "PriorityClass", spec.get("priorityClassName"))
    assert pc["value"] > 0 and not pc.get("globalDefault")
    for d in km.workloads(objects, "Deployment"):
        assert km.pod_spec(d).get("priorityClassName") in (None, ""), d["metadata"]["name"]


def test_services_select_pods_and_name_their_ports(objects):
    for svc in (o for o in objects if o["kind"] == "Service"):
        sel = svc["spec"]["selector"]
        targets = [d for d in km.workloads(objects)
                   if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"Service/{svc['metadata']['name']} selects no pod"
        names = {p["name"] for d in targets for c in km.pod_spec(d)["containers"]
                 for p in c.get("ports") or []}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, (svc["metadata"]["name"], port, names)


def test_disruption_budgets_select_workers(objects):
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        targets = [d for d in km.workloads(objects, "Deployment")
                   if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"PodDisruptionBudget/{pdb['metadata']['name']} selects no Deployment"


def test_all_containers_use_the_one_placeholder_image(objects):
    # One image name, so an overlay's `images:` entry retargets every container.
    images = {c["image"] for w in km.workloads(objects) for c in km.all_containers(km.pod_spec(w))}
    assert {i.rsplit(":", 1)[0] for i in images} == {"wbroker"}, images


def test_overlays_differ_only_in_the_device():
    cpu, gpu = _rendered("overlays/cpu"), _rendered("overlays/gpu")
    assert km.broker_config(cpu)["device"] == "cpu"
    gcfg = km.broker_config(gpu)
    assert gcfg["device"].startswith("cuda:") and gcfg["cuda_sharing"] == "vmm", gcfg

    def gpus(objects):
        return {f"{w['metadata']['name']}/{c['name']}":
                (c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu")
                for w in km.workloads(objects) for c in km.pod_spec(w)["containers"]}

    assert set(gpus(cpu).values()) == {None}, gpus(cpu)
    assert set(gpus(gpu).values()) == {1}, gpus(gpu)


# --- the image ---------------------------------------------------------------

def _dockerfile_stage(name):
    text = (km.DEPLOY / "Dockerfile").read_text()
    stage = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, re.S | re.M)
    assert stage, f"deploy/kubernetes/Dockerfile has no stage {name!r}"
    # One logical line per instruction: join continuations, drop comments.
    lines = [ln for ln in stage.group(1).splitlines() if not ln.lstrip().startswith("#")]
    return re.sub(r"\\\n", " ", "\n".join(lines))


def test_dockerfile_build_packages_are_install_deps_packages():
    script = (km.REPO / "scripts" / "install-deps.sh").read_text()
    block = re.search(r"^packages=\((.*?)\)", script, re.S | re.M)
    assert block, "scripts/install-deps.sh: packages=(...) not found"
    wanted = set(block.group(1).split())
    # Test-only packages: tests and benchmarks are not built in the image.
    wanted -= {"libgtest-dev", "libgmock-dev", "libbenchmark-dev", "systemd", "clang-format"}
    run = next(ln for ln in _dockerfile_stage("build").splitlines() if "apt-get install" in ln)
    have = set(re.search(r"--no-install-recommends (.*?)&&", run).group(1).split())
    assert have == wanted, (f"Dockerfile lacks {sorted(wanted - have)}, "
                            f"has beyond install-deps.sh {sorted(have - wanted)}")


def test_dockerfile_provides_every_command_the_manifests_run(objects):
    build, runtime = _dockerfile_stage("build"), _dockerfile_stage("runtime")
    installed = re.search(r"install -m 0755 --strip (.*?) /out/usr/bin/", build)
    assert installed, "the build stage does not install the binaries into /out/usr/bin"
    binaries = {posixpath.basename(p) for p in installed.group(1).split()}
    pins = (km.REPO / "scripts" / "requirements.txt").read_text()
    for w in km.workloads(objects):
        spec = km.pod_spec(w)
        for c in km.all_containers(spec):
            # Our binaries as commands, in shell scripts and in exec probes.
            for used in set(re.findall(r"/usr/bin/([\w.-]+)", json.dumps(c))):
                assert used in binaries, (
                    f"{w['metadata']['name']} container {c['name']} runs /usr/bin/{used}, "
                    f"which the Dockerfile does not install (it installs {sorted(binaries)})")
            cmd = c["command"][0]
            where = f"{w['metadata']['name']} container {c['name']}: {cmd}"
            if cmd.startswith("/opt/wbroker/venv/bin/"):
                assert re.search(rf"^{posixpath.basename(cmd)}==", pins, re.M), (
                    f"{where}: not pinned in scripts/requirements.txt")
            elif not cmd.startswith("/usr/bin/"):
                assert cmd == "/bin/sh", f"{where}: nothing in the image provides it"
            if "workingDir" in c:
                assert f" {c['workingDir']}\n" in runtime + "\n", f"{where}: no COPY to {c['workingDir']}"

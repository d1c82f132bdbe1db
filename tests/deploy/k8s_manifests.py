"""deploy/kubernetes read as data: kustomizations, the files they list, rendered
entry points, and the pod/container views the manifest tests check."""
from __future__ import annotations

import posixpath
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
# The Kubernetes version the manifests are validated against (strict schemas
# shipped in kubernetes-validate; no cluster, no network).
KUBERNETES_VERSION = "1.33.0"
# What `kubectl apply -k` is pointed at (docs/kubernetes.md).
ENTRY_POINTS = ("overlays/cpu", "overlays/gpu", "fastapi")
# Workload kinds whose pod template the checks look into.
WORKLOAD_KINDS = ("DaemonSet", "Deployment", "StatefulSet")
# The broker: its DaemonSet and the ConfigMap holding wbrokerd.toml.
BROKER_DAEMONSET = "wbrokerd"
BROKER_CONFIGMAP = "wbrokerd-config"
BROKER_CONFIG_KEY = "wbrokerd.toml"


def load_documents(path: Path) -> list[dict]:
    """Every non-empty YAML document of a file."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


@dataclass(frozen=True)
class Kustomization:
    """One kustomization.yaml and the paths it names."""

    path: Path  #: the kustomization.yaml itself
    data: dict  #: its parsed content

    @property
    def directory(self) -> Path:
        return self.path.parent

    def _paths(self, entries) -> list[Path]:
        return [(self.directory / e).resolve() for e in entries or []]

    def resources(self) -> list[Path]:
        """`resources:` entries: manifest files or kustomization directories."""
        return self._paths(self.data.get("resources"))

    def components(self) -> list[Path]:
        return self._paths(self.data.get("components"))

    def patches(self) -> list[Path]:
        """Patch files (`patches[].path`, legacy `patchesStrategicMerge`)."""
        paths = [p["path"] for p in self.data.get("patches") or [] if "path" in p]
        return self._paths(paths + list(self.data.get("patchesStrategicMerge") or []))

    def generator_files(self) -> list[Path]:
        files = []
        for gen in (self.data.get("configMapGenerator") or []) + (
            self.data.get("secretGenerator") or []
        ):
            files += [f.split("=", 1)[-1] for f in gen.get("files") or []]
        return self._paths(files)

    def referenced(self) -> list[Path]:
        return self.resources() + self.components() + self.patches() + self.generator_files()


def kustomizations() -> list[Kustomization]:
    return [
        Kustomization(p.resolve(), load_documents(p)[0])
        for p in sorted(DEPLOY.rglob("kustomization.yaml"))
    ]


def resource_files() -> list[Path]:
    """Every manifest file listed as a resource (whole objects, not patches)."""
    return sorted({p for k in kustomizations() for p in k.resources() if p.is_file()})


def patch_files() -> list[Path]:
    return sorted({p for k in kustomizations() for p in k.patches()})


def raw_objects(directory: Path) -> list[dict]:
    """The objects of a kustomization's resources, following resource
    directories, with no patch or transformer applied."""
    k = Kustomization((directory / "kustomization.yaml").resolve(),
                      load_documents(directory / "kustomization.yaml")[0])
    out = []
    for p in k.resources():
        out += raw_objects(p) if p.is_dir() else load_documents(p)
    return out


def kubectl() -> str | None:
    """kubectl (its built-in kustomize renders offline), if installed."""
    return shutil.which("kubectl")


def render(entry: str) -> list[dict]:
    """`kubectl kustomize deploy/kubernetes/ENTRY` as objects."""
    tool = kubectl()
    assert tool, "kubectl is not installed"
    proc = subprocess.run([tool, "kustomize", str(DEPLOY / entry)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {entry} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def workloads(objects: list[dict], kind: str | None = None) -> list[dict]:
    kinds = (kind,) if kind else WORKLOAD_KINDS
    return [o for o in objects if o["kind"] in kinds]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def all_containers(spec: dict) -> list[dict]:
    """Init containers and containers of a pod spec."""
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def effective_security_context(spec: dict, container: dict) -> dict:
    """The container's securityContext with the pod-level fields that apply
    to containers filled in where the container does not set them."""
    pod = spec.get("securityContext") or {}
    out = {k: pod[k] for k in ("runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile",
                               "seLinuxOptions", "appArmorProfile") if k in pod}
    out.update(container.get("securityContext") or {})
    return out


def volume(spec: dict, name: str) -> dict:
    matches = [v for v in spec.get("volumes") or [] if v["name"] == name]
    assert len(matches) == 1, f"expected one volume {name!r}, found {len(matches)}"
    return matches[0]


def mount_at(spec: dict, container: dict, mount_path: str) -> tuple[dict, dict] | None:
    """(volumeMount, volume) of the container at mount_path, or None."""
    for m in container.get("volumeMounts") or []:
        if posixpath.normpath(m["mountPath"]) == posixpath.normpath(mount_path):
            return m, volume(spec, m["name"])
    return None


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of `--flag VALUE` or `--flag=VALUE` in an argument list."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def env_value(container: dict, name: str) -> str | None:
    for e in container.get("env") or []:
        if e["name"] == name:
            return e.get("value")
    return None


def broker_config(objects: list[dict]) -> dict:
    """wbrokerd.toml from the broker's ConfigMap, parsed."""
    cm = find(objects, "ConfigMap", BROKER_CONFIGMAP)
    return tomllib.loads(cm["data"][BROKER_CONFIG_KEY])


def broker_container(objects: list[dict]) -> tuple[dict, dict]:
    """(pod spec, wbrokerd container) of the broker DaemonSet."""
    spec = pod_spec(find(objects, "DaemonSet", BROKER_DAEMONSET))
    [c] = [c for c in spec["containers"] if c["command"][0].endswith("/wbrokerd")]
    return spec, c


def worker_containers(objects: list[dict]) -> list[tuple[dict, dict, dict]]:
    """(Deployment, pod spec, container) of every worker container."""
    return [(d, pod_spec(d), c) for d in workloads(objects, "Deployment")
            for c in pod_spec(d)["containers"]]


def worker_socket_path(container: dict) -> str | None:
    """The socket a worker connects to: wbroker-worker's --socket, else the
    Python client's WBROKER_SOCKET."""
    if container["command"][0].endswith("/wbroker-worker"):
        return flag_value(container.get("args") or [], "--socket")
    return env_value(container, "WBROKER_SOCKET")


def worker_model(container: dict) -> tuple[str, str] | None:
    """(model, revision) a worker serves: wbroker-worker's --model MODEL@REV,
    else MODEL_ID/MODEL_REVISION of the FastAPI example."""
    if container["command"][0].endswith("/wbroker-worker"):
        spec = flag_value(container.get("args") or [], "--model")
        if spec is None or "@" not in spec:
            return None
        model, rev = spec.rsplit("@", 1)
        return model, rev
    model, rev = env_value(container, "MODEL_ID"), env_value(container, "MODEL_REVISION")
    return (model, rev) if model and rev else None

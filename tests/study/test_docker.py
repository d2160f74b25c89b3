"""docker/: the compose file and the Dockerfile, checked without a Docker engine.

The compose file is read as `docker compose config` reads it: YAML, then Compose's ${...}
substitution (done here), then validation against the Compose Specification's JSON schema
(vendored in tests/vendor/compose-spec/) and the cross-references Compose checks (a service
named in depends_on, a config, secret, network or named volume a service uses, is defined).
The tests below look at that validated model.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from helpers import REPO, TESTS

DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENV_EXAMPLE = DOCKER / ".env.example"
COMPOSE_SCHEMA = TESTS / "vendor" / "compose-spec" / "compose-spec.json"

# `python -m fractal_mlops.study` flags, from the contract in the design.
CONTRACT_FLAGS = {"--config", "--tracking-uri", "--storage", "--study-name", "--workers",
                  "--device", "--n-trials"}
TEST_ENV = {"POSTGRES_PASSWORD": "test-only-pw"}

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR:?error}."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("bare"):
            return env.get(match.group("bare"), "")
        name, op, rest = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])(.*))?",
                                      match.group("braced"), re.S).groups()
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in ("-", ":-"):
            return rest if unset else current
        if op in ("?", ":?"):
            if unset:
                raise KeyError(f"required variable {name} is missing: {rest}")
            return current
        return current or ""

    return _VARIABLE.sub(substitute, value)


class ComposeInvalid(ValueError):
    """The compose file breaks the Compose Specification (the message lists every error)."""


@functools.cache
def compose_schema_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    # The schema says draft-07; jsonschema does not recognise its `$schema` URI (no trailing
    # `#`) and would fall back to the latest draft, so the draft is named here.
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _named_volume(volume) -> str | None:
    """The named volume a service volume mounts (None for a bind mount or a tmpfs)."""
    if isinstance(volume, dict):
        return volume.get("source") if volume.get("type") == "volume" else None
    source = volume.split(":", 1)[0] if ":" in volume else None
    return source if source and not source.startswith((".", "/", "~", "$")) else None


def reference_errors(model: dict) -> list[str]:
    """Names a service uses that the file does not define (Compose refuses those too)."""
    errors = []
    for name, service in model.get("services", {}).items():
        depends_on = service.get("depends_on") or []
        used = {"services": list(depends_on),
                "volumes": [v for v in map(_named_volume, service.get("volumes") or []) if v],
                "networks": list(service.get("networks") or [])}
        for kind in ("configs", "secrets"):
            used[kind] = [item["source"] if isinstance(item, dict) else item
                          for item in service.get(kind) or []]
        for kind, names in used.items():
            defined = set(model.get(kind) or {}) | ({"default"} if kind == "networks" else set())
            errors += [f"services.{name}.{kind}: {item!r} is not defined in top-level {kind}"
                       for item in names if item not in defined]
    return errors


def load_compose(path: Path, env: dict[str, str]) -> dict:
    """The compose model `docker compose config` would resolve: YAML, ${...} substituted,
    valid against the Compose Specification schema, every reference defined."""
    model = interpolate(yaml.safe_load(path.read_text()), env)
    errors = [f"{error.json_path}: {error.message}"
              for error in compose_schema_validator().iter_errors(model)]
    errors += reference_errors(model)
    if errors:
        raise ComposeInvalid(f"{path}:\n" + "\n".join(errors))
    return model


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    """The resolved, validated compose model."""
    return load_compose(COMPOSE_FILE, TEST_ENV)


def flag_values(args: list[str]) -> dict[str, str | None]:
    """{--flag: value} from an argv list with `--flag=value` or `--flag value` items."""
    values: dict[str, str | None] = {}
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        if "=" in arg:
            flag, value = arg.split("=", 1)
        else:
            following = args[index + 1] if index + 1 < len(args) else None
            flag, value = arg, None if following is None or following.startswith("-") else following
        values[flag] = value
    return values


def as_list(command) -> list[str]:
    return command.split() if isinstance(command, str) else list(command or [])


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def container_ports(service: dict) -> set[int]:
    ports = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            ports.add(int(port["target"]))
        else:
            ports.add(int(str(port).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def worker_settings(compose: dict) -> tuple[dict[str, str | None], dict[str, str]]:
    worker = compose["services"]["worker"]
    return flag_values(as_list(worker.get("command"))), environment(worker)


def worker_storage_url(compose: dict) -> str:
    flags, env = worker_settings(compose)
    url = flags.get("--storage") or env.get("FRACTAL_STORAGE")
    assert url, "the worker gets no Optuna storage (--storage or FRACTAL_STORAGE)"
    return url


def worker_tracking_uri(compose: dict) -> str:
    flags, env = worker_settings(compose)
    uri = flags.get("--tracking-uri") or env.get("MLFLOW_TRACKING_URI")
    assert uri, "the worker gets no tracking URI (--tracking-uri or MLFLOW_TRACKING_URI)"
    return uri


# --------------------------------------------------------------------------- compose file


def test_compose_has_the_four_services(compose):
    assert {"postgres", "mlflow", "optuna-dashboard", "worker"} <= set(compose["services"])


def test_worker_reaches_the_mlflow_service_on_its_port(compose):
    uri = urlsplit(worker_tracking_uri(compose))
    mlflow = compose["services"]["mlflow"]
    server_flags = flag_values(as_list(mlflow["command"]))
    assert uri.scheme == "http" and uri.hostname == "mlflow"
    assert uri.port == int(server_flags["--port"])
    assert uri.port in container_ports(mlflow)
    assert server_flags.get("--host") == "0.0.0.0"


def test_mlflow_accepts_the_host_header_the_worker_sends(compose):
    """MLflow 3 answers 403 to Host headers outside --allowed-hosts (its default: localhost)."""
    uri = urlsplit(worker_tracking_uri(compose))
    allowed = flag_values(as_list(compose["services"]["mlflow"]["command"]))["--allowed-hosts"]
    patterns = allowed.split(",")
    assert any(fnmatch.fnmatch(uri.netloc, pattern) for pattern in patterns), allowed
    assert any(fnmatch.fnmatch("localhost:5000", pattern) for pattern in patterns), allowed


def same_database(url: str) -> tuple:
    """What makes two SQLAlchemy URLs the same database, whatever driver they name."""
    parts = urlsplit(url)
    return parts.scheme.split("+")[0], parts.hostname, parts.port, parts.path, parts.username


def assert_logs_in_to_postgres(compose: dict, service: str, url: str) -> None:
    """The service's URL names the postgres service and its user; the password comes from
    PGPASSWORD (libpq reads it), never from the URL."""
    parts = urlsplit(url)
    pg_env = environment(compose["services"]["postgres"])
    assert parts.scheme.split("+")[0] == "postgresql"
    assert (parts.hostname, parts.port) == ("postgres", 5432)
    assert 5432 in container_ports(compose["services"]["postgres"])
    assert parts.username == pg_env["POSTGRES_USER"]
    assert parts.password is None, f"{service}: password in a URL"
    password = environment(compose["services"][service]).get("PGPASSWORD")
    assert password == pg_env["POSTGRES_PASSWORD"] == TEST_ENV["POSTGRES_PASSWORD"]


def test_worker_storage_is_the_postgres_service_database(compose):
    url = worker_storage_url(compose)
    assert_logs_in_to_postgres(compose, "worker", url)
    assert urlsplit(url).path.lstrip("/") == environment(compose["services"]["postgres"])[
        "POSTGRES_DB"]


def test_dashboard_shows_the_worker_study_storage(compose):
    dashboard = compose["services"]["optuna-dashboard"]
    argv = as_list(dashboard.get("entrypoint")) + as_list(dashboard.get("command"))
    (url,) = [arg for arg in argv if "://" in arg]
    assert same_database(url) == same_database(worker_storage_url(compose))
    assert_logs_in_to_postgres(compose, "optuna-dashboard", url)
    assert flag_values(argv).get("--host") == "0.0.0.0"
    assert int(flag_values(argv)["--port"]) in container_ports(dashboard)


def test_mlflow_backend_store_is_a_database_postgres_creates(compose):
    """MLflow and Optuna both keep an alembic_version table: they need separate databases."""
    mlflow = compose["services"]["mlflow"]
    backend = (flag_values(as_list(mlflow["command"])).get("--backend-store-uri")
               or environment(mlflow).get("MLFLOW_BACKEND_STORE_URI"))
    assert_logs_in_to_postgres(compose, "mlflow", backend)
    database = urlsplit(backend).path.lstrip("/")
    assert database != urlsplit(worker_storage_url(compose)).path.lstrip("/")
    init_sql = " ".join(config.get("content", "") for config in compose["configs"].values())
    mounted = [c["target"] for c in compose["services"]["postgres"]["configs"]]
    assert re.search(rf"CREATE DATABASE {database}\b", init_sql)
    assert all(target.startswith("/docker-entrypoint-initdb.d/") for target in mounted)


def test_mlflow_proxies_artifacts_into_a_volume(compose):
    mlflow = compose["services"]["mlflow"]
    flags = flag_values(as_list(mlflow["command"]))
    assert "--serve-artifacts" in flags and "--no-serve-artifacts" not in flags
    destination = flags["--artifacts-destination"]
    targets = []
    for volume in mlflow["volumes"]:
        targets.append(volume["target"] if isinstance(volume, dict) else volume.split(":")[1])
    assert destination in targets


def test_workers_share_the_decoded_image_cache_on_a_volume(compose):
    """Each container decoded CIFAR-10 again: the image's cache folder is a named volume."""
    worker = dockerfile_stages()[-1]
    env = [i for i in worker if i.upper().startswith("ENV ") and "FRACTAL_MLOPS_CACHE=" in i]
    assert env, "the worker image sets no FRACTAL_MLOPS_CACHE"
    cache = re.search(r"FRACTAL_MLOPS_CACHE=(\S+)", env[-1]).group(1)
    # the folder exists in the image and belongs to the worker user, so the volume does too
    assert any(i.startswith("RUN ") and f"mkdir -p {cache}" in i and "chown fractal" in i
               and cache in i.split("chown", 1)[1] for i in worker)
    mounts = {}
    for volume in compose["services"]["worker"]["volumes"]:
        source, target = ((volume["source"], volume["target"]) if isinstance(volume, dict)
                          else volume.split(":")[:2])
        mounts[target] = source
    assert cache in mounts and mounts[cache] in (compose.get("volumes") or {})


def test_worker_scales_on_gpus_after_healthy_servers(compose):
    worker = compose["services"]["worker"]
    assert "container_name" not in worker  # `--scale worker=N` needs generated names
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    for dependency in ("postgres", "mlflow"):
        assert worker["depends_on"][dependency]["condition"] == "service_healthy"
        assert compose["services"][dependency]["healthcheck"]["test"]


def test_worker_builds_the_dockerfile_from_the_repository_root(compose):
    build = compose["services"]["worker"]["build"]
    context = (COMPOSE_FILE.parent / build["context"]).resolve()
    assert context == REPO
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.M | re.I)
    for service in compose["services"].values():
        if "build" in service and service["build"].get("target"):
            assert service["build"]["target"] in stages


def test_worker_uses_only_contract_flags(compose):
    flags, _ = worker_settings(compose)
    assert flags and set(flags) <= CONTRACT_FLAGS


def test_worker_flags_exist_in_the_study_cli(compose):
    result = subprocess.run([sys.executable, "-m", "fractal_mlops.study", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    offered = set(re.findall(r"--[a-z][a-z0-9-]*", result.stdout))
    flags, _ = worker_settings(compose)
    assert set(flags) <= offered
    assert CONTRACT_FLAGS <= offered


def test_no_password_is_written_in_the_compose_file(raw_compose):
    def password_values(node, key=""):
        if isinstance(node, dict):
            for child_key, child in node.items():
                yield from password_values(child, str(child_key))
        elif isinstance(node, list):
            for child in node:
                yield from password_values(child, key)
        elif "PASSWORD" in key.upper():
            yield key, node

    found = list(password_values(raw_compose))
    assert {key for key, _ in found} >= {"POSTGRES_PASSWORD", "PGPASSWORD"}
    for key, value in found:
        assert str(value).startswith("${"), f"{key} has a literal value"
    text = re.sub(r"\$\{[^}]*\}", "VARIABLE", COMPOSE_FILE.read_text())
    for password in re.findall(r"://[^:/@\s\"']+:([^@\s\"']+)@", text):
        assert password == "VARIABLE", f"literal password in a URL: {password}"


def test_env_example_ships_no_password():
    values = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                  if line.strip() and not line.lstrip().startswith("#"))
    assert values["POSTGRES_PASSWORD"] == ""
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE_FILE.read_text()))
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text()))
    assert required == {"POSTGRES_PASSWORD"}
    assert used <= set(values), f"undocumented variables: {used - set(values)}"


@pytest.mark.parametrize("env", [{}, {"POSTGRES_PASSWORD": ""}], ids=["unset", "empty"])
def test_compose_config_requires_the_password(env):
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        load_compose(COMPOSE_FILE, env)


# A slip in the compose file, and what the check must say about it: (what, replacement, error).
SLIPS = {
    "misspelled healthcheck key": ("interval: 5s", "intervall: 5s",
                                   r"postgres\.healthcheck: 'intervall' does not match"),
    "misspelled service key": ("shm_size: 1gb", "shm_sise: 1gb",
                               r"worker: 'shm_sise' does not match"),
    "misspelled top-level key": ("\nvolumes:\n  pgdata:", "\nvolume:\n  pgdata:",
                                 r"\$: 'volume' does not match"),
    "duration without a unit": ("interval: 5s", "interval: 5",
                                r"healthcheck\.interval: 5 is not of type 'string'"),
    "string for a list": ("capabilities: [gpu]", "capabilities: gpu",
                          r"capabilities: 'gpu' is not of type 'array'"),
    "undefined named volume": ("- pgdata:/var/lib", "- pg-data:/var/lib",
                               r"'pg-data' is not defined in top-level volumes"),
    "undefined dependency": ("      mlflow:\n        condition: service_healthy",
                             "      mlfow:\n        condition: service_healthy",
                             r"worker\.services: 'mlfow' is not defined"),
}


@pytest.mark.parametrize("slip", SLIPS)
def test_compose_check_catches_a_slip_in_a_copy_of_the_file(slip, tmp_path):
    old, new, error = SLIPS[slip]
    text = COMPOSE_FILE.read_text()
    assert text.count(old) == 1, f"the compose file no longer holds {old!r}: update SLIPS"
    copy = tmp_path / "compose.yaml"
    copy.write_text(text.replace(old, new))
    with pytest.raises(ComposeInvalid, match=error):
        load_compose(copy, TEST_ENV)


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped) per build stage."""
    lines, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    stages: list[list[str]] = []
    for instruction in lines:
        if instruction.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def test_worker_image_runs_the_study_module_as_a_non_root_user():
    worker = dockerfile_stages()[-1]  # the default build target
    entrypoints = [i for i in worker if i.upper().startswith("ENTRYPOINT ")]
    entrypoint = json.loads(entrypoints[-1].split(None, 1)[1])
    assert entrypoint == ["python", "-m", "fractal_mlops.study"]
    assert (REPO / (entrypoint[2].replace(".", "/") + ".py")).is_file()
    users = [i.split(None, 1)[1] for i in worker if i.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_worker_image_installs_the_tested_torch_and_the_repository():
    """The worker's torch and torchvision are the ones this suite runs on (which meet the
    package's minimum), from PyPI, whose Linux wheels are CUDA builds; then the package."""
    import torch
    import torchvision
    from packaging.requirements import Requirement

    text = DOCKERFILE.read_text()
    worker = dockerfile_stages()[-1]
    pinned = {name: re.search(rf"^ARG {name}=(\S+)", text, re.M).group(1)
              for name in ("TORCH_VERSION", "TORCHVISION_VERSION")}
    assert pinned["TORCH_VERSION"] == torch.__version__.split("+")[0]
    assert pinned["TORCHVISION_VERSION"] == torchvision.__version__.split("+")[0]
    requirements = {Requirement(r).name: Requirement(r) for r in metadata.requires("fractal-mlops")}
    assert pinned["TORCH_VERSION"] in requirements["torch"].specifier
    assert pinned["TORCHVISION_VERSION"] in requirements["torchvision"].specifier
    installs = [i for i in worker if re.match(r"RUN .*pip install", i)]
    torch_install = next(i for i in installs if "torch==${TORCH_VERSION}" in i)
    assert "torchvision==${TORCHVISION_VERSION}" in torch_install
    assert "--index-url" not in torch_install and "whl/cpu" not in torch_install  # CUDA wheels
    assert installs.index(torch_install) < next(  # before the package, which then keeps them
        n for n, i in enumerate(installs) if re.match(r"RUN .*pip install \.(\s|$)", i))
    assert any("apt-get install" in i and "g++" in i for i in worker)  # torch.compile needs it
    for instruction in worker:
        if instruction.upper().startswith("COPY ") and "--from" not in instruction:
            sources = instruction.split()[1:-1]
            for source in sources:
                assert (REPO / source).exists(), f"COPY source {source} is not in the repository"

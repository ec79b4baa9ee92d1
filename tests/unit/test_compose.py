"""docker-compose.yml: services, images, ports and wiring, checked by parsing (no Docker needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"

EXPECTED_IMAGES = {
    "postgres": "postgres:16",
    "kafka": "apache/kafka:4.1.1",
    "schema-registry": "apicurio/apicurio-registry:3.3.3",
    "connect": "quay.io/debezium/connect:3.3",
    "clickhouse": "clickhouse/clickhouse-server:25.8",
}
# Services that run the projector image, built from the repository's Dockerfile.
PROJECTOR_SERVICES = {
    "connector-init": ["projector", "connectors", "apply"],
    "projector": ["projector", "run"],
    "query": ["projector", "serve", "--host", "0.0.0.0", "--port", "8000"],
}
CCOMPAT_PATH = "/apis/ccompat/v7"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping, whichever of the two compose syntaxes it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {p[0]: (p[1] if len(p) > 1 else "") for p in pairs}
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(c) for c in command]


def depends_on_of(service: dict[str, Any]) -> dict[str, str]:
    """`depends_on` as {service: condition}; the short list form means `service_started`."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def published_ports(service: dict[str, Any]) -> list[tuple[str | None, str, str]]:
    """Each published port as (host_ip, host_port, container_port)."""
    result: list[tuple[str | None, str, str]] = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            result.append(
                (entry.get("host_ip"), str(entry.get("published", "")), str(entry["target"]))
            )
            continue
        parts = str(entry).split(":")
        if len(parts) == 3:
            result.append((parts[0], parts[1], parts[2]))
        elif len(parts) == 2:
            result.append((None, parts[0], parts[1]))
        else:
            result.append((None, "", parts[0]))
    return result


def volume_pairs(service: dict[str, Any]) -> list[tuple[str, str]]:
    """Each volume as (source, target), read-only flags dropped."""
    pairs = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            pairs.append((str(entry.get("source", "")), str(entry["target"])))
        else:
            source, target, *_ = str(entry).split(":")
            pairs.append((source, target))
    return pairs


def kafka_listener_addresses(kafka: dict[str, Any]) -> set[str]:
    """host:port of every advertised listener whose port the broker actually listens on."""
    env = env_of(kafka)
    listening = {
        name: urlsplit(f"//{addr}").port
        for name, addr in (item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    }
    addresses = set()
    for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","):
        name, addr = item.split("://", 1)
        if urlsplit(f"//{addr}").port == listening.get(name):
            addresses.add(addr)
    return addresses


# ---- services and images -------------------------------------------------------------------


def test_all_expected_services_are_present(services: dict[str, dict[str, Any]]) -> None:
    expected = set(EXPECTED_IMAGES) | set(PROJECTOR_SERVICES)
    assert expected <= set(services), f"missing: {sorted(expected - set(services))}"


@pytest.mark.parametrize(("name", "image"), sorted(EXPECTED_IMAGES.items()))
def test_official_image(services: dict[str, dict[str, Any]], name: str, image: str) -> None:
    assert services[name].get("image") == image
    assert "build" not in services[name]


@pytest.mark.parametrize(("name", "command"), sorted(PROJECTOR_SERVICES.items()))
def test_projector_services_build_the_repository_image(
    services: dict[str, dict[str, Any]], name: str, command: list[str]
) -> None:
    service = services[name]
    build = service.get("build")
    context = build.get("context") if isinstance(build, dict) else build
    assert context in (".", "./"), f"{name} must build the image from the repository root"
    assert command_of(service) == command
    images = {services[n].get("image") for n in PROJECTOR_SERVICES}
    assert len(images) == 1, f"projector services use different images: {images}"


def _projector_commands() -> set[tuple[str, ...]]:
    """Every command path the installed `projector` CLI accepts, from the CLI itself."""
    import typer.main

    from projector.cli import app

    found: set[tuple[str, ...]] = set()

    def walk(command: Any, path: tuple[str, ...]) -> None:
        found.add(path)
        if hasattr(command, "commands"):  # a group of sub-commands
            for name, sub in command.commands.items():
                walk(sub, (*path, name))

    walk(typer.main.get_command(app), ("projector",))
    return found


def _named_commands(words: list[str]) -> tuple[str, ...]:
    """`projector a b --flag x` → ('projector', 'a', 'b'): the words before the first option."""
    path = []
    for word in words:
        if word.startswith("-"):
            break
        path.append(word)
    return tuple(path)


def test_every_projector_command_in_compose_and_dockerfile_exists(
    services: dict[str, dict[str, Any]],
) -> None:
    named = [
        command_of(service)
        for service in services.values()
        if command_of(service)[:1] == ["projector"]
    ]
    dockerfile = (COMPOSE_FILE.parent / "Dockerfile").read_text()
    named += [
        json_list
        for json_list in (
            [w.strip().strip('"') for w in m.split(",")]
            for m in re.findall(r"^CMD \[(.*)\]", dockerfile, re.MULTILINE)
        )
    ]
    named += [w.split() for w in re.findall(r"`(projector [a-z -]+)`", dockerfile)]
    assert len(named) >= 3
    commands = _projector_commands()
    for words in named:
        path = _named_commands(words)
        assert path in commands, f"{' '.join(words)} names no command of the CLI"


def test_the_command_check_knows_a_missing_command() -> None:
    assert ("projector", "run") in _projector_commands()
    assert ("projector", "serve-nothing") not in _projector_commands()


def test_projector_runs_on_the_clickhouse_service(services: dict[str, dict[str, Any]]) -> None:
    assert env_of(services["projector"]).get("PROJECTOR_BACKEND") == "server"


def test_query_service_serves_the_clickhouse_service_on_port_8000(
    services: dict[str, dict[str, Any]],
) -> None:
    """`projector serve` runs beside the projector on the same ClickHouse service (a server lets
    two processes share it), listens on all interfaces of its container, published on 8000."""
    query = services["query"]
    env = env_of(query)
    assert env.get("PROJECTOR_BACKEND") == "server"
    assert (
        env["PROJECTOR_CLICKHOUSE_URL"] == env_of(services["projector"])["PROJECTOR_CLICKHOUSE_URL"]
    )
    command = command_of(query)
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "8000"
    assert ("127.0.0.1", "8000", "8000") in published_ports(query)
    assert env["PROJECTOR_API_TOKEN"].startswith("${"), "the token comes from the environment"
    assert depends_on_of(query).get("clickhouse") == "service_healthy"


def test_the_ops_page_can_reach_the_projector_metrics(services: dict[str, dict[str, Any]]) -> None:
    url = urlsplit(env_of(services["query"])["PROJECTOR_PROJECTOR_METRICS_URL"])
    assert url.hostname == "projector"
    assert env_of(services["projector"]).get("PROJECTOR_METRICS_HOST") == "0.0.0.0"


def test_dockerfile_exists_for_the_build() -> None:
    dockerfile = COMPOSE_FILE.parent / "Dockerfile"
    text = dockerfile.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert "pip install ." in text
    assert "ENTRYPOINT" not in text


# ---- postgres ------------------------------------------------------------------------------


def test_postgres_enables_logical_decoding(services: dict[str, dict[str, Any]]) -> None:
    command = " ".join(command_of(services["postgres"]))
    assert "wal_level=logical" in command
    assert "max_wal_senders=" in command
    assert "max_replication_slots=" in command


# ---- ports ---------------------------------------------------------------------------------


def test_every_published_port_binds_localhost(services: dict[str, dict[str, Any]]) -> None:
    offenders = [
        (name, host_ip, host_port, target)
        for name, service in services.items()
        for host_ip, host_port, target in published_ports(service)
        if host_ip != "127.0.0.1" or not host_port
    ]
    assert not offenders, f"ports not bound to 127.0.0.1 with an explicit host port: {offenders}"


def test_expected_ports_are_published(services: dict[str, dict[str, Any]]) -> None:
    def targets(name: str) -> dict[str, str]:
        return {target: host for _, host, target in published_ports(services[name])}

    assert targets("postgres").get("5432") == "5432"
    assert targets("clickhouse").get("8123") == "8123"
    assert targets("clickhouse").get("9000") == "9000"


# ---- wiring --------------------------------------------------------------------------------


def test_connector_init_mounts_the_repository_connectors(
    services: dict[str, dict[str, Any]],
) -> None:
    service = services["connector-init"]
    assert ("./connectors", "/app/connectors") in volume_pairs(service)
    mounts = [v for v in service["volumes"] if str(v).startswith("./connectors:")]
    assert mounts and all(str(v).endswith(":ro") for v in mounts), "mount it read-only"


def test_connector_init_points_at_connect(services: dict[str, dict[str, Any]]) -> None:
    url = urlsplit(env_of(services["connector-init"])["CONNECT_URL"])
    assert url.hostname == "connect"
    assert url.port == 8083
    connect_targets = {t for _, _, t in published_ports(services["connect"])}
    assert "8083" in connect_targets


@pytest.mark.parametrize("name", ["connector-init", "projector"])
def test_registry_url_is_the_ccompat_api(services: dict[str, dict[str, Any]], name: str) -> None:
    url = urlsplit(env_of(services[name])["REGISTRY_URL"])
    assert url.hostname == "schema-registry"
    assert url.port == 8080
    assert url.path.rstrip("/") == CCOMPAT_PATH
    registry_targets = {t for _, _, t in published_ports(services["schema-registry"])}
    assert str(url.port) in registry_targets


def test_connector_init_has_what_the_connector_file_needs(
    services: dict[str, dict[str, Any]],
) -> None:
    placeholders = re.findall(
        r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
        (COMPOSE_FILE.parent / "connectors" / "postgres-source.json").read_text(),
    )
    required = set(placeholders) - {"TABLE_INCLUDE_LIST"}  # derived from CAPTURE by apply
    env = env_of(services["connector-init"])
    assert required <= set(env), f"missing for the connector file: {sorted(required - set(env))}"
    assert env["PG_HOST"] == "postgres"
    assert env["PG_PORT"] == "5432"
    assert urlsplit(env["ADMIN_DSN"]).hostname == "postgres"
    assert env["CAPTURE"].startswith("${CAPTURE")


@pytest.mark.parametrize(
    ("name", "key"), [("projector", "KAFKA_BOOTSTRAP"), ("connect", "BOOTSTRAP_SERVERS")]
)
def test_kafka_bootstrap_matches_the_broker_listener(
    services: dict[str, dict[str, Any]], name: str, key: str
) -> None:
    bootstrap = env_of(services[name])[key]
    addresses = kafka_listener_addresses(services["kafka"])
    for server in bootstrap.split(","):
        assert server in addresses, f"{name} {key}={server} is not one of {sorted(addresses)}"
        assert server.split(":")[0] == "kafka", "containers reach the broker by its service name"


def test_projector_writes_to_the_clickhouse_service(services: dict[str, dict[str, Any]]) -> None:
    url = urlsplit(env_of(services["projector"])["PROJECTOR_CLICKHOUSE_URL"])
    assert url.hostname == "clickhouse"
    assert url.port == 8123


def test_kafka_is_single_node_kraft(services: dict[str, dict[str, Any]]) -> None:
    env = env_of(services["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")[0] == node_id
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
    ):
        assert env[key] == "1"


def test_schema_registry_stores_in_postgres(services: dict[str, dict[str, Any]]) -> None:
    env = env_of(services["schema-registry"])
    assert env["APICURIO_STORAGE_KIND"] == "sql"
    assert env["APICURIO_STORAGE_SQL_KIND"] == "postgresql"
    assert env["APICURIO_DATASOURCE_URL"].startswith("jdbc:postgresql://postgres:5432/")
    assert env["APICURIO_DATASOURCE_USERNAME"].startswith("${")


def test_clickhouse_keeps_its_data_in_a_named_volume(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    sources = {
        s for s, t in volume_pairs(compose["services"]["clickhouse"]) if t == "/var/lib/clickhouse"
    }
    assert sources and sources <= named


def test_connect_mounts_the_avro_converter_plugin(services: dict[str, dict[str, Any]]) -> None:
    plugin_mounts = [
        (source, target)
        for source, target in volume_pairs(services["connect"])
        if target.startswith("/kafka/connect/")
    ]
    assert ("./.connect-plugins", "/kafka/connect/confluent-avro") in plugin_mounts


# ---- start order ---------------------------------------------------------------------------


def test_every_dependency_exists(services: dict[str, dict[str, Any]]) -> None:
    missing = [
        (name, dep)
        for name, service in services.items()
        for dep in depends_on_of(service)
        if dep not in services
    ]
    assert not missing, f"depends_on names unknown services: {missing}"


def test_dependencies_wait_for_health_where_there_is_a_healthcheck(
    services: dict[str, dict[str, Any]],
) -> None:
    wrong = [
        (name, dep, condition)
        for name, service in services.items()
        for dep, condition in depends_on_of(service).items()
        if dep in services and "healthcheck" in services[dep] and condition != "service_healthy"
    ]
    assert not wrong, f"should be condition: service_healthy: {wrong}"


def test_projector_waits_for_the_connector_to_be_applied(
    services: dict[str, dict[str, Any]],
) -> None:
    deps = depends_on_of(services["projector"])
    assert deps.get("connector-init") == "service_completed_successfully"


@pytest.mark.parametrize("name", ["postgres", "kafka", "clickhouse", "connect"])
def test_healthchecks(services: dict[str, dict[str, Any]], name: str) -> None:
    expected = {
        "postgres": "pg_isready",
        "kafka": "kafka-broker-api-versions.sh --bootstrap-server localhost:9092",
        "clickhouse": "http://localhost:8123/ping",
        "connect": "http://localhost:8083/connectors",
    }[name]
    test = services[name]["healthcheck"]["test"]
    text = test if isinstance(test, str) else " ".join(str(t) for t in test)
    assert expected in text


# ---- secrets -------------------------------------------------------------------------------


def test_no_literal_passwords_in_the_environment(services: dict[str, dict[str, Any]]) -> None:
    literal = [
        (name, key, value)
        for name, service in services.items()
        for key, value in env_of(service).items()
        if "PASSWORD" in key.upper() and not value.startswith("${")
    ]
    assert not literal, f"passwords must come from ${{VAR}}: {literal}"


def test_no_literal_passwords_in_urls(services: dict[str, dict[str, Any]]) -> None:
    credentials = re.compile(r"://[^/:@\s]+:([^@\s]*)@")
    literal = [
        (name, key)
        for name, service in services.items()
        for key, value in env_of(service).items()
        for password in credentials.findall(value)
        if not password.startswith("${")
    ]
    assert not literal, f"credentials in URLs must come from ${{VAR}}: {literal}"

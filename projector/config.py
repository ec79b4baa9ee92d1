"""Projector settings: where events come from and where tables go.

Sources, lowest priority first: defaults (which point at the local stack when it exists), a TOML
file given with `--config`, environment variables `PROJECTOR_<FIELD>` (and the connector's
`KAFKA_BOOTSTRAP` / `REGISTRY_URL`; the source database for `--until-caught-up` from the
connector's `PG_*` / `CDC_*` values or `ADMIN_DSN` when `source_dsn` is not set).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, cast
from urllib.parse import quote

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from projector.clickhouse import ChdbBackend, ServerBackend
from projector.errors import ConfigError
from schemas.errors import SchemaError
from schemas.upcasters import Upcasters

# What a delete means for a table (projector/replicas/delete_policy.py says what each does).
DeletePolicy = Literal["hard", "soft", "history"]
POLICIES: tuple[DeletePolicy, ...] = ("hard", "soft", "history")
DELETE_POLICY_SETTING = "DELETE_POLICY"

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$]*$")


def parse_policies(value: object) -> dict[str, DeletePolicy]:
    """`schema.table=policy` pairs, comma-separated (the environment's form) or a mapping (a
    TOML table). Raises ValueError naming what is wrong."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        pairs: dict[str, str] = {}
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            table, sep, policy = item.partition("=")
            if not sep:
                raise ValueError(f"{DELETE_POLICY_SETTING}: {item!r} is not schema.table=policy")
            if table.strip() in pairs:
                raise ValueError(f"{DELETE_POLICY_SETTING}: {table.strip()} is named twice")
            pairs[table.strip()] = policy.strip()
    elif isinstance(value, Mapping):
        pairs = {str(k): str(v) for k, v in value.items()}
    else:
        raise ValueError(
            f"{DELETE_POLICY_SETTING}: expected schema.table=policy pairs, got {value!r}"
        )
    found: dict[str, DeletePolicy] = {}
    for table, policy in pairs.items():
        if not _TABLE.match(table):
            raise ValueError(f"{DELETE_POLICY_SETTING}: {table!r} is not schema.table")
        if policy not in POLICIES:
            raise ValueError(
                f"{DELETE_POLICY_SETTING}: {table} has policy {policy!r}; one of {', '.join(POLICIES)}"
            )
        found[table] = cast(DeletePolicy, policy)
    return found


class ProjectorConfig(BaseModel):
    model_config = {"extra": "forbid"}

    kafka_bootstrap: str = "127.0.0.1:19092"
    # The source database, read only by `run --until-caught-up` (its WAL position when the run
    # starts). Unset: the connector's own login (PG_HOST, PG_PORT, PG_DATABASE, CDC_USER,
    # CDC_PASSWORD, as `projector connectors apply` reads them), else ADMIN_DSN.
    source_dsn: str | None = None
    registry_url: str = "http://127.0.0.1:18081/apis/ccompat/v7"
    topic_prefix: str = "cdc"
    # Schemas whose tables are projected (Debezium's own control schema never is).
    schemas: list[str] = Field(default_factory=lambda: ["public", "shop"])
    # Which tables of those schemas (a regular expression for the whole table name).
    table_pattern: str = "[^.]+"
    group_id: str = "projector"
    # The connector's publication (`publication.name`, PUBLICATION_NAME): the captured tables, whose
    # replicas exist before their first event (projector/replicas/source_tables.py).
    publication: str = "projector_pub"
    # The connector's replication slot (`slot.name`, SLOT_NAME): its health in the metrics.
    slot_name: str = "projector_slot"

    # What a delete means per source table (projector/replicas/delete_policy.py): `schema.table`
    # → hard (default), soft or history; env DELETE_POLICY="shop.orders=soft,shop.prices=history".
    delete_policy: dict[str, DeletePolicy] = Field(default_factory=dict)
    # The `history` tables of source schema S live in ClickHouse database `<history_prefix>S`.
    history_prefix: str = "history_"

    backend: Literal["chdb", "server"] = "chdb"
    chdb_path: Path = Field(default_factory=lambda: Path.cwd() / ".stack" / "chdb")
    clickhouse_url: str = "http://127.0.0.1:8123"
    clickhouse_user: str = "default"
    clickhouse_password: str = ""
    # A cluster named in the servers' `remote_servers` (one shard, N replicas): DDL then runs
    # ON CLUSTER with Replicated* engines and Keeper-backed insert deduplication (see
    # `projector.clickhouse.Topology`). Server backend only.
    clickhouse_cluster: str | None = None
    # Replica of source schema S lives in ClickHouse database `<replica_prefix>S`.
    replica_prefix: str = "replica_"
    # Analysts' views of the replicas' current rows (docs/analysts.md) live in database
    # `<view_prefix>S`. Unset: the replica prefix without its `replica_` (`shop.orders` beside
    # `replica_shop.orders`), else the replica prefix and `current_`.
    view_prefix: str | None = None
    control_database: str = "projector"

    # Consume Debezium's transaction topic to compute consistency watermarks.
    transaction_metadata: bool = True
    # How often a running projector drops the ledger rows no watermark needs any more
    # (projector/commit/ledger.py, "Pruning").
    ledger_prune_interval_s: float = Field(default=300.0, gt=0)
    # Read models (projector/read_models/read_models.toml by default) over the replica of one source schema.
    read_models_file: Path | None = None
    read_model_schema: str = "shop"
    read_model_database: str = "read_models"
    # May this process keep the read models? One process at a time does, the holder of the
    # stage's lease (docs/read-models.md, "One maintainer"); false: it never takes the lease.
    maintain_read_models: bool = True
    # Keys recomputed per backfill chunk of a new read-model version (one chunk runs between two
    # batches: smaller chunks keep ingestion going, larger ones finish sooner).
    read_model_backfill_chunk_keys: int = Field(default=250_000, ge=1)
    # Messages a replica rebuild from Kafka applies per partition and step (replica_rebuild.py):
    # as many as a live batch; one step holds ingestion while it applies, and the next chunk is
    # read ahead meanwhile.
    replica_rebuild_chunk_messages: int = Field(default=50_000, ge=1)

    # Prometheus metrics at http://127.0.0.1:<port>/metrics (projector/metrics.py); 0: none.
    metrics_port: int = Field(default=19464, ge=0, le=65535)
    # Where it listens: this machine only, unless another container must read it (compose).
    metrics_host: str = "127.0.0.1"
    # Let ClickHouse decode batches itself where it can (projector/replicas/fast_path.py; either backend).
    fast_path: bool = True
    # Messages per batch (one partition): each batch costs two checkpoint inserts, so bigger
    # batches go faster through a backlog; a batch is cut sooner when nothing more is waiting.
    # At most 1,000,000: a fast-path batch must stay one ClickHouse insert block.
    max_batch_messages: int = Field(default=50_000, ge=1, le=1_000_000)
    # Messages per batch of the transaction topic, where it should differ (None: the same): its
    # BEGIN/END events are a few ledger rows each, so a deployment that keeps its table batches
    # small (big rows; the tests, for many batch boundaries) still takes a backlog of
    # transactions in few batches, each of which costs the same checkpoint inserts.
    transaction_batch_messages: int | None = Field(default=None, ge=1, le=1_000_000)
    max_batch_wait_ms: int = Field(default=50, ge=1)
    dlq_topic: str = "projector.dlq"
    # Declared renames and type changes of source columns (schemas/upcasters.py); None: the
    # file shipped in schemas/.
    upcasters_file: Path | None = None
    # How soon the group hands a crashed member's partitions to the others (Kafka's default is
    # 45 s; positions come from ClickHouse checkpoints, so a quick hand-over is safe).
    session_timeout_ms: int = Field(default=10_000, ge=6_000)
    # How long the group waits for a member's next poll before it moves the member's partitions
    # (Kafka's `max.poll.interval.ms`). The projector keeps polling while a batch waits for
    # ClickHouse, so an outage does not cost it its partitions; a hand-over waits for the batch in
    # flight a third of this at most (the fence keeps a batch that finishes later out).
    max_poll_interval_ms: int = Field(default=300_000, ge=6_000)

    # The query service (queries/service.py): `projector serve`, or `projector run --serve`.
    # Bearer token every endpoint but /health requires (PROJECTOR_API_TOKEN); none: no service.
    api_token: str | None = None
    query_host: str = "127.0.0.1"
    query_port: int = Field(default=18000, ge=1, le=65535)
    # Named queries (*.sql); None: the ones shipped in queries/sql.
    query_dir: Path | None = None
    # Cached results (0: no cache), and how long one may be served at the same watermark.
    query_cache_entries: int = Field(default=10_000, ge=0)
    query_cache_ttl_s: float = Field(default=60.0, gt=0)
    # The longest a request with `min_lsn` waits for the read model before answering 202.
    query_wait_ms: int = Field(default=5_000, ge=0, le=60_000)
    # Rows per page of a named query (`limit`), and of an ad-hoc SQL result; its time limit.
    query_max_page: int = Field(default=10_000, ge=1)
    sql_max_rows: int = Field(default=10_000, ge=1)
    sql_max_seconds: float = Field(default=10.0, gt=0)
    # What one ad-hoc statement may take of ClickHouse (docs/security.md): memory, bytes read,
    # the result's size; and how many run at once (beyond: 429 with Retry-After), so named
    # queries and ingestion keep their share.
    sql_max_memory_bytes: int = Field(default=512 * 1024**2, ge=1024**2)
    sql_max_result_bytes: int = Field(default=64 * 1024**2, ge=1024)
    sql_max_bytes_to_read: int = Field(default=10 * 1024**3, ge=1024**2)
    sql_max_concurrent: int = Field(default=2, ge=1)
    # Requests waiting for `min_lsn` at once (beyond: 202 at once), and the largest request
    # body the service reads (beyond: 413, before it is read).
    query_max_waiters: int = Field(default=16, ge=0)
    query_max_body_bytes: int = Field(default=1024**2, ge=1024)
    # Where the ops page reads the projector's metrics (lag in seconds); None: this machine's
    # `metrics_port`. How often it samples lag, connector and slot health for its chart.
    projector_metrics_url: str | None = None
    ops_sample_s: float = Field(default=2.0, gt=0)
    # `projector status` and the ops page warn when the replication slot keeps more WAL than this.
    wal_retained_warning_bytes: int = Field(default=1 << 30, ge=0)

    @field_validator("delete_policy", mode="before")
    @classmethod
    def _policies(cls, value: object) -> dict[str, DeletePolicy]:
        return parse_policies(value)

    @field_validator("schemas")
    @classmethod
    def _no_control_schema(cls, value: list[str]) -> list[str]:
        if "debezium" in value:
            raise ValueError("schema 'debezium' holds Debezium's signal/heartbeat tables")
        return value

    @model_validator(mode="after")
    def _poll_interval_covers_the_session(self) -> ProjectorConfig:
        if self.max_poll_interval_ms < self.session_timeout_ms:
            raise ValueError(
                "max_poll_interval_ms must be at least session_timeout_ms (Kafka's rule)"
            )
        return self

    @model_validator(mode="after")
    def _cluster_needs_a_server(self) -> ProjectorConfig:
        if self.clickhouse_cluster and self.backend != "server":
            raise ValueError("clickhouse_cluster needs backend = 'server' (chDB is one process)")
        return self

    def topic_pattern(self) -> str:
        """librdkafka subscription regex for the captured tables' topics."""
        schemas = "|".join(self.schemas)
        return rf"^{self.topic_prefix}\.({schemas})\.({self.table_pattern})$"

    def subscription(self) -> list[str]:
        """What the consumer subscribes to: the table topics (a regex), and the transaction
        topic when watermarks are on."""
        topics = [self.topic_pattern()]
        if self.transaction_metadata:
            topics.append(self.transaction_topic)
        return topics

    def subscribes_to(self, topic: str) -> bool:
        return bool(re.match(self.topic_pattern(), topic)) or (
            self.transaction_metadata and topic == self.transaction_topic
        )

    @property
    def analyst_view_prefix(self) -> str:
        if self.view_prefix is not None:
            return self.view_prefix
        if self.replica_prefix.endswith("replica_"):
            return self.replica_prefix.removesuffix("replica_")
        return f"{self.replica_prefix}current_"

    @property
    def transaction_topic(self) -> str:
        return f"{self.topic_prefix}.transaction"

    def batch_messages(self, topic: str) -> int:
        """How many messages a batch of `topic` holds at most."""
        if topic == self.transaction_topic and self.transaction_batch_messages is not None:
            return self.transaction_batch_messages
        return self.max_batch_messages

    @property
    def notification_topic(self) -> str:
        """Debezium's notifications (`notification.sink.topic.name`, connectors/)."""
        return f"{self.topic_prefix}.notifications"


# The local stack (`projector stack up`) writes its addresses here, under its state directory.
STACK_ENV_FILE = "client.env"


def client_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The one rule for where addresses and credentials come from, used by every command: the
    process environment (or `env`) wins over the local stack's `client.env` (written by
    `projector stack up` into `$PROJECTOR_STATE_DIR`, default `./.stack`), which wins over the
    built-in defaults."""
    env = dict(os.environ if env is None else env)
    state_dir = Path(env.get("PROJECTOR_STATE_DIR") or Path.cwd() / ".stack")
    merged: dict[str, str] = {}
    try:
        for line in (state_dir / STACK_ENV_FILE).read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and name.strip() and not name.lstrip().startswith("#"):
                merged[name.strip()] = value
    except FileNotFoundError:
        pass  # no local stack here: everything comes from the environment or the defaults
    merged.update(env)
    return merged


_ENV_ALIASES = {
    "KAFKA_BOOTSTRAP": "kafka_bootstrap",
    "REGISTRY_URL": "registry_url",
    "PUBLICATION_NAME": "publication",
    "SLOT_NAME": "slot_name",
    DELETE_POLICY_SETTING: "delete_policy",
}


def load_config(path: Path | None = None, env: dict[str, str] | None = None) -> ProjectorConfig:
    """Defaults, then the TOML file at `path`, then the environment by `client_environment`'s
    rule (`PROJECTOR_<FIELD>`, and `KAFKA_BOOTSTRAP` / `REGISTRY_URL` / `PUBLICATION_NAME`)."""
    env = client_environment(env)
    values: dict[str, object] = {}
    if path is not None:
        try:
            values.update(tomllib.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    for name, field in _ENV_ALIASES.items():
        if env.get(name):
            values[field] = env[name]
    for field in ProjectorConfig.model_fields:
        key = f"PROJECTOR_{field.upper()}"
        if env.get(key):
            raw = env[key]
            values[field] = raw.split(",") if field == "schemas" else raw
    if "source_dsn" not in values:
        values["source_dsn"] = connector_source_dsn(env)
    try:
        config = ProjectorConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid projector config: {problems}") from exc
    try:  # a broken upcaster file stops start-up, not a batch (read models: projector.cli)
        Upcasters.load(config.upcasters_file)
    except SchemaError as exc:
        raise ConfigError(str(exc)) from exc
    return config


def connector_source_dsn(env: dict[str, str]) -> str | None:
    """The source database as the connector's environment names it: Debezium's own login (it
    may read the WAL position and nothing more is needed), else the admin DSN; None when the
    environment has neither."""
    if all(env.get(name) for name in ("PG_HOST", "PG_DATABASE", "CDC_USER")):
        user, database = quote(env["CDC_USER"], safe=""), quote(env["PG_DATABASE"], safe="")
        password = quote(env.get("CDC_PASSWORD") or "", safe="")
        login = f"{user}:{password}" if password else user
        return f"postgresql://{login}@{env['PG_HOST']}:{env.get('PG_PORT') or 5432}/{database}"
    return env.get("ADMIN_DSN") or None


def open_backend(config: ProjectorConfig) -> ChdbBackend | ServerBackend:
    """The configured ClickHouse: the embedded engine on `chdb_path`, or a server."""
    if config.backend == "chdb":
        config.chdb_path.mkdir(parents=True, exist_ok=True)
        return ChdbBackend(str(config.chdb_path))
    return ServerBackend(
        config.clickhouse_url,
        config.clickhouse_user,
        config.clickhouse_password,
        config.clickhouse_cluster,
    )

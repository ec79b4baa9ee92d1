"""The DDL every store sends, on one ClickHouse and on a cluster (projector.clickhouse.Topology).

The statements are recorded from the real stores with a backend that only records, then parsed by
ClickHouse's own parser (chDB's `EXPLAIN AST`, in a child process so its engine does not clash
with other tests' sessions): a typo in generated DDL fails here, not on a production cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from projector.clickhouse import Topology
from projector.commit.checkpoint import CheckpointStore
from projector.commit.dead_letters import DeadLetterStore
from projector.commit.ledger import TransactionLedger
from projector.read_models.definitions import load_definitions
from projector.read_models.maintenance import ReadModelMaintainer
from projector.replicas.catalog import ReplicaCatalog, ReplicaTable, SourceColumn
from schemas.type_map import column_type


class RecordingClickHouse:
    """Records every statement; answers reads with no rows (nothing exists yet)."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.statements: list[str] = []

    def execute(self, sql: str) -> None:
        self.statements.append(sql)

    def rows(self, sql: str) -> list[dict[str, Any]]:
        self.statements.append(sql)
        return []

    def text(self, sql: str, fmt: str) -> str:
        self.statements.append(sql)
        return ""


def all_ddl(topology: Topology) -> list[str]:
    """Every CREATE / ALTER the engine's stores send for a fresh deployment."""
    ch = RecordingClickHouse(topology)
    CheckpointStore(ch, "projector", "replica").create()
    DeadLetterStore(ch, "projector").create()
    TransactionLedger(ch, "projector", "replica").create()
    catalog = ReplicaCatalog(ch, "replica_")
    catalog._load = lambda database, table: ReplicaTable(database, table, [])  # type: ignore[method-assign]
    text = column_type({"type": "string"})
    number = column_type({"type": "long"})
    catalog._create(
        "replica_public", "orders", ["id"], [SourceColumn("id", number), SourceColumn("note", text)]
    )
    catalog._create("replica_public", "events", [], [SourceColumn("payload", text)])
    # a column added later: the ALTER goes through the same topology
    ch.statements.append(
        topology.alter_table("`replica_public`.`orders`", "ADD COLUMN IF NOT EXISTS `x` Int32")
    )
    definitions = load_definitions(None)
    sources = {s for family in definitions.families for s in family.entity.sources}

    def answers(sql: str) -> list[dict[str, Any]]:
        """What a fresh deployment's ClickHouse says: the shop's replicas exist, nothing else."""
        ch.statements.append(sql)
        if sql.startswith("DESCRIBE"):  # every alias a column (its type does not matter here)
            return [
                {"name": n, "type": "Int64"} for n in dict.fromkeys(re.findall(r"AS (\w+)", sql))
            ]
        if "system.columns" in sql:
            return [
                {"name": "order_id", "type": "Int64", "k": 0},
                {"name": "status", "type": "String", "k": 0},
            ]
        if "count() AS n" in sql:
            return [{"n": 0, "lo": None, "hi": None}]
        if "system.tables" in sql and "endsWith" not in sql:
            return [{"name": s} for s in sources]
        return []

    ch.rows = answers  # type: ignore[method-assign]
    maintainer = ReadModelMaintainer(
        ch, definitions, "shop", "replica_shop", "read_models", "projector"
    )
    maintainer.family_versions.ensure()
    while maintainer.building:  # an empty backfill, then the views switch to the new tables
        maintainer.backfill_step()
    return [s for s in ch.statements if s.startswith(("CREATE", "ALTER", "SYSTEM"))]


def parse_errors(statements: list[str]) -> dict[str, str]:
    """Each statement ClickHouse's parser refuses, with its message."""
    program = (
        "import json, sys, chdb\n"
        "bad = {}\n"
        "for s in json.load(sys.stdin):\n"
        "    try:\n"
        "        chdb.query('EXPLAIN AST ' + s, 'TSV')\n"
        "    except Exception as exc:\n"
        "        bad[s] = str(exc).splitlines()[0]\n"
        "print(json.dumps(bad))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        input=json.dumps(statements),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single() -> list[str]:
    return all_ddl(Topology())


@pytest.fixture(scope="module")
def cluster() -> list[str]:
    return all_ddl(Topology("analytics"))


def created_tables(statements: list[str]) -> list[str]:
    """Each table's CREATE (the first: scratch tables are made sure of again), scratch apart."""
    seen: dict[str, str] = {}
    for statement in statements:
        found = re.match(r"CREATE TABLE IF NOT EXISTS (\S+)", statement)
        memory = "ENGINE = Memory" in statement  # a recompute's scratch (below)
        if found and "__staged__" not in statement and not memory:
            seen.setdefault(found.group(1), statement)
    return list(seen.values())


def scratch_tables(statements: list[str]) -> list[str]:
    """The read models' durable scratch tables (version_tables.py `SCRATCH`), each once."""
    seen: dict[str, str] = {}
    for statement in statements:
        found = re.match(r"CREATE TABLE IF NOT EXISTS (\S+__staged__\S+)", statement)
        if found:
            seen.setdefault(found.group(1), statement)
    return list(seen.values())


def test_single_server_ddl_is_plain_and_deduplicates(single: list[str]) -> None:
    tables = created_tables(single)
    # checkpoints, partition owners and resets, dlq, two ledgers, a keyed and a key-less replica,
    # the read-model versions, three entity tables, six aggregate tables and four index tables
    assert len(tables) == 22
    # durable scratch: each entity's stage
    scratch = scratch_tables(single)
    assert len(scratch) == 3
    for statement in scratch:  # token-ed rows, emptied a lease generation at a time
        assert "ENGINE = MergeTree PARTITION BY _generation ORDER BY _range" in statement
        assert "non_replicated_deduplication_window = 100000" in statement
    for statement in single:
        assert "ON CLUSTER" not in statement
        assert "Replicated" not in statement
    for statement in tables:
        window = (
            "0"
            if any(
                t in statement
                for t in (
                    "checkpoints",
                    "partition_owners",
                    "partition_resets",
                    "read_model_versions",
                )
            )
            else "100000"
        )
        assert f"non_replicated_deduplication_window = {window}" in statement
    assert any("ENGINE = ReplacingMergeTree(_version, _is_deleted)" in s for s in tables)
    assert any("ENGINE = MergeTree ORDER BY (_partition, _offset)" in s for s in tables)


def test_cluster_ddl_runs_on_every_replica_with_replicated_engines(cluster: list[str]) -> None:
    tables = created_tables(cluster)
    assert len(tables) == 22
    for statement in cluster:
        # a recompute's Memory scratch is the lease holder's, on the server it talks to
        if statement.startswith(("CREATE", "ALTER")) and "ENGINE = Memory" not in statement:
            assert " ON CLUSTER `analytics`" in statement, statement
    path = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'"
    # scratch is replicated too: whichever replica the next statement lands on reads it
    for statement in scratch_tables(cluster):
        assert f"ENGINE = ReplicatedMergeTree({path}) PARTITION BY _generation" in statement
    for statement in tables:
        assert "ENGINE = Replicated" in statement and path in statement, statement
        window = (
            "0"
            if any(
                t in statement
                for t in (
                    "checkpoints",
                    "partition_owners",
                    "partition_resets",
                    "read_model_versions",
                )
            )
            else "10000"
        )
        assert f"replicated_deduplication_window = {window}" in statement
        assert "non_replicated" not in statement
    keyed = next(s for s in tables if "`orders`" in s)
    assert f"ReplicatedReplacingMergeTree({path}, _version, _is_deleted)" in keyed
    keyless = next(s for s in tables if "`events`" in s)
    assert f"ReplicatedMergeTree({path}) ORDER BY (_partition, _offset)" in keyless
    assert any(s.startswith("CREATE OR REPLACE VIEW") for s in cluster)


def test_cluster_checkpoint_reads_sync_the_replica_first() -> None:
    ch = RecordingClickHouse(Topology("analytics"))
    CheckpointStore(ch, "projector", "replica").load([("cdc.public.t", 0)])
    assert ch.statements[0] == "SYSTEM SYNC REPLICA `projector`.checkpoints"
    assert ch.statements[1].startswith("SELECT")
    alone = RecordingClickHouse(Topology())
    CheckpointStore(alone, "projector", "replica").load([("cdc.public.t", 0)])
    assert not any(s.startswith("SYSTEM") for s in alone.statements)


def test_clickhouse_parses_every_generated_statement(single: list[str], cluster: list[str]) -> None:
    assert parse_errors(single + cluster) == {}


def test_the_parser_check_catches_a_broken_statement() -> None:
    broken = Topology("analytics").create_table("`db`.`t`", ["a Int64"], "MergeTree", "", "")
    assert broken in parse_errors([broken])  # an empty ORDER BY does not parse

"""Watermarks stay truthful (issue 10, item 6): a dead letter holds the watermark of the read
models over its table, and once it is replayed the watermark moves on.

The ledger's rules that no test stack can show in real time (two transactions with one xid after
Postgres' 2^32 wraparound, an END that cannot be decoded, pruning) are tested on an embedded
ClickHouse in tests/unit/test_ledger.py."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg

from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess


def commit(stack: StackHandle, statement: str) -> str:
    """Run `statement` in a transaction of its own; its Postgres xid (as Debezium names it)."""
    with psycopg.connect(stack.admin_dsn) as conn:
        conn.execute(statement)
        ((xid,),) = conn.execute("SELECT txid_current() % (2^32)::bigint").fetchall()
    return str(xid)


def watermark(projector: ProjectorProcess, model: str) -> str | None:
    result = projector.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    mark = json.loads(result.stdout)["read_models"][model]["watermark"]
    return None if mark is None else str(mark["tx_id"])


def test_a_replayed_dead_letter_releases_the_watermark(stack: StackHandle, tmp_path: Path) -> None:
    projector = ProjectorProcess(stack, tmp_path)
    table, model = projector.table("wm_replay"), projector.table("wm_model")
    models = tmp_path / "read_models.toml"
    models.write_text(
        f'[[read_model]]\nname = "{model}"\ndescription = "the rows"\nsources = ["{table}"]\n'
        f'key = ["id"]\nsql = "SELECT id FROM {{{table}}}"\n'
    )
    projector.env |= {"PROJECTOR_TRANSACTION_METADATA": "true",
                      "PROJECTOR_READ_MODEL_SCHEMA": "public",
                      "PROJECTOR_READ_MODELS_FILE": str(models)}  # fmt: skip
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
    stack.apply()
    first = commit(stack, f"INSERT INTO {table} VALUES (1, 'first')")
    run = projector.cli("run", "--until-caught-up", timeout_s=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert watermark(projector, model) == first

    # A renamed column: the next transaction's event is refused into the DLQ until an upcaster
    # declares the rename. The watermark stays before it, as it must.
    stack.sql(f"ALTER TABLE {table} RENAME COLUMN note TO remark")
    second = commit(stack, f"INSERT INTO {table} VALUES (2, 'second')")
    run = projector.cli("run", "--until-caught-up", timeout_s=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert watermark(projector, model) == first

    upcasters = tmp_path / "upcasters.toml"
    upcasters.write_text(
        f'[[upcaster]]\ntable = "public.{table}"\nrenames = {{ note = "remark" }}\n'
    )
    projector.env["PROJECTOR_UPCASTERS_FILE"] = str(upcasters)
    replay = projector.cli("dlq", "replay", "--topic", f"cdc.public.{table}", timeout_s=300)
    said = replay.stdout + replay.stderr
    assert replay.returncode == 0 and "replayed 1, still dead 0" in said, said
    # The replayed event completes its transaction: the watermark reaches it.
    assert watermark(projector, model) == second

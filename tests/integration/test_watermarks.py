"""Watermarks stay truthful (issue 10, item 6): a dead letter holds the watermark of the read
models over its table, and once it is replayed the watermark moves on.

The ledger's rules that no test stack can show in real time (two transactions with one xid after
Postgres' 2^32 wraparound, an END that cannot be decoded, pruning) are tested on an embedded
ClickHouse in tests/unit/test_ledger.py."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psycopg
from confluent_kafka import KafkaException, Message, Producer

from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess


def commit(stack: StackHandle, statement: str) -> str:
    """Run `statement` in a transaction of its own; its Postgres xid (as Debezium names it)."""
    with psycopg.connect(stack.admin_dsn) as conn:
        conn.execute(statement)
        ((xid,),) = conn.execute("SELECT txid_current() % (2^32)::bigint").fetchall()
    return str(xid)


def read_model_over(directory: Path, model: str, table: str) -> Path:
    """A read-model file with one read model, `model`: the ids of `table`."""
    path = directory / "read_models.toml"
    path.write_text(
        f'[[entity]]\nname = "{model}"\ndescription = "the rows"\nsources = ["{table}"]\n'
        f'key = ["id"]\nkeys = "SELECT id FROM {{{table}}}"\n'
        f'sql = "SELECT id FROM {{{table}}} WHERE id IN {{keys}}"\n'
        f'[entity.affects]\n{table} = "SELECT id FROM {{changed}}"\n'
    )
    return path


def watermark(projector: ProjectorProcess, model: str) -> str | None:
    result = projector.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    mark = json.loads(result.stdout)["read_models"][model]["watermark"]
    return None if mark is None else str(mark["tx_id"])


def test_a_replayed_dead_letter_releases_the_watermark(stack: StackHandle, tmp_path: Path) -> None:
    projector = ProjectorProcess(stack, tmp_path)
    table, model = projector.table("wm_replay"), projector.table("wm_model")
    models = read_model_over(tmp_path, model, table)
    projector.env |= {
        "PROJECTOR_TRANSACTION_METADATA": "true",
        "PROJECTOR_READ_MODEL_SCHEMA": "public",
        "PROJECTOR_READ_MODELS_FILE": str(models),
    }
    # Two value columns: a rename of the only one would be read as a drop and an add.
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, note text, qty int)")
    stack.apply()
    first = commit(stack, f"INSERT INTO {table} VALUES (1, 'first', 1)")
    run = projector.cli("run", "--until-caught-up", timeout_s=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert watermark(projector, model) == first

    # A renamed column: the next transaction's event is refused into the DLQ until an upcaster
    # declares the rename. The watermark stays before it, as it must.
    stack.sql(f"ALTER TABLE {table} RENAME COLUMN note TO remark")
    second = commit(stack, f"INSERT INTO {table} VALUES (2, 'second', 2)")
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
    # The replayed event completes its transaction in the replica; the read model, kept by the
    # projector's stage, is not there yet: its watermark says so.
    assert watermark(projector, model) == first
    # The next run's stage recomputes the replayed offset: the watermark reaches it.
    run = projector.cli("run", "--until-caught-up", timeout_s=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert watermark(projector, model) == second
    rows = projector.sql(f"SELECT id FROM {projector.read_model_db}.{model} ORDER BY id")
    assert [int(r["id"]) for r in rows] == [1, 2]


def test_an_unreadable_end_holds_the_watermark(stack: StackHandle, tmp_path: Path) -> None:
    """Three transactions on a table; the second's change event never arrives and its END cannot
    be decoded. A projector that skipped the END would find the third complete and show it as
    the watermark, past an incomplete transaction; it must stop at the first.

    The projector reads topics of its own prefix, filled with Debezium's real messages (copied
    from `cdc.*`, bytes unchanged) and one message that is not Confluent-framed in place of the
    second END: the shared `cdc.transaction` stays clean for every other test."""
    projector = ProjectorProcess(stack, tmp_path)
    table, model = projector.table("wm_unreadable"), projector.table("wm_model")
    prefix = f"wm{projector.unique}"
    models = read_model_over(tmp_path, model, table)
    projector.env |= {
        "PROJECTOR_TRANSACTION_METADATA": "true",
        "PROJECTOR_READ_MODEL_SCHEMA": "public",
        "PROJECTOR_READ_MODELS_FILE": str(models),
        "PROJECTOR_TOPIC_PREFIX": prefix,
    }
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
    stack.apply()
    xids = [commit(stack, f"INSERT INTO {table} VALUES ({n}, 'row {n}')") for n in (1, 2, 3)]
    topic = f"cdc.public.{table}"
    changes = wait_for_messages(stack, topic, 3)
    decoder = stack.decoder()

    def tx_of(msg: Message) -> str:
        value = decoder.decode(topic, 0, msg.offset() or 0, msg.key(), msg.value()).value or {}
        return str((value.get("transaction") or {})["id"]).partition(":")[0]

    ends = {}  # xid -> (BEGIN, END) messages of the transaction topic
    for msg in stack.messages_to_end("cdc.transaction"):
        value = decoder.decode("cdc.transaction", 0, msg.offset() or 0, msg.key(), msg.value())
        xid = str((value.value or {}).get("id", "")).partition(":")[0]
        if xid in xids:
            ends.setdefault(xid, []).append(msg)
    assert all(len(ends.get(x, [])) == 2 for x in xids), ends

    producer = Producer({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"]})
    for msg in changes:
        if tx_of(msg) != xids[1]:  # the second transaction's event never arrives
            producer.produce(f"{prefix}.public.{table}", key=msg.key(), value=msg.value())
    for xid in xids:
        begin, end = ends[xid]
        producer.produce(f"{prefix}.transaction", key=begin.key(), value=begin.value())
        value = b"not an Avro message" if xid == xids[1] else end.value()
        producer.produce(f"{prefix}.transaction", key=end.key(), value=value)
    producer.flush(30)

    run = projector.cli("run", "--until-kafka-end", timeout_s=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert watermark(projector, model) == xids[0]
    letters = projector.cli("dlq", "list", "--format", "json")
    assert f'"topic": "{prefix}.transaction"' in letters.stdout, letters.stdout


def wait_for_messages(stack: StackHandle, topic: str, count: int) -> list[Message]:
    """The first `count` messages of `topic`, once Debezium has written them."""
    deadline = time.monotonic() + 120
    while True:
        try:
            if stack.end_offset(topic) >= count:
                return stack.messages_to_end(topic)[:count]
        except KafkaException:
            pass  # the topic appears with its first event
        assert time.monotonic() < deadline, f"{topic} has fewer than {count} messages"
        time.sleep(0.5)


TRANSACTIONS = 12_000


def test_the_running_projector_prunes_its_ledger_and_keeps_the_watermark(
    stack: StackHandle, tmp_path: Path
) -> None:
    projector = ProjectorProcess(stack, tmp_path)
    table, model = projector.table("wm_prune"), projector.table("wm_model")
    models = read_model_over(tmp_path, model, table)
    projector.env |= {
        "PROJECTOR_TRANSACTION_METADATA": "true",
        "PROJECTOR_READ_MODEL_SCHEMA": "public",
        "PROJECTOR_READ_MODELS_FILE": str(models),
    }
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
    stack.apply()
    # A backlog of 12,000 single-row transactions (an application at 40 tx/s for five minutes):
    # more spans than one statement could name when they are pruned.
    with psycopg.connect(stack.admin_dsn) as conn:
        for n in range(TRANSACTIONS):
            conn.execute(f"INSERT INTO {table} VALUES ({n}, 'row {n}')")
            conn.commit()
        last_xid = commit(stack, f"INSERT INTO {table} VALUES ({TRANSACTIONS}, 'the last')")
    run = projector.cli(
        "run",
        "--until-caught-up",
        timeout_s=600,
        env={"PROJECTOR_LEDGER_PRUNE_INTERVAL_S": "86400"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    collection = f"public.{table}"

    def ends_on_table() -> int:
        rows = projector.sql(
            f"SELECT count() AS n FROM {projector.control_db}.transaction_ends "
            f"WHERE data_collection = '{collection}'"
        )
        return int(rows[0]["n"])

    assert ends_on_table() == TRANSACTIONS + 1  # not pruned yet
    projector.env["PROJECTOR_LEDGER_PRUNE_INTERVAL_S"] = "1"
    process = projector.start()  # runs on, and prunes every second
    try:
        projector.wait_for_log("settled transaction(s) pruned")
        assert process.poll() is None, projector.log.read_text()[-3000:]  # the run goes on
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, projector.log.read_text()[-3000:]
    assert "the run goes on" not in projector.log.read_text()  # no chore failed
    # Every transaction on the table is complete: only the newest of them is still needed.
    assert ends_on_table() == 1
    assert watermark(projector, model) == last_xid

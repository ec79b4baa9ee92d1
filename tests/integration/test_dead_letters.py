"""Data never stops the projector: a message whose content or schema it cannot apply goes to the
dead-letter queue with its reason, and the messages around it are applied."""

from __future__ import annotations

import io
import json

import fastavro
import httpx
from confluent_kafka import Producer

from tests.integration.conftest import StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source

# Valid Avro under a registered schema, with an `op` like an envelope, but no `before`/`after`.
NOT_AN_ENVELOPE = {
    "type": "record",
    "name": "NotAnEnvelope",
    "namespace": "test",
    "fields": [{"name": "op", "type": "string"}, {"name": "note", "type": "string"}],
}


def produce_framed(stack: StackHandle, topic: str, schema: dict, datum: dict) -> int:
    """Register `schema` under a subject of its own and produce `datum` in the Confluent wire
    format (as key and value) to `topic`; returns the message's offset."""
    registered = httpx.post(
        f"{stack.env['REGISTRY_URL']}/subjects/{topic}-crafted-value/versions",
        json={"schema": json.dumps(schema)},
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        timeout=30,
    )
    registered.raise_for_status()
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(schema), datum)
    framed = b"\x00" + int(registered.json()["id"]).to_bytes(4, "big") + body.getvalue()
    offsets: list[int] = []
    producer = Producer({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"]})
    producer.produce(
        topic,
        key=framed,
        value=framed,
        partition=0,
        on_delivery=lambda err, msg: offsets.append(msg.offset()) if err is None else None,
    )
    producer.flush(10)
    assert len(offsets) == 1, "the crafted message was not delivered"
    return offsets[0]


@one_backend("server")
def test_a_message_that_is_not_a_debezium_envelope_is_dead_lettered(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    table = projector.table("dl_envelope")
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    stack.apply()
    stack.sql(f"INSERT INTO {table} VALUES (1, 'before')")
    projector.catch_up()

    offset = produce_framed(
        stack, f"cdc.public.{table}", NOT_AN_ENVELOPE, {"op": "c", "note": "no after image"}
    )
    stack.sql(f"INSERT INTO {table} VALUES (2, 'after')")
    stack.sql(f"UPDATE {table} SET v = 'changed' WHERE id = 1")
    projector.catch_up()  # exits non-zero if the projector died on the message

    assert assert_replica_equals_source(stack, projector, table, ["id"]) == 2
    dead = projector.sql(
        f"SELECT offset, stage, error FROM {projector.control_db}.dlq FINAL "
        f"WHERE topic = 'cdc.public.{table}'"
    )
    assert [(d["offset"], d["stage"]) for d in dead] == [(offset, "schema")], dead
    assert "Debezium envelope" in dead[0]["error"], dead

"""Versions survive what happens to topics (issue 10, item 5; projector/replicas/topic_guard.py): a topic
whose offsets stop ordering its keys' events stops its table — its messages go to the DLQ with the
reason and the remedy — while the other tables go on; `projector table reset` rebuilds it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source


def topic_letters(projector: ProjectorProcess, topic: str) -> list[dict[str, Any]]:
    listed = projector.cli("dlq", "list", "--format", "json", "--limit", "100000")
    assert listed.returncode == 0, listed.stderr
    letters = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    return [letter for letter in letters if letter["topic"] == topic]


def write(stack: StackHandle, table: str, ids: range, value: str) -> None:
    stack.sql(
        f"INSERT INTO {table} SELECT i, %s FROM generate_series(%s::int, %s::int) AS i "
        "ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
        [value, ids.start, ids.stop - 1],
    )


def test_a_topic_given_more_partitions_stops_its_table_until_it_is_reset(
    stack: StackHandle, tmp_path: Path
) -> None:
    projector = ProjectorProcess(stack, tmp_path)
    grown, other = projector.table("tg_grown"), projector.table("tg_other")
    for table in (grown, other):
        stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    stack.apply()
    for table in (grown, other):
        write(stack, table, range(1, 51), "first")
    projector.catch_up()

    topic = f"cdc.public.{grown}"
    admin = AdminClient({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"]})
    for future in admin.create_partitions([NewPartitions(topic, 2)]).values():
        future.result(30)
    for table in (grown, other):
        write(stack, table, range(1, 51), "second")
    projector.catch_up()

    letters = topic_letters(projector, topic)
    assert letters, f"no dead letter of {topic}: its table was not stopped"
    assert {letter["stage"] for letter in letters} == {"topic"}, letters[:3]
    reason = letters[0]["error"]
    assert "went from 1 to 2 partitions" in reason, reason
    assert f"projector table reset public.{grown}" in reason, reason
    assert_replica_equals_source(stack, projector, other, ["id"])  # the others go on

    reset = projector.reset_table(
        f"public.{grown}",
        lambda: assert_replica_equals_source(stack, projector, grown, ["id"]),
        then=lambda: write(stack, grown, range(1, 11), "third"),
    )
    assert "incremental snapshot" in reset.stderr, reset.stderr
    assert topic_letters(projector, topic) == letters  # a rebuilt table applies again


def test_a_changed_key_schema_on_a_partitioned_topic_stops_its_table(
    stack: StackHandle, tmp_path: Path
) -> None:
    projector = ProjectorProcess(stack, tmp_path)
    rekeyed, other = projector.table("tg_rekeyed"), projector.table("tg_steady")
    admin = AdminClient({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"]})
    created = admin.create_topics([NewTopic(f"cdc.public.{rekeyed}", num_partitions=3)])
    for future in created.values():
        future.result(30)
    for table in (rekeyed, other):
        stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    stack.apply()
    for table in (rekeyed, other):
        write(stack, table, range(1, 51), "first")
    projector.catch_up()

    # The key's Avro type changes (int → long): a new key schema id, new key bytes, and
    # Kafka's partitioner may place the key elsewhere.
    stack.sql(f"ALTER TABLE {rekeyed} ALTER COLUMN id TYPE bigint")
    for table in (rekeyed, other):
        write(stack, table, range(1, 51), "second")
    projector.catch_up()

    letters = topic_letters(projector, f"cdc.public.{rekeyed}")
    assert letters, "the table was not stopped"
    reasons = {letter["stage"] + ": " + letter["error"][:60] for letter in letters}
    assert {letter["stage"] for letter in letters} == {"topic"}, reasons
    assert "key schema of topic" in letters[0]["error"], letters[0]["error"]
    assert_replica_equals_source(stack, projector, other, ["id"])


def test_a_re_created_topic_stops_its_table_and_not_the_projector(
    stack: StackHandle, tmp_path: Path
) -> None:
    projector = ProjectorProcess(stack, tmp_path)
    recreated, other = projector.table("tg_recreated"), projector.table("tg_bystander")
    for table in (recreated, other):
        stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    stack.apply()
    for table in (recreated, other):
        write(stack, table, range(1, 51), "first")
    projector.catch_up()

    topic = f"cdc.public.{recreated}"
    admin = AdminClient({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"]})
    for future in admin.delete_topics([topic]).values():
        future.result(30)
    deadline = time.monotonic() + 60
    while topic in admin.list_topics(timeout=10).topics:
        assert time.monotonic() < deadline, f"{topic} was not deleted"
        time.sleep(0.5)
    # Debezium's next event re-creates the topic (the broker creates topics on demand): its
    # offsets start at 0 again, below every version stored
    for table in (recreated, other):
        write(stack, table, range(1, 11), "second")
    projector.catch_up()

    letters = topic_letters(projector, topic)
    assert letters, "the table was not stopped"
    assert {letter["stage"] for letter in letters} == {"topic"}, letters[:3]
    assert "was deleted and re-created" in letters[0]["error"], letters[0]["error"]
    assert_replica_equals_source(stack, projector, other, ["id"])


def test_a_snapshot_bound_that_does_not_decode_stops_its_table_instead_of_sweeping(
    stack: StackHandle, tmp_path: Path
) -> None:
    """issue 22, item 8: a message that may be a Debezium snapshot's first read (it holds the
    mark's bytes) but does not decode. Swept without it, the next snapshot would seem to begin
    at its last read and every key read before would be marked deleted; the table stops instead
    (its messages to the DLQ with the reason), and `projector table reset` brings it back."""
    projector = ProjectorProcess(stack, tmp_path)
    table, other = projector.table("tg_bound"), projector.table("tg_bystander")
    for name in (table, other):
        stack.sql(f"CREATE TABLE {name} (id int PRIMARY KEY, v text)")
    stack.apply()
    for name in (table, other):
        write(stack, name, range(1, 21), "first")
    projector.catch_up()

    topic = f"cdc.public.{table}"
    unknown_schema = b"\x00\x00\x0f\x42\x3f"  # Confluent framing, an id the registry lacks
    mark = b"\x30first_in_data_collection"  # the mark as Avro writes the string
    producer = Producer({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"]})
    producer.produce(topic, key=b"k", value=unknown_schema + mark)
    producer.flush(30)
    projector.catch_up()  # a batch of its own
    for name in (table, other):
        write(stack, name, range(1, 31), "second")
    projector.catch_up()

    letters = topic_letters(projector, topic)
    reasons = [letter["error"] for letter in letters if letter["stage"] == "topic"]
    assert reasons, letters[:3]  # the rows after it went to the DLQ: the table stopped
    assert "may bound a Debezium snapshot of the table but does not decode" in reasons[0]
    assert f"projector table reset public.{table}" in reasons[0], reasons[0]
    rows = projector.sql(f"SELECT count() AS n FROM {projector.replica_db}.{table} FINAL")
    assert int(rows[0]["n"]) == 20  # nothing swept, nothing after the stop applied
    assert_replica_equals_source(stack, projector, other, ["id"])  # the others go on

    projector.reset_table(
        f"public.{table}", lambda: assert_replica_equals_source(stack, projector, table, ["id"])
    )

"""Keeping PII out (connectors/columns.py): an excluded column never leaves Postgres, a masked one
arrives as a salted hash, and the application's migrations on the table still work.

After a workload (inserts, updates, deletes, a row the projector cannot apply, the application
dropping and adding columns), every excluded value and every plain text of a masked one is looked
for in Kafka's payloads, the registry's schemas, the replica, the dead-letter queue and the
projector's log: none is found. Changing the rules re-reads that table alone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess

import httpx

from connectors import apply_connector
from tests.integration.conftest import PROJECTOR, StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess

SALT = "pii-test-salt-0123456789"
PEOPLE = 40


def ssn(i: int) -> str:
    return f"SSN-{i:04d}-7d1f"


def email(i: int) -> str:
    return f"person{i % 30}@pii.example"  # some rows share an address


def name(i: int) -> str:
    return f"Fullname{i:04d}Zq"


def contains_any(data: bytes, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s.encode() in data]


@one_backend("chdb")
def test_excluded_and_masked_columns_never_reach_kafka_the_replica_the_dlq_or_the_log(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    table = projector.table("pii_people")
    qualified = f"public.{table}"
    topic = f"{stack.env.get('TOPIC_PREFIX', 'cdc')}.{qualified}"
    rules = {
        **stack.env,
        "EXCLUDE_COLUMNS": f"{qualified}.ssn",
        "MASK_COLUMNS": f"{qualified}.email",
        "MASK_SALT": SALT,
    }
    stack.sql(
        f"CREATE TABLE {table} (id int PRIMARY KEY, name text, email text, ssn text, "
        "born date, note text)"
    )
    try:
        for wrong, says in (
            ({"EXCLUDE_COLUMNS": f"{qualified}.id"}, "can be neither excluded nor masked"),
            ({"MASK_COLUMNS": f"{qualified}.born", "MASK_SALT": SALT}, "only text columns"),
            ({"EXCLUDE_COLUMNS": f"{qualified}.no_such"}, "has no column 'no_such'"),
        ):
            refused = subprocess.run(
                [PROJECTOR, "connectors", "apply", "--dry-run"],
                env={**projector.env, **stack.env, **wrong},
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert refused.returncode != 0, refused.stdout + refused.stderr
            assert says in refused.stdout + refused.stderr, refused.stdout + refused.stderr
        shown = subprocess.run(
            [PROJECTOR, "connectors", "apply", "--dry-run"],
            env={**projector.env, **rules},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert f"excluded {qualified}.ssn: not in the publication's column list" in shown.stdout
        assert f"masked {qualified}.email: salted SHA-256" in shown.stdout, shown.stdout
        assert SALT not in shown.stdout + shown.stderr  # the salt is in a setting's name
        apply_connector(stack.connect, stack.admin_dsn, rules)
        # The WAL stream does not carry it: the publication's column list leaves it out.
        ((published,),) = stack.sql(
            "SELECT attnames FROM pg_publication_tables WHERE tablename = %s", [table]
        )
        assert "ssn" not in published and "email" in published, published
        # The rules hold before the first row is written (what Kafka has, it keeps).
        stack.sql(
            f"INSERT INTO {table} SELECT i, 'Fullname' || lpad(i::text, 4, '0') || 'Zq', "
            "'person' || (i % 30) || '@pii.example', 'SSN-' || lpad(i::text, 4, '0') || '-7d1f', "
            f"'1990-01-01', 'n' FROM generate_series(1, {PEOPLE}) i"
        )

        # The workload, the application's migrations among it.
        stack.sql(
            f"UPDATE {table} SET ssn = 'SSN-9999-7d1f', email = 'changed@pii.example' WHERE id = 1"
        )
        stack.sql(f"DELETE FROM {table} WHERE id = 2")
        stack.sql(
            f"INSERT INTO {table} (id, name, email, ssn, born) VALUES (99, 'x', 'dead@pii.example', 'SSN-0099-7d1f', '2400-01-01')"
        )  # a dead letter (> 2299)
        stack.sql(f"ALTER TABLE {table} DROP COLUMN note")  # listed: Postgres would refuse it
        stack.sql(f"ALTER TABLE {table} ADD COLUMN extra int")
        stack.sql(
            f"INSERT INTO {table} (id, name, email, ssn, extra) VALUES (100, 'Fullname0100Zq', 'person100@pii.example', 'SSN-0100-7d1f', 7)"
        )
        ((published,),) = stack.sql(
            "SELECT attnames FROM pg_publication_tables WHERE tablename = %s", [table]
        )
        assert "ssn" not in published and "extra" in published and "note" not in published
        projector.catch_up()

        secrets = [ssn(i) for i in range(1, PEOPLE + 1)] + [
            "SSN-9999-7d1f",
            "SSN-0099-7d1f",
            "SSN-0100-7d1f",
        ]
        plain_emails = [
            *sorted({email(i) for i in range(1, PEOPLE + 1)}),
            "changed@pii.example",
            "dead@pii.example",
            "person100@pii.example",
        ]
        hidden = secrets + plain_emails
        # Kafka: every payload of the table's topic, keys and values, raw bytes.
        messages = stack.messages_to_end(topic)
        assert messages
        for message in messages:
            found = contains_any((message.key() or b"") + (message.value() or b""), hidden)
            assert not found, (message.offset(), found)
        # The registry: no schema names the excluded column.
        registry = stack.env["REGISTRY_URL"]
        versions = httpx.get(f"{registry}/subjects/{topic}-value/versions", timeout=30).json()
        for version in versions:
            schema = httpx.get(
                f"{registry}/subjects/{topic}-value/versions/{version}", timeout=30
            ).json()["schema"]
            assert '"ssn"' not in schema, schema
        # The replica: no ssn column; emails as the salted hash, the same address the same hash.
        columns = {
            r["name"]
            for r in projector.sql(
                f"SELECT name FROM system.columns WHERE database = '{projector.replica_db}' "
                f"AND table = '{table}'"
            )
        }
        assert "ssn" not in columns and "email" in columns and "extra" in columns, columns
        rows = projector.sql(f"SELECT * FROM {projector.replica_db}.{table}")
        dumped = json.dumps(rows)
        assert not contains_any(dumped.encode(), hidden)
        current = {
            int(r["id"]): r
            for r in projector.sql(
                f"SELECT id, email, extra FROM {projector.replica_db}.{table} FINAL "
                "WHERE NOT _is_deleted"
            )
        }
        assert set(current) == set(range(1, PEOPLE + 1)) - {2} | {100}, sorted(current)
        hashes = {i: current[i]["email"] for i in current}
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in hashes.values()), hashes
        assert hashes[3] == hashes[33]  # person3@ both: one hash
        assert hashes[3] != hashes[4]
        assert hashes[3] not in (
            hashlib.sha256(b"person3@pii.example").hexdigest(),  # salted: not the bare hash
        )
        assert int(current[100]["extra"]) == 7  # the column added later arrives
        # The dead-letter queue holds the poison message, without what it must not hold.
        dead = projector.sql(f"SELECT * FROM {projector.control_db}.dlq")
        assert any(r["topic"] == topic for r in dead), dead
        for row in dead:
            for value in row.values():
                if not isinstance(value, str):
                    continue
                try:
                    decoded = base64.b64decode(value, validate=True)
                except ValueError:
                    decoded = b""
                assert not contains_any(value.encode() + decoded, hidden), row
        # The projector's log.
        assert not contains_any(projector.log.read_bytes(), hidden)

        # Masking the name too re-reads this table alone: its current rows then carry hashes.
        more = {**rules, "MASK_COLUMNS": f"{qualified}.email,{qualified}.name"}
        applied = subprocess.run(
            [PROJECTOR, "connectors", "apply"],
            env={**projector.env, **more},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert applied.returncode == 0, applied.stdout + applied.stderr
        assert f"re-reading {qualified}" in applied.stderr, applied.stdout + applied.stderr
        names = [name(i) for i in range(1, PEOPLE + 1) if i != 2] + ["Fullname0100Zq"]
        deadline_rows: list[dict] = []
        for _ in range(60):
            projector.catch_up()
            deadline_rows = projector.sql(
                f"SELECT id, name FROM {projector.replica_db}.{table} FINAL WHERE NOT _is_deleted"
            )
            if not contains_any(json.dumps(deadline_rows).encode(), names):
                break
        assert not contains_any(json.dumps(deadline_rows).encode(), names), deadline_rows
        assert len(deadline_rows) == len(current)
    finally:
        stack.sql(f"DROP TABLE IF EXISTS {table}")
        apply_connector(stack.connect, stack.admin_dsn, stack.env)  # the rules gone again

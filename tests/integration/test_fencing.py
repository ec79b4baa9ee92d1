"""A member whose ClickHouse stalls past `max.poll.interval.ms` writes nothing the group has given
to another member (issue 10, item 4; the fence in projector/commit/checkpoint.py).

Two members share one ClickHouse (`projector chdb-server`); member A reaches it through a TCP proxy
the test cuts while A is applying a steady write load, for longer than A's poll interval. Then
member B joins, and takes over what the group gives it; then the proxy is restored and A's batches
in flight and buffered meet ClickHouse again. Background merges are stopped, so an event applied
twice stays visible as two rows of one (partition, offset) — in a keyed table, in an append-only
table, and as a transaction counted twice in the watermark ledger.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
from confluent_kafka.admin import AdminClient, NewTopic

from tests.integration.conftest import PROJECTOR, StackHandle
from tests.integration.projector_harness import (
    ProjectorProcess,
    assert_replica_equals_source,
    start_chdb_server,
)
from tests.integration.tcp_proxy import TcpProxy
from tests.integration.test_scale_out import stop_merges_once_created

PARTITIONS = 3
POLL_INTERVAL_MS = 8000  # the broker's minimum session (6 s) is the floor


class Writer(threading.Thread):
    """The application: small transactions, each an upsert of a keyed row and a log line."""

    def __init__(self, dsn: str, items: str, log: str) -> None:
        super().__init__(daemon=True)
        self.dsn, self.items, self.log = dsn, items, log
        self.stop = threading.Event()
        self.transactions = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn) as conn:
                while not self.stop.is_set():
                    n = self.transactions
                    conn.execute(
                        f"INSERT INTO {self.items} (id, v) VALUES (%s, %s) "
                        "ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
                        [n % 300, n],
                    )
                    conn.execute(f"INSERT INTO {self.log} (at, msg) VALUES (%s, %s)", [n, f"m{n}"])
                    conn.commit()
                    self.transactions += 1
                    time.sleep(0.005)
        except BaseException as exc:  # reported by the test
            self.error = exc


def start(member: ProjectorProcess, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [PROJECTOR, "run"], env={**member.env, **env}, stdout=out, stderr=subprocess.STDOUT
        )


def wait_for(log: Path, *texts: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(t in log.read_text() for t in texts):
        assert time.monotonic() < deadline, f"none of {texts} in {log}: {log.read_text()[-3000:]}"
        time.sleep(0.5)


def test_a_member_cut_off_from_clickhouse_past_its_poll_interval_applies_nothing_twice(
    stack: StackHandle, tmp_path: Path
) -> None:
    server, url = start_chdb_server(tmp_path / "clickhouse")
    port = int(url.rsplit(":", 1)[1])
    proxy = TcpProxy("127.0.0.1", port)
    members: list[subprocess.Popen[bytes]] = []
    try:
        deployment = ProjectorProcess(stack, tmp_path, server_url=url)
        deployment.env["PROJECTOR_TRANSACTION_METADATA"] = "true"  # the ledgers count too
        items, log = deployment.table("fc_items"), deployment.table("fc_log")
        admin = AdminClient({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"]})
        created = admin.create_topics(
            [NewTopic(f"cdc.public.{t}", num_partitions=PARTITIONS) for t in (items, log)]
        )
        for future in created.values():
            future.result(30)
        stack.sql(f"CREATE TABLE {items} (id int PRIMARY KEY, v bigint)")
        stack.sql(f"CREATE TABLE {log} (at bigint, msg text)")  # no key: append-only
        stack.sql(f"ALTER TABLE {log} REPLICA IDENTITY FULL")
        stack.apply()

        a_log, b_log = tmp_path / "member-a.log", tmp_path / "member-b.log"
        member_a = start(
            deployment,
            a_log,
            {
                "PROJECTOR_CLICKHOUSE_URL": f"http://127.0.0.1:{proxy.port}",
                "PROJECTOR_MAX_POLL_INTERVAL_MS": str(POLL_INTERVAL_MS),
            },
        )
        members.append(member_a)
        writer = Writer(stack.admin_dsn, items, log)
        writer.start()
        try:
            # Generous: the member applies the transaction topic's backlog (every test's) too
            stop_merges_once_created(url, deployment.replica_db, [items, log], timeout_s=600)
            time.sleep(3)  # A applies the load for a while
            proxy.cut()
            # Longer than A's poll interval: a member blocked on its batch is thrown out now.
            time.sleep(POLL_INTERVAL_MS / 1000 * 1.5)
            member_b = start(deployment, b_log, {"PROJECTOR_MAX_BATCH_MESSAGES": "5000"})
            members.append(member_b)
            wait_for(b_log, f"assigned cdc.public.{items}", f"assigned cdc.public.{log}")
            time.sleep(10)  # B applies what it was given, cut in its own batches
            proxy.restore()
            # A's batch in flight meets ClickHouse again (after its back-off)
            wait_for(a_log, "recovered after", "dropped a batch")
            time.sleep(3)
        finally:
            writer.stop.set()
            writer.join(30)
        assert writer.error is None, repr(writer.error)
        a_survived = member_a.poll() is None

        deployment.catch_up()
        for member in members:
            if member.poll() is None:
                member.send_signal(signal.SIGTERM)
                member.wait(60)
        deployment.catch_up()  # whatever the stopped members left

        context = f"{writer.transactions} transactions; member A's log: {a_log.read_text()[-2000:]}"
        for table in (items, log):
            twice = deployment.sql(
                f"SELECT _partition, _offset, count() AS n FROM {deployment.replica_db}.{table} "
                "GROUP BY _partition, _offset HAVING n > 1 LIMIT 5"
            )
            assert twice == [], f"{table}: events applied twice {twice} ({context})"
        collections = f"'public.{items}', 'public.{log}'"
        # Per transaction and table, the events the ledger counts as applied (every span of
        # the xid: no wraparound here) against the number its END announced.
        miscounted = deployment.sql(
            "SELECT p.tx_id AS tx_id, p.data_collection AS data_collection, p.applied AS applied, "
            "t.expected AS expected FROM (SELECT tx_id, data_collection, sum(applied) AS applied "
            f"FROM {deployment.control_db}.transaction_events WHERE data_collection IN "
            f"({collections}) GROUP BY tx_id, data_collection) AS p INNER JOIN (SELECT tx_id, "
            f"data_collection, any(expected) AS expected FROM {deployment.control_db}."
            f"transaction_ends WHERE data_collection IN ({collections}) "
            "GROUP BY tx_id, data_collection) AS t "
            "ON p.tx_id = t.tx_id AND p.data_collection = t.data_collection "
            "WHERE p.applied != t.expected LIMIT 5"
        )
        assert miscounted == [], f"the ledger counts events twice: {miscounted} ({context})"
        assert_replica_equals_source(stack, deployment, items, ["id"])
        assert_replica_equals_source(stack, deployment, log, ["at"], append_only=True)
        # ClickHouse out of reach is infrastructure: the member waited, it did not die
        assert a_survived, context
        assert member_a.returncode == 0, context
    finally:
        for member in members:
            if member.poll() is None:
                member.kill()
        server.send_signal(signal.SIGTERM)
        server.wait(60)

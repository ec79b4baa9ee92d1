"""Scale-out: three projector processes in one consumer group share the partitions of 3-partition
topics under the crash test's random write load, while members leave (SIGTERM), crash (SIGKILL)
and join; at the end every replica equals Postgres, and no event was applied twice.

The members share one ClickHouse: `projector chdb-server` (one chDB directory served over
ClickHouse's HTTP interface; docs/projector.md, "Scale-out"), reached through the projector's
server backend. Background merges are stopped there, so a double application (two inserts of the
same event under different tokens) would stay visible as two rows of one (partition, offset).
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
from confluent_kafka.admin import AdminClient, NewTopic

from tests.integration.conftest import PROJECTOR, StackHandle
from tests.integration.projector_harness import ProjectorProcess, start_chdb_server
from tests.integration.test_crash_recovery import Tables, Workload

PARTITIONS = 3


def test_three_members_share_partitions_through_leaves_crashes_and_joins(
    stack: StackHandle, tmp_path: Path
) -> None:
    server, url = start_chdb_server(tmp_path / "clickhouse")
    members: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        deployment = ProjectorProcess(stack, tmp_path, server_url=url)
        tables = Tables(deployment.unique)
        names = [tables.accounts, tables.lines, tables.notes]
        admin = AdminClient({"bootstrap.servers": stack.env["KAFKA_BOOTSTRAP"]})
        created = admin.create_topics(
            [NewTopic(f"cdc.public.{t}", num_partitions=PARTITIONS) for t in names]
        )
        for future in created.values():
            future.result(30)  # Debezium then produces into these, keyed: one key, one partition
        tables.create(stack)
        stack.apply()
        seed = random.randrange(1_000_000)
        rng = random.Random(seed)
        workload = Workload(stack.admin_dsn, tables, seed)

        def start_member() -> None:
            log = tmp_path / f"member-{len(members)}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [PROJECTOR, "run"], env=deployment.env, stdout=out, stderr=subprocess.STDOUT
                )
            members.append((process, log))

        for _ in range(3):
            start_member()
        workload.start()
        try:
            stop_merges_once_created(url, deployment.replica_db, names)
            # Leaves, crashes and joins, each while the others apply: a graceful leave hands
            # partitions over at once, a crash after the 6 s session timeout.
            for change in ("leave", "join", "crash", "join", "leave", "crash", "join"):
                time.sleep(rng.uniform(4, 8))
                running = [m for m in members if m[0].poll() is None]
                if change == "join":
                    start_member()
                else:
                    victim, _ = rng.choice(running)
                    victim.send_signal(signal.SIGTERM if change == "leave" else signal.SIGKILL)
                    victim.wait(60)
                    if change == "leave":
                        assert victim.returncode == 0
            assert workload.altered.is_set(), "the workload never reached its ALTER TABLE"
        finally:
            workload.stop.set()
            workload.join(30)
        assert workload.error is None, f"workload failed (seed {seed}): {workload.error!r}"
        deployment.catch_up()  # one more member, until a fence row is applied
        for process, _ in members:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                assert process.wait(60) == 0
        deployment.catch_up()  # whatever the stopped members left

        owners = set()
        for index, (_, log) in enumerate(members):
            for topic, _partition in re.findall(r"assigned (\S+)\[(\d+)\]", log.read_text()):
                if topic.removeprefix("cdc.public.") in names:
                    owners.add(index)
        assert len(owners) >= 3, f"partitions were not shared: owners {owners}"

        context = f"seed {seed}, {workload.transactions} transactions"
        for name in names:
            twice = deployment.sql(
                f"SELECT _partition, _offset, count() AS n FROM {deployment.replica_db}.{name} "
                "GROUP BY _partition, _offset HAVING n > 1 LIMIT 5"
            )
            assert twice == [], f"{name}: events applied twice {twice} ({context})"
            partitions = deployment.sql(
                f"SELECT uniqExact(_partition) AS n FROM {deployment.replica_db}.{name}"
            )
            assert int(partitions[0]["n"]) == PARTITIONS, f"{name}: {partitions}"
        assert all(tables.assert_replicas_equal_source(stack, deployment)), context
    finally:
        for process, _ in members:
            if process.poll() is None:
                process.kill()
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def stop_merges_once_created(
    url: str, database: str, tables: list[str], timeout_s: float = 120
) -> None:
    """Stop background merges of the replica tables as soon as the members have created them
    (merges would fold two copies of one event into one and hide a double application)."""
    wanted = ", ".join(f"'{t}'" for t in tables)
    query = (
        f"SELECT count() FROM system.tables WHERE database = '{database}' AND name IN ({wanted})"
    )
    deadline = time.monotonic() + timeout_s
    while httpx.post(url, content=query, timeout=30).text.strip() != str(len(tables)):
        assert time.monotonic() < deadline, "the members never created the replica tables"
        time.sleep(0.1)
    for table in tables:
        statement = f"SYSTEM STOP MERGES {database}.{table}"
        httpx.post(url, content=statement, timeout=30).raise_for_status()

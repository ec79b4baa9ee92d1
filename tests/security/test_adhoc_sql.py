"""Ad-hoc SQL (`POST /sql`, `projector sql`) as a token holder would attack it: every statement
below must be refused before it reads a file, the network, a secret or the control database,
and before it can take the engine's memory or time. queries/sql_guard.py says why each is."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from projector.clickhouse import ChdbBackend, ServerBackend
from queries.adhoc import SqlLimits, run_read_only
from queries.errors import QueryError, RejectedStatement, TooManyRows
from queries.server import token_scope
from tests.security.conftest import CONFIG, SECRET

Engine = ChdbBackend | ServerBackend
LIMITS = SqlLimits(
    max_rows=1000, max_seconds=3.0, max_memory_bytes=256 * 1024**2, max_result_bytes=8 * 1024**2
)
SCOPE = token_scope(CONFIG)


def ask(engine: Engine, statement: str) -> list[str]:
    return run_read_only(engine, statement, LIMITS, SCOPE)


# (statement, what the refusal must name)
REFUSED = [
    ("SELECT file('/etc/passwd')", "file"),
    ("SELECT file('.stack/client.env')", "file"),
    ("SELECT FILE('/proc/self/environ')", "FILE"),
    ("SELECT length(file('/proc/self/environ')) AS n", "file"),
    ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "file"),
    ("SELECT * FROM url('http://127.0.0.1:9/x', 'CSV', 'a String')", "url"),
    ("SELECT * FROM s3('http://127.0.0.1:9/b/k', 'CSV', 'a String')", "s3"),
    ("SELECT * FROM remote('127.0.0.1', system.one)", "remote"),
    ("SELECT * FROM executable('id', 'TSV', 'a String')", "executable"),
    ("SELECT * FROM postgresql('127.0.0.1:5432', 'db', 't', 'u', 'p')", "postgresql"),
    ("SELECT * FROM merge('projector', '.*')", "merge"),
    ("SELECT 1 WHERE 'x' IN sqlite('/tmp/x.db', 't')", "sqlite"),
    ("SELECT getSetting('format_avro_schema_registry_url')", "getSetting"),
    ("SELECT hostName()", "hostName"),
    ("SELECT dictGet('d', 'a', toUInt64(1))", "dictGet"),
    ("SELECT sleepEachRow(1) FROM numbers(10)", "sleepEachRow"),
    ("SELECT sleep(3)", "sleep"),
    ("SELECT addressToSymbol(toUInt64(1))", "addressToSymbol"),
    ("SELECT * FROM system.settings", "system.settings"),
    ("SELECT query FROM system.processes", "system.processes"),
    ("SELECT * FROM `system`.`query_log`", "system.query_log"),
    ("SELECT * FROM projector.dlq", "projector"),
    (f"SELECT 1 WHERE '{SECRET}' IN projector.dlq", "projector"),
    ("SELECT * FROM (SELECT reason FROM projector.dlq)", "projector"),
    ("SELECT 1 SETTINGS readonly = 0", "SETTINGS"),
    ("SELECT * FROM (SELECT 1 SETTINGS max_execution_time = 1000)", "SETTINGS"),
    ("SELECT 1; SELECT 2", "statement"),
    ("INSERT INTO read_models.orders_by_status VALUES ('X', 1)", "SELECT"),
    ("DROP TABLE read_models.orders_by_status", "SELECT"),
    ("SELECT 1 INTO OUTFILE '/tmp/projector-outfile'", ""),
    # what a review found past the first version of the guard
    ("SELECT * APPLY(file) FROM (SELECT '/proc/self/environ' AS p)", "APPLY"),
    ("SELECT * APPLY(file) APPLY(toUInt8) FROM (SELECT '/etc/passwd' AS p)", "APPLY"),
    ("SELECT COLUMNS('p') APPLY(file) FROM (SELECT '/etc/passwd' AS p)", "APPLY"),
    ("SELECT user()", "user"),
    ("SELECT fullHostName()", "fullHostName"),
    ("SELECT * FROM values('a String DEFAULT file(''/etc/passwd'')', 'x')", "values"),
    ("SELECT * FROM format(JSONEachRow, 'a String', '{}')", "format"),
    ("SELECT * FROM view(SELECT reason FROM projector.dlq)", "projector"),
    ("WITH d AS (SELECT reason FROM projector.dlq) SELECT * FROM d", "projector"),
]


@pytest.mark.parametrize(("statement", "named"), REFUSED)
def test_a_statement_that_reaches_beyond_the_tables_is_refused(
    engine: Engine, statement: str, named: str
) -> None:
    with pytest.raises(QueryError) as refused:
        ask(engine, statement)
    assert 400 <= refused.value.status < 500, refused.value.message
    assert named in refused.value.message, refused.value.message
    assert SECRET not in refused.value.message
    still = ask(engine, "SELECT count() AS n FROM read_models.orders_by_status")
    assert still == ['{"n":"2"}'] or still == ['{"n":2}'], still


def test_a_refused_table_function_creates_no_file(engine: Engine, tmp_path: Path) -> None:
    """`sqlite()` was refused by `readonly`, yet created its file first."""
    target = tmp_path / "created.db"
    with pytest.raises(RejectedStatement, match="sqlite"):
        ask(engine, f"SELECT * FROM sqlite('{target}', 't')")
    assert not target.exists()


def test_what_a_token_holder_may_read_answers(engine: Engine) -> None:
    allowed = {
        "SELECT status, orders FROM read_models.orders_by_status ORDER BY status": 2,
        "SELECT o.id, o.total FROM replica_public.orders AS o WHERE o.id > 0": 2,
        "WITH t AS (SELECT 1 AS x) SELECT x FROM t": 1,
        "SELECT number FROM numbers(5)": 5,
        "SELECT format('{} {}', 'a', 'b') AS s": 1,
        "SELECT name FROM system.databases WHERE name = 'read_models'": 1,
        "SELECT count() FROM system.columns WHERE database = 'read_models'": 1,
        "SELECT version() AS v, timezone() AS tz": 1,
        "SELECT arrayMap(x -> x * 2, [1, 2]) AS a, sumIf(number, number > 1) AS s "
        "FROM numbers(3)": 1,
    }
    for statement, rows in allowed.items():
        assert len(ask(engine, statement)) == rows, statement


def test_a_huge_result_is_refused_quickly_and_bounded(engine: Engine) -> None:
    """`SELECT repeat('x', 1000000) FROM numbers(300)` answered 300 MB in 12.7 s past a 3 s
    limit, and the service's memory grew by 850 MiB."""
    started = time.monotonic()
    with pytest.raises(TooManyRows):
        ask(engine, "SELECT repeat('x', 1000000) AS s FROM numbers(300)")
    assert time.monotonic() - started < 10 * LIMITS.max_seconds  # refused, not streamed out


def test_a_statement_cannot_take_the_engines_memory(engine: Engine) -> None:
    with pytest.raises(QueryError) as refused:
        ask(
            engine,
            "SELECT count() FROM (SELECT groupArray(repeat('x', 1000)) AS a FROM numbers(2000000))",
        )
    assert refused.value.status in (400, 413), refused.value.message

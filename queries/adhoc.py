"""Ad-hoc SQL for analysts (`POST /sql`, `projector sql`): one read-only SELECT, bounded in rows
and time, checked by ClickHouse itself.

What is sent, in order:
1. ClickHouse's own parser reads the text, given as a query *parameter* (never spliced into SQL):
   `SELECT formatQuerySingleLine({statement:String})`. It refuses several statements and bad
   syntax, and gives back the one statement in canonical form, comments and trailing `;` gone.
2. Its syntax tree (`EXPLAIN AST`) is checked for what it may touch (queries/sql_guard.py:
   functions, table functions, tables, SETTINGS), then it runs as a subquery of ours:
   `SELECT * FROM (<statement>) LIMIT <rows + 1> SETTINGS max_execution_time = <s>, <memory,
   bytes read and result size limits>, readonly = 1`.
   Only a SELECT (or WITH ... SELECT, UNION) parses as a subquery, so a DROP or INSERT is a syntax
   error here; our SETTINGS clause belongs to the outermost query, which is ours; and `readonly = 1`
   (last, so it also stops any later setting change, e.g. a SETTINGS clause inside the statement)
   makes ClickHouse refuse writes, DDL and table functions that reach outside (`file`, `url`).
   A SETTINGS clause inside the statement is refused before that (its AST has a `Set` node):
   ClickHouse lets a subquery's own SETTINGS change limits such as `max_execution_time`.
   Memory, bytes read and the result's bytes are limited too, so one statement cannot take the
   engine's memory or produce hundreds of megabytes (SqlLimits).
3. One row more than the limit is read: if it arrives, the answer is "too many rows", not a
   silently cut result.

Why not just append `SETTINGS readonly = 1` to the text: a statement ending in a `--` comment
swallows it, and a `;` starts a second statement that chDB runs too (both measured).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from projector.clickhouse import ParameterisedClickHouse, parse_rows
from projector.errors import ClickHouseUnavailable
from projector.redaction import redact
from queries.errors import (
    InvalidParameters,
    InvalidSql,
    QueryError,
    QueryTimeout,
    RejectedStatement,
    TooManyRows,
    Unavailable,
)
from queries.sql_guard import EVERY_DATABASE, Scope, check_resolved, check_statement

MAX_STATEMENT_LENGTH = 100_000

# ClickHouse error codes → what the client is told (the rest: InvalidSql).
CLICKHOUSE_ERRORS: dict[int, type[QueryError]] = {
    62: InvalidSql,  # SYNTAX_ERROR
    159: QueryTimeout,  # TIMEOUT_EXCEEDED
    164: RejectedStatement,  # READONLY
    396: TooManyRows,  # TOO_MANY_ROWS_OR_BYTES
    307: TooManyRows,  # TOO_MANY_BYTES
    241: TooManyRows,  # MEMORY_LIMIT_EXCEEDED
    457: InvalidParameters,  # BAD_QUERY_PARAMETER
}
CODE = re.compile(r"Code: (\d+)\.")


def clickhouse_code(exc: BaseException) -> int | None:
    found = CODE.search(str(exc))
    return int(found.group(1)) if found else None


def first_line(exc: BaseException) -> str:
    """ClickHouse's message without its stack trace or the repeated query text, redacted (it is
    answered to the client: a URL with a password in it never is)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return redact(line[:2000])


def classify(exc: Exception) -> QueryError:
    """A ClickHouse failure of an ad-hoc statement as the client's error."""
    if isinstance(exc, QueryError):
        return exc
    if isinstance(exc, ClickHouseUnavailable):
        return Unavailable(str(exc))
    code = clickhouse_code(exc)
    return CLICKHOUSE_ERRORS.get(code or 0, InvalidSql)(f"ClickHouse: {first_line(exc)}")


def canonical_statement(ch: ParameterisedClickHouse, text: str) -> str:
    """Step 1: ClickHouse's parser reads exactly one statement; its canonical single-line form."""
    if not text.strip():
        raise InvalidSql("the statement is empty")
    if len(text) > MAX_STATEMENT_LENGTH:
        raise InvalidSql(f"the statement is longer than {MAX_STATEMENT_LENGTH:,} characters")
    try:
        out = ch.query(
            "SELECT formatQuerySingleLine({statement:String}) AS s",
            "JSONEachRow",
            {"statement": text},
        )
    except Exception as exc:
        if clickhouse_code(exc) == 62:
            raise InvalidSql(f"not one valid statement: {first_line(exc)}") from exc
        raise classify(exc) from exc
    return str(json.loads(out)["s"])


@dataclass(frozen=True)
class SqlLimits:
    """What one ad-hoc statement may take (the service's settings; `projector sql` has its own
    flags). Memory, bytes read and the result's size are ClickHouse's limits, enforced while the
    statement runs (`*_overflow_mode = 'throw'`); the response is checked again here."""

    max_rows: int = 10_000
    max_seconds: float = 10.0
    max_memory_bytes: int = 512 * 1024**2
    max_result_bytes: int = 64 * 1024**2
    max_bytes_to_read: int = 10 * 1024**3


def read_only_select(statement: str, limits: SqlLimits) -> str:
    """Step 2: the canonical statement under our limits and `readonly = 1` (last: no later
    setting can change them)."""
    return (
        f"SELECT * FROM ({statement}) LIMIT {int(limits.max_rows) + 1} "
        f"SETTINGS max_execution_time = {float(limits.max_seconds)}, "
        "timeout_overflow_mode = 'throw', "
        f"max_memory_usage = {int(limits.max_memory_bytes)}, "
        f"max_result_bytes = {int(limits.max_result_bytes)}, result_overflow_mode = 'throw', "
        f"max_bytes_to_read = {int(limits.max_bytes_to_read)}, read_overflow_mode = 'throw', "
        "readonly = 1"
    )


def run_read_only(
    ch: ParameterisedClickHouse, text: str, limits: SqlLimits, scope: Scope = EVERY_DATABASE
) -> list[str]:
    """Steps 1-3: the result as JSONEachRow lines (one row each)."""
    statement = canonical_statement(ch, text)
    try:  # the canonical form of one parsed statement: safe to place after EXPLAIN AST
        ast = ch.query(f"EXPLAIN AST {statement}", "TSVRaw", {})
    except Exception as exc:
        raise classify(exc) from exc
    catalogue_rows = lambda sql: parse_rows(ch.query(sql, "JSONEachRow", {}))  # noqa: E731
    check_statement(ast, catalogue_rows, id(ch), scope, lambda: _databases(ch))
    try:  # names resolved by the analyzer: only for what the first look let through
        tree = ch.query(f"EXPLAIN QUERY TREE {statement}", "TSVRaw", {})
    except Exception as exc:
        raise classify(exc) from exc
    check_resolved(tree, catalogue_rows, id(ch), scope)
    try:
        out = ch.query(read_only_select(statement, limits), "JSONEachRow", {})
    except Exception as exc:
        if clickhouse_code(exc) == 62:  # parsed alone, but is no SELECT
            raise RejectedStatement(
                f"only one read-only SELECT is allowed; ClickHouse read: {statement[:200]}"
            ) from exc
        raise classify(exc) from exc
    if len(out) > limits.max_result_bytes:  # ClickHouse counts its own bytes, not the JSON's
        raise TooManyRows(
            f"the result is larger than {limits.max_result_bytes:,} bytes: select fewer "
            "columns or rows, or aggregate"
        )
    lines = [line for line in out.splitlines() if line.strip()]
    if len(lines) > limits.max_rows:
        raise TooManyRows(
            f"the result has more than {limits.max_rows:,} rows: add a LIMIT or aggregate "
            "(the service's limit is PROJECTOR_SQL_MAX_ROWS)"
        )
    return lines


def _databases(ch: ParameterisedClickHouse) -> set[str]:
    return {
        str(r["name"])
        for r in parse_rows(ch.query("SELECT name FROM system.databases", "JSONEachRow", {}))
    }

"""Ad-hoc SQL for analysts (`POST /sql`, `projector sql`): one read-only SELECT, bounded in rows
and time, checked by ClickHouse itself.

What is sent, in order:
1. ClickHouse's own parser reads the text, given as a query *parameter* (never spliced into SQL):
   `SELECT formatQuerySingleLine({statement:String})`. It refuses several statements and bad
   syntax, and gives back the one statement in canonical form, comments and trailing `;` gone.
2. That canonical statement runs as a subquery of ours:
   `SELECT * FROM (<statement>) LIMIT <rows + 1> SETTINGS max_execution_time = <s>, readonly = 1`.
   Only a SELECT (or WITH ... SELECT, UNION) parses as a subquery, so a DROP or INSERT is a syntax
   error here; our SETTINGS clause belongs to the outermost query, which is ours; and `readonly = 1`
   (last, so it also stops any later setting change, e.g. a SETTINGS clause inside the statement)
   makes ClickHouse refuse writes, DDL and table functions that reach outside (`file`, `url`).
   A SETTINGS clause inside the statement is refused before that (its AST has a `Set` node):
   ClickHouse lets a subquery's own SETTINGS change limits such as `max_execution_time`.
3. One row more than the limit is read: if it arrives, the answer is "too many rows", not a
   silently cut result.

Why not just append `SETTINGS readonly = 1` to the text: a statement ending in a `--` comment
swallows it, and a `;` starts a second statement that chDB runs too (both measured).
"""

from __future__ import annotations

import json
import re

from projector.clickhouse import ParameterisedClickHouse
from projector.errors import ClickHouseUnavailable
from queries.errors import (
    InvalidParameters,
    InvalidSql,
    QueryError,
    QueryTimeout,
    RejectedStatement,
    TooManyRows,
    Unavailable,
)

MAX_STATEMENT_LENGTH = 100_000

# ClickHouse error codes → what the client is told (the rest: InvalidSql).
CLICKHOUSE_ERRORS: dict[int, type[QueryError]] = {
    62: InvalidSql,  # SYNTAX_ERROR
    159: QueryTimeout,  # TIMEOUT_EXCEEDED
    164: RejectedStatement,  # READONLY
    396: TooManyRows,  # TOO_MANY_ROWS_OR_BYTES
    457: InvalidParameters,  # BAD_QUERY_PARAMETER
}
CODE = re.compile(r"Code: (\d+)\.")


def clickhouse_code(exc: BaseException) -> int | None:
    found = CODE.search(str(exc))
    return int(found.group(1)) if found else None


def first_line(exc: BaseException) -> str:
    """ClickHouse's message without its stack trace or the repeated query text."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:2000]


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
            "SELECT formatQuerySingleLine({statement:String}) AS s", "JSONEachRow",
            {"statement": text},
        )  # fmt: skip
    except Exception as exc:
        if clickhouse_code(exc) == 62:
            raise InvalidSql(f"not one valid statement: {first_line(exc)}") from exc
        raise classify(exc) from exc
    return str(json.loads(out)["s"])


def read_only_select(statement: str, max_rows: int, max_seconds: float) -> str:
    """Step 2: the canonical statement under our limits and `readonly = 1`."""
    return (
        f"SELECT * FROM ({statement}) LIMIT {int(max_rows) + 1} "
        f"SETTINGS max_execution_time = {float(max_seconds)}, "
        "timeout_overflow_mode = 'throw', readonly = 1"
    )


def run_read_only(
    ch: ParameterisedClickHouse, text: str, max_rows: int, max_seconds: float
) -> list[str]:
    """Steps 1-3: the result as JSONEachRow lines (one row each)."""
    statement = canonical_statement(ch, text)
    try:  # the canonical form of one parsed statement: safe to place after EXPLAIN AST
        ast = ch.query(f"EXPLAIN AST {statement}", "TSVRaw", {})
    except Exception as exc:
        raise classify(exc) from exc
    if any(line.strip() == "Set" for line in ast.splitlines()):
        raise RejectedStatement(
            "SETTINGS inside the statement are not allowed: the service sets the limits"
        )
    try:
        out = ch.query(read_only_select(statement, max_rows, max_seconds), "JSONEachRow", {})
    except Exception as exc:
        if clickhouse_code(exc) == 62:  # parsed alone, but is no SELECT
            raise RejectedStatement(
                f"only one read-only SELECT is allowed; ClickHouse read: {statement[:200]}"
            ) from exc
        raise classify(exc) from exc
    lines = [line for line in out.splitlines() if line.strip()]
    if len(lines) > max_rows:
        raise TooManyRows(
            f"the result has more than {max_rows:,} rows: add a LIMIT or aggregate "
            "(the service's limit is PROJECTOR_SQL_MAX_ROWS)"
        )
    return lines

"""What `projector verify` compares for one source table (`TablePlan`): its columns' canonical
texts on each side, and the Postgres rows its replica holds (a row filter's, if any). The
comparison itself is projector/operations/verify.py's."""

from __future__ import annotations

from dataclasses import dataclass

from projector.clickhouse import ident
from schemas.canonical_text import CanonicalText
from schemas.canonical_text import field as text_field


def pg_ident(name: str) -> str:
    """A Postgres identifier inside a query sent with parameters (`%` doubled)."""
    return '"' + name.replace('"', '""').replace("%", "%%") + '"'


@dataclass(frozen=True)
class Column:
    name: str
    text: CanonicalText  # its canonical text, `{0}` the column


@dataclass
class TablePlan:
    """What is compared for one source table, and the SQL of its texts on each side."""

    schema: str
    table: str
    replica: str  # the ClickHouse table, qualified
    keys: list[Column]
    columns: list[Column]  # every compared column (the keys among them)
    not_compared: list[str]
    # The table's row filter in the publication (connectors/row_filters.py): the replica holds
    # the matching rows only, so only they are compared
    row_filter: str | None = None

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def source(self) -> str:
        """The Postgres rows the replica holds, for a FROM clause (`%` escaped: every statement
        of the verifier has parameters)."""
        table = f"{pg_ident(self.schema)}.{pg_ident(self.table)}"
        if self.row_filter is None:
            return table
        return f"(SELECT * FROM {table} WHERE ({self.row_filter.replace('%', '%%')})) AS __filtered"

    def key_text(self, side: str) -> str:
        return _concat(side, [text_field(c.text) for c in self.keys], [c.name for c in self.keys])

    def row_text(self, side: str) -> str:
        columns = self.columns
        return _concat(side, [text_field(c.text) for c in columns], [c.name for c in columns])

    def column_texts(self, side: str) -> list[str]:
        quoted = pg_ident if side == "postgres" else ident
        rule = (lambda c: c.text.postgres) if side == "postgres" else (lambda c: c.text.clickhouse)
        return [f"{rule(c).format(quoted(c.name))} AS {quoted(c.name)}" for c in self.columns]


def _concat(side: str, texts: list[CanonicalText], names: list[str]) -> str:
    if side == "postgres":
        return " || ".join(
            t.postgres.format(pg_ident(n)) for t, n in zip(texts, names, strict=True)
        )
    return (
        "concat('', "
        + ", ".join(t.clickhouse.format(ident(n)) for t, n in zip(texts, names, strict=True))
        + ")"
    )

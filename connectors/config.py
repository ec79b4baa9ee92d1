"""Render connector JSON files: `${VAR}` / `${VAR:-default}` placeholders filled from an environment.

The JSON in this folder is the single source of truth for the Debezium connector, both for the local
stack and for docker-compose. Secrets never live in it: they arrive as placeholders.

Which tables are captured is one setting, `CAPTURE` (default `public`): a comma-separated list of
schema names (every table of the schema, including ones created later) and/or `schema.table` names.
It becomes Debezium's `table.include.list`; the signal and heartbeat tables are always added.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from connectors.errors import ConnectorConfigError

PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Tables the connector itself needs in the publication: Debezium's signal table (incremental
# snapshots) and the heartbeat table (keeps the slot advancing on an idle database).
CONTROL_SCHEMA = "debezium"
SIGNAL_TABLE = f"{CONTROL_SCHEMA}.signal"
HEARTBEAT_TABLE = f"{CONTROL_SCHEMA}.heartbeat"
DEFAULT_CAPTURE = "public"
DEFAULT_TEMPLATE = "postgres-source.json"


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture: whole schemas and single tables (`schema.table`)."""

    schemas: tuple[str, ...]
    tables: tuple[str, ...]

    @classmethod
    def parse(cls, text: str | None) -> CaptureSpec:
        entries = [e.strip() for e in (text or DEFAULT_CAPTURE).split(",") if e.strip()]
        if not entries:
            raise ConnectorConfigError("CAPTURE is empty: name at least one schema or schema.table")
        schemas, tables = [], []
        for entry in entries:
            parts = entry.split(".")
            if len(parts) == 1 and _is_identifier(parts[0]):
                schemas.append(parts[0])
            elif len(parts) == 2 and all(_is_identifier(p) for p in parts):
                tables.append(entry)
            else:
                raise ConnectorConfigError(
                    f"CAPTURE entry {entry!r} is neither a schema name nor schema.table"
                )
        return cls(tuple(schemas), tuple(tables))

    def include_list(self, left_out: Collection[str] = ()) -> str:
        """Debezium's `table.include.list`: regexes anchored on the whole `schema.table` name.
        `left_out` tables (`schema.table`) are not captured although the spec covers them: a
        schema's pattern skips them with a negative lookahead (Debezium refuses an exclude list
        beside an include list), so tables created later in the schema are still captured."""
        patterns = []
        for schema in self.schemas:
            skipped = sorted(t.split(".", 1)[1] for t in left_out if t.split(".", 1)[0] == schema)
            lookahead = f"(?!(?:{'|'.join(map(re.escape, skipped))})$)" if skipped else ""
            patterns.append(rf"{re.escape(schema)}\.{lookahead}.*")
        tables = [t for t in self.tables if t not in left_out]
        patterns += [re.escape(t) for t in (*tables, SIGNAL_TABLE, HEARTBEAT_TABLE)]
        return ",".join(patterns)

    def covers(self, schema: str, table: str) -> bool:
        return schema in self.schemas or f"{schema}.{table}" in self.tables


def _is_identifier(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*", name) is not None


def substitute(text: str, env: Mapping[str, str]) -> str:
    """Replace every placeholder; a placeholder with no value and no default is an error."""
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            return json.dumps(env[name])[1:-1]  # escaped for a JSON string
        if default is not None:
            return default
        missing.append(name)
        return ""

    rendered = PLACEHOLDER.sub(replace, text)
    if missing:
        raise ConnectorConfigError(
            "connector config needs these environment variables: " + ", ".join(sorted(set(missing)))
        )
    return rendered


def render_connector(
    env: Mapping[str, str], template: str = DEFAULT_TEMPLATE, left_out: Collection[str] = ()
) -> dict[str, Any]:
    """The connector definition `{"name": ..., "config": {...}}` with every placeholder filled;
    `left_out`: tables CAPTURE covers that are not captured (`CaptureSpec.include_list`)."""
    values = dict(env)
    capture = CaptureSpec.parse(values.get("CAPTURE"))
    values.setdefault("TABLE_INCLUDE_LIST", capture.include_list(left_out))
    text = (resources.files("connectors") / template).read_text()
    definition = json.loads(substitute(text, values))
    if set(definition) != {"name", "config"}:
        raise ConnectorConfigError(f"{template} must have exactly the keys 'name' and 'config'")
    from connectors.columns import ColumnRules  # excluded and masked columns

    definition["config"].update(ColumnRules.from_env(values).connector_config())
    return definition

"""What an ad-hoc statement may touch, checked on ClickHouse's own parse of it before it runs.

`readonly = 1` stops writes, DDL and the *table* function `file()`, but not everything that
reads outside the tables: chDB (clickhouse-local) does not confine the *scalar* `file()` to a
user-files directory (`SELECT file('/proc/self/environ')` answered the service's secrets), a
table function such as `sqlite()` creates the file it is refused for, and settings, macros,
dictionaries and introspection tell what a token holder should not know. So the statement's
syntax tree (`EXPLAIN AST` of the canonical statement, ClickHouse's parser, never ours) is read
for every function, table function and table it names, and the statement is refused, naming
the first thing it may not use, unless:

- every **function** is one of the engine's built-in functions (user-defined ones may run
  programs) and not in `REFUSED_FUNCTIONS` or a category of `REFUSED_CATEGORIES` -- the ones
  that read files, the network, settings, the host, dictionaries, or that sleep; functions the
  engine does not know are left to ClickHouse, which refuses them;
- every **table function** is in `TABLE_FUNCTIONS`: the ones that compute rows from their
  arguments alone (`numbers`, `values`, ...);
- every **table** lies in a database the caller may read (`Scope`), and a system table is one
  of `SYSTEM_TABLES` (catalogue tables BI tools ask; never `system.settings`, whose values hold
  the registry's URL with its password, or `system.processes` and the logs, which hold other
  clients' statements);
- no `SETTINGS` clause: the service sets the limits.

A column reference `a.b` and a table `a.b` read alike in the tree (`Identifier a.b`): a
two-part name whose first part is a database the caller may not read is refused either way
(give the table another alias).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from queries.errors import RejectedStatement

# Functions that reach beyond the statement's tables or stall the engine.
REFUSED_FUNCTIONS = frozenset(name.lower() for name in (
    "file",  # reads any file the process can (chDB does not confine it)
    "sleep", "sleepEachRow",  # holds the engine, and on chDB every other reader and ingestion
    "getSetting", "getSettingOrDefault", "getServerSetting", "getMergeTreeSetting",  # secrets
    "getMacro", "getServerPort", "tcpPort", "hostName", "FQDN", "serverUUID", "buildId",
    "getOSKernelVersion", "filesystemAvailable", "filesystemCapacity", "filesystemUnreserved",
    "globalVariable", "getClientHTTPHeader", "currentRequestURL", "showCertificate",
    "zookeeperSessionUptime", "currentUser", "authenticatedUser", "currentProfiles",
    "enabledProfiles", "defaultProfiles", "currentRoles", "enabledRoles", "defaultRoles",
    "joinGet", "joinGetOrNull",  # read a table named in a string, past the table check
    "hasColumnInTable",  # the same
    "catboostEvaluate", "modelEvaluate",  # load model files
    "fuzzQuery", "transactionID", "transactionLatestSnapshot", "transactionOldestSnapshot",
))  # fmt: skip
# Categories of system.functions refused whole: dictionaries (they may read files, URLs or other
# databases), introspection (addresses and symbols of the server's code), AI (calls the
# network), and the engine's internals.
REFUSED_CATEGORIES = frozenset({"Dictionary", "Embedded Dictionary", "Introspection", "AI",
                                "Internal"})  # fmt: skip
# Table functions that compute rows from their arguments alone.
TABLE_FUNCTIONS = frozenset(name.lower() for name in (
    "numbers", "numbers_mt", "zeros", "zeros_mt", "values", "generate_series", "generateSeries",
    "primes", "null", "view", "format", "generateRandom",
))  # fmt: skip
# System tables a token holder may read: the catalogue (what BI tools ask for) and constants.
SYSTEM_TABLES = frozenset({
    "one", "numbers", "numbers_mt", "zeros", "zeros_mt", "databases", "tables", "columns",
    "functions", "table_functions", "data_type_families", "formats", "time_zones",
    "table_engines", "collations",
})  # fmt: skip
CATALOGUE_DATABASES = frozenset({"system", "information_schema"})


@dataclass(frozen=True)
class Scope:
    """Which databases a caller may read (besides the catalogue): `may_read(database)`."""

    may_read: Callable[[str], bool] = lambda database: True
    description: str = "any database"


EVERY_DATABASE = Scope()

_NODE = re.compile(r"^\s*(Function|TableIdentifier|Identifier|Set)\b\s*(\S*)")


@dataclass
class _Catalogue:
    """What the engine at hand knows: its built-in functions that are allowed, the names of its
    table functions and of its databases (read once per backend: they do not change)."""

    refused: dict[str, str] = field(default_factory=dict)  # lower-case name -> why
    functions: frozenset[str] = frozenset()  # lower-case names of every (scalar) function
    table_functions: frozenset[str] = frozenset()


_catalogues: dict[int, _Catalogue] = {}
_catalogues_lock = threading.Lock()


def _catalogue(rows: Callable[[str], list[dict[str, Any]]], key: int) -> _Catalogue:
    with _catalogues_lock:
        found = _catalogues.get(key)
        if found is not None:
            return found
        refused: dict[str, str] = {}
        functions: set[str] = set()
        for row in rows(
            "SELECT name, origin, categories FROM system.functions"
        ):  # every name, aliases included
            name = str(row["name"]).lower()
            functions.add(name)
            if str(row["origin"]) != "System":
                refused[name] = "a user-defined function (it may run programs)"
            elif str(row["categories"]) in REFUSED_CATEGORIES:
                refused[name] = f"a function of category {row['categories']}"
        for name in REFUSED_FUNCTIONS:
            refused[name] = "a function that reaches beyond the tables"
        table_functions = frozenset(
            str(r["name"]).lower() for r in rows("SELECT name FROM system.table_functions")
        )
        found = _catalogues[key] = _Catalogue(refused, frozenset(functions), table_functions)
        return found


def check_statement(
    ast: str, rows: Callable[[str], list[dict[str, Any]]], key: int, scope: Scope,
    databases: Callable[[], set[str]],
) -> None:  # fmt: skip
    """Refuse (`RejectedStatement`, naming the culprit) a statement whose `EXPLAIN AST` text is
    `ast` unless it keeps to the rules of the module docstring. `rows` runs a catalogue query on
    the engine (cached per `key`), `databases` names the engine's databases now."""
    catalogue = _catalogue(rows, key)
    known_databases: set[str] | None = None
    lines = ast.splitlines()
    for index, line in enumerate(lines):
        match = _NODE.match(line)
        if match is None:
            continue
        kind, name = match.groups()
        if kind == "Set":
            raise RejectedStatement(
                "SETTINGS inside the statement are not allowed: the service sets the limits"
            )
        if kind == "Function":
            lowered = name.lower()
            # A table function where a table stands, or anywhere if no function has its name
            # (`x IN sqlite(...)` reads a table too).
            if lowered in catalogue.table_functions and (
                lowered not in catalogue.functions or _parent(lines, index) == "TableExpression"
            ):
                if lowered not in TABLE_FUNCTIONS:
                    raise RejectedStatement(
                        f"the table function {name}() is not allowed: ad-hoc SQL reads the "
                        "projector's tables only (allowed table functions: "
                        f"{', '.join(sorted(TABLE_FUNCTIONS))})"
                    )
                continue
            why = catalogue.refused.get(lowered)
            if why is not None:
                raise RejectedStatement(f"the function {name}() is not allowed: {why}")
            continue
        parts = [p.strip("`") for p in name.split(".")]
        if len(parts) != 2:
            continue  # a column, or a table of the current database (or a WITH name)
        database, table = parts
        if database.lower() in CATALOGUE_DATABASES:
            if database.lower() == "system" and table.lower() not in SYSTEM_TABLES:
                raise RejectedStatement(
                    f"the table system.{table} is not allowed (system tables allowed: "
                    f"{', '.join(sorted(SYSTEM_TABLES))})"
                )
            continue
        if scope.may_read(database):
            continue
        if kind == "Identifier":  # maybe a column `alias.column`: only a database is refused
            if known_databases is None:
                known_databases = databases()
            if database not in known_databases:
                continue
        raise RejectedStatement(
            f"the database {database} is not readable here (ad-hoc SQL reads {scope.description})"
        )


def _parent(lines: list[str], index: int) -> str:
    """The kind of the node above the one on `lines[index]` (the tree is indented by depth):
    `TableExpression` above a `Function` makes it a table function."""
    depth = len(lines[index]) - len(lines[index].lstrip())
    for previous in reversed(lines[:index]):
        if len(previous) - len(previous.lstrip()) < depth:
            return previous.split()[0] if previous.split() else ""
    return ""

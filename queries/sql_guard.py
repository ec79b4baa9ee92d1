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

Then a **second look** (`check_resolved`) at what ClickHouse's analyzer makes of the statement
(`EXPLAIN QUERY TREE`): there every table is resolved to its database (a name without one, a WITH
name), every alias of a function to the function (`user()` is `currentUser()`), and `APPLY(...)`
to the functions it applies -- the same rules, applied to what will run. The first look comes
first because the analyzer already *evaluates* constant expressions: a refused function must
never reach it (`toUInt8(file('/etc/passwd'))` would put the file into the error message).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from queries.errors import RejectedStatement

# Functions that reach beyond the statement's tables or stall the engine.
# Grouped by what each group reaches (aligned by hand, hence `fmt: skip`).
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
REFUSED_CATEGORIES = frozenset(
    {"Dictionary", "Embedded Dictionary", "Introspection", "AI", "Internal"}
)
# Table functions that compute rows from numbers alone. Not `values`, `format`, `null` or
# `generateRandom`: their structure argument is a string the engine parses later (a column's
# DEFAULT expression in it is a function the guard never sees); not `view`: the query tree hides
# the tables inside it.
TABLE_FUNCTIONS = frozenset(
    name.lower()
    for name in (
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
        "generate_series",
        "generateSeries",
        "primes",
    )
)
# Prefixes of refused function families (also where system.functions has no categories).
REFUSED_PREFIXES = ("dictget", "dicthas", "dictisin", "region")
# Syntax that applies functions the tree does not name: `SELECT * APPLY(file) FROM ...`.
REFUSED_NODES = {"ColumnsApplyTransformer": "APPLY(...) is not allowed: name the functions"}
# System tables a token holder may read: the catalogue (what BI tools ask for) and constants.
SYSTEM_TABLES = frozenset(
    {
        "one",
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
        "databases",
        "tables",
        "columns",
        "functions",
        "table_functions",
        "data_type_families",
        "formats",
        "time_zones",
        "table_engines",
        "collations",
    }
)
CATALOGUE_DATABASES = frozenset({"system", "information_schema"})


@dataclass(frozen=True)
class Scope:
    """Which databases a caller may read (besides the catalogue): `may_read(database)`."""

    may_read: Callable[[str], bool] = lambda database: True
    description: str = "any database"


EVERY_DATABASE = Scope()

_NODE = re.compile(
    r"^\s*(Function|TableIdentifier|Identifier|Set|ColumnsApplyTransformer)\b\s*(\S*)"
)


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
        aliases: dict[str, str] = {}
        for row in rows(
            "SELECT name, alias_to, origin, categories FROM system.functions"
        ):  # every name, aliases included
            name = str(row["name"]).lower()
            functions.add(name)
            if row.get("alias_to"):
                aliases[name] = str(row["alias_to"]).lower()
            if str(row["origin"]) != "System":
                refused[name] = "a user-defined function (it may run programs)"
            elif str(row["categories"]) in REFUSED_CATEGORIES:
                refused[name] = f"a function of category {row['categories']}"
            elif name.startswith(REFUSED_PREFIXES):
                refused[name] = "a dictionary function (dictionaries may read files or networks)"
        for name in REFUSED_FUNCTIONS:
            refused[name] = "a function that reaches beyond the tables"
        for alias, original in aliases.items():  # user() is currentUser(), FQDN() hostName()
            if original in refused:
                refused.setdefault(alias, f"{refused[original]} (another name of {original})")
        table_functions = frozenset(
            str(r["name"]).lower() for r in rows("SELECT name FROM system.table_functions")
        )
        found = _catalogues[key] = _Catalogue(refused, frozenset(functions), table_functions)
        return found


def check_statement(
    ast: str,
    rows: Callable[[str], list[dict[str, Any]]],
    key: int,
    scope: Scope,
    databases: Callable[[], set[str]],
) -> None:
    """Refuse (`RejectedStatement`, naming the culprit) a statement whose `EXPLAIN AST` text is
    `ast` unless it keeps to the rules of the module docstring. `rows` runs a catalogue query on
    the engine (cached per `key`), `databases` names the engine's databases now."""
    catalogue = _catalogue(rows, key)
    known_databases: set[str] | None = None
    lines = ast.splitlines()
    top = lines[0].split()[0] if lines and lines[0].split() else ""
    if top not in ("SelectWithUnionQuery", "SelectIntersectExceptQuery"):
        raise RejectedStatement(
            f"only one read-only SELECT is allowed (ClickHouse read a {top or 'nothing'})"
        )
    for index, line in enumerate(lines):
        match = _NODE.match(line)
        if match is None:
            continue
        kind, name = match.groups()
        if kind in REFUSED_NODES:
            raise RejectedStatement(REFUSED_NODES[kind])
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


_RESOLVED = re.compile(
    r"^\s*(?:(TABLE) id: \d+.*?table_name: (\S+)|(TABLE_FUNCTION) id: \d+.*?table_function_name: "
    r"(\S+)|(FUNCTION) id: \d+.*?function_name: ([^,\s]+))"
)


def check_resolved(
    tree: str, rows: Callable[[str], list[dict[str, Any]]], key: int, scope: Scope
) -> None:
    """The second look, at `EXPLAIN QUERY TREE` of a statement `check_statement` let through:
    ClickHouse's analyzer has resolved every name there -- a table of the current database or of
    a WITH clause to its database and table, an alias of a function to the function -- so the
    rules are applied again to what will actually run."""
    catalogue = _catalogue(rows, key)
    for line in tree.splitlines():
        match = _RESOLVED.match(line)
        if match is None:
            continue
        table, table_name, table_function, table_function_name, function, function_name = (
            match.groups()
        )
        if table:
            database, _, name = table_name.partition(".")
            if database.lower() == "system":
                if name.lower() not in SYSTEM_TABLES:
                    raise RejectedStatement(f"the table system.{name} is not allowed")
            elif database.lower() not in CATALOGUE_DATABASES and not scope.may_read(database):
                raise RejectedStatement(
                    f"the table {table_name} is not readable here (ad-hoc SQL reads "
                    f"{scope.description})"
                )
        elif table_function and table_function_name.lower() not in TABLE_FUNCTIONS:
            raise RejectedStatement(f"the table function {table_function_name}() is not allowed")
        elif function and function_name.lower() in catalogue.refused:
            why = catalogue.refused[function_name.lower()]
            raise RejectedStatement(f"the function {function_name}() is not allowed: {why}")

"""The query side: named queries and the query service. (The read models they read are defined
and kept by the engine: projector/read_models/read_models.toml, projector/read_models/maintenance.py.)

- `named`: named queries (`sql/*.sql`) with typed, documented parameters.
- `service` / `api` / `server`: the query service (HTTP API, read-your-writes, cache, ad-hoc SQL,
  ops page), started by `projector serve` or `projector run --serve`.
"""

from queries.errors import QueryDefinitionError, QueryError
from queries.named import NamedQuery, load_named_queries

__all__ = ["NamedQuery", "QueryDefinitionError", "QueryError", "load_named_queries"]

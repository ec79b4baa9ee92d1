"""The query side: read-model definitions, named queries and the query service.

- `read_models`: the declared read models (`read_models.toml`) and their creation.
- `named`: named queries (`sql/*.sql`) with typed, documented parameters.
- `service` / `api` / `server`: the query service (HTTP API, read-your-writes, cache, ad-hoc SQL,
  ops page), started by `projector serve` or `projector run --serve`.
"""

from queries.errors import QueryDefinitionError, QueryError
from queries.named import NamedQuery, load_named_queries

__all__ = ["NamedQuery", "QueryDefinitionError", "QueryError", "load_named_queries"]

"""A read model that fails answers 503 with its reason, never its stale rows (issue: read models
as a stage of their own, item 5), on the real stack.

A read model whose definition cannot take a value (ClickHouse's `throwIf`) is served, then a
row arrives that it cannot take: the family fails and is no longer kept. From then on its named
query answers with the failure, with or without `min_lsn` (a client waiting for a write must
not get the row as it was before that write), where before it answered rows.
"""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import StackHandle
from tests.integration.projector_harness import ProjectorProcess


def test_a_failed_read_model_answers_503_with_its_reason(
    stack: StackHandle, tmp_path: Path
) -> None:
    projector = ProjectorProcess(stack, tmp_path)
    table, model = projector.table("fm_items"), projector.table("fm_model")
    models = tmp_path / "read_models.toml"
    models.write_text(
        f'[[entity]]\nname = "{model}"\ndescription = "qty up to 100"\nsources = ["{table}"]\n'
        f'key = ["id"]\nkeys = "SELECT id FROM {{{table}}}"\n'
        f'sql = "SELECT id, qty, throwIf(qty > 100) AS refused FROM {{{table}}} '
        f'WHERE id IN {{keys}}"\n'
        f'[entity.affects]\n{table} = "SELECT id FROM {{changed}}"\n'
    )
    queries = tmp_path / "queries"
    queries.mkdir()
    (queries / "item.sql").write_text(
        f'-- description = "One item."\n-- read_models = ["{model}"]\n--\n'
        '-- [params.id]\n-- description = "Its id."\n'
        f"SELECT id, qty FROM read_models.{model} WHERE id = {{id:Int32}}\n"
    )
    projector.env |= {
        "PROJECTOR_TRANSACTION_METADATA": "true",
        "PROJECTOR_READ_MODEL_SCHEMA": "public",
        "PROJECTOR_READ_MODELS_FILE": str(models),
        "PROJECTOR_QUERY_DIR": str(queries),
    }
    stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, qty int)")
    stack.sql(f"INSERT INTO {table} VALUES (1, 5), (2, 7)")
    projector.catch_up()
    served = projector.cli("query", "item", "--param", "id=1", "--format", "csv")
    assert served.returncode == 0, served.stdout + served.stderr
    assert served.stdout.split() == ["id,qty", "1,5"], served.stdout

    stack.sql(f"UPDATE {table} SET qty = 500 WHERE id = 1")  # a value the definition refuses
    ((lsn,),) = stack.sql("SELECT pg_current_wal_lsn()::text")
    projector.catch_up()
    status = projector.cli("read-models", "list")
    assert "failed" in status.stdout + status.stderr, status.stdout + status.stderr
    for extra in ([], ["--min-lsn", str(lsn)]):
        answer = projector.cli("query", "item", "--param", "id=1", *extra)
        said = " ".join((answer.stdout + answer.stderr).split())
        assert answer.returncode == 1, said  # a 503: the service's fault, not the client's
        assert "has failed and is no longer kept" in said and model in said, said
        assert "qty" not in answer.stdout, said  # no stale row

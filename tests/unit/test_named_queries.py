"""Named queries: the shipped files load, every parameter is typed and documented, and values are
checked before ClickHouse sees them (injection attempts and wrong types are refused)."""

from __future__ import annotations

import re

import pytest

from projector.read_models.definitions import load_read_models
from queries.errors import InvalidParameters, QueryDefinitionError
from queries.named import PLACEHOLDER, load_named_queries, parse_named_query

SHIPPED = load_named_queries()


def test_the_seed_queries_are_shipped() -> None:
    assert {
        "order_by_id",
        "orders_of_customer",
        "orders_in_status",
        "order_statistics",
        "daily_sales",
        "monthly_sales",
        "top_products",
        "top_customers",
    } <= set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_query_reads_only_declared_read_models(name: str) -> None:
    query = SHIPPED[name]
    known = {m.name for m in load_read_models()}
    assert set(query.read_models) <= known
    for model in query.read_models:
        assert f"read_models.{model}" in query.sql
    tables = set(re.findall(r"read_models\.(\w+)", query.sql))
    assert tables == set(query.read_models), "every read model read must be declared"
    assert all(p.spec.description for p in query.parameters)
    assert {p for p, _ in PLACEHOLDER.findall(query.sql)} == {p.name for p in query.parameters}


@pytest.mark.parametrize(
    ("name", "params", "wrong"),
    [
        ("order_by_id", {"order_id": "1 OR 1=1"}, "order_id"),
        ("order_by_id", {"order_id": "1; DROP TABLE read_models.order_summary"}, "order_id"),
        ("order_by_id", {"order_id": "0"}, "order_id"),  # below the declared minimum
        ("order_by_id", {"order_id": "99999999999999999999"}, "order_id"),  # beyond Int64
        ("orders_in_status", {"status": "PENDING' OR '1'='1"}, "status"),
        ("orders_in_status", {"status": "pending"}, "status"),
        (
            "daily_sales",
            {"start_date": "2026-01-01' OR 1=1 --", "end_date": "2026-01-31"},
            "start_date",
        ),
        ("daily_sales", {"start_date": "2026-02-30", "end_date": "2026-03-01"}, "start_date"),
        ("top_products", {"top": "5000"}, "top"),
        ("order_by_id", {"order_id": "1", "extra": "x"}, "extra"),
        ("daily_sales", {"start_date": "2026-01-01"}, "end_date"),  # missing
    ],
)
def test_bad_values_are_refused_naming_the_parameter(
    name: str, params: dict[str, str], wrong: str
) -> None:
    with pytest.raises(InvalidParameters) as refused:
        SHIPPED[name].bind(params)
    assert wrong in refused.value.message
    assert any(d["parameter"] == wrong for d in refused.value.details)


def test_good_values_become_clickhouse_parameter_text() -> None:
    assert SHIPPED["order_by_id"].bind({"order_id": "42"}) == {"order_id": "42"}
    assert SHIPPED["daily_sales"].bind({"start_date": "2026-01-01", "end_date": "2026-01-31"}) == {
        "start_date": "2026-01-01",
        "end_date": "2026-01-31",
    }
    assert SHIPPED["top_products"].bind({}) == {"top": "10"}  # the default
    assert SHIPPED["orders_in_status"].bind({"status": "SHIPPED"}) == {"status": "SHIPPED"}


def test_a_string_value_stays_data_whatever_it_holds() -> None:
    query = parse_named_query(
        "by_name",
        '-- description = "x"\n-- read_models = ["order_summary"]\n'
        '-- [params.name]\n-- description = "a name"\n'
        "SELECT * FROM read_models.order_summary WHERE customer_name = {name:String}",
    )
    hostile = "x' OR '1'='1'; DROP TABLE t; --"
    assert query.bind({"name": hostile}) == {"name": hostile}  # bound as a value, never spliced
    assert hostile not in query.sql
    with pytest.raises(InvalidParameters):
        query.bind({"name": "x" * 1001})  # the default length bound


HEADER = '-- description = "d"\n-- read_models = ["order_summary"]\n'


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (HEADER + "SELECT {id:Int64}", "must be the same"),  # undeclared placeholder
        (HEADER + '-- [params.id]\n-- description = "i"\nSELECT 1', "must be the same"),
        (HEADER + '-- [params.id]\n-- description = "i"\nSELECT {id:Float64}', "supported types"),
        (
            HEADER + '-- [params.id]\n-- description = "i"\nSELECT {id:Int64}, {id:String}',
            "used as",
        ),
        (HEADER + '-- [params.limit]\n-- description = "i"\nSELECT {limit:Int64}', "reserved"),
        (HEADER + "-- [params.id]\nSELECT {id:Int64}", "description"),
        (HEADER + "SELECT 1; SELECT 2", "one statement"),
        ('-- read_models = ["x"]\nSELECT 1', "description"),
        (
            HEADER + '-- [params.n]\n-- description = "n"\n-- default = 0\n-- minimum = 1\n'
            "SELECT {n:UInt32}",
            "default",
        ),
    ],
)
def test_a_broken_definition_is_refused_at_load(text: str, problem: str) -> None:
    with pytest.raises(QueryDefinitionError) as refused:
        parse_named_query("q", text, "q.sql")
    assert problem in str(refused.value)
    assert "q.sql" in str(refused.value)

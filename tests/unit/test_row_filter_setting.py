"""ROW_FILTERS (connectors/row_filters.py): what the setting takes and refuses, and the Debezium
settings that make its snapshots read the matching rows only."""

from __future__ import annotations

import pytest

from connectors.errors import ConnectorConfigError
from connectors.row_filters import parse_row_filters, snapshot_overrides


def test_entries_split_on_semicolons_and_the_first_equals_sign() -> None:
    assert parse_row_filters("shop.orders=region = 'eu' ; public.events=kind <> 'a,b';") == {
        "shop.orders": "region = 'eu'",
        "public.events": "kind <> 'a,b'",
    }
    assert parse_row_filters(None) == {} and parse_row_filters(" ; ") == {}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("shop.orders", "is not schema.table=<condition>"),
        ("orders=id > 1", "is not schema.table=<condition>"),
        ("shop.orders=", "is not schema.table=<condition>"),
        ("shop.orders=id > 1; shop.orders=id > 2", "names shop.orders twice"),
    ],
)
def test_what_is_refused_says_why(text: str, says: str) -> None:
    with pytest.raises(ConnectorConfigError, match=says):
        parse_row_filters(text)


def test_the_snapshots_select_what_the_filter_matches() -> None:
    assert snapshot_overrides({}) == {}
    config = snapshot_overrides({"shop.orders": "(region = 'eu'::text)", "a.b": "(id > 1)"})
    assert config == {
        "snapshot.select.statement.overrides": "a.b,shop.orders",
        "snapshot.select.statement.overrides.shop.orders": (
            'SELECT * FROM "shop"."orders" WHERE ((region = \'eu\'::text))'
        ),
        "snapshot.select.statement.overrides.a.b": 'SELECT * FROM "a"."b" WHERE ((id > 1))',
    }

"""Rendering of the connector JSON: placeholders, defaults, the CAPTURE setting."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

from connectors.config import CaptureSpec, render_connector, substitute
from connectors.errors import ConnectorConfigError

FULL_ENV = {
    "PG_HOST": "db.internal",
    "PG_PORT": "6543",
    "PG_DATABASE": "shop",
    "CDC_USER": "cdc",
    "CDC_PASSWORD": 'p"w\\d',
    "REGISTRY_URL": "http://registry:8080/apis/ccompat/v7",
}


def test_placeholders_take_environment_values_then_defaults() -> None:
    assert substitute("${A}-${B:-two}", {"A": "one"}) == "one-two"
    assert substitute("${B:-two}", {"B": "given"}) == "given"


def test_empty_value_falls_back_to_default() -> None:
    assert substitute("${B:-two}", {"B": ""}) == "two"


def test_missing_variables_are_all_named_in_one_error() -> None:
    with pytest.raises(ConnectorConfigError) as info:
        substitute("${X} ${Y} ${X}", {})
    assert "X, Y" in str(info.value)


def test_values_are_escaped_for_json() -> None:
    definition = render_connector(FULL_ENV)
    assert definition["config"]["database.password"] == 'p"w\\d'


def test_rendered_connector_has_the_settings_the_design_requires() -> None:
    config = render_connector(FULL_ENV)["config"]
    assert config["database.hostname"] == "db.internal"
    assert config["database.port"] == "6543"
    assert config["plugin.name"] == "pgoutput"
    assert config["publication.autocreate.mode"] == "disabled"
    assert config["slot.name"] and config["publication.name"]
    assert int(config["heartbeat.interval.ms"]) > 0
    assert config["signal.data.collection"] == "debezium.signal"
    assert config["provide.transaction.metadata"] == "true"
    assert config["decimal.handling.mode"] == "precise"
    assert config["tombstones.on.delete"] == "true"
    for part in ("key", "value"):
        assert config[f"{part}.converter"] == "io.confluent.connect.avro.AvroConverter"
        assert config[f"{part}.converter.schema.registry.url"] == FULL_ENV["REGISTRY_URL"]


def test_connector_file_has_no_literal_secrets() -> None:
    text = (resources.files("connectors") / "postgres-source.json").read_text()
    config = json.loads(text)["config"]
    for key, value in config.items():
        if "password" in key or "secret" in key:
            assert re.fullmatch(r"\$\{[A-Z_]+\}", value), f"{key} must be a placeholder"


def test_every_setting_is_explained_next_to_the_file() -> None:
    config = json.loads((resources.files("connectors") / "postgres-source.json").read_text())
    notes = (resources.files("connectors") / "postgres-source.md").read_text()
    missing = [key for key in config["config"] if f"`{key}`" not in notes]
    assert missing == [], f"settings without an explanation: {missing}"


def test_default_capture_is_every_table_of_public() -> None:
    spec = CaptureSpec.parse(None)
    assert spec.schemas == ("public",) and spec.tables == ()
    include = render_connector(FULL_ENV)["config"]["table.include.list"]
    patterns = include.split(",")
    assert any(re.fullmatch(p, "public.orders") for p in patterns)
    assert not any(re.fullmatch(p, "other.orders") for p in patterns)
    assert any(re.fullmatch(p, "debezium.signal") for p in patterns)


def test_capture_mixes_schemas_and_single_tables() -> None:
    spec = CaptureSpec.parse("sales, inventory.items")
    assert spec.covers("sales", "anything")
    assert spec.covers("inventory", "items")
    assert not spec.covers("inventory", "other")
    patterns = spec.include_list().split(",")
    assert any(re.fullmatch(p, "inventory.items") for p in patterns)
    assert not any(re.fullmatch(p, "inventoryXitems") for p in patterns)


@pytest.mark.parametrize("bad", ["a.b.c", "has space", "1abc", ",,"])
def test_malformed_capture_entries_are_rejected(bad: str) -> None:
    with pytest.raises(ConnectorConfigError):
        CaptureSpec.parse(bad)


def test_capture_changes_the_include_list_without_editing_json() -> None:
    config = render_connector({**FULL_ENV, "CAPTURE": "sales"})["config"]
    assert "sales" in config["table.include.list"]
    assert "public" not in config["table.include.list"]


def test_left_out_tables_are_skipped_by_their_schema_pattern_and_dropped_from_tables() -> None:
    spec = CaptureSpec.parse("public,sales.orders,sales.lines")
    patterns = spec.include_list(left_out={"public.log", "public.a.b", "sales.lines"}).split(",")

    def included(table: str) -> bool:
        return any(re.fullmatch(p, table) for p in patterns)

    assert not included("public.log") and not included("public.a.b")
    assert included("public.logs") and included("public.lo") and included("public.later_table")
    assert included("sales.orders") and not included("sales.lines")
    assert included("debezium.signal") and included("debezium.heartbeat")
    # Nothing left out: the list is exactly what it was before left-out tables existed.
    assert spec.include_list() == spec.include_list(left_out=())
    assert "?!" not in spec.include_list()


def test_config_change_names_added_removed_and_changed_keys_with_secrets_masked() -> None:
    from connectors.apply import ConfigChange

    change = ConfigChange.between(
        {"a": "1", "gone": "x", "database.password": "old"},
        {"a": "2", "new": "y", "database.password": "new"},
    )
    assert change.added == {"new": "y"} and change.removed == {"gone": "x"}
    assert change.changed == {"a": ("1", "2"), "database.password": ("***", "***")}
    assert not ConfigChange.between({"a": "1"}, {"a": "1"})
    assert ConfigChange.between(None, {"a": "1"}).created


def test_a_connect_failure_is_summarised_by_its_reasons_not_its_frames() -> None:
    from connectors import failure_summary

    trace = (
        "org.apache.kafka.connect.errors.ConnectException: Tolerance exceeded in error handler\n"
        "\tat org.apache.kafka.connect.runtime.errors.RetryWithToleranceOperator.execAndHandleError"
        "(RetryWithToleranceOperator.java:260)\n"
        "Caused by: org.apache.kafka.connect.errors.DataException: Failed to serialize Avro data\n"
        "\tat io.confluent.connect.avro.AvroConverter.fromConnectData(AvroConverter.java:95)\n"
        "\t... 12 more\n"
        "Caused by: java.net.SocketTimeoutException: Read timed out\n"
        "\tat java.base/sun.nio.ch.NioSocketImpl.timedRead(NioSocketImpl.java:288)\n"
    )
    assert failure_summary(trace).splitlines() == [
        "org.apache.kafka.connect.errors.ConnectException: Tolerance exceeded in error handler",
        "Caused by: org.apache.kafka.connect.errors.DataException: Failed to serialize Avro data",
        "Caused by: java.net.SocketTimeoutException: Read timed out",
    ]

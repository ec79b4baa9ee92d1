"""Consume Debezium change events from Kafka and project them into ClickHouse."""

"""The KRaft cluster id of a fresh stack: `kafka-storage format -t ID` reads an id that starts with
'-' as an option and fails (about 1 start in 64 with a plain URL-safe base64 of a random UUID)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator

from devstack.components import kraft_cluster_id, usable_cluster_id


def test_no_generated_id_starts_with_a_dash() -> None:
    ids = [kraft_cluster_id() for _ in range(500)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 and usable_cluster_id(i) for i in ids)
    assert len(set(ids)) == len(ids)  # still random


def test_a_dash_leading_draw_is_drawn_again() -> None:
    # 0xF8 encodes as '-' first in URL-safe base64 (index 62): the first draw must be rejected.
    dash_first = b"\xf8" + bytes(range(1, 16))
    plain = uuid.UUID("6f1c2a44-0d3e-4b8a-9c1f-2a3b4c5d6e7f").bytes
    draws: Iterator[bytes] = iter([dash_first, plain])
    cluster_id = kraft_cluster_id(lambda: next(draws))
    assert cluster_id == base64.urlsafe_b64encode(plain).decode().rstrip("=")


def test_the_rule_rejects_what_kafka_storage_cannot_read() -> None:
    assert not usable_cluster_id("-" + "A" * 21)
    assert not usable_cluster_id(base64.urlsafe_b64encode(bytes(16)).decode().rstrip("="))  # zero
    assert not usable_cluster_id("AAAAAAAAAAAAAAAAAAAAAQ")  # Kafka's reserved metadata topic id
    assert not usable_cluster_id("too-short")
    assert usable_cluster_id("MkU3OEVBNTcwNTJENDM2Qg")

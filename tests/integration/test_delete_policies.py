"""What a delete means, per table (projector/replicas/delete_policy.py), on the real stack.

One `soft` table and one `history` table take inserts, updates (two of one row in one
transaction), deletes (of a row written in the same batch, and of a row stored by an earlier
run), a TRUNCATE and inserts after it (a soft-deleted key written again). The test keeps its own
model of what it wrote, and then:
- soft: the analysts' view holds Postgres's rows exactly (`_deleted = 0`) and every row Postgres
  no longer has, with its last values and a deletion time (`_deleted = 1`);
- history: every version of every row in order, each valid until the next one began (or its
  delete), the last open exactly when the row is live in Postgres;
- both: the replica itself still equals Postgres under FINAL (read models and verify see no
  difference), and `connectors apply --dry-run` shows the policies.
"""

from __future__ import annotations

from decimal import Decimal
from itertools import pairwise

from tests.integration.conftest import StackHandle, one_backend
from tests.integration.projector_harness import ProjectorProcess, assert_replica_equals_source


class Model:
    """What the test wrote: the live rows, the deleted ones' last values, every version."""

    def __init__(self) -> None:
        self.live: dict[int, tuple] = {}
        self.deleted: dict[int, tuple] = {}
        self.versions: dict[int, list[tuple]] = {}
        self.ended_by_delete: set[tuple[int, int]] = set()  # (key, version index)

    def write(self, key: int, values: tuple) -> None:
        self.live[key] = values
        self.deleted.pop(key, None)
        self.versions.setdefault(key, []).append(values)

    def delete(self, key: int) -> None:
        self.deleted[key] = self.live.pop(key)
        self.ended_by_delete.add((key, len(self.versions[key]) - 1))

    def truncate(self) -> None:
        for key in list(self.live):
            self.delete(key)


@one_backend("chdb")
def test_soft_and_history_policies_keep_deleted_rows_and_every_version(
    stack: StackHandle, projector: ProjectorProcess
) -> None:
    soft, hist = projector.table("dp_soft"), projector.table("dp_hist")
    policies = f"public.{soft}=soft,public.{hist}=history"
    projector.env["DELETE_POLICY"] = policies
    for table in (soft, hist):
        stack.sql(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, amount numeric(10,2))")

    shown = projector.cli("connectors", "apply", "--dry-run")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"delete policy public.{soft}: soft" in shown.stdout, shown.stdout
    assert f"delete policy public.{hist}: history" in shown.stdout, shown.stdout
    wrong = projector.cli(
        "connectors", "apply", "--dry-run", env={"DELETE_POLICY": f"public.{soft}=archive"}
    )
    assert wrong.returncode != 0
    assert "one of hard, soft, history" in " ".join((wrong.stdout + wrong.stderr).split())

    models = {soft: Model(), hist: Model()}

    def insert(key: int, name: str, amount: str) -> None:
        for table, model in models.items():
            stack.sql(f"INSERT INTO {table} VALUES ({key}, '{name}', {amount})")
            model.write(key, (name, Decimal(amount)))

    def update(keys: list[int], name: str) -> None:
        """One transaction per table, the keys in order."""
        for table, model in models.items():
            statements = [f"UPDATE {table} SET name = '{name}{k}' WHERE id = {k}" for k in keys]
            stack.sql("BEGIN; " + "; ".join(statements) + "; COMMIT")
            for k in keys:
                model.write(k, (f"{name}{k}", model.live[k][1]))

    def delete(key: int) -> None:
        for table, model in models.items():
            stack.sql(f"DELETE FROM {table} WHERE id = {key}")
            model.delete(key)

    for key in range(1, 21):
        insert(key, f"n{key}", f"{key}.25")
    update([1, 2, 3, 4, 5], "first")
    update([3, 3], "again")  # two versions of one row in one transaction
    for key in (6, 7, 8):
        delete(key)
    insert(21, "short-lived", "0.50")
    delete(21)  # deleted in the batch that wrote it
    delete(1)  # after its update
    projector.catch_up()

    update([9], "late")
    delete(9)  # its row is stored by the earlier run
    delete(10)  # likewise, never updated
    # the application's migration: the history table follows the replica's shape
    stack.sql(f"ALTER TABLE {hist} ADD COLUMN note text")
    stack.sql(f"UPDATE {hist} SET note = 'noted' WHERE id = 11")
    models[hist].write(11, models[hist].live[11])
    for table, model in models.items():
        stack.sql(f"TRUNCATE {table}")
        model.truncate()
    insert(50, "after", "5.00")
    insert(2, "back", "2.00")  # a soft-deleted key written again: live
    projector.catch_up()

    # The replicas themselves: exactly Postgres (FINAL hides what a delete removed).
    for table in (soft, hist):
        assert_replica_equals_source(stack, projector, table, ["id"])

    # soft: live rows as Postgres has them, deleted ones with their last values and a time.
    view = projector.sql(
        f"SELECT id, name, amount, _deleted, _deleted_at FROM public.{soft} ORDER BY id"
    )
    live = {int(r["id"]): (r["name"], Decimal(str(r["amount"]))) for r in view if not r["_deleted"]}
    gone = {int(r["id"]): (r["name"], Decimal(str(r["amount"]))) for r in view if r["_deleted"]}
    postgres = {k: (n, a) for k, n, a in stack.sql(f"SELECT id, name, amount FROM {soft}")}
    assert live == postgres == models[soft].live
    assert gone == models[soft].deleted, (sorted(gone), sorted(models[soft].deleted))
    assert all(r["_deleted_at"] is not None for r in view if r["_deleted"])
    assert all(r["_deleted_at"] is None for r in view if not r["_deleted"])

    # history: every version in order, each valid until the next began; open while live.
    rows = projector.sql(
        f"SELECT id, name, amount, _valid_from, _valid_to FROM public.{hist}_history "
        "ORDER BY id, _valid_from, _lsn"
    )
    found: dict[int, list[dict]] = {}
    for row in rows:
        found.setdefault(int(row["id"]), []).append(row)
    expected = models[hist].versions
    assert sorted(found) == sorted(expected)
    live_in_postgres = {k for (k,) in stack.sql(f"SELECT id FROM {hist}")}
    for key, versions in found.items():
        assert [(v["name"], Decimal(str(v["amount"]))) for v in versions] == expected[key], key
        for n, (earlier, later) in enumerate(pairwise(versions)):
            if (key, n) in models[hist].ended_by_delete:  # deleted, later written again: a gap
                assert earlier["_valid_from"] <= earlier["_valid_to"] <= later["_valid_from"]
            else:
                assert earlier["_valid_to"] == later["_valid_from"], (key, earlier, later)
        assert (versions[-1]["_valid_to"] is None) == (key in live_in_postgres), (key, versions)
    notes = projector.sql(f"SELECT note FROM public.{hist}_history WHERE id = 11 ORDER BY _lsn")
    assert [r["note"] for r in notes] == [None, "noted"], notes
    # and the history view of current rows is the soft one
    current = projector.sql(f"SELECT id, _deleted FROM public.{hist} ORDER BY id")
    assert {int(r["id"]) for r in current if not r["_deleted"]} == live_in_postgres
    assert {int(r["id"]) for r in current if r["_deleted"]} == set(models[hist].deleted)

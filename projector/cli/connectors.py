"""`projector connectors apply | status | pause | resume | restart | delete`: the Debezium
connector, through the Kafka Connect REST API (connectors/)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from projector.cli.common import console, fail
from projector.config import DELETE_POLICY_SETTING as DELETE_POLICY
from projector.config import DeletePolicy, client_environment, parse_policies
from projector.replicas.delete_policy import describe

if TYPE_CHECKING:
    from connectors import ApplyPlan, ConnectClient, IdentityGap


connectors_app = typer.Typer(
    help="Manage the Debezium connector through the Kafka Connect REST API.", no_args_is_help=True
)


def connector_environment() -> dict[str, str]:
    """The addresses the connector needs, by the one rule of `client_environment`."""
    return client_environment()


def _connect_and_name() -> tuple[ConnectClient, str]:
    from connectors import ConnectClient, render_connector

    env = connector_environment()
    if "CONNECT_URL" not in env:
        fail("CONNECT_URL is not set and no local stack exists (projector stack up)")
    return ConnectClient(env["CONNECT_URL"]), render_connector(env)["name"]


def _connector_call(action: str) -> None:
    from connectors import ConnectorError

    try:
        client, name = _connect_and_name()
        getattr(client, action)(name)
    except ConnectorError as exc:
        fail(str(exc))
        return
    console.print(f"{action}: {name}", highlight=False)


@connectors_app.command("apply")
def connectors_apply(
    capture: str = typer.Option(
        None,
        "--capture",
        help="Schemas and/or schema.table names to capture, comma-separated (env CAPTURE; "
        "default: public).",
    ),
    set_identity_full: bool = typer.Option(
        False,
        "--set-replica-identity-full",
        help="Capture tables without a primary key too, after setting REPLICA IDENTITY FULL on "
        "them (their UPDATEs and DELETEs then log the whole old row). Without it they are left "
        "out with a warning. Env SET_REPLICA_IDENTITY_FULL=true does the same.",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Show what would change in the publication and the connector config, and change "
        "nothing.",
    ),
) -> None:
    """Create or update the connector, sync the publication, snapshot newly captured tables.

    A table Postgres could not publish UPDATEs and DELETEs of (no primary key, no replica
    identity) is left out, with a warning: in the publication, the application's UPDATEs and
    DELETEs on it would fail."""
    from connectors import ConnectClient, ConnectorError, apply_connector, display_name
    from connectors import dry_run as plan_dry_run

    env = connector_environment()
    if capture:
        env["CAPTURE"] = capture
    for needed in ("CONNECT_URL", "ADMIN_DSN"):
        if needed not in env:
            fail(f"{needed} is not set and no local stack exists (projector stack up)")
    client = ConnectClient(env["CONNECT_URL"])
    try:
        if dry_run:
            try:
                policies = parse_policies(
                    env.get(DELETE_POLICY) or env.get(f"PROJECTOR_{DELETE_POLICY}")
                )
            except ValueError as exc:
                fail(str(exc))
                return
            plan = plan_dry_run(client, env["ADMIN_DSN"], env, set_identity_full)
            _warn_left_out(plan.left_out)
            _warn_not_snapshotted(plan.not_snapshotted)
            _print_plan(plan, policies)
            return
        result = apply_connector(client, env["ADMIN_DSN"], env, set_identity_full)
    except ConnectorError as exc:
        fail(str(exc))
        return
    _warn_left_out(result.left_out)
    for gap in result.identity_full:
        console.print(
            f"REPLICA IDENTITY FULL set on {', '.join(map(display_name, gap.relations))} "
            f"({gap.reason}): its UPDATEs and DELETEs now log the whole old row",
            highlight=False,
        )
    console.print(
        f"connector {result.connector}: {'updated' if result.config_changed else 'unchanged'}; "
        f"capturing {len(result.tables)} table(s)",
        highlight=False,
    )
    if result.publication.added:
        console.print(f"publication: added {', '.join(result.publication.added)}", highlight=False)
    if result.publication.removed:
        console.print(
            f"publication: removed {', '.join(result.publication.removed)}", highlight=False
        )
    if not result.column_lists:
        console.print(
            "[yellow]warning:[/yellow] the admin role may not create event triggers (only a "
            "superuser may), which keep publication column lists right across the application's "
            "ALTER TABLE: excluded columns are left out by the connector alone (they reach Kafka "
            "Connect, never Kafka)",
            highlight=False,
            soft_wrap=True,
        )
    if result.reread:
        console.print(
            f"re-reading {', '.join(result.reread)}: its excluded or masked columns or its row "
            "filter changed",
            highlight=False,
        )
    for table in result.row_filters_changed:
        console.print(
            f"[yellow]warning:[/yellow] the row filter of {table} changed: rows it no longer "
            f"matches stay in the replica until `projector rebuild {table} --from snapshot`",
            highlight=False,
            soft_wrap=True,
        )
    if result.snapshot_signal:
        console.print(
            f"incremental snapshot requested (signal {result.snapshot_signal})", highlight=False
        )
    _warn_not_snapshotted(result.not_snapshotted)
    if not result.follows_new_tables:
        console.print(
            "[yellow]warning:[/yellow] the admin role may not create event triggers (only a "
            "superuser may): a table created later in a captured schema is captured when "
            "`projector connectors apply` runs again",
            highlight=False,
            soft_wrap=True,
        )


def _warn_left_out(gaps: tuple[IdentityGap, ...]) -> None:
    from connectors import display_name

    for gap in gaps:
        console.print(
            f"[yellow]warning:[/yellow] {display_name(gap.table)} is not captured: {gap.reason}. "
            "In the publication, every UPDATE and DELETE on it would fail. To capture it: "
            f"{gap.remedy()} (then apply again), or apply --set-replica-identity-full",
            highlight=False,
            soft_wrap=True,
        )


def _warn_not_snapshotted(tables: tuple[str, ...]) -> None:
    if tables:
        console.print(
            f"[yellow]warning:[/yellow] existing rows of {', '.join(tables)} are not copied: "
            "Debezium's incremental snapshot needs a primary key. Their changes from now on "
            "are captured.",
            highlight=False,
            soft_wrap=True,
        )


def _print_plan(plan: ApplyPlan, policies: Mapping[str, DeletePolicy]) -> None:
    """What `connectors apply` would do, as a diff (secrets masked; lines never wrapped)."""
    from connectors import display_name

    out = Console(soft_wrap=True)
    change = plan.config_change
    if change.created:
        out.print(f"connector {plan.connector}: would be created", highlight=False)
    elif change:
        out.print(f"connector {plan.connector}: config would change", highlight=False)
    else:
        out.print(f"connector {plan.connector}: config unchanged", highlight=False)
    if not change.created:
        for key, value in change.added.items():
            out.print(f"  + {key} = {value}", highlight=False, markup=False)
        for key, value in change.removed.items():
            out.print(f"  - {key} = {value}", highlight=False, markup=False)
        for key, (now, after) in change.changed.items():
            out.print(f"  ~ {key}: {now} -> {after}", highlight=False, markup=False)
    publication = plan.config["publication.name"]
    added, removed = plan.publication.added, plan.publication.removed
    verb = (
        "would be created"
        if plan.publication.created
        else "changes"
        if added or removed
        else "unchanged"
    )
    out.print(f"publication {publication}: {verb}", highlight=False)
    for table in added:
        out.print(f"  + {table}", highlight=False, markup=False)
    for table in removed:
        out.print(f"  - {table}", highlight=False, markup=False)
    for gap in plan.identity_full:
        out.print(
            f"would set REPLICA IDENTITY FULL on {', '.join(map(display_name, gap.relations))} "
            f"({gap.reason})",
            highlight=False,
        )
    _print_column_rules(out, plan)
    for table, condition in plan.row_filters.filters.items():
        changing = " (filter would change)" if table in plan.row_filters.changing else ""
        out.print(f"row filter {table}: WHERE {condition}{changing}", highlight=False, markup=False)
    for table in plan.row_filters.not_captured:
        out.print(f"row filter {table}: not captured", highlight=False, markup=False)
    for table, policy in policies.items():  # what the projector makes of a delete there
        captured = "" if table in plan.tables else " -- not captured"
        out.print(f"{describe(table, policy)}{captured}", highlight=False, markup=False)
    if plan.snapshot:
        out.print(
            f"would request an incremental snapshot of {', '.join(plan.snapshot)}", highlight=False
        )
    if plan.reread:
        out.print(
            f"would re-read {', '.join(plan.reread)} (its excluded or masked columns or its "
            "row filter changed)",
            highlight=False,
        )
    out.print("dry run: nothing was changed", highlight=False)


def _print_column_rules(out: Console, plan: ApplyPlan) -> None:
    """Which columns stay in Postgres, and how; which arrive masked."""
    lists, connector_only = plan.column_lists.lists, plan.column_lists.connector_only
    for column in plan.rules.excluded:
        table = column.rsplit(".", 1)[0]
        how = (
            f"connector only: {connector_only[table]}"
            if table in connector_only
            else "not in the publication's column list"
            + (" (list would change)" if table in plan.column_lists.changing else "")
            if table in lists
            else "not captured"
        )
        out.print(f"excluded {column}: {how}", highlight=False, markup=False)
    for column in plan.rules.masked:
        out.print(
            f"masked {column}: salted SHA-256 (MASK_SALT), hex", highlight=False, markup=False
        )


@connectors_app.command("status")
def connectors_status(
    as_json: bool = typer.Option(False, "--json", help="Print Kafka Connect's status document."),
) -> None:
    """Show the connector's and its tasks' state. Exit 1 unless all are RUNNING."""
    from connectors import ConnectorError, failure_summary

    try:
        client, name = _connect_and_name()
        status = client.status(name)
    except ConnectorError as exc:
        fail(str(exc))
        return
    if as_json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
    else:
        sys.stdout.write(f"{name}: {status['connector']['state']}\n")
        for task in status.get("tasks", []):
            sys.stdout.write(f"  task {task['id']}: {task['state']}\n")
            if task.get("trace"):
                summary = failure_summary(task["trace"]).replace("\n", "\n    ")
                sys.stdout.write(f"    {summary}\n")
    states = [status["connector"]["state"]] + [t["state"] for t in status.get("tasks", [])]
    if any(s != "RUNNING" for s in states):
        raise typer.Exit(1)


@connectors_app.command("pause")
def connectors_pause() -> None:
    """Pause the connector (the replication slot keeps WAL until it resumes)."""
    _connector_call("pause")


@connectors_app.command("resume")
def connectors_resume() -> None:
    """Resume a paused connector."""
    _connector_call("resume")


@connectors_app.command("restart")
def connectors_restart() -> None:
    """Restart the connector and all its tasks."""
    _connector_call("restart")


@connectors_app.command("delete")
def connectors_delete() -> None:
    """Delete the connector from Kafka Connect (the slot and publication stay in Postgres)."""
    _connector_call("delete")

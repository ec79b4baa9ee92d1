"""The ops page in a real headless browser (Debian's chromium, driven by playwright) against the
running service, deployed as on a ClickHouse server: `projector run` and `projector serve` as two
processes on one ClickHouse (`projector chdb-server` stands in for the server). The page loads,
shows the projections, and follows the lag: up while the projector is stopped and the shop writes,
back to 0 once it runs again."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.shop import ShopWriter, create_shop
from tests.integration.conftest import FENCE_TABLE, PROJECTOR, StackHandle
from tests.integration.projector_harness import ProjectorProcess, free_port

TOKEN = "ops-page-token"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
READ_MODELS = [
    "customer_lifetime_value",
    "daily_sales",
    "monthly_sales",
    "order_summary",
    "orders_by_status",
    "product_popularity",
]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([PROJECTOR, *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_until(what: str, check: object, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what} not within {timeout_s}s" + (
            f":\n{log.read_text()[-3000:]}" if log else ""
        )
        time.sleep(0.5)


@pytest.fixture
def deployment(stack: StackHandle, tmp_path: Path) -> Iterator[dict[str, object]]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: `make system-deps` installs Debian's chromium package")
    server_port = free_port()
    chdb_server = start(
        ["chdb-server", "--port", str(server_port), "--path", str(tmp_path / "chdb-server")],
        {**ProjectorProcess(stack, tmp_path).env},
        tmp_path / "chdb-server.log",
    )
    wait_until("chdb-server", lambda: _answers(f"http://127.0.0.1:{server_port}/ping"), 60)
    projector = ProjectorProcess(stack, tmp_path, server_url=f"http://127.0.0.1:{server_port}")
    schema = f"shop_{projector.unique}"
    create_shop(stack.admin_dsn, schema)
    stack.apply(capture=f"public,{schema}")
    ShopWriter(stack.admin_dsn, schema, seed=5).run(rate_per_s=0, transactions=60)
    metrics_port, api_port = free_port(), free_port()
    projector.env |= {
        "PROJECTOR_SCHEMAS": f"public,{schema}",
        "PROJECTOR_TABLE_PATTERN": f"({FENCE_TABLE}|customers|products|orders|order_items)",
        "PROJECTOR_READ_MODEL_SCHEMA": schema,
        "PROJECTOR_TRANSACTION_METADATA": "true",
        "PROJECTOR_METRICS_PORT": str(metrics_port),
        "PROJECTOR_API_TOKEN": TOKEN,
        "PROJECTOR_OPS_SAMPLE_S": "0.5",
    }
    processes = {"run": start(["run"], projector.env, projector.log)}
    processes["serve"] = start(
        ["serve", "--port", str(api_port)], projector.env, tmp_path / "serve.log"
    )
    url = f"http://127.0.0.1:{api_port}"
    wait_until("the query service", lambda: _answers(url + "/health"), 60, tmp_path / "serve.log")
    yield {
        "url": url,
        "projector": projector,
        "processes": processes,
        "schema": schema,
        "stack": stack,
        "tmp": tmp_path,
        "metrics_port": metrics_port,
    }
    for process in (*processes.values(), chdb_server):
        process.send_signal(signal.SIGTERM)
    for process in (*processes.values(), chdb_server):
        process.wait(60)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_ops_page_shows_projections_and_follows_the_lag(
    deployment: dict[str, object],
) -> None:
    from playwright.sync_api import sync_playwright

    url, tmp = str(deployment["url"]), Path(str(deployment["tmp"]))
    projector: ProjectorProcess = deployment["projector"]  # type: ignore[assignment]
    processes: dict[str, subprocess.Popen[bytes]] = deployment["processes"]  # type: ignore[assignment]
    stack: StackHandle = deployment["stack"]  # type: ignore[assignment]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox"]
        )
        refused = httpx.get(url + "/")  # the page itself needs the token
        assert refused.status_code == 401 and "Basic" in refused.headers["www-authenticate"]
        # a browser asks for credentials once (the token as the password) and sends them with
        # every request of the page
        page = browser.new_context(
            http_credentials={"username": "ops", "password": TOKEN}
        ).new_page()
        page.goto(url + "/")
        for name in READ_MODELS:
            page.wait_for_selector(f'#projections tr[data-name="{name}"]', timeout=120_000)

        def lag() -> int | None:
            text = page.inner_text("#lag-events").replace(",", "").strip()
            return int(text) if text.isdigit() else None

        def state() -> str:
            return page.inner_text('#projections tr[data-name="orders_by_status"] td:nth-child(2)')

        wait_until("lag 0 on the page (caught up)", lambda: lag() == 0, 240, projector.log)
        # The lag and the watermark are sampled apart (the transaction topic may still hold a
        # backlog of other tests' transactions): the state follows within a few samples.
        wait_until("orders_by_status current", lambda: state() == "current", 120, projector.log)
        assert page.inner_text("#connector").startswith("RUNNING")
        # Commit to visible, per read model: every event of its source tables, each observed
        # once (the read models are kept in the batch that writes the replica rows).
        schema = str(deployment["schema"])
        metrics_url = f"http://127.0.0.1:{deployment['metrics_port']}/metrics"

        def visible_counts() -> dict[tuple[str, str], float]:
            exposition = httpx.get(metrics_url, timeout=5).text
            return {
                (sample.name, next(iter(sample.labels.values()))): sample.value
                for family in text_string_to_metric_families(exposition)
                for sample in family.samples
                if sample.name.endswith("commit_to_visible_seconds_count")
            }

        def consistent(counts: dict[tuple[str, str], float]) -> bool:
            def table(name: str) -> float:
                return counts.get(
                    ("projector_commit_to_visible_seconds_count", f"{schema}.{name}"), 0
                )

            def model(name: str) -> float:
                return counts.get(("projector_read_model_commit_to_visible_seconds_count", name), 0)

            sources = sum(table(t) for t in ("orders", "customers", "order_items", "products"))
            return (
                table("orders") > 0
                and model("orders_by_status") == table("orders")
                and model("order_summary") == sources
            )

        wait_until(
            "commit-to-visible counted per read model", lambda: consistent(visible_counts()), 30
        )
        processes["run"].send_signal(signal.SIGTERM)  # the projector stops; the shop goes on
        assert processes["run"].wait(60) == 0
        ShopWriter(stack.admin_dsn, str(deployment["schema"]), seed=6).run(
            rate_per_s=0, transactions=40
        )
        wait_until("lag > 0 on the page", lambda: (lag() or 0) > 0, 120)
        page.screenshot(path=str(tmp / "ops-page-lagging.png"), full_page=True)
        assert page.locator('#chart polyline[data-series="events"]').count() == 1
        # per table: the shop's tables each a line, with its name and how far behind it is
        orders = f"{deployment['schema']}.orders"
        wait_until(
            "the orders table behind on the per-table chart",
            lambda: (
                page.locator(f'#table-chart polyline[data-table="{orders}"]').count() == 1
                and int(
                    page.inner_text(f'#table-legend span[data-table="{orders}"]')
                    .rsplit(" ", 1)[-1]
                    .replace(",", "")
                )
                > 0
            ),
            60,
        )

        processes["run"] = start(["run"], projector.env, projector.log)  # and runs again
        wait_until("lag back to 0 on the page", lambda: lag() == 0, 240, projector.log)
        page.screenshot(path=str(tmp / "ops-page.png"), full_page=True)
        browser.close()

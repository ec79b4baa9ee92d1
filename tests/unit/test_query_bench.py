"""The query bench reads wrk's report: requests answered 2xx per second, never the raw total."""

from __future__ import annotations

import pytest

from devstack.query_bench import wrk_rate

REPORT = """Running 10s test @ http://127.0.0.1:40123/queries/order_by_id?order_id=1
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  310.11us   9.80ms   91.20%
    Req/Sec     7.90k   402.31     8.51k    80.00%
  78612 requests in 10.00s, 25.41MB read
{failed}Requests/sec:   7861.07
Transfer/sec:      2.54MB
"""


def test_the_rate_counts_only_2xx_answers() -> None:
    assert wrk_rate(REPORT.format(failed="")) == pytest.approx(7861.2)
    refused = REPORT.format(failed="  Non-2xx or 3xx responses: 78612\n")
    assert wrk_rate(refused) == 0.0  # every request refused (a wrong token): nothing served


def test_a_run_that_did_not_happen_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="wrk did not report"):
        wrk_rate("unable to connect to 127.0.0.1:40123 Connection refused")

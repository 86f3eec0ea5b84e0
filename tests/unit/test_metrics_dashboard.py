"""contrib/grafana-dashboard.json queries only metric names the daemons expose."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import generate_latest
from sms_milter import metrics
from sms_milter.spool.base import STATES

DASHBOARD = Path(__file__).resolve().parents[2] / "contrib" / "grafana-dashboard.json"


def _exprs(node: object) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "expr" and isinstance(v, str)] + \
            [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_dashboard_uses_only_exposed_names():
    metrics.watch_spool(lambda: {"queued": 1}, STATES, lambda: {"fax": {"queued": 1}})
    exposed = set(re.findall(r"^# TYPE (\S+) (\w+)", generate_latest(metrics.REGISTRY).decode(), re.M))
    names = set()
    for name, kind in exposed:
        names.add(name)
        if kind == "counter":
            names.add(name + "_total")
        if kind == "histogram":
            names.update(name + s for s in ("_bucket", "_sum", "_count"))
    exprs = _exprs(json.loads(DASHBOARD.read_text()))
    used = {n for e in exprs for n in re.findall(r"\bsms_milter_\w+", e)}
    assert len(exprs) >= 10
    assert used, exprs
    assert used <= names, used - names
    # the contract's minimum is on the dashboard
    for want in ("sms_milter_decisions_total", "sms_milter_jobs", "sms_milter_channel_jobs",
                 "sms_milter_submits_total",
                 "sms_milter_receipts_total", "sms_milter_smtp_to_commit_seconds_bucket",
                 "sms_milter_commit_to_submit_seconds_bucket", "sms_milter_submit_to_receipt_seconds_bucket"):
        assert want in used, want


def test_refusal_reasons_are_short_labels_never_the_reply_text():
    from sms_milter.policy.refusal import INTERNAL_ERROR, SPOOL_UNAVAILABLE, Refusal

    assert metrics.reason_of(Refusal("550", "5.7.1", "sender x@y is not authorized")) == "not_authorized"
    assert metrics.reason_of(SPOOL_UNAVAILABLE) == "spool_unavailable"
    assert metrics.reason_of(INTERNAL_ERROR) == "internal_error"
    assert metrics.reason_of(Refusal("451", "4.3.0", "could not decide in time")) == "too_slow"
    assert metrics.reason_of(Refusal("554", "5.9.9", "x")) == "5.9.9"

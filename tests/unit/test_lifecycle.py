"""The job lifecycle's rules (spool/lifecycle.py), table by table: values in, values out."""

from __future__ import annotations

import pytest
from sms_milter.spool import lifecycle as lc

# -- part states -> job state -------------------------------------------------------------
JOB_STATE = [
    # (current, parts, part states, expected)
    ("submitted", 1, ["submitted"], "submitted"),
    ("submitted", 1, ["delivered"], "delivered"),
    ("submitted", 2, ["delivered"], "submitted"),  # one of two parts delivered: not yet
    ("submitted", 2, ["delivered", "submitted"], "submitted"),
    ("submitted", 2, ["delivered", "delivered"], "delivered"),
    ("submitted", 2, ["delivered", "buffered"], "buffered"),
    ("submitted", 1, ["buffered"], "buffered"),
    ("buffered", 1, ["delivered"], "delivered"),
    ("buffered", 2, ["buffered", "submitted"], "buffered"),
    ("submitted", 2, ["delivered", "failed"], "failed"),
    ("submitted", 2, ["expired", "failed"], "failed"),  # failed before expired
    ("submitted", 2, ["expired", "delivered"], "expired"),
    ("submitted", 3, ["buffered", "expired"], "expired"),
    ("queued", 1, [], "queued"),
]


@pytest.mark.parametrize(("current", "parts", "states", "expected"), JOB_STATE)
def test_job_state(current: str, parts: int, states: list[str], expected: str) -> None:
    assert lc.job_state(current, parts, states) == expected


MAY_BECOME = [
    (None, "failed", False),  # no such job
    ("queued", "failed", True),
    ("queued", "expired", True),
    ("submitted", "delivered", True),
    ("submitted", "buffered", True),
    ("buffered", "buffered", False),  # no change
    ("buffered", "delivered", True),
    ("delivered", "failed", False),  # final is final
    ("failed", "delivered", False),
    ("expired", "delivered", False),
]


@pytest.mark.parametrize(("current", "new", "expected"), MAY_BECOME)
def test_may_become(current: str | None, new: str, expected: bool) -> None:
    assert lc.may_become(current, new) is expected


# -- Notify policy -> owed notifications ----------------------------------------------------
OWED = [
    # (state, notify, sender, urls, expected kinds)
    ("delivered", "", "a@example.org", "{}", ("mail",)),
    ("buffered", "", "a@example.org", "{}", ()),
    ("failed", "", "a@example.org", "{}", ("mail",)),
    ("expired", "", "a@example.org", "{}", ("mail",)),
    ("delivered", "ALWAYS", "a@example.org", "{}", ("mail",)),
    ("buffered", "ALWAYS", "a@example.org", "{}", ("mail",)),
    ("delivered", "FAILED", "a@example.org", "{}", ()),
    ("failed", "FAILED", "a@example.org", "{}", ("mail",)),
    ("expired", "FAILED", "a@example.org", "{}", ("mail",)),
    ("failed", "NONE", "a@example.org", "{}", ()),
    ("delivered", "bogus", "a@example.org", "{}", ("mail",)),  # unknown policy: the default
    ("buffered", "bogus", "a@example.org", "{}", ()),
    ("delivered", "ALWAYS", "", "{}", ()),  # null sender: never a mail
    ("delivered", "NONE", "", '{"delivered": "http://x/d"}', ("url",)),
    ("expired", "NONE", "", '{"failed": "http://x/f"}', ("url",)),  # expired calls the failed URL
    ("buffered", "", "", '{"delivered": "http://x/d"}', ()),
    ("failed", "", "a@example.org", {"failed": "http://x/f"}, ("mail", "url")),
    ("delivered", "", "a@example.org", "", ("mail",)),
]


@pytest.mark.parametrize(("state", "notify", "sender", "urls", "expected"), OWED)
def test_owed_events(state: str, notify: str, sender: str, urls: str | dict[str, str],
                     expected: tuple[str, ...]) -> None:
    assert lc.owed_events(state, notify, sender, urls) == expected


def test_notify_states_cover_every_policy() -> None:
    assert set(lc.NOTIFY_STATES) == {"", "ALWAYS", "FAILED", "NONE"}
    for states in lc.NOTIFY_STATES.values():
        assert set(states) <= set(lc.STATES) - {"queued", "held", "submitted"}


# -- due time and validity ----------------------------------------------------------------------
SCHEDULE = [
    # (now, not_before, expires_at, validity, expected (due, expires, deferred))
    (1000.0, None, None, 60.0, (1000.0, 1060.0, False)),
    (1000.0, 2000.0, None, 60.0, (2000.0, 2060.0, True)),  # deferred: valid from when it is due
    (1000.0, 500.0, None, 60.0, (500.0, 1060.0, False)),  # due in the past: not deferred
    (1000.0, 1000.0, None, 60.0, (1000.0, 1060.0, False)),
    (1000.0, None, 1500.0, 60.0, (1000.0, 1500.0, False)),  # its own validity end
    (1000.0, 2000.0, 1500.0, 60.0, (2000.0, 1500.0, True)),
]


@pytest.mark.parametrize(("now", "not_before", "expires_at", "validity", "expected"), SCHEDULE)
def test_schedule(now: float, not_before: float | None, expires_at: float | None, validity: float,
                  expected: tuple[float, float, bool]) -> None:
    assert lc.schedule(now, not_before, expires_at, validity) == expected


@pytest.mark.parametrize(("state", "expected"), [("delivered", 5.0), ("failed", 5.0), ("expired", 5.0),
                                                  ("buffered", None), ("submitted", None)])
def test_done_at(state: str, expected: float | None) -> None:
    assert lc.done_at(state, 5.0) == expected


# -- which part a receipt is for ------------------------------------------------------------------
NUMBERS = [
    ("+41791234567", "41791234567"),
    ("0041791234567", "41791234567"),
    ("41791234567", "41791234567"),
    ("+41 79 123 45 67", "41791234567"),
    ("", ""),
    ("abc", ""),
]


@pytest.mark.parametrize(("addr", "key"), NUMBERS)
def test_number_key(addr: str, key: str) -> None:
    assert lc.number_key(addr) == key


SAME = [
    ("41791234567", "41791234567", True),
    ("791234567", "41791234567", True),  # national form: the last 7+ digits
    ("1234567", "41791234567", True),
    ("234567", "41791234567", False),  # too short to say
    ("41791234568", "41791234567", False),
]


@pytest.mark.parametrize(("a", "b", "expected"), SAME)
def test_same_number(a: str, b: str, expected: bool) -> None:
    assert lc.same_number(a, b) is expected
    assert lc.same_number(b, a) is expected


MATCHES = [
    # (source, recipient, provider, part provider, expected)
    ("", "41791234567", "", "", True),  # the receipt names no number: the id decides
    ("41791234567", "41791234567", "smpp", "smpp", True),
    ("41790000000", "41791234567", "smpp", "smpp", False),  # another handset
    ("41791234567", "41791234567", "smpp", "http", False),  # another provider's id
    ("41791234567", "41791234567", "", "http", True),  # a receipt of unknown provider
    ("41791234567", "41791234567", "smpp", "", True),  # a part stored before providers were named
]


@pytest.mark.parametrize(("source", "recipient", "provider", "part_provider", "expected"), MATCHES)
def test_receipt_matches(source: str, recipient: str, provider: str, part_provider: str,
                         expected: bool) -> None:
    assert lc.receipt_matches(source, recipient, provider, part_provider) is expected


def test_receipt_rank_order() -> None:
    open_old = lc.receipt_rank(False, 0, 100.0, 1, 0)
    open_new = lc.receipt_rank(False, 0, 200.0, 2, 0)
    final_new = lc.receipt_rank(True, 0, 300.0, 3, 0)
    other_reading = lc.receipt_rank(False, 1, 400.0, 4, 0)
    second_part = lc.receipt_rank(False, 0, 200.0, 2, 1)
    assert sorted([final_new, other_reading, open_old, second_part, open_new]) == [
        open_new, second_part, open_old, other_reading, final_new]

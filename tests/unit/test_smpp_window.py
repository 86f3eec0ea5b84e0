"""The send window of one SMPP bind (dispatcher/smpp_window.py) is pure state: PDUs out,
answers in, one SubmitResult per job. Table by table, without a socket."""

from __future__ import annotations

import time

from sms_milter.dispatcher import pdus
from sms_milter.dispatcher.provider import SubmitResult
from sms_milter.dispatcher.quietlog import QuietLog
from sms_milter.dispatcher.smpp_window import TIMEOUTS_BEFORE_RECONNECT, Window, encode_jobs
from sms_milter.model import SmppConfig
from sms_milter.spool.base import Job


def _window(**cfg: object) -> tuple[Window, list[SubmitResult]]:
    out: list[SubmitResult] = []
    return Window(SmppConfig(**cfg), out.append, QuietLog()), out  # type: ignore[arg-type]


def _add(w: Window, jid: int, text: str = "hi") -> None:
    job = Job(recipient=f"+4179123{jid:04d}", originator="SMS", text=text, parts=1 if len(text) <= 160 else 2,
              account="a", id=jid)
    for js in encode_jobs([job], w.on_result):
        w.add(js)


def _seqs(batch: list[bytes]) -> list[int]:
    return [pdus.HEADER.unpack_from(b)[3] for b in batch]


def test_window_bounds_what_is_in_flight_and_answers_finish_jobs():
    w, out = _window(window=2)
    for jid in (1, 2, 3):
        _add(w, jid)
    batch, _ = w.take(0.0)
    assert len(batch) == 2 and w.take(0.0)[0] == []  # the window is full
    s1, s2 = _seqs(batch)
    w.answer(s1, 0, "abc", 0.0)
    w.answer(s2, 0x0B, "", 0.0)  # ESME_RINVDSTADR: permanent
    assert out[0] == SubmitResult(1, refs=("abc",))
    assert out[1].job_id == 2 and not out[1].temporary and "ESME_RINVDSTADR" in out[1].error
    assert not out[1].maybe_sent
    (b3,) = w.take(0.0)[0]
    w.answer(_seqs([b3])[0], 0x08, "", 0.0)  # ESME_RSYSERR: temporary, counts an attempt
    assert out[2].temporary and out[2].count_attempt and not out[2].maybe_sent


def test_throttled_part_is_sent_again_after_a_pause_not_failed():
    w, out = _window(window=10)
    _add(w, 1)
    t = time.monotonic()  # the rate limiter keeps its own clock: real times
    (b,) = w.take(t)[0]
    w.answer(_seqs([b])[0], pdus.ESME_RTHROTTLED, "", t)
    assert out == [] and w.take(t)[0] == []  # paused
    batch, _ = w.take(t + 5.0)
    assert len(batch) == 1
    w.answer(_seqs(batch)[0], 0, "x1", t + 5.0)
    assert out == [SubmitResult(1, refs=("x1",))]


def test_a_lost_connection_marks_what_was_on_the_wire_as_maybe_sent():
    w, out = _window(window=1)
    _add(w, 1)
    _add(w, 2)
    w.take(0.0)  # job 1 on the wire, job 2 queued
    assert w.lose("read failed") == 2
    by = {r.job_id: r for r in out}
    assert by[1].maybe_sent and by[1].temporary and not by[1].count_attempt
    assert not by[2].maybe_sent and by[2].temporary  # never written: free to go elsewhere
    assert not w.jobs and not w.inflight


def test_an_accepted_part_makes_a_later_failure_maybe_sent():
    w, out = _window(window=10)
    _add(w, 1, "x" * 200)  # two parts
    s1, s2 = _seqs(w.take(0.0)[0])
    w.answer(s1, 0, "p1", 0.0)
    w.answer(s2, 0x08, "", 0.0)
    assert out[0].job_id == 1 and out[0].temporary and out[0].maybe_sent


def test_unanswered_submits_time_out_and_drop_the_bind_after_three():
    w, out = _window(window=5, submit_timeout=1.0)
    for jid in range(1, 4):
        _add(w, jid)
    w.take(0.0)
    drop, _ = w.expire(0.5)
    assert not drop and out == []
    drop, _ = w.expire(1.5)
    assert drop and w.timeouts == TIMEOUTS_BEFORE_RECONNECT
    assert all(r.temporary and r.count_attempt and r.maybe_sent for r in out) and len(out) == 3


def test_stop_gives_up_only_what_was_not_written():
    w, out = _window(window=1)
    _add(w, 1)
    _add(w, 2)
    (b,) = w.take(0.0)[0]
    w.stop("dispatcher stopping")
    assert [r.job_id for r in out] == [2] and not out[0].maybe_sent
    w.answer(_seqs([b])[0], 0, "m", 0.0)
    assert out[1] == SubmitResult(1, refs=("m",))


def _answer_all(w: Window, batch: list[bytes], status: int, now: float) -> None:
    for i, seq in enumerate(_seqs(batch)):
        w.answer(seq, status, f"m{seq}-{i}" if status == 0 else "", now)


def test_window_grows_additively_per_acknowledged_window_up_to_window_max():
    w, out = _window(window=4, window_max=10)
    for jid in range(1, 60):
        _add(w, jid)
    t = time.monotonic()
    sizes = []
    for _ in range(6):
        batch, _ = w.take(t)
        sizes.append(len(batch))  # what went out while nothing was answered: the window
        _answer_all(w, batch, 0, t)
    assert sizes == [4, 8, 10, 10, 10, 10]  # +window per full window accepted, capped at window_max
    assert all(r.ok for r in out) and len(out) == sum(sizes)


def test_throttling_halves_the_window_and_it_grows_back():
    w, out = _window(window=8, window_max=32)
    for jid in range(1, 200):
        _add(w, jid)
    t = time.monotonic()
    for _ in range(4):  # 8, 16, 24, 32
        _answer_all(w, w.take(t)[0], 0, t)
    assert w.size == 32
    batch, _ = w.take(t)
    assert len(batch) == 32
    _answer_all(w, batch, pdus.ESME_RTHROTTLED, t)  # the whole window throttled: one episode
    assert w.size == 16  # halved once, not once per throttled submit
    assert not out[-1:] or out[-1].ok  # throttled parts are not job failures
    later = t + 10.0
    batch, _ = w.take(later)
    assert len(batch) == 16
    _answer_all(w, batch, 0, later)
    assert w.size == 24  # additive again


def test_window_max_below_window_means_a_fixed_window():
    w, _ = _window(window=5, window_max=1)
    for jid in range(1, 30):
        _add(w, jid)
    t = time.monotonic()
    for _ in range(3):
        batch, _ = w.take(t)
        assert len(batch) == 5
        _answer_all(w, batch, 0, t)
    assert w.size == 5


def _add_to(w: Window, jid: int, recipient: str) -> None:
    job = Job(recipient=recipient, originator="SMS", text=f"t{jid}", parts=1, account="a", id=jid)
    for js in encode_jobs([job], w.on_result):
        w.add(js)


def _ids(w: Window, batch: list[bytes]) -> list[int]:
    return [w.inflight[seq][0].job.id for seq in _seqs(batch)]


def test_one_numbers_depth_starts_at_one_and_grows_while_the_smsc_accepts():
    w, out = _window(window=10, window_max=10, pipeline_per_number=3)
    for jid in range(1, 9):
        _add_to(w, jid, "+41790000001")
    _add_to(w, 9, "+41790000002")
    t = time.monotonic()
    rounds = []
    while len(out) < 9:
        batch, _ = w.take(t)
        rounds.append(_ids(w, batch))
        _answer_all(w, batch, 0, t)
    # depth 1 (+ the other number); each accepted submit on the bind adds one, up to
    # pipeline_per_number (3)
    assert rounds == [[1, 9], [2, 3, 4], [5, 6, 7], [8]]
    assert [r.job_id for r in out if r.ok] == [1, 9, 2, 3, 4, 5, 6, 7, 8]


def test_a_train_job_that_goes_back_takes_the_unsent_ones_behind_it_along():
    w, out = _window(window=10, window_max=10)
    for jid in range(1, 9):
        _add_to(w, jid, "+41790000001")
    t = time.monotonic()
    for _ in range(2):  # depth 1, then 2: jobs 1, 2, 3 accepted
        _answer_all(w, w.take(t)[0], 0, t)
    batch, _ = w.take(t)
    assert _ids(w, batch) == [4, 5, 6, 7]  # depth 4
    s4, *rest = _seqs(batch)
    w.answer(s4, 0x08, "", t)  # ESME_RSYSERR on job 4: temporary, back to the queue
    by_id = {r.job_id: r for r in out}
    assert by_id[4].temporary and by_id[4].count_attempt
    # 8 (same number, not written yet) goes back unsent, no attempt counted, behind job 4
    assert by_id[8].temporary and not by_id[8].count_attempt and "job 4" in by_id[8].error
    for seq in rest:  # 5, 6, 7 were on the wire already: accepted (the trade, ADR 0003)
        w.answer(seq, 0, f"m{seq}", t)
    assert [r.job_id for r in out if r.ok] == [1, 2, 3, 5, 6, 7]
    assert w.depth == 1 and not w.jobs and not w.held and not w.running  # refused: no trains for a while


def test_after_a_refusal_depth_stays_one_until_the_cooldown_passed():
    from sms_milter.dispatcher.smpp_window import TRAIN_COOLDOWN

    w, _ = _window(window=10, window_max=10)
    for jid in range(1, 30):
        _add_to(w, jid, "+41790000001")
    t = time.monotonic()
    (b,) = w.take(t)[0]
    w.answer(_seqs([b])[0], pdus.ESME_RTHROTTLED, "", t)
    for i in range(1, 4):  # accepted one by one: no train on the wire during the cooldown
        soon = t + i  # (a second apart: the throttled rate allows one)
        batch, _ = w.take(soon)
        assert len(batch) == 1
        _answer_all(w, batch, 0, soon)
    later = t + TRAIN_COOLDOWN + 1.0
    _answer_all(w, w.take(later)[0], 0, later)
    assert len(w.take(later)[0]) == 2  # depth grows again


def test_throttled_train_parts_are_resent_in_order_before_the_rest():
    w, out = _window(window=3, window_max=3)
    for jid in range(1, 7):
        _add_to(w, jid, "+41790000001")
    t = time.monotonic()
    seqs = _seqs(w.take(t)[0])  # jobs 1, 2, 3 on the wire
    for s in seqs:  # an SMSC throttling episode: every submit in it refused
        w.answer(s, pdus.ESME_RTHROTTLED, "", t)
    order: list[int] = []
    later = t + 10.0
    while len(order) < 6:
        batch, _ = w.take(later)
        for seq in _seqs(batch):
            order.append(w.inflight[seq][0].job.id)
            w.answer(seq, 0, f"m{seq}", later)
    assert order == [1, 2, 3, 4, 5, 6]
    assert [r.job_id for r in out] == [1, 2, 3, 4, 5, 6] and all(r.ok for r in out)

"""Property-based fuzzing of the receipt parsers (issue 9, Tests): any deliver_sm octets and
any receipt text end in a value or ValueError (the PDU) / None (not a receipt), never in
another exception."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from sms_milter.dispatcher.pdus import parse_deliver_sm
from sms_milter.dispatcher.receipts import STAT_TO_STATE, interpret, parse_receipt_text

_words = st.sampled_from(["id:", "sub:", "dlvrd:", "submit date:", "done date:", "stat:", "err:", "text:",
                          "DELIVRD", "UNDELIV", "ENROUTE", "EXPIRED", "00AB", "123", " ", "\x00", "é", ":"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_words | st.text(max_size=8), max_size=20), st.none() | st.text(max_size=12),
       st.none() | st.integers(-5, 300))
def test_receipt_text_gives_a_value_or_none(pieces, rid, state):
    text = "".join(pieces)
    assert isinstance(parse_receipt_text(text), dict)
    out = interpret(rid, state, text)
    assert out is None or (out[0] and out[1] in STAT_TO_STATE.values())


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_deliver_sm_octets_give_a_value_or_value_error(body):
    raw = struct.pack(">LLLL", 16 + len(body), 5, 0, 1) + body
    try:
        pdu = parse_deliver_sm(raw)
    except ValueError:
        return
    assert isinstance(pdu.source_addr, str) and isinstance(pdu.short_message, bytes)

"""Issue 9: tests that fail when the code is broken in the ways hand-made mutations were not
caught: the ISO-8859-1 check off for textsms@, the recipients left out of the idempotency
key, the Subject's Notify= override ignored (number@ and textsms@). Through a real Postfix."""

from __future__ import annotations

import bed
import pytest
from test_inline import ACME, ANYONE, TEXTSMS, assert_data, assert_reply, one_job, sms

pytestmark = pytest.mark.bed


def test_non_latin1_refused_for_textsms(gw):
    num, e164 = bed.unique_number()
    r = gw.send(ANYONE, [TEXTSMS], bed.make_message(f"U=ACME123 P=s3cret R={num}", "Hello \u0416 there"))
    assert_reply(r["data"], 550, "5.6.0", "U+0416", "ISO-8859-1")
    assert gw.jobs(recipient=e164) == []


def test_latin1_accepted_for_textsms(gw):
    num, e164 = bed.unique_number()
    r = gw.send(ANYONE, [TEXTSMS], bed.make_message(f"U=ACME123 P=s3cret R={num}", "Gr\u00fc\u00dfe"))
    assert_data(r, 250)
    assert one_job(gw, e164)["text"] == "Grüße"


def test_same_message_id_to_a_new_number_is_not_a_duplicate(gw):
    (num1, e1), (num2, e2) = bed.unique_number(), bed.unique_number()
    mid = f"<{bed.unique('same')}@client.bed.example>"
    assert_data(gw.send(ACME, [sms(num1)], bed.make_message("", "first", message_id=mid)), 250)
    assert_data(gw.send(ACME, [sms(num2)], bed.make_message("", "first", message_id=mid)), 250)
    assert len(gw.jobs(recipient=e1)) == 1
    assert len(gw.jobs(recipient=e2)) == 1, "a resend of the same Message-ID to a new number vanished"
    # and the textsms@ spelling: the numbers live in the Subject
    (num3, e3), (num4, e4) = bed.unique_number(), bed.unique_number()
    mid = f"<{bed.unique('same')}@client.bed.example>"
    for num in (num3, num4):
        r = gw.send(ANYONE, [TEXTSMS], bed.make_message(f"U=ACME123 P=s3cret R={num}", "t", message_id=mid))
        assert_data(r, 250)
    assert len(gw.jobs(recipient=e3)) == 1 and len(gw.jobs(recipient=e4)) == 1


@pytest.mark.parametrize("subject,want", [("", ""), ("Notify=NONE", "NONE"), ("N=always", "ALWAYS"),
                                          ("Originator=Alerts Notify=FAILED", "FAILED")])
def test_notify_override_number_at(gw, subject, want):
    num, e164 = bed.unique_number()
    assert_data(gw.send(ACME, [sms(num)], bed.make_message(subject, "hello")), 250)
    assert one_job(gw, e164)["notify"] == want


@pytest.mark.parametrize("extra,want", [("", ""), (" N=NONE", "NONE"), (" Notify=Always", "ALWAYS"),
                                        (" n=FAILED", "FAILED")])
def test_notify_override_textsms(gw, extra, want):
    num, e164 = bed.unique_number()
    r = gw.send(ANYONE, [TEXTSMS], bed.make_message(f"U=ACME123 P=s3cret R={num}{extra}", "hello"))
    assert_data(r, 250)
    assert one_job(gw, e164)["notify"] == want

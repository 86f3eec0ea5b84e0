"""Property-based fuzzing (hypothesis) of the other pure parsers: Subject keywords,
addresses and originators, the XML request, the delivery-receipt text. Every input ends
in a value or a `Refusal`, never another exception."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from sms_milter.dispatcher.receipts import interpret, parse_receipt_text
from sms_milter.model import Domain
from sms_milter.policy import addresses, styles
from sms_milter.policy.refusal import Refusal
from sms_milter.policy.subject import (
    SubjectFields,
    parse_optional_originator,
    parse_subject,
    recipient_label,
    strip_credentials,
    textsms_problem,
)
from sms_milter.xmlapi.request import ParserFailure, XmlRequest, parse_request

FUZZ = settings(max_examples=400, deadline=None)

subject_words = st.lists(st.one_of(
    st.sampled_from(["U=ACME123", "Userkey=", "P=", "Password=x", "Password:", "R=0041791234567", "r=+41 79",
                     "N=always", "Notify=", "O=Alerts", "Originator=", "=", "==", ",", ";", " ", "\t", "\n",
                     "é", "\ud800", "\0", "Recipient", "p", "U", "P=s e", "x=y=z"]),
    st.text(max_size=8),
), max_size=12).map("".join)


@FUZZ
@given(st.one_of(st.text(max_size=80), subject_words))
def test_subject_parsers(subject: str) -> None:
    f = parse_subject(subject)
    assert isinstance(f, (SubjectFields, Refusal))
    if isinstance(f, Refusal):
        assert f.code == "550"
    else:
        assert textsms_problem(f) is None or isinstance(textsms_problem(f), Refusal)
        for v in f.recipients:
            assert isinstance(recipient_label(v), str)
    assert isinstance(strip_credentials(subject), str)
    orig, notify = parse_optional_originator(subject)
    assert orig is None or isinstance(orig, str)
    assert notify is None or isinstance(notify, str)


@FUZZ
@given(st.text(min_size=6, alphabet="0123456789").map(lambda d: "U=ACME123 R=00" + d + " P="),
       st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20))
def test_no_subject_refusal_contains_the_password(prefix: str, pw: str) -> None:
    pw = "Zq" + "".join(c if c.isalnum() else "x" for c in pw)  # one word; never part of the number
    for subject in (prefix + pw, prefix + pw + " " + pw, f"U=ACME123 Password:{pw}", f"U=ACME123 {pw}",
                    f"U=ACME123 P={pw} N={pw}", f"U=ACME123 P=x R={pw}"):
        f = parse_subject(subject)
        texts = [f.text] if isinstance(f, Refusal) else [recipient_label(v) for v in f.recipients]
        assert all(pw not in t for t in texts), (subject, texts)


DOMAINS = {"sms.example.com": Domain("sms.example.com", "aspsms"),
           "tm.example.com": Domain("tm.example.com", "telemessage")}
addr_local = st.one_of(st.text(max_size=20), st.from_regex(r"\A(00|\+)?[0-9-]{0,20}\Z"),
                       st.sampled_from(["textsms", "XML", "", "@", "00", "-", "1-781-6170000"]))
addr_domain = st.one_of(st.text(max_size=20), st.sampled_from(
    ["sms.example.com", "SMS.EXAMPLE.COM.", "tm.example.com", "Fax.tm.example.com", "x.SMS.tm.example.com",
     "pager.tm.example.com", "", "."]))


@FUZZ
@given(addr_local, st.sampled_from(["@", "", "@@"]), addr_domain)
def test_addresses(local: str, at: str, domain: str) -> None:
    address = local + at + domain
    r = styles.classify_recipient(address, DOMAINS)
    assert r is None or isinstance(r, (Refusal, addresses.SmsTarget))
    if isinstance(r, addresses.SmsTarget) and r.number is not None:
        assert r.number.startswith("+")
    n = addresses.parse_number(local)
    assert n is None or n.startswith("+")
    p = addresses.originator_problem(local)
    assert p is None or isinstance(p, str)
    if p is None and local.strip():
        assert isinstance(addresses.normalize_originator(local), str)


xml_docs = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from([
        b"<?xml version='1.0' encoding='utf-7'?>", b"<?xml version=\"1.0\" encoding=\"punycode\"?>",
        b"<?xml version='1.0' encoding='ISO-8859-1'?>", b"<aspsms>", b"</aspsms>", b"<Userkey>A</Userkey>",
        b"<Password>p</Password>", b"<Recipient><PhoneNumber>0041791234567</PhoneNumber></Recipient>",
        b"<Recipient>", b"<Action>SendTextSMS</Action>", b"<MessageData>\xe4&#0;&#xD800;</MessageData>",
        b"<!DOCTYPE x [<!ENTITY a 'b'>]>", b"&a;", b"<![CDATA[x]]>", b"\x00", b"\xff\xfe",
        b"<a xmlns:x='u'/>",
    ]), max_size=12).map(b"".join),
)


@FUZZ
@given(xml_docs, st.sampled_from([None, "utf-8", "iso8859-1", "utf-7", "utf-16", "shift_jis", "koi8-r",
                                  "cp1252"]))
def test_xml_request_parser(data: bytes, encoding: str | None) -> None:
    r = parse_request(data, encoding)
    assert isinstance(r, (XmlRequest, ParserFailure))


receipt_text = st.one_of(
    st.text(max_size=120),
    st.lists(st.sampled_from(["id:", "id:0001", "sub:001", "dlvrd:001", "submit date:2601011200",
                              "done date:", "stat:DELIVRD", "stat:undeliv", "stat:", "err:000", "text:",
                              "text:id:9 stat:DELIVRD", " ", "\x00", "é"]), max_size=10).map(" ".join),
)


@FUZZ
@given(receipt_text, st.one_of(st.none(), st.text(max_size=10)), st.one_of(st.none(), st.integers(-5, 300)))
def test_receipt_text(text: str, receipted_id: str | None, state: int | None) -> None:
    fields = parse_receipt_text(text)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    r = interpret(receipted_id, state, text)
    assert r is None or (isinstance(r, tuple) and len(r) == 3)

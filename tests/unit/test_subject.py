from __future__ import annotations

import pytest
from sms_milter.policy.refusal import Refusal
from sms_milter.policy.subject import (
    SubjectFields,
    parse_optional_originator,
    parse_subject,
    strip_credentials,
    textsms_problem,
)


def test_full_subject() -> None:
    s = ("Userkey=ACME123 Password=s3cret Recipient=0041790000000 Recipient=0041790000001 "
         "Originator=Me Notify=ALWAYS")
    assert parse_subject(s) == SubjectFields(userkey="ACME123", password="s3cret",
                                             recipients=("0041790000000", "0041790000001"),
                                             originator="Me", notify="ALWAYS")


def test_abbreviated_mixed_separators_and_spaces() -> None:
    s = "u = ACME123;P=s3cret,, r=0041790000000 ;R= +41790000001 o =Me n=failed"
    assert parse_subject(s) == SubjectFields(userkey="ACME123", password="s3cret",
                                             recipients=("0041790000000", "+41790000001"),
                                             originator="Me", notify="FAILED")


def test_empty_notify_and_values_with_equals() -> None:
    assert parse_subject("P=a=b= Notify= R=0041791234567") == SubjectFields(
        password="a=b=", recipients=("0041791234567",), notify="")
    assert parse_subject("Notify=") == SubjectFields(notify="")
    assert parse_subject("") == SubjectFields()


def test_unknown_keyword() -> None:
    assert parse_subject("Userkey=A Foo=bar") == Refusal(
        "550", "5.5.4",
        "Unknown keyword 'Foo' in the Subject; use Userkey, Password, Recipient, Originator or Notify.")


def test_unknown_keyword_that_could_be_a_secret_is_named_by_its_place() -> None:
    assert parse_subject("U=ACME123 SECRETKW1=x R=0041791234567") == Refusal(
        "550", "5.5.4",
        "Unknown keyword in word 2 of the Subject; use Userkey, Password, Recipient, Originator or Notify.")


def test_token_without_equals() -> None:
    r = parse_subject("Userkey=A hello")
    assert isinstance(r, Refusal) and (r.code, r.xcode) == ("550", "5.5.4")
    assert r.text.startswith("Word 2 of the Subject is not a keyword=value pair")
    assert "hello" not in r.text  # a bare word may be a credential: named by position only


@pytest.mark.parametrize("subject", [
    "U=ACME123 Password:secret R=0041791234567", "U=ACME123 P:secret R=0041791234567",
    "U=ACME123 secret R=0041791234567", "Userkey:ACME123 P=secret R=0041791234567",
    "U=ACME123 P=secret,more R=1", "U=ACME123 P=secret N=secret", "U=ACME123 P=x secret=1",
    "U=ACME123 R=secret P=x", "U=ACME123 Pass-word=secret", "U=ACME123 password;secret",
])
def test_no_refusal_echoes_a_credential_value(subject: str) -> None:
    from sms_milter.policy.subject import recipient_label

    r = parse_subject(subject)
    texts = [r.text] if isinstance(r, Refusal) else [recipient_label(v) for v in r.recipients]
    for t in texts:
        assert "secret" not in t and "ACME123" not in t, t


def test_duplicate_keyword() -> None:
    assert parse_subject("U=A Userkey=B") == Refusal(
        "550", "5.5.4",
        "The Subject gives Userkey= twice; give each keyword once (only Recipient may repeat).")


def test_bad_notify() -> None:
    r = parse_subject("N=sometimes")
    assert isinstance(r, Refusal) and r.xcode == "5.5.4"
    assert "Notify= value in word 1" in r.text and "sometimes" not in r.text
    assert "ALWAYS" in r.text and "FAILED" in r.text


@pytest.mark.parametrize("subject", [
    "U=A P=my secret R=0041791234567",
    "U=A P=my;secret=x R=0041791234567",
    "U=A P=secret U=B",
    "U=A P= secret Foo=1",
])
def test_password_never_in_refusal(subject: str) -> None:
    r = parse_subject(subject)
    assert isinstance(r, Refusal)
    assert "secret" not in r.text


def test_empty_password_refused() -> None:
    r = parse_subject("U=A P= R=0041791234567")
    assert r == Refusal("550", "5.5.4", "The Subject has an empty Password= value; write Password=<value> "
                                        "without blanks.")


def test_textsms_problem() -> None:
    assert textsms_problem(SubjectFields(userkey="A", password="p", recipients=("1",))) is None
    assert textsms_problem(SubjectFields(password="p", recipients=("1",))) == Refusal(
        "550", "5.5.4", "The Subject has no Userkey= (or U=) keyword; textsms@ needs Userkey, Password and "
                        "at least one Recipient.")
    r = textsms_problem(SubjectFields(userkey="A", recipients=("1",)))
    assert isinstance(r, Refusal) and r.text.startswith("The Subject has no Password= (or P=) keyword")
    r = textsms_problem(SubjectFields(userkey="A", password="p"))
    assert isinstance(r, Refusal) and r.text.startswith("The Subject has no Recipient= (or R=) keyword")


def test_optional_originator() -> None:
    assert parse_optional_originator("Originator=+41760000000") == ("+41760000000", None)
    assert parse_optional_originator("o=ACME, Notify=none") == ("ACME", "NONE")
    assert parse_optional_originator("Server down") == (None, None)
    assert parse_optional_originator("Re: disk=full") == (None, None)
    assert parse_optional_originator("U=A P=b O=X") == (None, None)
    assert parse_optional_originator("") == (None, None)


def test_strip_credentials() -> None:
    assert strip_credentials("Userkey=ACME123 Password=s3cret Recipient=0041790000000 Notify=ALWAYS") == (
        "Recipient=0041790000000 Notify=ALWAYS")
    assert strip_credentials("u = ACME;p= s3cret,R=0041790000000") == "R=0041790000000"
    assert strip_credentials("R=0041790000000 P=my secret words") == "R=0041790000000"
    assert strip_credentials("Server down") == "Server down"


def test_strip_credentials_and_recipients() -> None:
    """A textsms@ job stores the Subject without credentials and without the R= list (each job
    has its own number; 3,000 R= in every one of 3,000 jobs was quadratic in size)."""
    numbers = " ".join(f"R=00417912345{i:02d}" for i in range(50))
    subject = f"U=ACME123 P=s3cret {numbers} O=ACME N=ALWAYS"
    assert strip_credentials(subject, drop_recipients=True) == "O=ACME N=ALWAYS"
    assert strip_credentials("Recipient=0041790000000 Server down", drop_recipients=True) == "Server down"


def test_textsms_length_bound() -> None:
    from sms_milter.policy.subject import MAX_TEXTSMS_SUBJECT, textsms_length_problem

    short = "U=A P=b " + " ".join(["R=0041791234567"] * 100)
    assert len(short) < MAX_TEXTSMS_SUBJECT and textsms_length_problem(short, 100) is None
    padded = "U=A P=b " + " " * MAX_TEXTSMS_SUBJECT + "R=0041791234567"
    r = textsms_length_problem(padded, 100)
    assert r is not None and r.xcode == "5.5.4" and f"takes at most {MAX_TEXTSMS_SUBJECT}" in r.text
    many = "U=A P=b " + ";".join(["r = 0041791234567"] * 600)
    r = textsms_length_problem(many, 100)
    assert r is not None and r.xcode == "5.5.3" and "at least 600 Recipient=" in r.text
    assert textsms_length_problem(many, 1000).xcode == "5.5.4"  # type: ignore[union-attr]

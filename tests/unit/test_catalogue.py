"""The refusal catalogue (milter/policy/catalogue.py): every reply of the gateway is one entry,
its classes agree, nothing outside it builds a refusal, README's tables are generated from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sms_milter.policy import catalogue
from sms_milter.policy.refusal import Refusal

ROOT = Path(__file__).resolve().parents[2]
ENTRIES = list(catalogue.ENTRIES.values())


def test_the_catalogue_has_every_entry_once_by_name():
    assert len(ENTRIES) >= 50
    assert all(e is getattr(catalogue, e.name) for e in ENTRIES)
    texts = [(e.code, e.xcode, e.template) for e in ENTRIES]
    assert len(set(texts)) == len(texts), "two entries with the same reply"


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_enhanced_code_class_matches_reply_code_class(entry: catalogue.Reply):
    assert re.fullmatch(r"[45][0-9][0-9]", entry.code), entry.code
    assert re.fullmatch(r"[45]\.[0-9]{1,3}\.[0-9]{1,3}", entry.xcode), entry.xcode
    assert entry.code[0] == entry.xcode[0], f"{entry.name}: {entry.code} with {entry.xcode}"
    assert entry.stage in catalogue.STAGES
    assert entry.when.strip() and entry.template.strip()


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.name)
def test_each_entry_formats_with_exactly_its_example_fields(entry: catalogue.Reply):
    assert set(entry.fields) == set(entry.example), entry.name
    r = entry.sample()
    assert isinstance(r, Refusal) and (r.code, r.xcode) == (entry.code, entry.xcode)
    assert "{" not in r.text and "}" not in r.text
    assert r.temporary == entry.code.startswith("4")


def test_a_field_value_is_inserted_as_it_is():
    r = catalogue.NOT_ASPSMS_ADDRESS(address="{0}{x}@sms.example.com", domain="sms.example.com")
    assert r.text.startswith("Recipient {0}{x}@sms.example.com is not an SMS address")


# A refusal built anywhere else: a Refusal(...) call, a reply-code/enhanced-code pair, or a
# string starting with an enhanced code and a text (what the pipe transport used to print).
_BUILT = [re.compile(r"\bRefusal\("),
          re.compile(r"""["'][245][0-9][0-9]["']\s*,\s*f?["'][245]\."""),
          re.compile(r"""f?["'][245]\.[0-9]{1,3}\.[0-9]{1,3} """)]


def test_no_refusal_is_built_outside_the_catalogue():
    found = []
    for path in sorted((ROOT / "milter").rglob("*.py")):
        if path.relative_to(ROOT).as_posix() in ("milter/policy/refusal.py", "milter/policy/catalogue.py",
                                                 "milter/policy/catalogue_text.py"):  # split for length
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in _BUILT):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "refusals built outside milter/policy/catalogue.py:\n" + "\n".join(found)


def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_readme_refusal_tables_are_the_generated_ones():
    text = _readme()
    m = re.search(r"<!-- refusals:[^\n]*-->\n(.*?)<!-- /refusals -->", text, re.S)
    assert m, "README lost the markers of its generated refusal tables"
    assert m.group(1) == catalogue.markdown(), (
        "README's refusal tables differ from the catalogue: regenerate them with "
        "`.venv/bin/python -m sms_milter.policy.catalogue` and paste the output between the markers")


def _matches(snippet: str) -> bool:
    code, xcode, text = snippet.split(" ", 2)
    for e in ENTRIES:
        if (e.code, e.xcode) != (code, xcode):
            continue
        pieces = re.split(r"\s*\.\.\.\s*", text)  # "..." in README: text left out
        shown = re.compile(".*".join(re.escape(p) for p in pieces))
        if (shown.match if len(pieces) > 1 else shown.fullmatch)(e.sample().text):
            return True
        parts = re.split(r"\{[^{}]*\}", e.template)
        if re.fullmatch(".+".join(re.escape(p) for p in parts), text):
            return True
    return False


def test_every_reply_readme_quotes_elsewhere_is_in_the_catalogue():
    text = re.sub(r"<!-- refusals:.*?<!-- /refusals -->", "", _readme(), flags=re.S)
    quoted = re.findall(r"`([245][0-9][0-9] [245]\.[0-9]{1,3}\.[0-9]{1,3} [^`]+)`", text)
    assert len(quoted) >= 5
    unknown = [q for q in quoted if not _matches(q)]
    assert not unknown, f"README quotes replies the catalogue does not have: {unknown}"

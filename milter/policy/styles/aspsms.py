"""The aspsms style: `00<number>@`, `textsms@` (credentials and recipients in the Subject) and
`xml@` (an ASPSMS XML request) at the domain itself; ISO-8859-1 text; exact sender addresses."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ...model import Account, Domain, SenderRule
from .. import auth, subject
from .. import catalogue as replies
from ..addresses import SmsTarget, e164, parse_number
from ..content import MessageText
from ..jobs import Draft, Prepared, prepare
from ..refusal import Refusal

_PLUS = re.compile(r"\+[0-9]+")
_ZEROS = re.compile(r"00([0-9]+)")


class Aspsms:
    name = "aspsms"
    device_labels = False
    sender_domains = False
    latin1_only = True

    def usage(self, domain: str) -> str:
        return f"00<international number>@{domain}, textsms@{domain} or xml@{domain}"

    def target(self, address: str, local: str, label: str | None, domain: Domain) -> SmsTarget | Refusal:
        lower = local.lower()
        if lower in ("textsms", "xml"):
            return SmsTarget(kind=lower, domain=domain)
        if _PLUS.fullmatch(local):
            return replies.PLUS_NUMBER(address=address, suggested="00" + local[1:], domain=domain.name)
        m = _ZEROS.fullmatch(local)
        if m:
            number = e164(m.group(1))
            if number is None:
                return replies.INVALID_NUMBER(address=address, digits=m.group(1))
            return SmsTarget(kind="number", domain=domain, number=number)
        return replies.NOT_ASPSMS_ADDRESS(address=address, domain=domain.name)

    def draft(self, mt: MessageText, account: Account, rule: SenderRule | None) -> Draft:
        """The body as it is; `Originator=` and `Notify=` may be given in the Subject."""
        given, given_notify = subject.parse_optional_originator(mt.subject)
        return Draft(text=mt.body,
                     originator=given or (rule and rule.originator) or account.originator,
                     notify=given_notify if given_notify is not None else account.notify,
                     subject=subject.strip_credentials(mt.subject), latin1_only=self.latin1_only)


STYLE = Aspsms()


def textsms(mt: MessageText, accounts: Mapping[str, Account], client_ip: str | None,
            most_recipients: int) -> Refusal | tuple[Prepared, list[str]]:
    """textsms@: the account and its checked SMS from the Subject's credentials, and the E.164
    numbers of its Recipient= values (each once, in order)."""
    # Decided before parsing: a longer Subject may have been cut on its way (by Postfix at
    # ~60 KB), and a cut R= value can be another number. Before the account is known, the
    # highest recipients_per_message of any account (`most_recipients`) bounds the R= count.
    too_long = subject.textsms_length_problem(mt.subject, most_recipients)
    if too_long is not None:
        return too_long
    fields = subject.parse_subject(mt.subject)
    if isinstance(fields, Refusal):
        return fields
    problem = subject.textsms_problem(fields)
    if problem:
        return problem
    assert fields.userkey is not None and fields.password is not None
    account = auth.authorize_userkey(fields.userkey, fields.password, client_ip, accounts)
    if isinstance(account, Refusal):
        return account
    # Once, and without the R= list: per recipient it was quadratic in time and in size.
    draft = Draft(text=mt.body, originator=fields.originator or account.originator,
                  notify=fields.notify if fields.notify is not None else account.notify,
                  subject=subject.strip_credentials(mt.subject, drop_recipients=True),
                  latin1_only=STYLE.latin1_only)
    prepared = prepare(draft, account)
    if isinstance(prepared, Refusal):
        return prepared
    numbers: dict[str, None] = {}
    for value in dict.fromkeys(fields.recipients):
        number = parse_number(value)
        if number is None:
            return replies.BAD_SUBJECT_NUMBER(label=subject.recipient_label(value))
        numbers[number] = None  # R=0041..., R=+41... and R=0041-... are one SMS
    return prepared, list(numbers)

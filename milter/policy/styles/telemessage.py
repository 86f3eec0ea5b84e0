"""The telemessage style: `<number>@[<Device>.]domain` (digits and dashes, no +), any Unicode
text from the account's template, senders recognised by address or by domain."""

from __future__ import annotations

import re

from ...model import Account, Domain, SenderRule
from .. import catalogue as replies
from .. import devices
from ..addresses import SmsTarget, e164
from ..content import MessageText, render_template
from ..jobs import Draft
from ..refusal import Refusal

_NUMBER = re.compile(r"[0-9](?:-?[0-9])*")


class Telemessage:
    name = "telemessage"
    device_labels = True
    sender_domains = True
    latin1_only = False

    def usage(self, domain: str) -> str:
        return f"<international number>@[<Device>.]{domain}"

    def target(self, address: str, local: str, label: str | None, domain: Domain) -> SmsTarget | Refusal:
        device = devices.DEFAULT if label is None else label.lower()
        if device not in devices.DEVICES:
            return replies.UNKNOWN_DEVICE(address=address, label=label)
        if not _NUMBER.fullmatch(local):
            return replies.NOT_TELEMESSAGE_ADDRESS(address=address, domain=domain.name)
        digits = local.replace("-", "")
        if digits.startswith("00"):
            digits = digits[2:]
        number = e164(digits)
        if number is None:
            return replies.INVALID_NUMBER(address=address, digits=digits)
        if devices.channel_of(device, domain.channels) is None:
            return replies.NO_CHANNEL(address=address, device=devices.DEVICES[device].label, local=local,
                                      domain=domain.name)
        return SmsTarget(kind="number", domain=domain, device=device, number=number)

    def draft(self, mt: MessageText, account: Account, rule: SenderRule | None) -> Draft:
        """The account's template filled with Subject and body; the sender rule's originator first."""
        return Draft(text=render_template(account.template, mt.subject, mt.body),
                     originator=(rule and rule.originator) or account.originator,
                     notify=account.notify, subject=mt.subject, latin1_only=self.latin1_only)


STYLE = Telemessage()

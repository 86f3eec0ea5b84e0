"""The devices an SMS address may name, and which of them this gateway can deliver to.

The one place that says which device has a delivery channel: a TeleMessage address
`<number>@<Device>.tm.example.com` names one of these (any case); a device whose `channel` is
None is refused 550 5.3.3 (`catalogue.NO_CHANNEL`). A new channel (voice, fax) sets `channel`
here and nothing else changes in the address code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Device:
    name: str  # lowercase: in addresses (any case) and in a job's `device`
    label: str  # as replies write it
    channel: str | None  # what delivers to it ("sms"); None: no channel on this gateway yet


DEVICES: Mapping[str, Device] = MappingProxyType({d.name: d for d in (
    Device("sms", "SMS", "sms"),
    Device("business", "Business", None),
    Device("mobile", "Mobile", None),
    Device("home", "Home", None),
    Device("fax", "Fax", None),
)})
DEFAULT = "sms"  # an address without a device label


def channel_of(device: str) -> str | None:
    """The channel that delivers to `device` (a name in DEVICES), None if none does."""
    found = DEVICES.get(device)
    return found.channel if found is not None else None

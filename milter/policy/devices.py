"""The devices an SMS address may name, and which of them this gateway can deliver to.

The one place that says which device has a delivery channel: a TeleMessage address
`<number>@<Device>.tm.example.com` names one of these (any case). A device is open only when its
channel is configured: `sms` always, `voice` with a `voice:` section, `fax` with a `fax:` section
(the configured channels come in as a value, `Domain.channels`); any other is refused 550 5.3.3
(`catalogue.NO_CHANNEL`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Device:
    name: str  # lowercase: in addresses (any case) and in a job's `device`
    label: str  # as replies write it
    channel: str | None  # what delivers to it ("sms", "voice", "fax"); None: no channel at all


DEVICES: Mapping[str, Device] = MappingProxyType({d.name: d for d in (
    Device("sms", "SMS", "sms"),
    Device("business", "Business", "voice"),
    Device("mobile", "Mobile", "voice"),
    Device("home", "Home", "voice"),
    Device("fax", "Fax", "fax"),
)})
DEFAULT = "sms"  # an address without a device label


ALWAYS = frozenset({"sms"})  # channels every gateway has


def channel_of(device: str, configured: frozenset[str] = ALWAYS) -> str | None:
    """The channel that delivers to `device` (a name in DEVICES) when that channel is among
    `configured`, None if none does."""
    found = DEVICES.get(device)
    if found is None or found.channel not in configured:
        return None
    return found.channel


def configured_channels(voice: bool, fax: bool) -> frozenset[str]:
    """The channels of a configuration: sms, plus voice / fax when their section is present."""
    return ALWAYS | {c for c, on in (("voice", voice), ("fax", fax)) if on}

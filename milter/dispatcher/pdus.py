"""SMPP 3.4 on the wire: a job as submit_sm parts, the PDUs the dispatcher writes and reads.

The wire rules (INTERFACE.md): destination TON 1 / NPI 1 without '+'; numeric originator
the same, alphanumeric TON 5 / NPI 0; GSM-7 data_coding 0 else UCS-2 8 (flash: message
class 0, 0x10 / 0x18); long text as parts behind an 8-bit-reference concatenation UDH with
esm_class 0x40; registered_delivery 1; nothing scheduled on the SMSC side.

`submit_sm_body` (behind `HEADER`) writes the same octets as smpplib's generic generator, and
`parse_deliver_sm` reads what smpplib's parser reads (unit tests compare them), at a
fraction of their cost: they are the dispatcher's hot path. The bind, query_sm and the
small PDUs are coded here too (smpplib stays the byte-for-byte oracle of the unit tests);
smpplib itself only lends its table of status names.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

import smpplib.consts

from ..policy.addresses import originator_wire
from ..policy.smstext import (
    ASTRAL,
    GSM7_BASIC,
    GSM7_PART,
    GSM7_SINGLE,
    NOT_GSM7,
    NOT_GSM7_BASIC,
    UCS2_PART,
    UCS2_SINGLE,
    encode,
    with_udh,
)
from ..spool.base import Job

GENERIC_NACK = 0x80000000
BIND_TRANSCEIVER = 0x00000009
BIND_TRANSCEIVER_RESP = 0x80000009
QUERY_SM = 0x00000003
QUERY_SM_RESP = 0x80000003
SUBMIT_SM = 0x00000004
SUBMIT_SM_RESP = 0x80000004
DELIVER_SM = 0x00000005
DELIVER_SM_RESP = 0x80000005
UNBIND = 0x00000006
UNBIND_RESP = 0x80000006
ENQUIRE_LINK = 0x00000015
ENQUIRE_LINK_RESP = 0x80000015

ESME_RINVCMDID = 0x03
ESME_RALYBND = 0x05
ESME_RBINDFAIL = 0x0D
ESME_RTHROTTLED = 0x58
ESME_RMSGQFUL = 0x14
THROTTLE_STATUSES = frozenset((ESME_RTHROTTLED, ESME_RMSGQFUL))
# Worth trying again later; every other error status fails the job.
TEMPORARY_STATUSES = frozenset((
    0x04,  # ESME_RINVBNDSTS (a bind problem, not the message's)
    0x08,  # ESME_RSYSERR
    0x45,  # ESME_RSUBMITFAIL
    0x64,  # ESME_RX_T_APPN
    0xFE,  # ESME_RDELIVERYFAILURE
    0xFF,  # ESME_RUNKNOWNERR
))
STATUS_NAMES = {v: k[5:] for k, v in vars(smpplib.consts).items()
                if k.startswith("SMPP_ESME_") and isinstance(v, int)}
MAX_PDU = 65536  # a longer command_length is garbage: the connection is dropped


def status_text(status: int) -> str:
    name = STATUS_NAMES.get(status, "ESME_UNKNOWN")
    desc = smpplib.consts.DESCRIPTIONS.get(status, "unknown status")
    return f"{name} (0x{status:08X}): {desc}"


def pdu(command_id: int, seq: int, status: int = 0, body: bytes = b"") -> bytes:
    return HEADER.pack(16 + len(body), command_id, status, seq) + body


def split_pdus(buf: bytes) -> tuple[list[bytes], bytes]:
    """The whole PDUs at the start of `buf`, and the rest; ValueError on a bad length."""
    out: list[bytes] = []
    pos, end = 0, len(buf)
    while end - pos >= 16:
        n = int.from_bytes(buf[pos:pos + 4], "big")
        if n < 16 or n > MAX_PDU:
            raise ValueError(f"bad PDU length {n}")
        if end - pos < n:
            break
        out.append(buf[pos:pos + n])
        pos += n
    return out, buf[pos:]


def bind_transceiver(seq: int, system_id: str, password: str, system_type: str) -> bytes:
    """bind_transceiver, SMPP 3.4, no address range (each string cut to its SMPP length)."""
    return pdu(BIND_TRANSCEIVER, seq, 0, _c(system_id, 16) + _c(password, 9) + _c(system_type, 13)
               + b"\x34\x00\x00\x00")


def query_sm(seq: int, ref: str, source: tuple[int, int, str]) -> bytes:
    ton, npi, addr = source
    return pdu(QUERY_SM, seq, 0, _c(ref, 65) + bytes((ton, npi)) + _c(addr, 21))


def parse_query_sm_resp(raw: bytes) -> tuple[int, int]:
    """(message_state, error_code) of a query_sm_resp; ValueError if malformed."""
    try:
        pos = raw.index(b"\0", 16) + 1  # message_id
        pos = raw.index(b"\0", pos) + 1  # final_date
        return raw[pos], raw[pos + 1]
    except IndexError:
        raise ValueError("malformed query_sm_resp") from None


def message_id(raw: bytes) -> str:
    """The message_id of a submit_sm_resp ("" when there is none)."""
    return raw[16:].split(b"\0", 1)[0].decode("ascii", "replace") if len(raw) > 16 else ""
ESM_UDHI = 0x40
FLASH_CODING = {0: 0x10, 8: 0x18}  # message class 0 with the GSM-7 / UCS-2 alphabet

_refs = itertools.count(1)


@dataclass(frozen=True)
class Part:
    job_id: int
    index: int  # 0-based
    total: int
    source: tuple[int, int, str]  # TON, NPI, address
    destination: str  # digits, no '+'
    esm_class: int
    data_coding: int
    short_message: bytes  # with the UDH when esm_class has 0x40


# The common texts in C: every character the same cost (GSM-7 without extension characters,
# or UCS-2 inside the BMP), so parts split evenly and no pair must be kept together. Anything
# else goes through smstext.encode. A unit test checks both give the same octets.
_SEPTETS = str.maketrans({ch: chr(code) for ch, code in GSM7_BASIC.items()})


def encode_text(text: str) -> tuple[int, list[bytes]]:
    """(data_coding, parts without UDH): exactly smstext.encode's, faster for the common texts."""
    n = len(text)
    if NOT_GSM7_BASIC.search(text) is None:
        raw = text.translate(_SEPTETS).encode("latin-1")
        if n <= GSM7_SINGLE:
            return 0, [raw]
        return 0, [raw[i:i + GSM7_PART] for i in range(0, n, GSM7_PART)]
    if NOT_GSM7.search(text) is not None and ASTRAL.search(text) is None:
        raw = text.encode("utf-16-be")
        if n <= UCS2_SINGLE:
            return 8, [raw]
        return 8, [raw[i:i + 2 * UCS2_PART] for i in range(0, 2 * n, 2 * UCS2_PART)]
    enc = encode(text)
    return enc.data_coding, list(enc.parts)


def job_parts(job: Job) -> list[Part]:
    """The submit_sm parts of a job, in order."""
    data_coding, chunks = encode_text(job.text)
    coding = FLASH_CODING[data_coding] if job.flash else data_coding
    source = originator_wire(job.originator)
    dest = job.recipient.lstrip("+")
    total = len(chunks)
    if total == 1:
        return [Part(job.id, 0, 1, source, dest, 0, coding, chunks[0])]
    ref = next(_refs) & 0xFF  # one reference per concatenated message (8-bit)
    return [Part(job.id, i, total, source, dest, ESM_UDHI, coding, with_udh(p, ref, total, i + 1))
            for i, p in enumerate(chunks)]


def _c(s: str, limit: int) -> bytes:
    return s.encode("latin-1", "replace")[:limit - 1] + b"\0"


HEADER = struct.Struct(">LLLL")


def submit_sm_body(part: Part, service_type: str = "") -> bytes:
    """A submit_sm without its 16-octet header (made once per part; the sequence number is
    only known when it is sent, and changes when a throttled part is sent again)."""
    ton, npi, addr = part.source
    return b"".join((
        _c(service_type, 6),
        bytes((ton, npi)), _c(addr, 21),
        b"\x01\x01", _c(part.destination, 21),
        bytes((part.esm_class, 0, 0)),  # esm_class, protocol_id, priority_flag
        b"\0\0",  # schedule_delivery_time, validity_period: none (SMSC defaults)
        bytes((1, 0, part.data_coding, 0, len(part.short_message))),  # registered_delivery=1, ...
        part.short_message,
    ))


TLV_RECEIPTED_MESSAGE_ID = 0x001E
TLV_MESSAGE_STATE = 0x0427
TLV_MESSAGE_PAYLOAD = 0x0424


@dataclass(frozen=True)
class DeliverSm:
    esm_class: int
    data_coding: int
    short_message: bytes
    receipted_message_id: str | None
    message_state: int | None
    source_addr: str = ""  # in a receipt: the handset number


def _cstr(raw: bytes, pos: int) -> int:
    """Position after the C-octet string starting at pos."""
    end = raw.index(b"\0", pos)
    return end + 1


def parse_deliver_sm(raw: bytes) -> DeliverSm:
    """The fields of a deliver_sm PDU (header included) that receipts need; ValueError if malformed."""
    try:
        p = _cstr(raw, 16)  # service_type
        src_end = _cstr(raw, p + 2)  # source TON, NPI, source_addr
        source = raw[p + 2:src_end - 1].decode("latin-1")
        p = src_end
        p = _cstr(raw, p + 2)  # dest TON, NPI, destination_addr
        esm_class = raw[p]
        p = _cstr(raw, p + 3)  # esm_class, protocol_id, priority_flag, schedule_delivery_time
        p = _cstr(raw, p)  # validity_period
        data_coding = raw[p + 2]  # after registered_delivery, replace_if_present_flag
        sm_len = raw[p + 4]  # after sm_default_msg_id
        p += 5
        short_message = raw[p:p + sm_len]
        p += sm_len
        rid: str | None = None
        state: int | None = None
        while p + 4 <= len(raw):
            tag, length = struct.unpack_from(">HH", raw, p)
            value = raw[p + 4:p + 4 + length]
            p += 4 + length
            if tag == TLV_RECEIPTED_MESSAGE_ID:
                rid = value.split(b"\0", 1)[0].decode("ascii", "replace")
            elif tag == TLV_MESSAGE_STATE and length == 1:
                state = value[0]
            elif tag == TLV_MESSAGE_PAYLOAD and not short_message:
                short_message = value
    except (IndexError, struct.error) as e:
        raise ValueError(f"malformed deliver_sm: {e}") from None
    return DeliverSm(esm_class, data_coding, bytes(short_message), rid, state, source)

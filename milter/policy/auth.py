"""Who may send: sender addresses, userkey/password, client networks, password hashes."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import threading
import time
from collections.abc import Mapping

from ..model import Account, SenderRule
from . import catalogue as replies
from .refusal import Refusal

_N, _R, _P = 16384, 8, 1
_DKLEN = 32
_MAX_N = 1 << 20
# Verified hashed credentials are remembered briefly, so that a client sending many textsms@
# or xml@ mails pays the scrypt cost (~40 ms) once a minute, not per mail. The key is a
# keyed hash of (account, stored hash, password): the plaintext is never kept.
VERIFIED_TTL = 60.0
_VERIFIED_MAX = 4096
_verified: dict[bytes, float] = {}
_verified_lock = threading.Lock()
_CACHE_SALT = os.urandom(16)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    maxmem = 128 * r * (n + 2 + p) + (1 << 20)
    return hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p, dklen=dklen,
                          maxmem=maxmem)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str) -> str:
    """`scrypt$16384$8$1$<salt b64>$<hash b64>` with a random 16-byte salt."""
    salt = os.urandom(16)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(_scrypt(password, salt, _N, _R, _P, _DKLEN))}"


def _parse_hash(h: str) -> tuple[int, int, int, bytes, bytes] | str:
    parts = h.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return "must look like scrypt$16384$8$1$<salt base64>$<hash base64> (the output of hash_password)"
    n_s, r_s, p_s = parts[1:4]
    if not all(x.isascii() and x.isdigit() for x in (n_s, r_s, p_s)):
        return "scrypt parameters N, r and p must be whole numbers"
    n, r, p = int(n_s), int(r_s), int(p_s)
    if n < 2 or n > _MAX_N or n & (n - 1):
        return f"scrypt N must be a power of two between 2 and {_MAX_N}, got {n}"
    if not 1 <= r <= 64 or not 1 <= p <= 16:
        return f"scrypt r must be 1-64 and p 1-16, got r={r} p={p}"
    try:
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (binascii.Error, ValueError):
        return "salt and hash must be base64"
    if len(salt) < 8:
        return "salt must be at least 8 bytes"
    if len(digest) < 16:
        return "hash must be at least 16 bytes"
    return n, r, p, salt, digest


def hash_problem(h: str) -> str | None:
    """None if `h` is a well-formed scrypt hash string, else what is wrong with it."""
    parsed = _parse_hash(h)
    return parsed if isinstance(parsed, str) else None


def verify_password(account: Account, given: str) -> bool:
    """Constant-time check of `given` against the account's password or password_hash."""
    if account.password is not None:
        return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), account.password.encode("utf-8"))
    if account.password_hash is not None:
        parsed = _parse_hash(account.password_hash)
        if isinstance(parsed, str):
            return False
        key = hashlib.sha256(_CACHE_SALT + "\0".join((account.name, account.password_hash, given))
                             .encode("utf-8", "surrogatepass")).digest()
        now = time.monotonic()
        with _verified_lock:
            until = _verified.get(key)
        if until is not None and until > now:
            return True
        n, r, p, salt, digest = parsed
        ok = hmac.compare_digest(_scrypt(given, salt, n, r, p, len(digest)), digest)
        if ok:
            with _verified_lock:
                if len(_verified) >= _VERIFIED_MAX:
                    _verified.clear()
                _verified[key] = now + VERIFIED_TTL
        return ok
    return False


def find_userkey_account(userkey: str, password: str, accounts: Mapping[str, Account]) -> Account | None:
    """The account whose userkey and password both match, else None."""
    given = userkey.encode("utf-8", "surrogatepass")
    found: Account | None = None
    for acc in accounts.values():  # no early exit: every userkey is compared
        same = acc.userkey is not None and hmac.compare_digest(given, acc.userkey.encode("utf-8"))
        if same and found is None:
            found = acc
    if found is None or not verify_password(found, password):
        return None
    return found


def _ip(ip: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not ip:
        return None
    s = ip.strip().strip("[]")
    if s[:5].lower() == "ipv6:":
        s = s[5:]
    s = s.split("%", 1)[0]
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None


def network_allowed(account: Account, ip: str | None) -> bool:
    """True if the account has no networks or `ip` lies in one of them."""
    if not account.networks:
        return True
    addr = _ip(ip)
    if addr is None:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        candidates.append(addr.ipv4_mapped)
    return any(a.version == net.version and a in net for a in candidates for net in account.networks)


def _network_refusal(ip: str | None) -> Refusal:
    return replies.CLIENT_NOT_ALLOWED(ip=ip or "(unknown)")


def authorize_sender(sender: str, ip: str | None, accounts: Mapping[str, Account],
                     allow_domain: bool) -> tuple[Account, SenderRule] | Refusal:
    """The account and rule that authorize envelope sender `sender` from client `ip`, or a Refusal."""
    s = sender.strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1].strip()
    if not s:
        return replies.NULL_SENDER()
    s = s.lower()
    match: tuple[Account, SenderRule] | None = None
    for acc in accounts.values():
        for rule in acc.senders:
            if rule.address is not None and rule.address.lower() == s:
                match = (acc, rule)
                break
        if match:
            break
    if match is None and allow_domain and "@" in s:
        domain = s.rpartition("@")[2].rstrip(".")
        for acc in accounts.values():
            for rule in acc.senders:
                if rule.domain is not None and rule.domain.lower().rstrip(".") == domain:
                    match = (acc, rule)
                    break
            if match:
                break
    if match is None:
        return replies.SENDER_NOT_AUTHORIZED()
    if not network_allowed(match[0], ip):
        return _network_refusal(ip)
    return match


def authorize_userkey(userkey: str, password: str, ip: str | None,
                      accounts: Mapping[str, Account]) -> Account | Refusal:
    """The account for textsms@/xml@ credentials from `ip`, or a Refusal (never saying which was wrong)."""
    acc = find_userkey_account(userkey, password, accounts)
    if acc is None:
        return replies.WRONG_CREDENTIALS()
    if not network_allowed(acc, ip):
        return _network_refusal(ip)
    return acc

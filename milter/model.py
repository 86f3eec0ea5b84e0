"""The typed configuration: frozen values the rest of the package reads.

Below both `config` (which builds them from YAML) and `policy` (which decides with them), so
neither imports the other's internals.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

NOTIFY_POLICIES = ("", "ALWAYS", "NONE", "FAILED")
# Address styles: policy/styles/ (the registry the config checks `style:` against); devices and
# which of them have a delivery channel: policy/devices.py.

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class SenderRule:
    """An authorized SMTP originator: an exact address (lowercased) or a whole domain."""

    address: str | None = None
    domain: str | None = None
    originator: str | None = None  # default SMS originator for this sender


# -- limits (abuse control): see policy/limits.py for the rules, INTERFACE.md "Limits" for the keys
LIMIT_MODES = ("enforce", "monitor")
# phonenumbers number types by their config name (PhoneNumberType values).
NUMBER_TYPES = {"fixed_line": 0, "mobile": 1, "fixed_line_or_mobile": 2, "toll_free": 3, "premium_rate": 4,
                "shared_cost": 5, "voip": 6, "personal": 7, "personal_number": 7, "pager": 8, "uan": 9,
                "voicemail": 10, "unknown": 99}
# Allowed when `number_types` is absent: premium-rate, shared-cost, UAN, personal, pager, voip and
# unknown are refused unless listed.
DEFAULT_NUMBER_TYPES = ("fixed_line", "mobile", "fixed_line_or_mobile", "toll_free", "voicemail")
CAP_KEYS = ("parts_per_minute", "parts_per_hour", "parts_per_day", "parts_per_month",
            "per_recipient_per_hour")
LIMIT_KEYS = ("mode", "recipients_per_message", *CAP_KEYS, "countries", "deny_prefixes", "number_types",
              "identical_seconds")


@dataclass(frozen=True)
class Limits:
    """One account's effective limits (None: no cap)."""

    mode: str = "enforce"
    recipients_per_message: int = 100
    parts_per_minute: int | None = None
    parts_per_hour: int | None = None
    parts_per_day: int | None = None
    parts_per_month: int | None = None
    per_recipient_per_hour: int | None = None
    countries: tuple[str, ...] | None = None  # ISO 3166 alpha-2, upper case; None = all
    deny_prefixes: tuple[str, ...] = ()  # E.164 with '+'
    number_types: tuple[str, ...] = DEFAULT_NUMBER_TYPES
    identical_seconds: int = 600  # the same text to the same number within this is one SMS; 0 = off

    @property
    def monitor(self) -> bool:
        return self.mode == "monitor"

    @property
    def counted(self) -> bool:
        """Does any rule need the usage counters?"""
        return any(getattr(self, k) is not None for k in CAP_KEYS)


@dataclass(frozen=True)
class BreakerConfig:
    """The circuit breaker on failing destinations (`limits.breaker`, off when absent)."""

    window: float = 3600.0  # seconds of finished jobs looked at
    min_jobs: int = 20  # fewer finished jobs to a prefix than this: never trips
    failure_rate: float = 0.5  # failed+expired / finished at or above this: trips
    cooldown: float = 1800.0  # seconds new mail to the prefix gets 451
    prefix_digits: int = 3  # destinations grouped by '+' and this many digits


@dataclass(frozen=True)
class Account:
    name: str
    userkey: str | None = None
    password: str | None = None
    password_hash: str | None = None
    senders: tuple[SenderRule, ...] = ()
    networks: tuple[IPNetwork, ...] = ()
    originator: str = "SMS"
    template: str = "{subject},{body}"
    max_parts: int = 6
    notify: str = ""
    credits: int | None = None  # remaining allowance (xml@ ShowCredits); None = unlimited
    limits: Limits = field(default_factory=Limits)  # top-level `limits:` merged with its own
    smtp_auth: tuple[str, ...] | None = None  # SMTP AUTH logins bound to the account; None = any/none
    voice_recordings: bool = False  # voice: an audio attachment may be the message instead of speech
    voice_language: str = ""  # voice: text-to-speech language ("" = voice.language)


@dataclass(frozen=True)
class Domain:
    name: str  # lowercased
    style: str  # a name in policy.styles.STYLES: "aspsms" | "telemessage"
    # Channels configured on this gateway (policy/devices.py): "sms", plus "voice"/"fax" when the
    # `voice:`/`fax:` section is present; a device whose channel is not here is refused.
    channels: frozenset[str] = frozenset({"sms"})


@dataclass(frozen=True)
class MilterConfig:
    socket: str = "inet:127.0.0.1:8894"
    max_message_bytes: int = 262144
    # How long a resend of the same message (same Message-ID) is recognised as a duplicate.
    dedupe_seconds: int = 7 * 24 * 3600
    # Mail with no Message-ID of its own is recognised by sender, recipients and content
    # for this much shorter window.
    dedupe_anonymous_seconds: int = 600
    spool_timeout: float = 5.0  # seconds to wait for the spool before answering 451


@dataclass(frozen=True)
class SpoolConfig:
    path: str = "/var/lib/sms-milter/spool.sqlite3"
    url: str | None = None  # postgresql://USER[:PASSWORD]@HOST[:PORT]/DB: the spool on PostgreSQL

    @property
    def where(self) -> str:
        """The spool for logs and check-config: the path, or the URL without its password."""
        if not self.url:
            return self.path
        head, at, tail = self.url.rpartition("@")
        scheme, sep, cred = head.partition("://")
        if at and sep and ":" in cred:
            return f"{scheme}://{cred.split(':', 1)[0]}:***@{tail}"
        return self.url


@dataclass(frozen=True)
class SmppConfig:
    host: str = "127.0.0.1"
    port: int = 2775
    system_id: str = ""
    password: str = ""
    system_type: str = ""
    window: int = 10  # unacknowledged submit_sm at first (the window grows from here, AIMD)
    window_max: int = 100  # the adaptive window's cap (halved on ESME_RTHROTTLED / ESME_RMSGQFUL)
    rate: float = 0.0  # submits per second at most; 0 = no cap
    enquire_link: float = 30.0  # seconds between keep-alives
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    validity: int = 48 * 3600  # seconds a job may wait before it expires
    submit_timeout: float = 30.0  # seconds to wait for a submit_sm_resp before the job goes back
    receipt_timeout: float = 3600.0  # seconds without a receipt before the SMSC is asked (query_sm)
    binds: int = 1  # bind_transceiver sessions to this SMSC, each its own connection and window
    pipeline_per_number: int = 200  # one number's jobs sent in order on one bind at most (1 = one at a time)


PROVIDER_KINDS = ("smpp", "http")
LEGACY_PROVIDER = "smpp"  # the one provider `provider: {smpp: ...}` makes (its name in metrics and the spool)


@dataclass(frozen=True)
class ProviderSpec:
    """One entry of `providers:` (or the old `provider:` section): its kind and settings."""

    name: str
    kind: str  # one of PROVIDER_KINDS
    smpp: SmppConfig | None = None
    http: object | None = None  # the HTTP provider's settings (config/http.py), when kind == "http"
    down_after: int = 3  # this many temporary errors in a row: the provider is skipped for `cooldown`
    cooldown: float = 30.0  # seconds a provider found down is skipped by the routes


@dataclass(frozen=True)
class Route:
    """One entry of `routes:`: first match wins; its providers are tried in order (failover)."""

    prefixes: tuple[str, ...] = ()  # E.164 with '+'; () = every destination
    accounts: tuple[str, ...] = ()  # account names; () = every account
    providers: tuple[str, ...] = ()

    def matches(self, recipient: str, account: str) -> bool:
        return (not self.prefixes or recipient.startswith(self.prefixes)) and \
            (not self.accounts or account in self.accounts)


@dataclass(frozen=True)
class NotifyConfig:
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    sender: str = "sms-gateway@localhost"


@dataclass(frozen=True)
class XmlConfig:
    # Hosts (exact, lowercased) that URL delivery notifications may call.
    allowed_url_hosts: tuple[str, ...] = ()
    url_timeout: float = 5.0


@dataclass(frozen=True)
class MetricsConfig:
    """Where each daemon serves Prometheus /metrics ("host:port"); None = not served."""

    milter: str | None = None
    dispatcher: str | None = None


@dataclass(frozen=True)
class Config:
    milter: MilterConfig = field(default_factory=MilterConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    domains: dict[str, Domain] = field(default_factory=dict)
    accounts: dict[str, Account] = field(default_factory=dict)
    providers: dict[str, ProviderSpec] = field(default_factory=lambda: {
        LEGACY_PROVIDER: ProviderSpec(LEGACY_PROVIDER, "smpp", SmppConfig())})
    routes: tuple[Route, ...] = (Route(providers=(LEGACY_PROVIDER,)),)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    xml: XmlConfig = field(default_factory=XmlConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    limits: Limits = field(default_factory=Limits)  # the top-level defaults
    breaker: BreakerConfig | None = None
    voice: VoiceConfig | None = None  # the voice channel (`voice:`), None = off
    fax: FaxConfig | None = None  # the fax channel (`fax:`), None = off
    source: str = ""

    @property
    def smpp(self) -> SmppConfig:
        """The first SMPP provider's settings (defaults when there is none). Its `validity`,
        `receipt_timeout` and `reconnect_min`/`reconnect_max` (the retry backoff) are read as the
        dispatcher's own settings: they lived under `provider.smpp` before there were several."""
        for spec in self.providers.values():
            if spec.smpp is not None:
                return spec.smpp
        return SmppConfig()

    def summary(self) -> str:
        return (
            f"{self.source}: OK: {len(self.domains)} domain(s), {len(self.accounts)} account(s), "
            f"milter on {self.milter.socket}, spool {self.spool.where}"
        )


# -- HTTP SMS providers (`providers.NAME.http`): see dispatcher/http.py and README "HTTP providers"
HTTP_PART_STATES = ("delivered", "buffered", "failed", "expired", "ignore")  # "ignore": acknowledged only


@dataclass(frozen=True)
class HttpCallback:
    """Delivery reports pushed by the provider to the dispatcher's callback listener."""

    listen: str  # "host:port" the dispatcher listens on (several providers may share one)
    url: str  # base URL the provider calls (default http://<listen>)
    token: str  # unguessable, in the callback path: /dlr/<token>/<reference>/<parts>
    suffix: str = ""  # appended to each job's callback URL as is (Kannel: "?type=%d&to=%p")
    state_field: str = "status"  # field (query, form or JSON path) holding the state
    states: tuple[tuple[str, str], ...] = ()  # field value -> one of HTTP_PART_STATES
    ref_field: str = ""  # field with the provider's message id; "" = our reference from the path
    number_field: str = ""  # field with the handset number (matched like SMPP's source_addr)
    error_field: str = ""  # field with the provider's error code/text, for last_error
    max_body: int = 16384  # bytes; larger bodies are refused 413
    timeout: float = 10.0  # seconds for a client to send its request / for the receipt to be stored


@dataclass(frozen=True)
class HttpPoll:
    """Delivery state asked for by the dispatcher (providers without callbacks)."""

    url: str  # template: {message_id}, {reference}, {recipient...}
    interval: float = 300.0  # seconds between asks for a job still waiting for its state
    state_json: str = ""  # JSON path of the state in the answer ...
    state_regex: str = ""  # ... or a regex whose group 1 is the state
    states: tuple[tuple[str, str], ...] = ()  # value -> one of HTTP_PART_STATES


# Status code ranges (lo, hi) inclusive.
StatusRanges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class HttpConfig:
    url: str  # template (placeholders are URL-encoded)
    method: str = "POST"  # GET | POST
    query: tuple[tuple[str, str], ...] = ()  # query parameters: name -> template
    headers: tuple[tuple[str, str], ...] = ()  # literal (secrets allowed: never logged)
    auth: tuple[str, str] | None = None  # HTTP basic (user, password)
    body: str = "form"  # form | json | none
    fields: object = None  # the body template: a mapping (form), any JSON value (json)
    success_status: StatusRanges = ((200, 299),)
    success_regex: str = ""  # the body must also match this (search)
    success_json: str = ""  # JSON path that must hold one of success_values
    success_values: tuple[str, ...] = ()
    message_id_json: str = ""  # JSON path of the provider's message id ("" with the regex: our reference)
    message_id_regex: str = ""  # or a regex whose group 1 is the message id
    temporary_status: StatusRanges = ((408, 408), (429, 429), (500, 599))  # other failures are permanent
    temporary_regex: str = ""  # a failed answer whose body matches this is temporary too
    timeout: float = 10.0  # seconds for the whole request
    concurrency: int = 4  # requests at once (pooled connections)
    callback: HttpCallback | None = None
    poll: HttpPoll | None = None


# Placeholders of HTTP templates ({name}; {{ and }} are literal braces).
HTTP_FIELDS = ("recipient", "recipient_00", "recipient_digits", "text", "originator", "originator_digits",
               "reference", "callback_url", "parts", "coding", "unicode", "flash", "job_id")
HTTP_POLL_FIELDS = (*HTTP_FIELDS, "message_id")


# -- TeleMessage voice and fax channels (issue 15): see milter/channels/ ------------------------------
@dataclass(frozen=True)
class VoiceConfig:
    """Voice calls (text-to-speech or a recording) through a SIP trunk, placed by baresip."""

    trunk: str = "127.0.0.1:5060"  # host:port of the SIP trunk / registrar / outbound proxy
    user: str = "sms-gateway"  # user part of our SIP address
    domain: str = ""  # SIP domain of our address ("" = the trunk host)
    auth_user: str = ""  # digest user ("" = user)
    password: str = ""  # digest password ("" = no authentication); never logged
    register: bool = False  # REGISTER with the trunk before calling
    codec: str = "PCMU"  # PCMU (G.711 µ-law) | PCMA (A-law)
    listen: str = "127.0.0.1"  # local address for SIP and RTP
    rtp_ports: str = "20000-29999"
    dial_prefix: str = "+"  # the request URI's user part: this + the E.164 digits
    language: str = "en"  # espeak-ng language when the job names none
    words_per_minute: int = 160
    max_seconds: float = 120.0  # longest message a call may play
    repeat: bool = False  # play the message twice, with a pause
    confirm_digit: str = ""  # DTMF digit the listener must press ("" = no confirmation asked)
    confirm_prompt: str = "Please press {digit} to confirm this message."  # spoken after the message
    ring_timeout: float = 30.0  # seconds to wait for an answer, then hang up (no answer)
    max_attempts: int = 3  # busy / no answer / hung up: tries before the job fails
    trunk_retry: float = 30.0  # seconds without calls after the trunk did not answer
    calls: int = 2  # calls at the same time
    work_dir: str = "/var/lib/sms-milter/voice"  # per-call scratch (audio, baresip config)


@dataclass(frozen=True)
class FaxConfig:
    """Faxes rendered to TIFF G3 and handed to a HylaFAX server (hfaxd) with sendfax."""

    server: str = "127.0.0.1:4559"  # hfaxd host:port (it admits us by host: etc/hosts.hfaxd)
    dial_prefix: str = "00"  # the dialled number: this + the E.164 digits
    max_pages: int = 20
    max_bytes: int = 10 * 1024 * 1024  # rendered TIFF at most
    max_tries: int = 3  # HylaFAX's own retries (sendfax -T)
    max_dials: int = 12  # sendfax -t
    kill_after: float = 3 * 3600.0  # seconds HylaFAX keeps trying (sendfax -k)
    poll: float = 5.0  # seconds between looks at the HylaFAX queue
    jobs: int = 20  # faxes handed to HylaFAX and not finished yet, at most
    work_dir: str = "/var/lib/sms-milter/fax"  # rendering scratch

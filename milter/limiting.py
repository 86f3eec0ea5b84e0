"""The gateway's side of the abuse limits: the decision rules (`policy/rules.py`) applied to a
message, with their log lines, metrics and monitor mode, the circuit breaker's state, and the plan
the spool runs inside its commit (the counted caps, identical-SMS keys)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

from . import metrics
from .message import Message
from .model import Account, BreakerConfig, Config
from .policy import limits, rules
from .policy.refusal import Refusal
from .spool.base import LimitPlan, LimitUsage, MilterSpool, NewJob, SpoolError

log = logging.getLogger("sms_milter.gateway")


class Limiter:
    def __init__(self, config: Callable[[], Config], spool: MilterSpool, clock: Callable[[], float]):
        self._config = config  # the gateway's current configuration (it changes on reload)
        self.spool = spool
        self.clock = clock  # for the circuit breaker; the spool's counters use the spool's clock
        self._breaker = limits.EMPTY_BREAKER
        self._breaker_due = 0.0

    def hit(self, msg: Message, account: Account, hit: limits.Hit | None, what: str = "") -> Refusal | None:
        """One log line per refusal by a limit, with the rule's name; in monitor mode the line
        says what would have happened and nothing is refused."""
        if hit is None:
            return None
        qid = msg.queue_id or "NOQUEUE"
        where = f" {what}" if what else ""
        metrics.limit_hit(hit.rule, account.limits.mode)
        if account.limits.monitor:
            log.info("%s: limit %s (monitor mode, not enforced) would refuse%s for account %s: %s",
                     qid, hit.rule, where, account.name, hit.refusal)
            return None
        log.info("%s: limit %s refused%s for account %s: %s", qid, hit.rule, where, account.name, hit.refusal)
        return hit.refusal

    def decide(self, msg: Message, ask: rules.Ask) -> Refusal | None:
        """The rules in their order; the first enforced hit is the reply."""
        for hit, what in rules.hits(ask):
            if hit is not None and (refusal := self.hit(msg, ask.account, hit, what)) is not None:
                return refusal
        return None

    def rcpt(self, msg: Message, account: Account, number: str) -> Refusal | None:
        """The rules decided at RCPT for a <number>@ recipient."""
        count = len(msg.numbers) + (number not in msg.numbers)
        return self.decide(msg, rules.Ask(account=account, login=msg.auth_login, recipients=count,
                                          numbers=(number,), breaker=self.breaker_hit,
                                          where=f"recipient {number}"))

    def breaker_hit(self, number: str) -> limits.Hit | None:
        cfg = self._config().breaker
        if cfg is None:
            return None
        now = self.clock()
        if now >= self._breaker_due:  # re-read the finished jobs now and then, not per message
            self._breaker_due = now + min(5.0, cfg.cooldown)
            self._breaker_refresh(cfg, now)
        return limits.breaker_hit(self._breaker, number, now)

    def _breaker_refresh(self, cfg: BreakerConfig, now: float) -> None:
        state = limits.breaker_expire(self._breaker, now)
        try:
            stats = self.spool.finished_by_prefix(now - cfg.window, cfg.prefix_digits)
            # After a cool-down only what finished since it ended counts.
            for p, closed in state.closed_at.items():
                if p in stats and closed > now - cfg.window:
                    stats[p] = self.spool.finished_by_prefix(closed, cfg.prefix_digits).get(p, (0, 0))
        except SpoolError as e:
            log.warning("circuit breaker: cannot read the spool (%s); keeping its state", e)
            return
        self._breaker, tripped = limits.breaker_update(cfg, state, stats, now)
        for p in tripped:
            metrics.limit_hit("breaker", "tripped")
            _until, finished, failed = self._breaker.open[p]
            log.warning("limit breaker: circuit breaker open for %s...: %d of %d SMS finished in the last "
                        "%gs failed; new mail there gets 451 for %gs", p, failed, finished, cfg.window,
                        cfg.cooldown)

    def eom(self, msg: Message, jobs: list[NewJob], late: list[int],
            xml_jobs: int = 0) -> Refusal | LimitPlan:
        """The rules decided at the end of the message for jobs[i] for i in `late` (textsms@, xml@:
        their recipients and account are known only now); then the plan the spool runs in its commit."""
        cfg = self._config()
        by_account: dict[str, set[str]] = {}
        for i in late:
            by_account.setdefault(jobs[i].account, set()).add(jobs[i].recipient)
        # recipients_per_message: the unique (number, device) of the whole message, number@ RCPTs
        # and textsms@ R= together (each alone was checked, the sum was not); xml@'s recipients
        # count too when the message has others, a message to xml@ alone keeps its own 1,000.
        whole: dict[str, set[tuple[str, str]]] = {}
        for j in jobs if len(jobs) > xml_jobs else ():
            whole.setdefault(j.account, set()).add((j.recipient, j.device))
        for name in dict.fromkeys([*by_account, *whole]):
            account = cfg.accounts.get(name)
            if account is None:
                continue
            found = self.decide(msg, rules.Ask(
                account=account, login=msg.auth_login, recipients=len(whole.get(name, ())),
                numbers=tuple(sorted(by_account.get(name, ()))), breaker=self.breaker_hit,
                auth=name in by_account))
            if found is not None:
                return found
        counted = any((a := cfg.accounts.get(j.account)) is not None and a.limits.counted for j in jobs)
        keys = tuple(self.sms_key(j, self._identical_seconds(cfg, j.account))
                     if j.trans_ref is None and not j.urls else "" for j in jobs)
        return LimitPlan(decide=self._decide_usage(msg) if counted else None,
                         dedupe_keys=keys if any(keys) else (), dedupe_ttl=1.0)

    @staticmethod
    def _identical_seconds(cfg: Config, name: str) -> int:
        account = cfg.accounts.get(name)
        return account.limits.identical_seconds if account is not None else cfg.limits.identical_seconds

    @staticmethod
    def sms_key(j: NewJob, seconds: int) -> str:
        """Identical SMS: same account, number, device, originator, Notify policy and text; "" =
        not deduplicated (another Notify policy is another request: the sender is told otherwise).
        The window is part of the key: `<seconds>:<hash>` (the spool keeps it that long)."""
        if seconds <= 0:
            return ""
        fields = ("sms", j.account, j.recipient, j.device, j.originator, j.notify, j.text)
        return f"{seconds}:" + hashlib.sha256("\0".join(fields).encode()).hexdigest()

    def _decide_usage(self, msg: Message) -> Callable[[str, LimitUsage, int, dict[str, int]],
                                                      limits.Hit | None]:
        def decide(account_name: str, usage: LimitUsage, parts: int,
                   per: dict[str, int]) -> limits.Hit | None:
            account = self._config().accounts.get(account_name)
            if account is None or not account.limits.counted:
                return None
            hit = limits.usage_hit(account.limits, usage, parts, per)
            if hit is None or account.limits.monitor:
                self.hit(msg, account, hit)  # the monitor-mode line (nothing when None)
                return None
            return hit  # logged by Gateway.committed(), once the transaction is over

        return decide

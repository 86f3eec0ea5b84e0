"""The provider factory: configuration in, `Provider` out.

`build_provider(spec)` makes one provider from its `ProviderSpec` through `KINDS` (one entry
per kind: `smpp` here; the HTTP provider's module adds `http`). `build_dispatch(cfg)` makes
what the engine talks to: the one provider itself when the configuration has a single
provider behind a catch-all route, else a `Router` over all of them (routes, failover).
"""

from __future__ import annotations

from collections.abc import Callable

from ..model import Config, HttpConfig, ProviderSpec
from ..spool.files import FileStore
from .http import HttpProvider
from .provider import Provider
from .router import Router
from .smpp import SmppProvider


def _smpp(spec: ProviderSpec) -> Provider:
    assert spec.smpp is not None  # the parser sets it for kind smpp
    return SmppProvider(spec.smpp, name=spec.name)


def _http(spec: ProviderSpec) -> Provider:
    assert isinstance(spec.http, HttpConfig)  # the parser sets it for kind http
    return HttpProvider(spec.http, name=spec.name)


# kind -> constructor; a new kind of provider is one entry here (and its config reader).
KINDS: dict[str, Callable[[ProviderSpec], Provider]] = {"smpp": _smpp, "http": _http}


class UnknownKind(ValueError):
    pass


def build_provider(spec: ProviderSpec) -> Provider:
    make = KINDS.get(spec.kind)
    if make is None:
        raise UnknownKind(f"provider {spec.name}: kind {spec.kind!r} is not supported by this version "
                          f"(supported: {', '.join(KINDS)})")
    return make(spec)


def trivial(cfg: Config) -> bool:
    """One provider, one route for every destination: no routing needed."""
    return len(cfg.providers) == 1 and len(cfg.routes) == 1 and not cfg.routes[0].prefixes \
        and not cfg.routes[0].accounts


def build_dispatch(cfg: Config, files: FileStore | None = None) -> Provider:
    """The SMS provider(s); with `voice:` or `fax:` configured, a ChannelRouter in front that
    sends each job to its channel's provider (voice/fax read the job's files from `files`)."""
    if trivial(cfg):
        sms = build_provider(next(iter(cfg.providers.values())))
    else:
        sms = Router({name: build_provider(spec) for name, spec in cfg.providers.items()},
                     cfg.providers, cfg.routes)
    if cfg.voice is None and cfg.fax is None:
        return sms
    from ..channels.router import ChannelRouter
    from ..channels.wiring import channel_providers

    return ChannelRouter({"sms": sms, **channel_providers(cfg, files)})

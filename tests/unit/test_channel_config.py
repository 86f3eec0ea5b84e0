"""The `voice:` and `fax:` config sections (issue 15): typed values, clear problems, off when absent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from sms_milter.config import ConfigError, parse
from sms_milter.model import FaxConfig, VoiceConfig

SAMPLE = Path(__file__).parents[2] / "conf" / "sms-milter.yaml.sample"
BASE = {"domains": {"tm.example.com": {"style": "telemessage"}}}


def test_channels_are_off_unless_configured():
    cfg = parse(BASE)
    assert cfg.voice is None and cfg.fax is None


def test_sample_sections_switched_on_give_the_documented_values():
    doc = yaml.safe_load(re.sub(r"(?m)^(\s*)# (?!#)", r"\1", SAMPLE.read_text()))
    cfg = parse({**BASE, "voice": doc["voice"], "fax": doc["fax"]})
    assert cfg.voice == VoiceConfig(trunk="sip.example.net:5060", domain="example.net", auth_user="gw123",
                                    password="secret", confirm_digit="1")
    assert cfg.fax == FaxConfig()


def test_bad_values_are_named():
    voice = {"trunk": "bad host:x", "codec": "G729", "rtp_ports": "10-5", "language": "English",
             "repeat": "yes", "ring_timeout": 0, "colour": 1, "confirm_digit": "12",
             "confirm_prompt": "press {key}", "password": "se;cret"}
    fax = {"server": "127.0.0.1:99999", "max_pages": 0, "dial_prefix": "00;rm", "work_dir": "rel"}
    with pytest.raises(ConfigError) as e:
        parse({**BASE, "voice": voice, "fax": fax})
    text = "\n".join(e.value.problems)
    for want in ("voice.trunk: port 'x'", "voice.codec: 'G729' is not PCMU or PCMA",
                 "voice.rtp_ports: '10-5' is not a port range",
                 "voice.language: 'English' is not an espeak-ng",
                 "voice.repeat: must be true or false", "voice.ring_timeout: must be between 1 and 300",
                 "voice.colour: unknown key", "voice.confirm_digit: '12' is not one DTMF digit",
                 "voice.confirm_prompt: may contain {digit}", "fax.server: port '99999'",
                 "fax.max_pages: must be between 1", "voice.password: must not contain spaces",
                 "fax.dial_prefix: '00;rm' is not digits", "fax.work_dir: 'rel' must be an absolute path"):
        assert want in text, (want, text)
    assert "se;cret" not in text

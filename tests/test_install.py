"""What the Debian package and the from-source install ship, checked without installing:

- the one sample config (conf/sms-milter.yaml.sample, installed as
  /etc/sms-milter/sms-milter.yaml) names every key the config package accepts and passes check-config;
- debian/changelog carries pyproject.toml's version (one version, two files);
- the systemd units and the master.cf snippet call /usr/bin/sms-milter (the package's path),
  are Type=notify with a watchdog, reload with SIGHUP and keep their hardening.

Building, installing and purging the .deb itself is .ci/package-check (run by .ci/run).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from bed import run_cli
from sms_milter.config import ConfigError, parse

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "conf" / "sms-milter.yaml.sample"
PROBE = "zz_probe"
UNKNOWN = re.compile(r"^(?P<path>.*?)\.?" + PROBE + r": unknown key \(known: (?P<known>[^)]*)\)$")


def _problems(doc: Any) -> list[str]:
    try:
        parse(doc, "probe")
    except ConfigError as e:
        return e.problems
    return []


def known_keys() -> dict[str, set[str]]:
    """Every key the config package accepts, by section, learnt from its own problems: an unknown key
    put into a section is answered with that section's list of known keys. Sections are
    followed down as mappings, as mappings of names (domains, accounts) and as lists."""
    found: dict[str, set[str]] = {}

    def probe(section: str, build: Any, depth: int) -> None:
        for problem in _problems(build({PROBE: 1})):
            m = UNKNOWN.match(problem)
            if not m:
                continue
            keys = {k.strip() for k in m["known"].split(",")}
            label = re.sub(r"\[\d+\]", "[]", section)
            if keys <= found.get(label, set()):
                continue
            found.setdefault(label, set()).update(keys)
            if depth >= 5:
                continue
            for key in keys:
                def shape(inner: Any, key: str = key) -> Any:
                    return build({key: inner})
                probe(f"{section}.{key}".lstrip("."), shape, depth + 1)
                probe(f"{section}.{key}.NAME".lstrip("."),
                      lambda inner, shape=shape: shape({"name.example.com": inner}), depth + 1)
                probe(f"{section}.{key}[]".lstrip("."), lambda inner, shape=shape: shape([inner]), depth + 1)

    probe("", lambda inner: inner, 0)
    return found


def sample_keys(text: str) -> set[str]:
    """Keys written in the sample, set (`key:`) or shown commented out (`# key:`, `#   - key:`)."""
    keys = set()
    for line in text.splitlines():
        m = re.match(r"^\s*(?:#\s*)?(?:-\s+)?([a-z_][a-z0-9_]*):(?:\s|$)", line)
        if m and not line.lstrip().startswith("##"):
            keys.add(m.group(1))
    return keys


def test_probe_finds_config_keys() -> None:
    """The probe itself: it must see the sections the config has had from the start."""
    keys = known_keys()
    assert {"milter", "spool", "domains", "accounts", "provider", "notify", "xml"} <= keys[""]
    assert "spool_timeout" in keys["milter"]
    assert {"enquire_link", "reconnect_min", "reconnect_max", "system_type"} <= keys["provider.smpp"]
    assert "url_timeout" in keys["xml"]
    assert "max_parts" in keys["accounts.NAME"]
    assert {"address", "domain", "originator"} <= keys["accounts.NAME.senders[]"]


def uncommented(text: str) -> Any:
    """The sample with every `# key: value` line switched on (the `# ` before it removed,
    `##` explanations left as comments), as YAML: where each shown key sits."""
    return yaml.safe_load(re.sub(r"(?m)^(\s*)# (?!#)", r"\1", text))


def sample_paths(node: Any, known: dict[str, set[str]], section: str = "") -> set[tuple[str, str]]:
    """(section, key) for every key of the uncommented sample; names of domains/accounts
    count as NAME, list items as []: the labels known_keys() uses."""
    out: set[tuple[str, str]] = set()
    if not isinstance(node, dict):
        return out
    names = f"{section}.NAME".lstrip(".")
    for key, value in node.items():
        if names in known:
            out |= sample_paths(value, known, names)
            continue
        out.add((section, str(key)))
        child = f"{section}.{key}".lstrip(".")
        out |= sample_paths(value, known, child)
        for item in value if isinstance(value, list) else []:
            out |= sample_paths(item, known, f"{child}[]")
    return out


def test_sample_names_every_key_config_accepts() -> None:
    known = known_keys()
    written = sample_paths(uncommented(SAMPLE.read_text()), known)
    missing = {f"{section}.{key}".lstrip(".") for section, keys in known.items()
               for key in keys if (section, key) not in written}
    assert not missing, f"keys the config accepts but {SAMPLE.name} does not show: {sorted(missing)}"


def test_sample_documents_type_and_default_of_every_key() -> None:
    """Each key has a `##` line naming it with its type in parentheses and its default (or
    `required`); only the top-level section headers (milter:, spool: ...) need none."""
    text = SAMPLE.read_text()
    docs = [line for line in text.splitlines() if line.lstrip().startswith("##")]
    known = known_keys()
    headers = known[""] - {"domains", "accounts"}
    for key in sorted(set().union(*known.values()) - headers):
        named = [d for d in docs if re.search(r"\b" + key + r"\b[^(]*\(", d)]
        assert named, f"{key}: no '## {key} (type), default ...' line"
        assert any("default" in d or "required" in d for d in named), f"{key}: default not stated"


def test_sample_passes_check_config() -> None:
    r = run_cli(SAMPLE, "check-config")
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_sample_is_safe_to_ship() -> None:
    """Installed as a live config: no account, password or SMSC login is set by default."""
    cfg = parse(yaml.safe_load(SAMPLE.read_text()), str(SAMPLE))
    assert cfg.accounts == {}
    assert cfg.smpp.password == "" and cfg.smpp.system_id == ""


def test_debian_version_is_pyproject_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    m = re.match(r"^sms-milter \(([^)]+)\) ", first)
    assert m, first
    assert m.group(1) == version, f"debian/changelog says {m.group(1)}, pyproject.toml says {version}"


@pytest.mark.parametrize("unit", ["sms-milter.service", "sms-milter-dispatcher.service"])
def test_units_are_the_package_s(unit: str) -> None:
    text = (ROOT / "systemd" / unit).read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert "/usr/local" not in text
    assert settings["ExecStart"].startswith("/usr/bin/sms-milter ")
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert int(settings["WatchdogSec"]) > 0
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["User"] == settings["Group"] == "sms-milter"
    for hard in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                 "ReadWritePaths=/var/lib/sms-milter", "RuntimeDirectory=sms-milter", "LimitNOFILE=65536"):
        assert hard in text, hard


def test_postfix_snippets_call_the_package_s_command() -> None:
    for snippet in (ROOT / "postfix-conf").iterdir():
        text = snippet.read_text()
        assert "/usr/local" not in text, snippet.name
    assert "argv=/usr/bin/sms-milter submit" in (ROOT / "postfix-conf" / "master.cf.snippet").read_text()


def test_every_subpackage_is_packaged() -> None:
    """pyproject lists the packages by hand (the directory milter/ is imported as sms_milter):
    a new subpackage missing there would be missing from the .deb and from `pip install .`."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {"sms_milter" + "".join(f".{p}" for p in init.parent.relative_to(ROOT / "milter").parts)
               for init in (ROOT / "milter").rglob("__init__.py")}
    assert on_disk <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run the tests"):readme.index("## Install")]
    commands = re.findall(r"```sh\n(.*?)\n```", section, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, f"README's test command {test_command!r} is not a line of .ci/run"


@pytest.mark.parametrize("script", [".ci/run", ".ci/package-check", "demo/run", "demo/setup"])
def test_scripts_use_the_project_venv_only(script: str) -> None:
    """No `python` (Debian 12 has none), no pip into Debian's python3 (PEP 668), no ruff or
    pytest from PATH: the venv's tools or /usr/bin/python3 by path. No `|| true` hiding a failure."""
    bare = re.compile(r"(?<![\w/.-])(?<!-m )(python|python3|pip|pip3|ruff|pytest)(?=\s|$)")
    for n, line in enumerate((ROOT / script).read_text().splitlines(), 1):
        code = re.sub(r"\"[^\"]*\"|'[^']*'", "''", line.split("#", 1)[0] if "#" in line and
                      not re.search(r"\$\{?#|'[^']*#", line) else line)
        assert not bare.search(code), f"{script}:{n}: {line.strip()}"
        assert "|| true" not in code, f"{script}:{n}: {line.strip()}"

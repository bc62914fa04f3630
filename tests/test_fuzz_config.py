"""Fuzzing the organization loader: any file gives an organization or a config error.

Whatever an administrator (or an editor gone wrong) leaves in the organization file,
``hubport run`` and ``hubport test-config`` must answer with ``ConfigErrors`` whose every
entry names the file, where in it (object and field, or line) and why; never a traceback
or another exception type. Three kinds of input: structured TOML with random sections,
keys and values of every TOML type (keys mostly the field names hubport reads, so the
values reach the typed readers); the shipped ``core/default.toml`` with random fields
deleted, retyped or added; and the default file's text with random bytes spliced in.
"""

from __future__ import annotations

import copy
import re
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from daemon_process import child_env, hubport_command
from fuzzing import fuzz_settings
from hubport.core.config import SECTIONS, Organization, load_organization, plugin_modules
from hubport.core.config_fields import ConfigError, ConfigErrors
from hubport.core.hooks import Hooks
from hubport.core.toml_text import dumps

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOML = (ROOT / "core" / "default.toml").read_text(encoding="utf-8")
DEFAULT_DOC = tomllib.loads(DEFAULT_TOML)
# the field names the loaders read (`reader.int("MaxHopCount", ...)`), found in the source
_READ_CALL = re.compile(r'\b(?:r|reader)\.[a-z_]+\(\s*"([A-Za-z][A-Za-z0-9]*)"')


@cache
def registry() -> tuple[dict[str, type], dict[str, type]]:
    """The connector types and delivery agents of the built-in plugins (as the daemon has)."""
    hooks = Hooks(entry_points=False)
    return dict(hooks.registry.connector_types), dict(hooks.registry.delivery_agents)


@cache
def field_names() -> list[str]:
    names = set(re.findall(r"^([A-Za-z]+)\s*=", DEFAULT_TOML, re.M))
    for source in [ROOT / "core" / "config.py", *sorted((ROOT / "plugins").rglob("*.py")),
                   *sorted((ROOT / "agents").rglob("*.py"))]:
        names.update(_READ_CALL.findall(source.read_text(encoding="utf-8")))
    return sorted(names)


def section_names() -> list[str]:
    return sorted({*SECTIONS, *registry()[0], "receive_connector", "send_connector",
                   "foreign_connector", "delivery_agent_connector"})


# -- TOML writing (tomllib only reads) ---------------------------------------------------



def toml_document(doc: dict[str, Any]) -> str:
    """The document as TOML text: the writer hubport's organization store uses."""
    return dumps(doc)


# -- strategies ----------------------------------------------------------------------------

# values hubport's fields take, near misses of them, and plain junk
WORDS = [
    "", " ", "0", "-1", "1", "unlimited", "Unlimited", "10MB", "10 MB (10,485,760 bytes)",
    "1,5MB", "64KB", "2GB", "9999999999999TB", "1.5", "5s", "4h", "00:05:00", "1.00:00:00",
    "-00:00:01", "99999999.00:00:00", "nan", "inf", "$true", "$false", "true", "Enabled",
    "Disabled", "EnabledWithoutValue", "None", "Verbose", "Reject", "Normalize", "Custom",
    "Internet", "Client", "Internal", "Partner", "Authoritative", "InternalRelay",
    "ExternalRelay", "HUB01", "hub02", "Default-First-Site-Name", "contoso.test",
    "*.contoso.test", "*", "*.", ".", "..", "a/b", "localhost", "127.0.0.1", "127.0.0.1:0",
    "127.0.0.1:70000", "[::1]:25", "::1", "0.0.0.0-255.255.255.255", "10.0.0.0/33",
    "alice@contoso.test", "postmaster", "<>", "@", "smtp:a@contoso.test", "SMTP:",
    "X400:c=US;", "FAX:+15551234", "FAX:*;1", "SMTP:*;1", "contoso.test;0", "Tls",
    "BasicAuth", "BasicAuthRequireTLS", "ExchangeServer", "ExternalAuthoritative",
    "AnonymousUsers", "ExchangeUsers", "ExchangeServers", "Partners", "Ms-Exch-SMTP-Submit",
    "5.4.8", "6.0.0", "var", "/dev/null", "../../etc", "a\x00b", "\t", "é", "ü@例え.テスト",
    "xn--", "x" * 300,
]
scalars = st.one_of(
    st.sampled_from(WORDS),
    st.text(max_size=12),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 25, 65535, 65536, 2**31, 2**63 - 1]),
    st.floats(),
    st.datetimes(),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8,
)


@st.composite
def keys(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(field_names()))
    return draw(st.sampled_from([name, name.lower(), name.upper(), name + "x",
                                 draw(st.text(min_size=1, max_size=8))]))


tables = st.dictionaries(keys(), values, max_size=6)


@st.composite
def structured(draw: st.DrawFn) -> str:
    """A TOML document of random sections, most of them ones hubport reads."""
    doc: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 6))):
        section = draw(st.sampled_from(section_names()) | st.text(min_size=1, max_size=8))
        shape = draw(st.sampled_from(["array", "table", "scalar"]))
        if shape == "array":
            doc[section] = draw(st.lists(tables, min_size=1, max_size=3))
        elif shape == "table":
            doc[section] = draw(tables)
        else:
            doc[section] = draw(values)
    return toml_document(doc)


@st.composite
def mutated_default(draw: st.DrawFn) -> str:
    """``core/default.toml`` with fields deleted, retyped or added, and tables duplicated."""
    doc = copy.deepcopy(DEFAULT_DOC)
    for _ in range(draw(st.integers(1, 6))):
        section = draw(st.sampled_from(sorted(doc)))
        holder = doc[section]
        if isinstance(holder, list) and holder and isinstance(holder[0], dict):
            action = draw(st.sampled_from(["field", "field", "duplicate", "drop"]))
            if action == "duplicate":
                holder.append(dict(draw(st.sampled_from(holder))))
                continue
            if action == "drop":
                holder.pop(draw(st.integers(0, len(holder) - 1)))
                if not holder:
                    del doc[section]
                continue
            table = holder[draw(st.integers(0, len(holder) - 1))]
        elif isinstance(holder, dict):
            table = holder
        else:
            continue
        choice = draw(st.sampled_from(["delete", "retype", "add"]))
        if choice == "delete" and table:
            del table[draw(st.sampled_from(sorted(table)))]
        elif choice == "retype" and table:
            table[draw(st.sampled_from(sorted(table)))] = draw(values)
        else:
            table[draw(keys())] = draw(values)
    if draw(st.booleans()):
        doc[draw(st.sampled_from(section_names()))] = draw(values)
    return toml_document(doc)


@st.composite
def spliced_default(draw: st.DrawFn) -> bytes:
    """The default file's bytes with random bytes inserted, replaced or cut."""
    data = bytearray(DEFAULT_TOML.encode())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 40))
        data[at:at + cut] = draw(st.binary(max_size=12) | st.sampled_from(
            [b"\xff", b"\xef\xbb\xbf", b"\x00", b"\r", b"[", b"[[", b"]", b'"', b"=", b"\n[x]\n"]))
    return bytes(data)


documents = st.one_of(
    structured().map(str.encode),
    mutated_default().map(str.encode),
    spliced_default(),
    st.binary(max_size=200),
)


# -- the property --------------------------------------------------------------------------


def check_loads_or_explains(path: Path) -> Organization | ConfigErrors:
    """What the daemon does with a file before starting: its plugins, then the full load."""
    assert isinstance(plugin_modules(path), tuple)
    types, agents = registry()
    try:
        org = load_organization(path, types, agents)
    except ConfigErrors as exc:
        assert exc.errors, "an empty error list"
        for error in exc.errors:
            assert isinstance(error, ConfigError)
            assert error.file == str(path), f"error names no file: {error!r} ({error})"
            assert error.reason.strip(), f"error without a reason: {error}"
            assert error.object or error.field or error.line, f"error says not where: {error}"
            assert "Traceback" not in error.reason and "object at 0x" not in error.reason, error
        assert str(path) in str(exc)
        return exc
    assert isinstance(org, Organization)
    assert org.servers and org.default_domain.domain_name  # what start-up reads first
    return org


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-config") / "org.toml"


@fuzz_settings(80)
@given(documents)
@example(b"[hubport]\nPlugins = []\n# \xff\n")  # bug: plugin_modules raised UnicodeDecodeError
@example(b"\n[[site]]\n")  # bug: a site section without a valid site raised IndexError
@example(b"site = []\n")  # bug: the same, and no error said why
@example(b"\xef\xbb\xbf" + DEFAULT_TOML.encode())
@example(DEFAULT_TOML.encode())
def test_any_file_loads_or_gives_config_errors_naming_file_and_field(
        config_path: Path, document: bytes) -> None:
    config_path.write_bytes(document)
    check_loads_or_explains(config_path)


def test_default_toml_still_loads(tmp_path: Path) -> None:
    """The fuzzing's starting point is valid (else every mutation is trivially refused)."""
    path = tmp_path / "org.toml"
    path.write_text(DEFAULT_TOML)
    assert isinstance(check_loads_or_explains(path), Organization)


def test_hubport_test_config_refuses_a_non_utf8_file_with_a_config_error(tmp_path: Path) -> None:
    """Found by the fuzzing: a byte that is not UTF-8 gave a traceback (in the plugin
    pre-read), not the loader's 'not UTF-8 text' error."""
    path = tmp_path / "org.toml"
    path.write_bytes(DEFAULT_TOML.encode() + b"# caf\xe9\n")
    done = subprocess.run([*hubport_command(), "test-config", "--config", str(path)],
                          cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert f"{path}: line" in done.stderr and "not UTF-8 text" in done.stderr, done.stderr


def test_plugins_are_read_from_a_file_the_loader_accepts(tmp_path: Path) -> None:
    """The plugin pre-read decodes as the full load does: a BOM is fine (it used to make the
    pre-read skip the plugins, so their sections came out as unknown), other bytes are the
    full load's to report."""
    path = tmp_path / "org.toml"
    path.write_bytes(b'\xef\xbb\xbf[hubport]\nPlugins = ["my_agents"]\n')
    assert plugin_modules(path) == ("my_agents",)
    path.write_bytes(b'[hubport]\nPlugins = ["my_agents"]\n# \xff\n')
    assert plugin_modules(path) == ()

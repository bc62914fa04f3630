"""The organization cmdlets: ``New-``/``Set-``/``Get-``/``Remove-`` for every object of the
organization, typed as Exchange administrators type them (core/cmdlet_line.py reads the
line).

Parameters are the objects' own fields, which already carry Exchange's parameter names, so
one validation serves the file, the store and these cmdlets: the organization with the
change is validated exactly as a file load, and a wrong parameter or value is that load's
error (``RemoteIPRantes: unknown field; did you mean "RemoteIPRanges"``).

- **A file** is edited with tomlkit, so comments and layout stay; the new text is validated,
  then written atomically under a lock beside the file (two administrators never lose each
  other's change). The daemons reading it reload it live.
- **No file** (the embedded default): the first change writes the default out to
  ``./hubport.toml`` (saying so) and edits that; ``hubport run`` reads it from then on.
- **A store** (``etcd://``): one compare-and-swap per cmdlet (``OrganizationStore.change``).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from hubport.core.cmdlet_line import CmdletError, Token, text_list
from hubport.core.cmdlet_output import Stages

__all__ = ["LOCAL_FILE", "NOUNS", "run"]

#: the organization file the commands use in the current folder when --config names none
LOCAL_FILE = Path("hubport.toml")
#: cmdlet noun -> organization section
NOUNS = {
    "sendconnector": "send_connector", "receiveconnector": "receive_connector",
    "foreignconnector": "foreign_connector",
    "deliveryagentconnector": "delivery_agent_connector",
    "routinggroupconnector": "routing_group_connector", "routinggroup": "routing_group",
    "accepteddomain": "accepted_domain", "mailbox": "mailbox", "mailcontact": "mail_contact",
    "distributiongroup": "distribution_group", "adsite": "site", "adsitelink": "site_link",
    "transportserver": "transport_server", "transportconfig": "transport_config",
    "dkimsigningconfig": "dkim_signing_config", "senderidconfig": "sender_id_config",
    "antiphishpolicy": "anti_phish_policy",
}
SINGLE = {"transport_config", "sender_id_config"}
#: the verbs of a section when not New/Set/Get/Remove (Set/Get for a SINGLE one)
SECTION_VERBS = {"anti_phish_policy": ("Get", "Set"),
                 "dkim_signing_config": ("New", "Set", "Get", "Remove", "Rotate")}
#: sections whose objects are named by another field (a DKIM signing configuration by its
#: domain, as Exchange's New-DkimSigningConfig -DomainName)
NAMED_BY = {"dkim_signing_config": "DomainName"}
_USAGES = ("Custom", "Internal", "Internet", "Partner", "Client")
#: switches that stand for a field's value, as Exchange's New-SendConnector -Internet
SWITCHES: dict[str, dict[str, tuple[str, Any]]] = {
    **{section: {u.lower(): ("Usage", u) for u in _USAGES}
       for section in ("send_connector", "receive_connector")},
    "dkim_signing_config": {"renewinactivekey": ("RenewInactiveKey", True)}}
#: Exchange parameters whose field hubport spells otherwise
ALIASES = {"accepted_domain": {"MakeDefault": "Default"}}
VERBS = ("new", "set", "get", "remove", "add", "rotate")
#: Add-/Remove-DistributionGroupMember edit a group's Members
MEMBER_NOUN = "distributiongroupmember"
#: Add-/Remove-ADPermission edit a Receive connector's Permissions (the rights Active
#: Directory grants a principal on it: ms-Exch-SMTP-Accept-Any-Recipient and the rest)
PERMISSION_NOUN = "adpermission"
_INTEGER = re.compile(r"-?[0-9]+")
_UNITS = ("B", "KB", "MB", "GB", "TB")


def value_of(text: str) -> Any:
    """A parameter's text as the organization holds it: ``$true``/``$false``, whole
    numbers, comma lists, else text (sizes, times and the rest are checked by the load)."""
    low = text.strip().lower()
    if low in ("$true", "$false"):
        return low == "$true"
    if _INTEGER.fullmatch(text.strip()):
        return int(text)
    if "," in text:
        return text_list(text)
    return text


def arguments(cmdlet: str, tokens: Sequence[Token], positional: str,
              switches: Mapping[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """``-Field value`` pairs (the first bare value is ``positional``); ``$null`` clears;
    ``switches`` are parameters without a value that set a field (-Internet)."""
    switches = switches or {}
    values: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.parameter:
            previous = values.get(tokens[i - 2].text) if i > 1 and tokens[i - 2].parameter \
                and not tokens[i - 1].parameter else None
            if isinstance(previous, int) and token.text.upper() in _UNITS:
                name = tokens[i - 2].text
                raise CmdletError(f"{cmdlet}: -{name} {previous} {token.text}: write"
                                  f" {previous}{token.text} (no space)")
            if positional in values:
                raise CmdletError(f"{cmdlet}: {token.text!r}: only -{positional} is given by"
                                  " position")
            values[positional] = token.text
        elif token.text.lower() in switches and token.attached is None:
            field, value = switches[token.text.lower()]
            values[field] = value
        elif token.attached is not None:
            values[token.text] = value_of(token.attached)
        elif i + 1 < len(tokens) and tokens[i + 1].tables:
            i += 1  # one @{...} is a table, several a list of tables
            tables = [dict(t) for t in tokens[i].tables]
            values[token.text] = tables[0] if len(tables) == 1 else tables
        elif i + 1 < len(tokens) and not tokens[i + 1].parameter:
            i += 1
            text = tokens[i].text
            values[token.text] = None if text.strip().lower() == "$null" else value_of(text)
        elif token.text.lower() in ("whatif", "confirm"):
            values[token.text] = True
        else:
            raise CmdletError(
                f"{cmdlet}: -{token.text} needs a value. From bash, put the whole line in"
                f" single quotes ('{cmdlet} … -{token.text} $false'): in double quotes or none,"
                " bash removes $true, $false and $_")
        i += 1
    return values


def _pop(values: dict[str, Any], name: str) -> Any:
    for key in list(values):
        if key.lower() == name.lower():
            return values.pop(key)
    return None


def _name(identity: Any) -> str:
    """``Server\\Name`` or ``Name``: the object's Name."""
    return str(identity).rsplit("\\", 1)[-1].strip()


def object_name(table: Mapping[str, Any]) -> str:
    """An object's Name (a DKIM signing configuration's is its DomainName)."""
    return str(table.get("Name") or table.get("DomainName") or "")


def _find(objects: Sequence[Mapping[str, Any]], name: str) -> int | None:
    wanted = name.lower()
    return next((i for i, t in enumerate(objects) if object_name(t).lower() == wanted), None)


def _merge(table: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``table`` with ``changes`` (a field's case as the table spells it; None removes)."""
    merged = dict(table)
    for key, value in changes.items():
        spelled = next((k for k in merged if k.lower() == key.lower()), key)
        if value is None:
            merged.pop(spelled, None)
        else:
            merged[spelled] = value
    return merged


def run(verb: str, noun: str, tokens: Sequence[Token], config: Any, stages: Stages,
        validate: Callable[[str, str], object],
        changed: Callable[[str, Any, list[str], str], object] = lambda *a: None) -> int:
    """One organization cmdlet; the exit status. ``validate(text, source)`` raises the
    load's ConfigErrors for an organization that would not load; ``changed(cmdlet, where,
    object ids, revision)`` is told of each change made (the admin audit log)."""
    member = noun.lower() == MEMBER_NOUN
    permission = noun.lower() == PERMISSION_NOUN
    section = "distribution_group" if member else "receive_connector" if permission else \
        NOUNS[noun.lower()]
    cmdlet = f"{verb.capitalize()}-{noun_name(noun)}"
    allowed = [v.lower() for v in SECTION_VERBS.get(section, ())]
    if (verb == "add" and not (member or permission)) or (verb == "rotate" and
                                                          "rotate" not in allowed) \
            or (allowed and verb not in allowed and not (member or permission)):
        known = ", ".join(f"{v}-{noun_name(noun)}" for v in SECTION_VERBS.get(
            section, ("Get", "Set") if section in SINGLE else ("New", "Set", "Get", "Remove")))
        raise CmdletError(f"{cmdlet}: not a cmdlet hubport knows ({known} are)")
    values = arguments(cmdlet, tokens, "Name" if verb == "new" else "Identity",
                       SWITCHES.get(section))
    for key in list(values):
        alias = next((field for name, field in ALIASES.get(section, {}).items()
                      if name.lower() == key.lower()), None)
        if alias:
            values[alias] = values.pop(key)
    what_if = bool(_pop(values, "WhatIf"))
    _pop(values, "Confirm")
    store = _store_of(config)
    data = _read(config, store)
    _expand_names(cmdlet, section, data, values, validate)
    if verb == "get":
        return _get(cmdlet, section, data, values, stages, config, store, validate)
    if section == "dkim_signing_config":
        from hubport.core import mail_auth_cmdlets

        plan = mail_auth_cmdlets.prepare(cmdlet, verb, data, values, config, store, validate)
        if plan.done:
            changed(cmdlet, plan.where, plan.objects, plan.revision)
            _say(cmdlet, store.url if store is not None else str(plan.where), plan.objects,
                 plan.revision, stages)
            return 0
        values = plan.values
    if permission:
        edits = _permission_edits(cmdlet, verb, data, values)
    elif member:
        edits = _member_edits(cmdlet, verb, data, values, validate)
    else:
        edits = _edits(cmdlet, verb, section, data, values)
    if section == "accepted_domain":
        edits.update(_one_default(data, edits))
    if section == "dkim_signing_config" and not what_if:
        plan.make_keys(edits)
    if what_if:
        for (sec, name), table in edits.items():
            action = "Removing" if table is None else "Setting"
            print(f'What if: {action} {sec} "{name}".')
        return 0
    objects = [f"{sec}/{name}" if name else sec for sec, name in edits]
    where: Any
    if store is not None:
        generation = asyncio.run(store.change(edits, lambda text: validate(text, store.url)))
        where, revision = config, f"generation {generation}"
    else:
        import hashlib

        path = _local_file(config)
        with _locked(path):
            new = _edit_text(path.read_text(encoding="utf-8-sig"), edits)
            validate(new, str(path))
            _replace(path, new)
        where = path
        revision = "sha256 " + hashlib.sha256(new.encode()).hexdigest()[:16]
    changed(cmdlet, where, objects, revision)
    _say(cmdlet, store.url if store is not None else str(where), objects, revision, stages)
    if section == "dkim_signing_config":
        plan.report(edits)
    return 0


def _say(cmdlet: str, shown: str, objects: list[str], revision: str, stages: Stages) -> None:
    """What a change did: one line, or one JSON document with --json."""
    if stages.output == "json":
        print(json.dumps({"cmdlet": cmdlet, "organization": shown, "changed": objects,
                          "revision": revision}, indent=2))
    else:
        print(f"{cmdlet}: done ({shown}, {revision})")


def noun_name(noun: str) -> str:
    for proper in ("DistributionGroupMember", "ADPermission", "SendConnector",
                   "ReceiveConnector", "ForeignConnector", "DeliveryAgentConnector",
                   "RoutingGroupConnector", "RoutingGroup",
                   "AcceptedDomain", "Mailbox", "MailContact", "DistributionGroup", "AdSite",
                   "AdSiteLink", "TransportServer", "TransportConfig", "DkimSigningConfig",
                   "SenderIdConfig", "AntiPhishPolicy"):
        if proper.lower() == noun.lower():
            return proper
    return noun


def _edits(cmdlet: str, verb: str, section: str, data: Mapping[str, Any],
           values: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any] | None]:
    if section in SINGLE:
        if verb != "set":
            noun = cmdlet.split("-", 1)[1]
            raise CmdletError(f"{cmdlet}: the {section.replace('_', ' ')} is set, not made or"
                              f" removed (Set-{noun})")
        _pop(values, "Identity")
        return {(section, ""): _merge(data.get(section, {}), values)}
    objects = data.get(section, [])
    named_by = NAMED_BY.get(section)
    if verb == "new" and named_by:
        name = next((v for k, v in values.items() if k.lower() == named_by.lower()), None)
        if not name:
            raise CmdletError(f"{cmdlet}: -{named_by} is required")
        if _find(objects, str(name)) is not None:
            raise CmdletError(f"{cmdlet}: {section} {name!r} already exists (Set-… changes"
                              " it)")
        return {(section, str(name)): dict(values)}
    if verb == "new":
        name = _pop(values, "Name")
        if not name:
            given = _pop(values, "Identity")
            hint = f": {cmdlet} -Name '{_name(given)}' …" if given else ""
            raise CmdletError(f"{cmdlet}: -Name is required (New- cmdlets name the new object"
                              f" with -Name; -Identity names one that exists){hint}")
        if _find(objects, str(name)) is not None:
            raise CmdletError(f"{cmdlet}: {section} {name!r} already exists (Set-… changes"
                              " it)")
        return {(section, str(name)): {"Name": str(name), **values}}
    identity = _pop(values, "Identity")
    if identity is None:
        named = next((v for k, v in values.items() if k.lower() == "name"), None)
        hint = f": {cmdlet} -Identity '{named}' …" if named else ""
        raise CmdletError(f"{cmdlet}: -Identity is required (the object's Name; -Name renames"
                          f" it){hint}")
    index = _find(objects, _name(identity))
    if index is None and section == "anti_phish_policy" and \
            _name(identity).lower() == "default":  # the Default policy, written out
        return {(section, "Default"): {"Name": "Default", **values}}
    if index is None:
        names = [object_name(t) for t in objects]
        from hubport.core.config_fields import suggest

        raise CmdletError(f"{cmdlet}: no {section} {_name(identity)!r}"
                          f"{suggest(_name(identity), names)}")
    stored = object_name(objects[index])
    if verb == "remove":
        return {(section, stored): None}
    new_name = next((v for k, v in values.items() if k.lower() == "name"), None)
    table = _merge(objects[index], values)
    if new_name and str(new_name).lower() != stored.lower():
        return {(section, stored): None, (section, str(new_name)): table}
    return {(section, stored): table}


def validator(config: Any) -> Callable[[str, str], object]:
    """``validate(text, source)``: load an organization's text as ``hubport run`` would
    (with the plugins installed and the file's own), raising its ConfigErrors."""
    from hubport.core.config import parse_organization
    from hubport.core.daemon import make_hooks

    hooks = make_hooks(config if isinstance(config, Path) else None)

    def validate(text: str, source: str) -> Any:
        base = Path(source).parent if not str(source).startswith(("etcd", "<")) else Path.cwd()
        return parse_organization(text, source=source, base_dir=base,
                           connector_types=hooks.registry.connector_types,
                           delivery_agents=hooks.registry.delivery_agents)
    return validate


def section_fields(section: str, data: Mapping[str, Any] | None = None,
                   validate: Callable[[str, str], object] | None = None) -> dict[str, str]:
    """The fields a section's objects take, {lower case: spelling}: learnt by loading the
    organization with one bare object of it (their values: KNOWN_CHOICES)."""
    from hubport.core.config_fields import KNOWN_FIELDS
    from hubport.core.toml_text import dumps

    if section not in KNOWN_FIELDS:
        if data is None:
            data = tomllib.loads(_embedded_default())
        probe = dict(data)
        if section in SINGLE:
            probe.setdefault(section, {})
        else:
            probe[section] = [*probe.get(section, []), {"Name": "hubport-probe"}]
        try:
            (validate or validator(None))(dumps(probe), "<probe>")
        except Exception:  # the probe object is incomplete: only the fields matter here
            pass
    return KNOWN_FIELDS.get(section, {})


def _one_default(data: Mapping[str, Any],
                 edits: Mapping[tuple[str, str], Mapping[str, Any] | None]
                 ) -> dict[tuple[str, str], dict[str, Any] | None]:
    """-MakeDefault $true (Default) on one accepted domain clears it on the others, as
    Exchange's Set-AcceptedDomain -MakeDefault does."""
    made = {name.lower() for (_s, name), t in edits.items() if t and t.get("Default") is True}
    if not made:
        return {}
    return {("accepted_domain", str(t["Name"])): _merge(t, {"Default": None})
            for t in data.get("accepted_domain", [])
            if t.get("Default") is True and str(t.get("Name", "")).lower() not in made
            and ("accepted_domain", str(t["Name"])) not in edits}


def _expand_names(cmdlet: str, section: str, data: Mapping[str, Any], values: dict[str, Any],
                  validate: Callable[[str, str], object]) -> None:
    """Parameters shortened to a unique prefix of a field (-addressspace ->
    AddressSpaces), as PowerShell completes them."""
    known = section_fields(section, data, validate)
    for key in list(values):
        low = key.lower()
        if low in known or low in ("identity", "whatif", "confirm", "member"):
            continue
        matches = sorted({spelled for k, spelled in known.items() if k.startswith(low)})
        if len(matches) == 1:
            values[matches[0]] = values.pop(key)
        elif matches:
            raise CmdletError(f"{cmdlet}: -{key} is ambiguous: "
                              + ", ".join(f"-{m}" for m in matches))


def _embedded_default() -> str:
    return resources.files("hubport.core").joinpath("default.toml").read_text("utf-8")


def _member_edits(cmdlet: str, verb: str, data: Mapping[str, Any], values: dict[str, Any],
                  validate: Callable[[str, str], object]
                  ) -> dict[tuple[str, str], dict[str, Any] | None]:
    """Add-/Remove-DistributionGroupMember -Identity <group> -Member <recipient>: a member
    is the same whether named by Name, Alias or address (bob, bob@contoso.test)."""
    identity, member = _pop(values, "Identity"), _pop(values, "Member")
    if identity is None or member is None:
        raise CmdletError(f"{cmdlet}: -Identity (the group) and -Member are required")
    if values:
        raise CmdletError(f"{cmdlet}: takes -Identity and -Member only")
    groups = data.get("distribution_group", [])
    index = _find(groups, _name(identity))
    if index is None:
        raise CmdletError(f"{cmdlet}: no distribution_group {_name(identity)!r}")
    group = dict(groups[index])
    members = [str(m) for m in group.get("Members", [])]
    same = _same_recipient(data, validate)
    present = [m for m in members if same(m, str(member))]
    if verb == "add":
        if present:
            raise CmdletError(f"{cmdlet}: {member!r} is already a member of {group['Name']}")
        members.append(str(member))
    else:
        if not present:
            raise CmdletError(f"{cmdlet}: {member!r} is not a member of {group['Name']}")
        members = [m for m in members if m not in present]
    group["Members"] = members
    return {("distribution_group", str(group["Name"])): group}


def _permission_edits(cmdlet: str, verb: str, data: Mapping[str, Any], values: dict[str, Any]
                      ) -> dict[tuple[str, str], dict[str, Any] | None]:
    """Add-/Remove-ADPermission -Identity <receive connector> -User <principal>
    -ExtendedRights <rights>: Exchange's way to let an application server relay
    (``-User 'NT AUTHORITY\\ANONYMOUS LOGON' -ExtendedRights
    ms-Exch-SMTP-Accept-Any-Recipient``)."""
    identity, user = _pop(values, "Identity"), _pop(values, "User")
    rights = _pop(values, "ExtendedRights")
    if identity is None or user is None or rights is None:
        raise CmdletError(f"{cmdlet}: -Identity (the Receive connector), -User and"
                          " -ExtendedRights are required")
    if values:
        raise CmdletError(f"{cmdlet}: takes -Identity, -User and -ExtendedRights only (got"
                          f" {', '.join('-' + k for k in values)})")
    connectors = data.get("receive_connector", [])
    index = _find(connectors, _name(identity))
    if index is None:
        from hubport.core.config_fields import suggest

        names = [str(t.get("Name", "")) for t in connectors]
        raise CmdletError(f"{cmdlet}: no receive_connector {_name(identity)!r}"
                          f"{suggest(_name(identity), names)}")
    table = dict(connectors[index])
    wanted = [rights] if isinstance(rights, str) else [str(r) for r in rights]
    entries = [dict(e) for e in table.get("Permissions", [])]
    mine = next((e for e in entries if str(e.get("User", "")).lower() == str(user).lower()),
                None)
    if verb == "add":
        if mine is None:
            mine = {"User": str(user), "ExtendedRights": []}
            entries.append(mine)
        have = [str(r) for r in mine.get("ExtendedRights", [])]
        mine["ExtendedRights"] = have + [r for r in wanted
                                         if r.lower() not in {h.lower() for h in have}]
    else:
        if mine is None:
            raise CmdletError(f"{cmdlet}: {user!r} has no permission on {table['Name']}")
        left = [r for r in mine.get("ExtendedRights", [])
                if str(r).lower() not in {w.lower() for w in wanted}]
        entries = [e for e in entries if e is not mine] + (
            [{**mine, "ExtendedRights": left}] if left else [])
    table["Permissions"] = entries
    if not entries:
        table.pop("Permissions")
    return {("receive_connector", str(table["Name"])): table}


def _same_recipient(data: Mapping[str, Any], validate: Callable[[str, str], object]
                    ) -> Callable[[str, str], bool]:
    """Whether two references name one recipient, by the organization's directory; by
    their text when the organization does not load."""
    from hubport.core.directory import RecipientDirectory
    from hubport.core.toml_text import dumps

    try:
        directory = RecipientDirectory(validate(dumps(data), "<members>"))  # type: ignore[arg-type]
    except Exception:  # an organization that does not load: the text decides
        return lambda a, b: a.lower() == b.lower()

    def key(reference: str) -> str:
        entry = directory.member(reference)
        return entry.primary.lower() if entry is not None else reference.lower()
    return lambda a, b: key(a) == key(b)


def _get(cmdlet: str, section: str, data: Mapping[str, Any], values: dict[str, Any],
         stages: Stages, config: Any = None, store: Any = None,
         validate: Callable[[str, str], object] | None = None) -> int:
    from hubport.core import mail_auth_cmdlets

    short: Sequence[str] | None = None
    if section in mail_auth_cmdlets.SECTIONS and validate is not None:
        # every property with its effective value, and what this machine has of the keys
        rows = mail_auth_cmdlets.rows(section, data, config, store, validate)
        short = mail_auth_cmdlets.SHORT.get(section)
    elif section in SINGLE:
        rows = [dict(data.get(section, {}))]
    else:
        rows = [dict(t) for t in data.get(section, [])]
    if section not in SINGLE:
        identity = _pop(values, "Identity")
        if identity is not None:
            rows = [t for t in rows if object_name(t).lower() == _name(identity).lower()]
            if not rows:
                raise CmdletError(f"{cmdlet}: no {section} {_name(identity)!r}")
    if values:
        raise CmdletError(f"{cmdlet}: takes -Identity only (got"
                          f" {', '.join('-' + k for k in values)})")
    from hubport.core.cmdlet_output import apply, display, render

    objects = apply(rows, stages)
    if stages.output is None and not stages.works_on_objects and section not in SINGLE:
        for row in objects:  # the short table: the Name, then the fields set
            rest = ", ".join(f"{k}={display(v)}" for k, v in row.items()
                             if k != "Name" and (short is None or k in short))
            print(f"{row.get('Name', '')!s:<28} {rest}")
        return 0
    default = "list" if section in SINGLE else "table"
    print(render(objects, stages.output or default, stages.columns), end="")
    return 0


# -- where the organization is -----------------------------------------------------------


def _store_of(config: Any) -> Any:
    from hubport.core.org_store import OrganizationStore, StoreError, is_store_url

    if not is_store_url(config):
        return None
    try:
        return OrganizationStore.from_url(str(config))
    except StoreError as exc:
        raise CmdletError(str(exc)) from None


def _read(config: Any, store: Any) -> dict[str, Any]:
    from hubport.core.org_store import StoreError

    if store is not None:
        try:
            text, _generation, _revision = asyncio.run(store.read())
        except StoreError as exc:
            raise CmdletError(str(exc)) from None
        return tomllib.loads(text)
    path = config if config is not None else (LOCAL_FILE if LOCAL_FILE.exists() else None)
    if path is None:
        text = _embedded_default()
    else:
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise CmdletError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CmdletError(f"{path}: {exc}") from None


def _local_file(config: Any) -> Path:
    """The file to edit; with none, the embedded default written out to ./hubport.toml."""
    if config is not None:
        return Path(config)
    if not LOCAL_FILE.exists():
        _replace(LOCAL_FILE, _embedded_default())
        print(f"wrote the embedded default organization to ./{LOCAL_FILE}: it is edited from"
              " now on, and hubport run started here reads it", file=sys.stderr)
    return LOCAL_FILE


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One editor at a time: a lock file beside the organization file."""
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _replace(path: Path, text: str) -> None:
    """Atomically, keeping the file's mode (a new file: 0644)."""
    from hubport.core.credentials import replace_file

    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    replace_file(path, text.encode(), mode)


def _edit_text(text: str, edits: Mapping[tuple[str, str], Mapping[str, Any] | None]) -> str:
    """The file with the edits, comments and layout kept (tomlkit)."""
    import tomlkit

    doc = tomlkit.parse(text)
    for (section, name), table in edits.items():
        if section in SINGLE:
            if table is None:
                doc.pop(section, None)
                continue
            current = doc.get(section)
            if current is None:
                doc[section] = tomlkit.table()
                current = doc[section]
            _update(current, table)
            continue
        array: Any = doc.get(section)
        index = _find(list(array), name) if array is not None else None
        if table is None:
            if array is not None and index is not None:
                del array[index]
                if len(array) == 0:
                    del doc[section]
            continue
        if index is None:
            if array is None:
                doc[section] = tomlkit.aot()
                array = doc[section]
            new = tomlkit.table()
            for key, value in table.items():
                new[key] = value
            array.append(new)
        else:
            _update(array[index], table)
    return tomlkit.dumps(doc)


def _update(current: Any, table: Mapping[str, Any]) -> None:
    for key in [k for k in current if k not in table]:
        del current[key]
    for key, value in table.items():
        if current.get(key) != value:
            current[key] = value

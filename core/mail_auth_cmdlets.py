"""What the mail authentication cmdlets do besides editing the organization.

``New-DkimSigningConfig`` makes the domain's keys (both selectors', so the second is
published long before a rotation needs it) and prints the DNS records to publish;
``Rotate-DkimSigningConfig`` switches signing to the other selector, keeping the old key,
or with ``-RenewInactiveKey`` replaces the key of the selector not in use;
``Get-DkimSigningConfig``, ``Get-SenderIdConfig`` and ``Get-AntiPhishPolicy`` show every
property with its effective value, and for DKIM what this machine holds of the keys (the
records to publish, or why a key is missing or unusable).

Keys are made before the organization is changed, so a hub reading the change never finds
a configuration without its key on this machine.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubport.core.cmdlet_line import CmdletError
from hubport.core.dkim_keys import dkim_key_folder, ensure_keys, key_status, renew_key
from hubport.core.mail_auth_config import SELECTORS, DkimSigningConfig

__all__ = ["SECTIONS", "SHORT", "Plan", "prepare", "rows"]

SECTIONS = ("dkim_signing_config", "sender_id_config", "anti_phish_policy")
#: the columns of Get-DkimSigningConfig's short table (Format-List shows everything)
SHORT = {"dkim_signing_config": ("Enabled", "ActiveSelector", "Status")}


def _organization(data: Mapping[str, Any], config: Any, store: Any,
                  validate: Callable[[str, str], object]) -> Any:
    from hubport.core.toml_text import dumps

    source = store.url if store is not None else str(config or "hubport.toml")
    return validate(dumps(dict(data)), source)


def _folder(org: Any, server_name: str | None = None) -> Path:
    server = org.server(server_name) if server_name else org.servers[0]
    return dkim_key_folder(org, server)


# -- Get- ------------------------------------------------------------------------------


def rows(section: str, data: Mapping[str, Any], config: Any, store: Any,
         validate: Callable[[str, str], object]) -> list[dict[str, Any]]:
    """The objects of ``section`` with every property's effective value."""
    org = _organization(data, config, store, validate)
    if section == "sender_id_config":
        c = org.sender_id_config
        return [{"Enabled": c.enabled, "SpoofedDomainAction": c.spoofed_domain_action,
                 "TempErrorAction": c.temp_error_action,
                 "BypassedRecipients": list(c.bypassed_recipients),
                 "BypassedSenderDomains": list(c.bypassed_sender_domains),
                 "AuthservId": c.authserv_id or f"(each server's FQDN: "
                                                 f"{', '.join(s.fqdn for s in org.servers)})",
                 "ArcTrustedSealers": list(c.arc_trusted_sealers)}]
    if section == "anti_phish_policy":
        p = org.anti_phish_policy
        return [{"Name": p.name, "HonorDmarcPolicy": p.honor_dmarc_policy,
                 "DmarcRejectAction": p.dmarc_reject_action,
                 "DmarcQuarantineAction": p.dmarc_quarantine_action,
                 "QuarantineMailbox": p.quarantine_mailbox or f"(the postmaster:"
                                                              f" {org.postmaster})"}]
    folder = _folder(org)
    return [dkim_row(c, folder) for c in org.dkim_signing_configs]


def dkim_row(config: DkimSigningConfig, folder: Path) -> dict[str, Any]:
    """Get-DkimSigningConfig's object: the configuration, then each key: the TXT record's
    name and text to publish, when it was made, or what is wrong with it here."""
    row: dict[str, Any] = {
        "Name": config.name, "Domain": config.domain, "Enabled": config.enabled,
        "ActiveSelector": config.active_selector, "KeySize": config.key_size,
        "Ed25519Enabled": config.ed25519,
        "HeaderCanonicalization": config.header_canonicalization,
        "BodyCanonicalization": config.body_canonicalization,
    }
    problems = []
    for dns_name, status in key_status(folder, config):
        label = status.selector.replace("-ed25519", "Ed25519").replace("selector", "Selector")
        row[f"{label}RecordName"] = dns_name
        row[f"{label}Record"] = status.record or f"(no usable key: {status.problem})"
        row[f"{label}KeyCreated"] = status.created
        active = status.selector.split("-", 1)[0] == config.active_selector
        if status.problem and (active or not config.enabled):
            problems.append(f"{status.selector}: {status.problem}")
        elif status.problem:
            problems.append(f"{status.selector} (next rotation): {status.problem}")
    row["KeyFolder"] = str(folder)
    if problems:
        state = "KeyMissing" if config.enabled else "Disabled, key missing"
        row["Status"] = f"{state}: " + "; ".join(problems)
    else:
        row["Status"] = "Valid" if config.enabled else "Disabled"
    return row


# -- New-/Set-/Remove-/Rotate- ----------------------------------------------------------


@dataclass
class Plan:
    """What a DKIM cmdlet does around the organization edit ``org_cmdlets.run`` makes."""

    values: dict[str, Any]
    data: Mapping[str, Any]
    config: Any
    store: Any
    validate: Callable[[str, str], object]
    cmdlet: str
    #: the cmdlet did all its work (a key renewal changes no organization object)
    done: bool = False
    where: Any = None
    objects: list[str] = field(default_factory=list)
    revision: str = ""
    made: dict[str, list[str]] = field(default_factory=dict)
    folder: Path | None = None

    def make_keys(self, edits: Mapping[tuple[str, str], Mapping[str, Any] | None]) -> None:
        """Make the missing keys of every configuration the edits leave (both selectors)."""
        from hubport.core.config_fields import ConfigError

        merged = _apply(self.data, edits)
        try:
            org = _organization(merged, self.config, self.store, self.validate)
        except ConfigError:
            return  # the edit is refused by the same load in a moment, with its reasons
        self.folder = _folder(org)
        edited = {name.lower() for (_s, name), table in edits.items() if table is not None}
        for config in org.dkim_signing_configs:
            if config.name.lower() in edited:
                made = ensure_keys(self.folder, config, SELECTORS)
                if made:
                    self.made[config.domain] = made

    def report(self, edits: Mapping[tuple[str, str], Mapping[str, Any] | None]) -> None:
        """Say which keys were made and where, and what to publish (on stderr: stdout
        carries the cmdlet's own output, JSON with --json)."""
        for domain, selectors in self.made.items():
            print(f"{self.cmdlet}: made the DKIM keys {', '.join(selectors)} for {domain} in"
                  f" {self.folder} (mode 0600; copy them to the other hubs with hubport"
                  " export-secrets). Publish both selectors' TXT records before mail is"
                  f" signed: Get-DkimSigningConfig {domain} | Format-List", file=sys.stderr)
        for (_s, name), table in edits.items():
            if table is None and self.folder is not None:
                print(f"{self.cmdlet}: {name}'s keys stay in {self.folder / name}: delete"
                      " them once its records are withdrawn", file=sys.stderr)


def _apply(data: Mapping[str, Any], edits: Mapping[tuple[str, str], Mapping[str, Any] | None]
           ) -> dict[str, Any]:
    """``data`` with the edits of array sections applied (for loading it)."""
    from hubport.core.org_cmdlets import object_name

    merged = dict(data)
    for (section, name), table in edits.items():
        if not name:
            merged[section] = dict(table or {})
            continue
        kept = [t for t in merged.get(section, []) if object_name(t).lower() != name.lower()]
        merged[section] = kept + ([dict(table)] if table is not None else [])
    return merged


def prepare(cmdlet: str, verb: str, data: Mapping[str, Any], values: dict[str, Any],
            config: Any, store: Any, validate: Callable[[str, str], object]) -> Plan:
    """The plan of a DKIM cmdlet; Rotate- is turned into the edit of ActiveSelector, and
    Rotate- -RenewInactiveKey is done here."""
    plan = Plan(values, data, config, store, validate, cmdlet)
    if verb != "rotate":
        return plan
    from hubport.core.org_cmdlets import _name, _pop

    renew = _pop(values, "RenewInactiveKey")
    identity = _pop(values, "Identity")
    if identity is None:
        raise CmdletError(f"{cmdlet}: -Identity is required (the domain)")
    if values:
        raise CmdletError(f"{cmdlet}: takes -Identity and -RenewInactiveKey only (got"
                          f" {', '.join('-' + k for k in values)})")
    org = _organization(data, config, store, validate)
    wanted = _name(identity).lower()
    current = next((c for c in org.dkim_signing_configs if c.name.lower() == wanted), None)
    if current is None:
        raise CmdletError(f"{cmdlet}: no dkim_signing_config {_name(identity)!r}")
    folder = _folder(org)
    other = current.inactive_selector
    if renew:
        names = renew_key(folder, current, other)
        print(f"{cmdlet}: new keys for {', '.join(names)} of {current.domain} in {folder};"
              f" the old ones are gone. Publish the new records before the next rotation:",
              file=sys.stderr)
        _print_records(current, folder, other)
        plan.done = True
        plan.where = _where(config, store)
        plan.objects = [f"dkim_signing_config/{current.name}"]
        plan.revision = "key renewed (server-local, not in the organization)"
        return plan
    made = ensure_keys(folder, current, (other,))
    if made:
        _print_records(current, folder, other)
        raise CmdletError(f"{cmdlet}: {other} had no key here, so one was made now: publish"
                          " its record (above) and let it reach the resolvers, then rotate"
                          " again; signing with it before would fail at every receiver")
    plan.values = {"Identity": current.name, "ActiveSelector": other}
    print(f"{cmdlet}: {current.domain} is signed with {other} from now on;"
          f" {current.active_selector}'s key is kept (keep its record published while mail"
          " signed with it may still be checked; Rotate-DkimSigningConfig"
          f" {current.domain} -RenewInactiveKey replaces it)",
          file=sys.stderr)
    return plan


def _print_records(config: DkimSigningConfig, folder: Path, selector: str) -> None:
    for dns_name, status in key_status(folder, config):
        if status.selector.split("-", 1)[0] == selector:
            print(f"  {dns_name} TXT \"{status.record or status.problem}\"", file=sys.stderr)


def _where(config: Any, store: Any) -> Any:
    if store is not None:
        return config
    return Path(config) if config is not None else Path("hubport.toml")

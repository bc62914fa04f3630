"""Get-Command and Get-Help: every cmdlet hubport takes, its parameters, the values each
takes where they are a fixed set, and examples shaped like those of Exchange's cmdlet pages
(tests/test_cmdlet_examples.py runs every example as printed here)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from hubport.core.cmdlet_line import CmdletError, Parameter, bind, text_list, tokenize
from hubport.core.config_fields import KNOWN_CHOICES, suggest

__all__ = ["EXAMPLES", "catalogue", "get_command", "get_help", "parameters_of"]


@dataclass(frozen=True)
class Entry:
    name: str
    synopsis: str
    section: str = ""  # the organization section an object cmdlet edits


def catalogue() -> list[Entry]:
    """Every cmdlet, by name."""
    from hubport.core.cmdlets import CMDLETS
    from hubport.core.org_cmdlets import NOUNS, SECTION_VERBS, SINGLE, noun_name

    entries = [Entry(c.name, c.help) for c in CMDLETS.values()
               if c.name.split("-", 1)[1].lower() not in NOUNS]  # the object's own wins
    for noun, section in NOUNS.items():
        verbs = SECTION_VERBS.get(section) or (
            ("Get", "Set") if section in SINGLE else ("New", "Set", "Get", "Remove"))
        for verb in verbs:
            entries.append(Entry(f"{verb}-{noun_name(noun)}", _SYNOPSIS[verb].format(
                what=section.replace("_", " ")), section))
    entries += [
        Entry("Add-DistributionGroupMember", "add a recipient to a group's Members",
              "distribution_group"),
        Entry("Remove-DistributionGroupMember", "remove a recipient from a group's Members",
              "distribution_group"),
        Entry("Add-ADPermission", "grant a principal extended rights on a Receive"
              " connector", "receive_connector"),
        Entry("Remove-ADPermission", "take them back", "receive_connector"),
        Entry("Search-AdminAuditLog", "who changed what and when (the admin audit log)"),
        Entry("Get-Help", "a cmdlet's parameters and examples"),
        Entry("Get-Command", "the cmdlets, by name, verb or noun")]
    return sorted(entries, key=lambda e: (e.name.split("-", 1)[1].lower(), e.name.lower()))


_SYNOPSIS = {"New": "make a {what}", "Set": "change a {what}", "Get": "show {what} objects",
             "Remove": "remove a {what}", "Rotate": "sign with the other selector of a {what}"}


def get_command(line: str) -> str:
    """``Get-Command [name pattern] [-Verb V] [-Noun N]`` as a table."""
    bound = bind("Get-Command", tokenize(line)[1:], (
        Parameter("Name", positional=True), Parameter("Verb"), Parameter("Noun")))
    pattern, verb, noun = (bound.values[k] for k in ("Name", "Verb", "Noun"))
    rows = [e for e in catalogue()
            if (not pattern or fnmatch.fnmatch(e.name.lower(), pattern.lower()))
            and (not verb or fnmatch.fnmatch(e.name.split("-")[0].lower(), verb.lower()))
            and (not noun or fnmatch.fnmatch(e.name.split("-", 1)[1].lower(), noun.lower()))]
    if not rows:
        known = [e.name for e in catalogue()]
        raise CmdletError(f"Get-Command: no cmdlet matches{suggest(pattern or '', known)}")
    width = max(len(e.name) for e in rows)
    lines = [f"{'CommandType':<12} {'Name':<{width}} Synopsis",
             f"{'-----------':<12} {'----':<{width}} --------"]
    lines += [f"{'Cmdlet':<12} {e.name:<{width}} {e.synopsis}" for e in rows]
    return "\n".join(lines)


NO_VALUES: tuple[str, ...] = ()


def parameters_of(name: str) -> list[tuple[str, tuple[str, ...]]]:
    """A cmdlet's parameters and the values each takes when they are a fixed set."""
    from hubport.core.cmdlets import CMDLETS
    from hubport.core.org_cmdlets import ALIASES, SWITCHES, section_fields

    entry = _entry(name)
    if not entry.section:
        cmdlet = CMDLETS.get(entry.name.lower())
        if cmdlet is not None:
            return [(p.name, ("$true", "$false") if p.switch else NO_VALUES)
                    for p in cmdlet.parameters]
        if entry.name == "Search-AdminAuditLog":
            return [(p, ()) for p in ("Cmdlets", "StartDate", "EndDate", "ObjectIds",
                                      "ResultSize")]
        return [("Name", ())]
    verb = entry.name.split("-")[0]
    if entry.name.endswith("DistributionGroupMember"):
        return [("Identity", ()), ("Member", ()), ("WhatIf", ()), ("Confirm", ())]
    if entry.name.endswith("ADPermission"):
        section_fields(entry.section)  # the receive connector type declares the rights
        rights = KNOWN_CHOICES.get(entry.section, {}).get("ExtendedRights", NO_VALUES)
        return [("Identity", ()), ("User", ()), ("ExtendedRights", rights), ("WhatIf", ()),
                ("Confirm", ())]
    none = NO_VALUES
    first = [("Identity", none)] if verb != "New" else []
    if verb in ("Get", "Remove"):
        return first + ([("WhatIf", none), ("Confirm", none)] if verb == "Remove" else [])
    fields = sorted(set(section_fields(entry.section).values()), key=str.lower)
    choices = KNOWN_CHOICES.get(entry.section, {})
    extra = [(value, none) for _field, value in SWITCHES.get(entry.section, {}).values()]
    extra += [(alias, choices.get(field, none))
              for alias, field in ALIASES.get(entry.section, {}).items()]
    return [*first, *((f, choices.get(f, ())) for f in fields), *extra,
            ("WhatIf", ()), ("Confirm", ())]


def _entry(name: str) -> Entry:
    entries = {e.name.lower(): e for e in catalogue()}
    entry = entries.get(name.lower())
    if entry is None:
        raise CmdletError(f"Get-Help: {name}: not a cmdlet hubport knows"
                          f"{suggest(name, [e.name for e in entries.values()])}")
    return entry


def get_help(line: str) -> str:
    """``Get-Help [cmdlet] [-Examples] [-Detailed] [-Full] [-Parameter P]``."""
    bound = bind("Get-Help", tokenize(line)[1:], (
        Parameter("Name", positional=True), Parameter("Examples", switch=True, default=False),
        Parameter("Detailed", switch=True, default=False),
        Parameter("Full", switch=True, default=False), Parameter("Parameter", text_list)))
    v = bound.values
    if not v["Name"]:
        return ("Get-Command lists the cmdlets; Get-Help <cmdlet> shows one, with -Examples,"
                " -Detailed or -Full.\n\n" + get_command("Get-Command"))
    entry = _entry(v["Name"])
    params = parameters_of(entry.name)
    examples = EXAMPLES.get(entry.name, [])
    if v["Examples"]:
        return _examples(entry.name, examples)
    if v["Parameter"]:
        wanted = {p.lower() for p in v["Parameter"]}
        return "\n".join(_parameter(n, c) for n, c in params if n.lower() in wanted) or \
            f"{entry.name} has no parameter {', '.join(v['Parameter'])}"
    from hubport.core.org_cmdlets import SWITCHES

    switches = {"WhatIf", "Confirm", *(value for _f, value in SWITCHES.get(
        entry.section, {}).values())}
    syntax = " ".join(f"[-{n}]" if n in switches else
                      f"[-{n} <{'|'.join(c) if c else 'value'}>]" for n, c in params)
    text = [f"NAME\n    {entry.name}\n", f"SYNOPSIS\n    {entry.synopsis}\n",
            f"SYNTAX\n    {entry.name} {syntax}\n"]
    if entry.section:
        text.append(f"    The parameters are the fields of [[{entry.section}]] in the"
                    " organization file, validated as a file load validates them; $null"
                    " clears a field.\n")
    if v["Detailed"] or v["Full"]:
        text.append("PARAMETERS\n" + "\n".join(_parameter(n, c) for n, c in params) + "\n")
    if examples:
        text.append(_examples(entry.name, examples))
    return "\n".join(text)


def _parameter(name: str, choices: tuple[str, ...]) -> str:
    values = f" <{' | '.join(choices)}>" if choices else ""
    return f"    -{name}{values}"


def _examples(name: str, examples: list[tuple[str, str]]) -> str:
    if not examples:
        return f"{name}: no examples"
    blocks = [f"    -------------------------- Example {i} --------------------------\n"
              f"    {line}\n\n    {why}\n" for i, (line, why) in enumerate(examples, 1)]
    return "EXAMPLES\n" + "\n".join(blocks)


#: per cmdlet: (line, what it does); shaped like the examples on Exchange's cmdlet pages,
#: with this project's names. Each runs as printed, in this order, on the embedded default
#: organization (the queue cmdlets with the daemon running it and mail in Retry), in the
#: Exchange form and the --json form (tests/test_cmdlet_examples.py).
EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "New-DkimSigningConfig": [
        ("New-DkimSigningConfig -DomainName contoso.test -Enabled $true",
         "This example signs contoso.test's outbound mail. It makes the keys of both"
         " selectors; publish their records (Get-DkimSigningConfig) before mail leaves.")],
    "Set-DkimSigningConfig": [
        ("Set-DkimSigningConfig contoso.test -Ed25519Enabled $true",
         "This example adds an ed25519-sha256 signature beside the RSA one; its keys are"
         " made now.")],
    "Get-DkimSigningConfig": [
        ("Get-DkimSigningConfig contoso.test | Format-List",
         "This example shows the configuration and the DNS TXT records to publish.")],
    "Rotate-DkimSigningConfig": [
        ("Rotate-DkimSigningConfig contoso.test",
         "This example signs with the other selector from now on; the old key is kept."),
        ("Rotate-DkimSigningConfig contoso.test -RenewInactiveKey",
         "This example replaces the key of the selector no longer in use; publish its new"
         " record before the next rotation.")],
    "Remove-DkimSigningConfig": [
        ("Remove-DkimSigningConfig contoso.test",
         "This example stops signing contoso.test's mail (its keys stay on disk).")],
    "Set-SenderIdConfig": [
        ("Set-SenderIdConfig -Enabled $true -SpoofedDomainAction Reject"
         " -TempErrorAction StampStatus",
         "This example checks SPF, DKIM, DMARC and ARC on mail from the Internet, refuses"
         " mail that fails SPF or spoofs one of the organization's domains, and stamps"
         " the results when DNS fails.")],
    "Get-SenderIdConfig": [
        ("Get-SenderIdConfig", "This example shows the checks' settings.")],
    "Set-AntiPhishPolicy": [
        ("Set-AntiPhishPolicy -Identity Default -HonorDmarcPolicy $true -DmarcRejectAction"
         " Reject -DmarcQuarantineAction Quarantine",
         "This example refuses mail whose sender domain's DMARC policy is reject and"
         " quarantines mail whose policy is quarantine.")],
    "Get-AntiPhishPolicy": [
        ("Get-AntiPhishPolicy Default | Format-List",
         "This example shows the Default anti-phishing policy.")],
    "New-AcceptedDomain": [
        ("New-AcceptedDomain -DomainName tailspin.example -DomainType Authoritative"
         " -Name Tailspin", "This example makes tailspin.example an authoritative domain.")],
    "Set-AcceptedDomain": [
        ("Set-AcceptedDomain -Identity Tailspin -DomainType InternalRelay",
         "This example relays mail for tailspin.example recipients hubport does not know.")],
    "Get-AcceptedDomain": [
        ("Get-AcceptedDomain | Format-Table Name,DomainName,DomainType,Default",
         "This example lists the accepted domains.")],
    "New-Mailbox": [
        ("New-Mailbox -Name 'Chris Ashton' -Alias chris", "This example makes a mailbox;"
         " its address is chris@ the default accepted domain.")],
    "Set-Mailbox": [
        ("Set-Mailbox 'Chris Ashton' -PrimarySmtpAddress chris.ashton@contoso.test",
         "This example changes the mailbox's primary address.")],
    "Get-Mailbox": [
        ("Get-Mailbox | Format-Table Name,Alias,PrimarySmtpAddress",
         "This example lists the mailboxes.")],
    "New-MailContact": [
        ("New-MailContact -Name 'Kim Akers' -ExternalEmailAddress kim@fabrikam.example",
         "This example makes a mail contact for an address outside the organization.")],
    "Set-MailContact": [
        ("Set-MailContact 'Kim Akers' -ExternalEmailAddress kim.akers@fabrikam.example",
         "This example changes where the contact's mail goes.")],
    "Get-MailContact": [
        ("Get-MailContact 'Kim Akers' | Format-List", "This example shows the contact.")],
    "New-DistributionGroup": [
        ("New-DistributionGroup -Name Managers -Members alice,chris",
         "This example makes a group with two members.")],
    "Set-DistributionGroup": [
        ("Set-DistributionGroup Managers -PrimarySmtpAddress managers@contoso.test",
         "This example gives the group its address.")],
    "Add-DistributionGroupMember": [
        ("Add-DistributionGroupMember -Identity Managers -Member bob@contoso.test",
         "This example adds Bob to the group Managers.")],
    "Remove-DistributionGroupMember": [
        ("Remove-DistributionGroupMember -Identity Managers -Member Bob -Confirm:$false",
         "This example removes Bob again (by name this time: it is the same recipient).")],
    "Get-DistributionGroup": [
        ("Get-DistributionGroup Managers | Select-Object -ExpandProperty Members",
         "This example lists the group's members.")],
    "New-SendConnector": [
        ("New-SendConnector -Internet -Name MySendConnector -AddressSpaces"
         " contoso.example,fabrikam.example -SourceTransportServers HUB01",
         "This example makes a Send connector for two domains, delivering by DNS MX."),
        ("New-SendConnector -Name 'To Smart Host' -Usage Custom -AddressSpaces 'SMTP:*;10'"
         " -DNSRoutingEnabled $false -SmartHosts '[127.0.0.1]' -Port 2526"
         " -SmartHostAuthMechanism None -SourceTransportServers HUB01",
         "This example sends everything else through a smart host, at cost 10.")],
    "Set-SendConnector": [
        ("Set-SendConnector MySendConnector -MaxMessageSize 10MB"
         " -ConnectionInactivityTimeOut 00:15:00",
         "This example limits the size of messages and how long an idle connection lasts.")],
    "Get-SendConnector": [
        ("Get-SendConnector | Where-Object {$_.Name -like 'My*'} | Format-List",
         "This example shows every setting of the connectors whose name starts with My.")],
    "New-ReceiveConnector": [
        ("New-ReceiveConnector -Name 'Contoso.com Receive Connector' -Usage Custom"
         " -Bindings 127.0.0.1:2626 -RemoteIPRanges 127.0.0.2-127.0.0.24 -Server HUB01",
         "This example listens on port 2626 for the hosts 127.0.0.2 to 127.0.0.24.")],
    "Set-ReceiveConnector": [
        ("Set-ReceiveConnector 'HUB01\\Contoso.com Receive Connector'"
         " -Banner '220 SMTP OK' -ConnectionTimeout 00:15:00",
         "This example changes the banner and the connection time-out.")],
    "Add-ADPermission": [
        ("Add-ADPermission -Identity 'Contoso.com Receive Connector' -User 'NT AUTHORITY\\"
         "ANONYMOUS LOGON' -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient",
         "This example lets the hosts of the connector relay, as an application server"
         " needs (docs/scenarios.md).")],
    "Remove-ADPermission": [
        ("Remove-ADPermission -Identity 'Contoso.com Receive Connector' -User 'NT AUTHORITY\\"
         "ANONYMOUS LOGON' -ExtendedRights ms-Exch-SMTP-Accept-Any-Recipient -Confirm:$false",
         "This example takes the right back.")],
    "Get-ReceiveConnector": [
        ("Get-ReceiveConnector | Select-Object Name,Bindings,RemoteIPRanges",
         "This example lists the Receive connectors and who may use each.")],
    "New-ForeignConnector": [
        ("New-ForeignConnector -Name 'Contoso Foreign Connector' -AddressSpaces"
         " 'X400:c=US;a=Fabrikam;P=Contoso;5' -SourceTransportServers HUB01",
         "This example sends X.400 addresses to a foreign system's drop folder.")],
    "Set-ForeignConnector": [
        ("Set-ForeignConnector 'Contoso Foreign Connector' -MaxMessageSize 10MB"
         " -DropDirectory Contoso", "This example sets the size limit and the drop folder.")],
    "Get-ForeignConnector": [
        ("Get-ForeignConnector | Format-Table Name,AddressSpaces,DropDirectory",
         "This example lists the Foreign connectors.")],
    "New-DeliveryAgentConnector": [
        ("New-DeliveryAgentConnector -Name 'Contoso Archive' -AddressSpaces"
         " 'SMTP:archive.contoso.test;1' -DeliveryProtocol COMMAND -Command"
         " 'tee,-a,archive.eml' -SourceTransportServers HUB01",
         "This example hands mail for archive.contoso.test to a command (a delivery"
         " agent).")],
    "Set-DeliveryAgentConnector": [
        ("Set-DeliveryAgentConnector 'Contoso Archive' -MaxMessageSize 25MB",
         "This example raises the connector's size limit.")],
    "Get-DeliveryAgentConnector": [
        ("Get-DeliveryAgentConnector | Format-List",
         "This example shows the Delivery Agent connectors.")],
    "New-AdSite": [
        ("New-AdSite -Name Paris", "This example adds a site (its hubs come later).")],
    "New-AdSiteLink": [
        ("New-AdSiteLink -Name Default-Paris -Sites Default-First-Site-Name,Paris -Cost 10",
         "This example links the sites at cost 10.")],
    "Set-AdSiteLink": [
        ("Set-AdSiteLink -Identity Default-Paris -ExchangeCost 20 -MaxMessageSize 10MB",
         "This example makes Exchange routing use cost 20 on the link and caps its size.")],
    "Get-AdSiteLink": [
        ("Get-AdSiteLink | Format-List", "This example shows the site links.")],
    "Set-AdSite": [
        ("Set-AdSite -Identity Paris -HubSiteEnabled $true",
         "This example makes Paris a hub site: mail between sites goes through it.")],
    "Get-AdSite": [
        ("Get-AdSite | Format-Table Name,HubSiteEnabled", "This example lists the sites.")],
    "New-TransportServer": [
        ("New-TransportServer -Name HUB02 -Site Paris -Fqdn hub02.contoso.test",
         "This example adds a hub in Paris (hubport's own: Exchange adds a server by"
         " installing it).")],
    "Set-TransportServer": [
        ("Set-TransportServer HUB01 -MessageExpirationTimeout 4.00:00:00"
         " -MessageRetryInterval 00:05:00",
         "This example keeps mail four days and retries every five minutes.")],
    "Get-TransportServer": [
        ("Get-TransportServer | Format-Table Name,Site,Fqdn", "This example lists the hubs.")],
    "New-RoutingGroup": [
        ("New-RoutingGroup -Name 'First Routing Group' -Servers @{Name='EX2003BH1';"
         " Address='127.0.0.2'; Port=2525}, @{Name='EX2003BH2'; Address='127.0.0.3';"
         " Port=2525}", "This example declares a legacy routing group of two servers"
                        " (hubport's own: Exchange 2003 made them).")],
    "Set-RoutingGroup": [
        ("Set-RoutingGroup 'First Routing Group' -Servers @{Name='EX2003BH1';"
         " Address='127.0.0.2'; Port=25}, @{Name='EX2003BH2'; Address='127.0.0.3'; Port=25}",
         "This example moves both servers to port 25.")],
    "Get-RoutingGroup": [
        ("Get-RoutingGroup | Format-List", "This example shows the legacy routing groups.")],
    "New-RoutingGroupConnector": [
        ("New-RoutingGroupConnector -Name 'Interop RGC' -SourceTransportServers HUB01"
         " -TargetTransportServers EX2003BH1,EX2003BH2 -Cost 100 -Bidirectional $true",
         "This example connects the organization to the legacy group, both ways.")],
    "Set-RoutingGroupConnector": [
        ("Set-RoutingGroupConnector 'Interop RGC' -Cost 50",
         "This example lowers the connector's cost.")],
    "Get-RoutingGroupConnector": [
        ("Get-RoutingGroupConnector | Format-List", "This example shows both connectors.")],
    "Set-TransportConfig": [
        ("Set-TransportConfig -MaxReceiveSize 10MB -MaxSendSize 10MB",
         "This example sets the organization's message size limits.")],
    "Get-TransportConfig": [
        ("Get-TransportConfig | Format-List", "This example shows the transport settings.")],
    "Get-Queue": [
        ("Get-Queue -Server HUB01 -Filter {MessageCount -gt 0}",
         "This example lists the queues that hold mail."),
        ("Get-Queue | Where-Object {$_.Status -eq 'Retry'} | Format-Table"
         " Identity,NextHopDomain,LastError", "This example shows why queues are retrying.")],
    "Retry-Queue": [
        ("Retry-Queue -Filter {Status -eq 'Retry'}",
         "This example makes every queue in Retry try again now.")],
    "Suspend-Queue": [
        ("Suspend-Queue -Filter {NextHopDomain -eq 'example.net'}",
         "This example stops delivery to example.net.")],
    "Resume-Queue": [
        ("Resume-Queue -Filter {Status -eq 'Suspended'}",
         "This example resumes every suspended queue.")],
    "Get-Message": [
        ("Get-Message -Filter {FromAddress -like '*@contoso.test'} | Format-List",
         "This example shows the queued messages from contoso.test senders.")],
    "Suspend-Message": [
        ("Get-Message -Filter {Subject -eq 'Quarterly report'} | Suspend-Message",
         "This example holds the messages with that subject.")],
    "Export-Message": [
        ("Get-Message -Filter {Status -eq 'Suspended'} | Export-Message -Path held.eml",
         "This example writes a suspended message as a Replay file.")],
    "Resume-Message": [
        ("Resume-Message -Filter {Subject -eq 'Quarterly report'}",
         "This example releases them.")],
    "Remove-Message": [
        ("Remove-Message -Filter {FromAddress -eq 'alice@contoso.test'} -WithNDR $false"
         " -Confirm:$false", "This example removes Alice's queued messages without NDRs.")],
    "Get-MessageTrackingLog": [
        ("Get-MessageTrackingLog -Server HUB01 -Start '01/01/2026 09:00:00'"
         " -Sender alice@contoso.test", "This example lists what happened to Alice's mail."),
        ("Get-MessageTrackingLog -EventId RECEIVE -ResultSize Unlimited | Select-Object"
         " Timestamp,Source,Sender,Recipients", "This example lists every message received.")],
    "Test-Route": [
        ("Test-Route -Recipient someone@fabrikam.example -Server HUB01",
         "This example shows which connector takes mail for fabrikam.example, and why.")],
    "Search-AdminAuditLog": [
        ("Search-AdminAuditLog -Cmdlets New-SendConnector,Set-SendConnector"
         " -StartDate 01/01/2026", "This example lists the changes made to Send connectors.")],
    "Get-Help": [
        ("Get-Help New-SendConnector -Parameter Usage,SmartHostAuthMechanism",
         "This example shows two parameters and the values they take.")],
    "Get-Command": [
        ("Get-Command -Noun *Connector -Verb New", "This example lists the cmdlets that"
         " make connectors.")],
    # and, in the reverse order, everything the examples made
    "Remove-RoutingGroupConnector": [
        ("Remove-RoutingGroupConnector 'Interop RGC' -Confirm:$false",
         "This example removes the connector (and its reciprocal).")],
    "Remove-RoutingGroup": [
        ("Remove-RoutingGroup 'First Routing Group'", "This example forgets the legacy"
         " routing group.")],
    "Remove-TransportServer": [
        ("Remove-TransportServer HUB02 -Confirm:$false", "This example removes the hub.")],
    "Remove-AdSiteLink": [
        ("Remove-AdSiteLink Default-Paris", "This example removes the site link.")],
    "Remove-AdSite": [("Remove-AdSite Paris", "This example removes the site.")],
    "Remove-DeliveryAgentConnector": [
        ("Remove-DeliveryAgentConnector 'Contoso Archive' -Confirm:$false",
         "This example removes the connector.")],
    "Remove-ForeignConnector": [
        ("Remove-ForeignConnector 'Contoso Foreign Connector' -Confirm:$false",
         "This example removes the connector; files already in its drop folder stay.")],
    "Remove-ReceiveConnector": [
        ("Remove-ReceiveConnector 'HUB01\\Contoso.com Receive Connector' -Confirm:$false",
         "This example stops listening on port 2626; sessions in progress finish.")],
    "Remove-SendConnector": [
        ("Remove-SendConnector MySendConnector -Confirm:$false",
         "This example removes the connector.")],
    "Remove-DistributionGroup": [
        ("Remove-DistributionGroup Managers -Confirm:$false", "This example removes the"
         " group.")],
    "Remove-MailContact": [
        ("Remove-MailContact 'Kim Akers' -Confirm:$false", "This example removes the"
         " contact.")],
    "Remove-Mailbox": [
        ("Remove-Mailbox 'Chris Ashton' -Confirm:$false", "This example removes the"
         " mailbox from the organization; its folder under var/mailboxes stays.")],
    "Remove-AcceptedDomain": [
        ("Remove-AcceptedDomain Tailspin -Confirm:$false",
         "This example stops accepting mail for tailspin.example.")],
}

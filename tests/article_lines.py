"""Every cmdlet line of the article hubport is built from (../shared/seed), as printed, in
its order, with this project's names where the article left a value empty: the lines the
management shell must run, or refuse naming the fix (tests/test_org_cmdlets.py,
tests/test_scenario_shell.py)."""

ARTICLE = [  # every cmdlet line of the article as printed, in its order, with our names
    # where it left a value empty; (line, None) runs, (line, text) fails naming the fix.
    # Lines marked "ours" are the setup the article assumes but does not print.
    ("Set-TransportServer HUB01 -ExternalDnsServer 127.0.0.53,127.0.0.54", None),
    ("New-SendConnector -Name ‘To Internet’ -Usage ‘Custom’ -AddressSpaces ‘SMTP:*;1’"
     " -IsScopedConnector $false -DNSRoutingEnabled $false -SmartHosts"
     " ‘[127.0.0.1]’,'[127.0.0.2]’ -SmartHostAuthMechanism ‘None’"
     " -UseExternalDNSServersEnabled $false -SourceTransportServers ‘HUB01’", None),
    ("Set-Sendconnector -Name ‘To Internet’ -MaxMessageSize 20 MB"
     " -smtpmaxmessageperconnection 25", "write 20MB (no space)"),
    ("Set-Sendconnector -Name ‘To Internet’ -MaxMessageSize 20MB", "-Identity 'To Internet'"),
    ("Set-Sendconnector -Identity ‘To Internet’ -MaxMessageSize 20MB"
     " -smtpmaxmessageperconnection 25", 'did you mean "SmtpMaxMessagesPerConnection"'),
    ("Get-senderconnector -name « To Internet » |format-List", 'did you mean "Get-SendConnector"'),
    ("Get-Sendconnector -identity « To Internet » |format-List", None),
    ("New-Receiveconnector -Name ‘From App’ -usage ‘Custom’ -Bindings ‘127.0.0.1:2626’"
     " -fqdn ‘hub01.contoso.test’ -remoteIPrantes ‘127.0.0.1’ -Server ‘HUB01’",
     'did you mean "RemoteIPRanges"'),
    ("New-Receiveconnector -Name ‘From App’ -usage ‘Custom’ -Bindings ‘127.0.0.1:2626’"
     " -fqdn ‘hub01.contoso.test’ -remoteIPranges ‘127.0.0.1’ -Server ‘HUB01’", None),
    ("Set-ReceiveConnector -Identity « HUB01\\From App » -Banner « 220 Banner Text here »"
     " -ConnectionTimeout 00:15:00", None),
    ("New-Foreignconnector -identity « ForeignConnector » -AddressSpaces « fax:* »"
     " -SourceTransportServers « HUB01 », « HUB01 »", "-Name 'ForeignConnector'"),
    ("New-Foreignconnector -name « foreignconnector » -addressspace fax:*"
     " -sourcetransportserver HUB01", None),  # parameters shortened to a unique prefix
    ("Set-Foreignconnector -Identity « Foreignconnector » -Maxmessagesize 10MB"
     " -dropdirectory C:\\DropDirectory", "must name a folder inside the server's"
     " RootDropDirectoryPath"),
    ("Set-Foreignconnector -Identity « Foreignconnector » -Maxmessagesize 10MB"
     " -dropdirectory DropDirectory", None),
    ("New-ReceiveConnector -Name Receiveconnector:25 -Usage Custom -Bindings 127.0.0.1:2725"
     " -RemoteIPRanges 127.0.0.0/8 -Server HUB01", None),  # ours: the article's port 25
    ("New-SendConnector -Name \"Sendconnector:26\" -LinkedReceiveConnector"
     " \"HUB01\\Receiveconnector:25\" -SmartHosts antispam  -SmartHostAuthMechanism"
     " Externalauthoratative -DNSRoutingEnabled $False -MaxMessageSize unlimited",
     'did you mean "ExternalAuthoritative"'),
    ("New-SendConnector -Name \"Sendconnector:26\" -LinkedReceiveConnector"
     " \"HUB01\\Receiveconnector:25\" -SmartHosts antispam  -SmartHostAuthMechanism"
     " ExternalAuthoritative -DNSRoutingEnabled $False -MaxMessageSize unlimited", None),
    ("New-Receiveconnector -name « Receiveconnector:27 » -AuthMechanism externalAuthoritative"
     " -RemoteIPRanges antispam", "Bindings: required"),
    ("New-Receiveconnector -name « Receiveconnector:27 » -AuthMechanism externalAuthoritative"
     " -RemoteIPRanges 127.0.0.9 -Bindings 127.0.0.1:2727 -PermissionGroups ExchangeServers"
     " -Server HUB01", None),
    ("New-RoutingGroup -Name 'First Routing Group' -Servers @{Name='EX2003BH1';"
     " Address='127.0.0.2'; Port=2525}, @{Name='EX2003BH2'; Address='127.0.0.3';"
     " Port=2525}", None),  # ours: Exchange 2003 made the legacy group
    ("New-RoutingGroupConnector -Name \"RGCBidirection\" -SourceTransportServers \"\""
     " -TargetTransportServers \"\" -Cost 100 -Bidirectional $true",
     "is no server of a [[routing_group]] (legacy servers: EX2003BH1, EX2003BH2)"),  # as printed, with its values left empty
    ("New-RoutingGroupConnector -Name \"RGCBidirection\" -SourceTransportServers \"HUB01\""
     " -TargetTransportServers \"EX2003BH1\" -Cost 100 -Bidirectional $true", None),
    ("set-RoutingGroupConnector -Identity « RGCBidirection » -SourceTransportServers"
     " “HUB01”, “HUB01” -TargetTransportServers  »EX2003BH1”,” EX2003BH2»", None),
    ("Get-Routinggroupconnector -identity « RGCBidirection » | format-list", None),
]

#!/usr/bin/perl
# An independent DKIM and ARC verifier for the tests: Perl's Mail::DKIM (Debian's
# libmail-dkim-perl), asking the DNS server on 127.0.0.1:<port> (dnsmasq in the tests).
# Usage: dkim_verify.pl PORT dkim|arc < message
# Prints one line per DKIM signature ("<result> d=<domain> s=<selector> a=<algorithm>")
# and a last line "result=<overall>"; for arc, "result=<chain validation status>".
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::ARC::Verifier;
use Net::DNS::Resolver;

my ($port, $kind) = @ARGV;
my $resolver = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port,
                                       recurse => 1, udp_timeout => 5, tcp_timeout => 5);
Mail::DKIM::DNS::resolver($resolver);
my $verifier = $kind eq 'arc' ? Mail::DKIM::ARC::Verifier->new() : Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $verifier->PRINT($line);
}
$verifier->CLOSE;
if ($kind ne 'arc') {
    foreach my $signature ($verifier->signatures) {
        printf "%s d=%s s=%s a=%s\n", $signature->result_detail, $signature->domain,
            $signature->selector, $signature->algorithm;
    }
}
printf "result=%s\n", $verifier->result;

#!/usr/bin/perl
# ARC-seals a message as an independent forwarder would (Perl's Mail::DKIM): the message on
# stdin must carry the forwarder's Authentication-Results at the top.
# Usage: arc_seal.pl KEYFILE DOMAIN SELECTOR SRVID < message; prints the ARC set to prepend.
use strict;
use warnings;
use Mail::DKIM::ARC::Signer;

my ($keyfile, $domain, $selector, $srvid) = @ARGV;
my $signer = Mail::DKIM::ARC::Signer->new(
    Algorithm => 'rsa-sha256', Chain => 'ar', SrvId => $srvid, Domain => $domain,
    Selector => $selector, KeyFile => $keyfile, Headers => 'from:to:subject:date');
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $signer->PRINT($line);
}
$signer->CLOSE;
die "not sealed: $signer->{result} $signer->{details}\n" unless $signer->as_string;
print $signer->as_string;

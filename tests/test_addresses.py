"""Tests for hubport.core.addresses: SMTP address syntax, IMCEA, proxy addresses."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubport.core.addresses import (
    AddressError,
    check_hostname,
    domain_of,
    domain_to_ascii,
    imcea_decode,
    imcea_encode,
    normalize_address,
    parse_proxy_address,
    split_address,
)

PROPERTY = settings(derandomize=True, deadline=None, max_examples=200)

# ---------------------------------------------------------------------------------------------
# strategies

ATEXT = string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~"
QTEXT = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')

labels = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,8}[A-Za-z0-9])?", fullmatch=True)
tlds = st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,5}", fullmatch=True)
hostnames = st.builds(
    lambda parts, tld: ".".join([*parts, tld]), st.lists(labels, max_size=4), tlds
)
literals = st.one_of(
    st.ip_addresses(v=4).map(lambda ip: f"[{ip}]"),
    st.ip_addresses(v=6).map(lambda ip: f"[IPv6:{ip.exploded.upper()}]"),
)
dot_strings = st.lists(
    st.text(ATEXT, min_size=1, max_size=8), min_size=1, max_size=3
).map(".".join)
quoted = st.lists(
    st.one_of(
        st.sampled_from(QTEXT), st.sampled_from(string.printable[:94]).map("\\".__add__)
    ),
    max_size=10,
).map(lambda chars: '"' + "".join(chars) + '"')
local_parts = st.one_of(dot_strings, quoted.filter(lambda q: q != '""'))
mailboxes = st.builds(
    lambda lp, d: f"{lp}@{d}", local_parts, st.one_of(hostnames, literals)
)


@st.composite
def envelope_texts(draw: st.DrawFn) -> str:
    """Valid mailboxes in the wrappers an SMTP client may use: <>, source route, spaces."""
    mailbox = draw(mailboxes)
    if draw(st.booleans()):
        route = ",".join(
            "@" + d for d in draw(st.lists(hostnames, min_size=1, max_size=2))
        )
        mailbox = f"{route}:{mailbox}"
        bracket = True
    else:
        bracket = draw(st.booleans())
    text = f"<{mailbox}>" if bracket else mailbox
    pad = draw(st.sampled_from(["", " ", "\t", "  "]))
    return pad + text + pad


# Arbitrary text, plus text built from the characters that matter to the parser.
noisy = st.one_of(
    st.text(),
    st.lists(
        st.sampled_from(list('a@."\\<>[]:,-_ \r\n\x00é1ü') + ["IPv6:", "xn--"])
    ).map("".join),
    envelope_texts(),
    envelope_texts().map(lambda t: t + "@x"),
)


# ---------------------------------------------------------------------------------------------
# normalize_address: accepted forms


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alice@contoso.test", "alice@contoso.test"),
        ("<alice@contoso.test>", "alice@contoso.test"),
        ("  <Alice@Contoso.TEST>\t", "Alice@contoso.test"),  # local part keeps its case
        ("<@relay1.test,@relay2.test:bob@fabrikam.test>", "bob@fabrikam.test"),
        ('"a b"@X.test', '"a b"@x.test'),
        ('"a\\"b"@x.test', '"a\\"b"@x.test'),
        ("postmaster@localhost", "postmaster@localhost"),  # single label allowed
        ("a+tag@sub-1.example", "a+tag@sub-1.example"),
        ("x@[IPv6:2001:DB8:0:0::1]", "x@[IPv6:2001:db8::1]"),
        ("x@[ipv6:::1]", "x@[IPv6:::1]"),
    ],
)
def test_normalize_accepts(text: str, expected: str) -> None:
    assert normalize_address(text) == expected


# docs/reliability.md cases 37–43
def test_e37_percent_hack_is_an_ordinary_local_part() -> None:
    address = normalize_address("<x%external.example@our.domain>")
    assert split_address(address) == ("x%external.example", "our.domain")


def test_e38_source_route_is_dropped() -> None:
    assert normalize_address("<@our.domain:x@external.example>") == "x@external.example"


def test_e39_quoted_at_sign_stays_in_the_local_part() -> None:
    address = normalize_address('<"x@external.example"@our.domain>')
    assert address == '"x@external.example"@our.domain'
    assert domain_of(address) == "our.domain"


def test_e40_bang_path_is_opaque() -> None:
    address = normalize_address("<external.example!x@our.domain>")
    assert split_address(address) == ("external.example!x", "our.domain")


def test_e41_two_at_signs_rejected() -> None:
    with pytest.raises(AddressError, match="more than one @"):
        normalize_address("<x@external.example@our.domain>")


def test_e42_ipv4_literal_is_valid() -> None:
    assert normalize_address("<x@[192.0.2.9]>") == "x@[192.0.2.9]"
    assert domain_of("x@[192.0.2.9]") == "[192.0.2.9]"


def test_e43_control_character_inside_quotes_rejected() -> None:
    with pytest.raises(AddressError, match="control character"):
        normalize_address('<"a\rb"@example.com>')


# ---------------------------------------------------------------------------------------------
# normalize_address: rejections, one per rule


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a@b.test\r\n", "control character"),
        ("a\x00@b.test", "control character"),
        ("a\x7f@b.test", "control character"),
        ("x@a@b", "more than one @"),
        ("alice", "missing @"),
        ('"alice"', "missing @"),
        ("@contoso.test", "empty local part"),
        ('""@contoso.test', "empty local part"),
        ("alice@", "empty domain"),
        ("<alice@contoso.test", "unbalanced angle brackets"),
        ("alice@contoso.test>", "unbalanced angle brackets"),
        ("a<b@contoso.test", "angle bracket"),
        ("a b@contoso.test", "invalid character"),
        ('a"b"@contoso.test', "invalid character"),
        ('"ab"c@contoso.test', "after quoted local part"),
        ('"ab@contoso.test', "unterminated quoted"),
        ("<@bad_route:a@b.test>", "source route"),
        ("<@a.test,b.test:a@b.test>", "source route"),
        ("<@a.test:>", "without a mailbox"),
        ("a@-contoso.test", "hyphen"),
        ("a@contoso-.test", "hyphen"),
        ("a@contoso..test", "empty domain label"),
        ("a@contoso.test.", "empty domain label"),
        ("a@con_toso.test", "invalid character in domain"),
        ("a@" + "l" * 64 + ".test", "domain label too long"),
        ("a@" + ".".join(["abcdefghi"] * 26), "domain too long"),
        ("l" * 316 + "@contoso.test", "local part too long"),
        ("a@192.0.2.9", "all-numeric"),
        ("a@[192.0.2.256]", "invalid IPv4"),
        ("a@[IPv6:::g]", "invalid IPv6"),
        ("a@[IPv6:fe80::1%eth0]", "scoped"),
        ("a@[foo:bar]", "unsupported address literal"),
        ("a@[192.0.2.9", "unterminated address literal"),
        ("jörg@contoso.test", "requires SMTPUTF8"),
        ("a@bücher.test", "requires SMTPUTF8"),
    ],
)
def test_normalize_rejects(text: str, reason: str) -> None:
    with pytest.raises(AddressError, match=reason):
        normalize_address(text)


def test_length_limits_are_exchange_maxima() -> None:
    local = "l" * 315
    domain = ".".join(["d" * 63] * 3 + ["t" * 63])  # 255 characters
    address = normalize_address(f"{local}@{domain}")
    assert len(address) == 571


def test_null_sender_only_when_allowed() -> None:
    assert normalize_address("<>", allow_null=True) == ""
    assert normalize_address("", allow_null=True) == ""
    assert normalize_address(" <> ", allow_null=True) == ""
    for text in ("<>", ""):
        with pytest.raises(AddressError, match="null"):
            normalize_address(text)


def test_smtputf8_allows_utf8_local_part_and_idn_domain() -> None:
    assert normalize_address("jörg@Bücher.TEST", smtputf8=True) == "jörg@bücher.test"
    assert domain_to_ascii("bücher.test") == "xn--bcher-kva.test"


def test_smtputf8_still_rejects_unicode_separators_and_surrogates() -> None:
    for text in ("a\u2028b@x.test", "a\udcffb@x.test", "a\u00a0b@x.test"):
        with pytest.raises(AddressError):
            normalize_address(text, smtputf8=True)


def test_split_address_uses_last_at() -> None:
    assert split_address('"a@b"@c.test') == ('"a@b"', "c.test")
    assert domain_of("a@c.test") == "c.test"
    with pytest.raises(AddressError):
        split_address("no-at-sign")


def test_check_hostname() -> None:
    assert check_hostname("Mail.Contoso.TEST") == "mail.contoso.test"
    with pytest.raises(AddressError):
        check_hostname("a..b")


# ---------------------------------------------------------------------------------------------
# IMCEA


def test_imcea_encode_rules() -> None:
    encoded = imcea_encode("fax", "+1 555/12_3@x", "Contoso.test")
    assert encoded == "IMCEAFAX-+2B1+20555_12+5F3+40x@contoso.test"
    assert imcea_encode("EX", "é", "x.test") == "IMCEAEX-+C3+A9@x.test"
    assert imcea_encode("X", "a.b!#$%&'*-=?^`{|}~Z9", "x.test") == (
        "IMCEAX-a.b!#$%&'*-=?^`{|}~Z9@x.test"
    )


def test_imcea_decode_examples() -> None:
    assert imcea_decode("IMCEAFAX-+15551234@contoso.test") == ("FAX", "+15551234")
    assert imcea_decode("IMCEAFAX-+2B15551234@x") == ("FAX", "+15551234")
    assert imcea_decode("imceafax-+2b1@x") == ("FAX", "+1")
    assert imcea_decode("IMCEAEX-_o=Org_ou=Admin@x") == ("EX", "/o=Org/ou=Admin")
    # the escape of a control byte stays literal
    assert imcea_decode("IMCEAX-a+0Db@x") == ("X", "a+0Db")
    assert imcea_decode("IMCEAX-+ZZ+4@x") == ("X", "+ZZ+4")


@pytest.mark.parametrize(
    "address",
    ["alice@contoso.test", "IMCEA-x@y", "IMCEAFAX@y", "IMCEAF.X-1@y", "IMCEAFAX-1", ""],
)
def test_imcea_decode_not_imcea(address: str) -> None:
    assert imcea_decode(address) is None


def test_imcea_decode_refuses_invalid_utf8() -> None:
    assert imcea_decode("IMCEAX-+C3@x") is None


def test_imcea_encode_rejects_bad_input() -> None:
    with pytest.raises(AddressError, match="control character"):
        imcea_encode("FAX", "a\r\nb", "x.test")
    with pytest.raises(AddressError, match="type"):
        imcea_encode("FA-X", "1", "x.test")
    with pytest.raises(AddressError):
        imcea_encode("FAX", "1", "bad..domain")


# ---------------------------------------------------------------------------------------------
# proxy addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SMTP:Alice@Contoso.test", ("SMTP", "Alice@contoso.test", True)),
        ("smtp:alias@contoso.test", ("SMTP", "alias@contoso.test", False)),
        (
            "X400:c=US;a= ;p=Contoso;o=Sales;s=Smith;",
            ("X400", "c=US;a= ;p=Contoso;o=Sales;s=Smith;", True),
        ),
        ("fax:+15551234", ("FAX", "+15551234", False)),
        ("FAX:+15551234", ("FAX", "+15551234", True)),
        ("bob@Fabrikam.test", ("SMTP", "bob@fabrikam.test", False)),
    ],
)
def test_parse_proxy_address(text: str, expected: tuple[str, str, bool]) -> None:
    assert parse_proxy_address(text) == expected


@pytest.mark.parametrize(
    "text", ["SMTP:not-an-address", "FAX:", "X400:c=US\n", "SMTP:a@b@c"]
)
def test_parse_proxy_address_rejects(text: str) -> None:
    with pytest.raises(AddressError):
        parse_proxy_address(text)


# ---------------------------------------------------------------------------------------------
# properties


@PROPERTY
@given(noisy, st.booleans(), st.booleans())
def test_normalize_raises_only_address_error(text: str, utf8: bool, null: bool) -> None:
    try:
        result = normalize_address(text, smtputf8=utf8, allow_null=null)
    except AddressError:
        return
    assert isinstance(result, str)
    assert not any(ch < " " or ch == "\x7f" for ch in result)


@PROPERTY
@given(noisy, st.booleans())
def test_normalize_is_idempotent(text: str, utf8: bool) -> None:
    try:
        once = normalize_address(text, smtputf8=utf8)
    except AddressError:
        return
    assert normalize_address(once, smtputf8=utf8) == once


@PROPERTY
@given(envelope_texts())
def test_valid_addresses_are_accepted(text: str) -> None:
    result = normalize_address(text)
    local, domain = split_address(result)
    assert local in text  # the local part is kept exactly as given
    assert domain == domain.lower() or domain.startswith("[IPv6:")


@PROPERTY
@given(
    st.from_regex(r"[A-Za-z0-9]{1,8}", fullmatch=True), st.text(max_size=40), hostnames
)
def test_imcea_round_trip(addr_type: str, address: str, domain: str) -> None:
    if any(ch < " " or ch == "\x7f" or 0xD800 <= ord(ch) <= 0xDFFF for ch in address):
        with pytest.raises(AddressError):
            imcea_encode(addr_type, address, domain)
        return
    encoded = imcea_encode(addr_type, address, domain)
    assert imcea_decode(encoded) == (addr_type.upper(), address)
    # and the encapsulated form is itself a valid, already-normalized SMTP address
    assert normalize_address(encoded) == encoded


@PROPERTY
@given(noisy)
def test_imcea_decode_and_proxy_parse_never_crash(text: str) -> None:
    decoded = imcea_decode(text)
    assert decoded is None or isinstance(decoded[1], str)
    try:
        parse_proxy_address(text)
    except AddressError:
        pass

"""Tests for hubport.core.address_space: `[Type:]Space[;Cost]` syntax and most-specific matching."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubport.core.address_space import AddressSpace, AddressSpaceError, best_matches

PROPERTY = settings(derandomize=True, deadline=None, max_examples=200)

# ---------------------------------------------------------------------------------------------
# strategies

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
tlds = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)
domains = st.builds(
    lambda parts, tld: ".".join([*parts, tld]), st.lists(labels, max_size=3), tlds
)
local_parts = st.from_regex(r"[a-z0-9.+_-]{1,10}", fullmatch=True)
costs = st.integers(min_value=1, max_value=100)

smtp_spaces = st.one_of(
    st.just("*"), domains, domains.map(lambda d: "*." + d), domains.map(str.upper)
)
x400_values = st.text(
    st.characters(codec="ascii", exclude_characters=";\x7f"), max_size=6
).filter(lambda v: all(ch >= " " for ch in v))
x400_spaces = st.lists(
    st.tuples(
        st.sampled_from(["c", "a", "p", "o", "ou1", "s", "g", "cn", "Q"]), x400_values
    ),
    min_size=1,
    max_size=4,
).map(lambda pairs: ";".join(f"{n}={v}" for n, v in pairs))
free_text = st.text(min_size=1, max_size=12).filter(
    lambda t: t.strip() != "" and not any(ch < " " or ch == "\x7f" for ch in t)
)
address_spaces = st.one_of(
    st.builds(AddressSpace, st.sampled_from(["SMTP", "smtp"]), smtp_spaces, costs),
    st.builds(AddressSpace, st.sampled_from(["X400", "x400"]), x400_spaces, costs),
    st.builds(
        AddressSpace, st.sampled_from(["FAX", "notes", "My-Type"]), free_text, costs
    ),
)
fragments = [
    "SMTP:",
    "X400:",
    "FAX:",
    "*",
    ".",
    ";",
    "=",
    ":",
    "a",
    "5",
    "0",
    "-",
    "--",
    " ",
]
noisy = st.one_of(
    st.text(),
    st.lists(st.sampled_from(fragments)).map("".join),
    address_spaces.map(str),
    st.builds(
        lambda s, tail: str(s) + tail, address_spaces, st.sampled_from([";", "0", "x"])
    ),
)

# ---------------------------------------------------------------------------------------------
# syntax (Exchange 2010 address space syntax)


@pytest.mark.parametrize(
    "text", ["SMTP:contoso.com;1", "contoso.com;1", "SMTP:contoso.com", "contoso.com"]
)
def test_exchange_equivalent_forms(text: str) -> None:
    assert AddressSpace.parse(text) == AddressSpace("SMTP", "contoso.com", 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("*", AddressSpace("SMTP", "*", 1)),
        ("*.Contoso.COM;7", AddressSpace("SMTP", "*.contoso.com", 7)),
        ("smtp:localhost;100", AddressSpace("SMTP", "localhost", 100)),
        (" contoso.com ; 3 ", AddressSpace("SMTP", "contoso.com", 3)),
        ("FAX:*", AddressSpace("FAX", "*", 1)),
        ("notes:*@Sales;2", AddressSpace("NOTES", "*@Sales", 2)),
        (
            "X400:c=US;a=Fabrikam;P=Contoso;5",
            AddressSpace("X400", "c=US;a=Fabrikam;P=Contoso", 5),
        ),
        ("X400:c=US", AddressSpace("X400", "c=US", 1)),
    ],
)
def test_parse_valid(text: str, expected: AddressSpace) -> None:
    assert AddressSpace.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("*contoso.com", "wildcard"),
        ("a.*.b", "wildcard"),
        ("*.*.com", "wildcard"),
        ("contoso.com;0", "out of range"),
        ("contoso.com;101", "out of range"),
        ("contoso.com;-5", "out of range"),
        ("contoso.com;" + "9" * 5000, "out of range"),
        ("contoso.com;abc", "invalid address space cost"),
        ("contoso.com;", "invalid address space cost"),
        ("", "empty"),
        ("SMTP:", "empty"),
        (";5", "empty"),
        ("--", "Edge Send connectors"),
        ("contoso..com", "empty domain label"),
        ("-contoso.com", "hyphen"),
        ("con_toso.com", "invalid character"),
        ("bücher.test", "non-ASCII"),
        ("192.0.2.1", "all-numeric"),
        ("X400:c=US;a=Fabrikam;P=Contoso", "must end with an explicit cost"),
        ("FAX:1;2;x", "must end with an explicit cost"),
        ("X400:c=US;junk;5", "name=value"),
        ("X400:;;5", "empty X400"),
        ("FAX:  ;5", "empty FAX"),
        ("bad type:x", "invalid address space type"),
        ("FAX:a\r\nb", "control character"),
    ],
)
def test_parse_invalid(text: str, reason: str) -> None:
    with pytest.raises(AddressSpaceError, match=reason):
        AddressSpace.parse(text)


def test_cost_error_names_the_value() -> None:
    with pytest.raises(AddressSpaceError, match="'101'"):
        AddressSpace.parse("contoso.com;101")


def test_constructor_validates_and_canonicalizes() -> None:
    assert AddressSpace("smtp", "Contoso.COM") == AddressSpace.parse("contoso.com")
    assert AddressSpace("fax", "  +1555*  ").space == "+1555*"
    # a blank X.400 value is meaningful and kept
    assert AddressSpace("X400", "c=US;a= ").space == "c=US;a= "
    with pytest.raises(AddressSpaceError):
        AddressSpace("SMTP", "contoso.com", 0)
    with pytest.raises(AddressSpaceError):
        AddressSpace("SMTP", "contoso.com", True)  # type: ignore[arg-type]


def test_str_is_canonical() -> None:
    assert str(AddressSpace.parse("contoso.com")) == "SMTP:contoso.com;1"
    assert (
        str(AddressSpace.parse("x400:c=US;a= ;p=Contoso;5"))
        == "X400:c=US;a= ;p=Contoso;5"
    )


# ---------------------------------------------------------------------------------------------
# matching


def test_specificity_ordering_example() -> None:
    address = "julia@marketing.contoso.com"
    ranked = ["marketing.contoso.com", "*.marketing.contoso.com", "*.contoso.com", "*"]
    scores = [AddressSpace.parse(s).match("SMTP", address) for s in ranked]
    assert None not in scores
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)
    assert scores[-1] == 0


def test_exact_domain_excludes_subdomains_and_wildcard_includes_them() -> None:
    exact = AddressSpace.parse("contoso.com")
    wild = AddressSpace.parse("*.contoso.com")
    assert exact.match("SMTP", "a@Contoso.COM") is not None
    assert exact.match("SMTP", "a@sales.contoso.com") is None
    assert wild.match("SMTP", "a@contoso.com") is not None
    assert wild.match("SMTP", "a@sales.contoso.com") is not None
    assert wild.match("SMTP", "a@notcontoso.com") is None


def test_smtp_edge_cases() -> None:
    star = AddressSpace.parse("*")
    assert star.match("smtp", "a@[192.0.2.9]") == 0
    assert AddressSpace.parse("contoso.com").match("SMTP", "a@[192.0.2.9]") is None
    assert star.match("SMTP", "no-at-sign") is None
    assert star.match("FAX", "a@contoso.com") is None  # type must be equal
    idn = AddressSpace.parse("xn--bcher-kva.test")
    assert idn.match("SMTP", "jörg@bücher.test") is not None


def test_fax_star_matches_any_fax_address() -> None:
    space = AddressSpace.parse("FAX:*")
    assert space.match("FAX", "+15551234") == 0
    assert space.match("fax", "anything at all") == 0
    assert space.match("SMTP", "a@contoso.com") is None


def test_free_text_glob() -> None:
    space = AddressSpace.parse("FAX:+1555*")
    assert space.match("FAX", "+15551234") == 5
    assert space.match("FAX", "+44201") is None
    assert AddressSpace.parse("NOTES:A?c*@SALES").match("notes", "abcdef@sales") == 8
    # the glob must cover the whole address
    assert AddressSpace.parse("NOTES:abc").match("NOTES", "abcd") is None
    # no [] classes: brackets are literal characters
    brackets = AddressSpace.parse("FAX:[12]*")
    assert brackets.match("FAX", "1xyz") is None
    assert brackets.match("FAX", "[12]xyz") == 4


def test_x400_matching() -> None:
    space = AddressSpace.parse("X400:c=US;a=Fabrikam;P=Contoso;5")
    recipient = "c=us;a=FABRIKAM;p=Contoso;o=Sales;s=Smith;"
    assert space.match("X400", recipient) == 3
    assert space.match("X400", "c=US;a=Fabrikam;p=Other;s=Smith") is None
    assert space.match("X400", "c=US;a=Fabrikam") is None  # p missing
    assert space.match("X400", "/c=US/a=Fabrikam/p=Contoso/s=Smith/") == 3
    assert space.match("X400", "not x400 at all") is None
    wildcard = AddressSpace.parse("X400:c=US;a=*;5")
    assert wildcard.match("X400", "c=US;a= ;p=Contoso") == 2
    assert wildcard.match("X400", "c=US;p=Contoso") is None


def test_best_matches_keeps_ties_and_owners() -> None:
    spaces = [
        ("conn-star", AddressSpace.parse("*;1")),
        ("conn-a", AddressSpace.parse("*.contoso.com;5")),
        ("conn-b", AddressSpace.parse("*.contoso.com;2")),
        ("conn-fax", AddressSpace.parse("FAX:*")),
    ]
    best = best_matches(spaces, "SMTP", "a@sales.contoso.com")
    assert [(owner, space.cost, score) for owner, space, score in best] == [
        ("conn-a", 5, 4),
        ("conn-b", 2, 4),
    ]
    assert [o for o, _, _ in best_matches(spaces, "SMTP", "a@fabrikam.com")] == [
        "conn-star"
    ]
    assert best_matches(spaces, "X400", "c=US") == []
    assert best_matches([], "SMTP", "a@b.test") == []


def test_best_matches_prefers_later_more_specific() -> None:
    spaces = [(1, AddressSpace.parse("*")), (2, AddressSpace.parse("contoso.com"))]
    assert [o for o, _, _ in best_matches(spaces, "SMTP", "a@contoso.com")] == [2]


# ---------------------------------------------------------------------------------------------
# properties


@PROPERTY
@given(noisy)
def test_parse_raises_only_address_space_error(text: str) -> None:
    try:
        space = AddressSpace.parse(text)
    except AddressSpaceError:
        return
    assert AddressSpace.parse(str(space)) == space


@PROPERTY
@given(address_spaces)
def test_round_trip(space: AddressSpace) -> None:
    assert AddressSpace.parse(str(space)) == space


@PROPERTY
@given(
    address_spaces,
    st.sampled_from(["SMTP", "X400", "FAX", "NOTES"]),
    st.text(max_size=30),
)
def test_match_never_crashes(space: AddressSpace, addr_type: str, address: str) -> None:
    score = space.match(addr_type, address)
    assert score is None or score >= 0


@PROPERTY
@given(local_parts, domains)
def test_star_matches_every_domain(local: str, domain: str) -> None:
    assert AddressSpace.parse("*").match("SMTP", f"{local}@{domain}") == 0


@PROPERTY
@given(local_parts, domains, st.lists(labels, max_size=3))
def test_wildcard_matches_domain_and_every_subdomain(
    local: str, domain: str, sub: list[str]
) -> None:
    target = ".".join([*sub, domain])
    wild = AddressSpace.parse("*." + domain)
    score = wild.match("SMTP", f"{local}@{target.upper()}")
    assert score == 2 * (domain.count(".") + 1)


@PROPERTY
@given(local_parts, domains, st.lists(labels, min_size=1, max_size=3))
def test_exact_domain_never_matches_a_subdomain(
    local: str, domain: str, sub: list[str]
) -> None:
    exact = AddressSpace.parse(domain)
    assert exact.match("SMTP", f"{local}@{'.'.join([*sub, domain])}") is None
    exact_score = exact.match("SMTP", f"{local}@{domain}")
    wild_score = AddressSpace.parse("*." + domain).match("SMTP", f"{local}@{domain}")
    assert exact_score is not None and wild_score is not None
    assert exact_score > wild_score > 0

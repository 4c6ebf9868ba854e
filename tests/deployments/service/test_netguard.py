"""The SSRF guard of webhook URLs, with an injected resolver (no lookup leaves the machine)."""

from __future__ import annotations

import ipaddress

import pydantic
import pytest

from deployments.service.netguard import AddressPolicy, NotResolved, Refused, parse_allow, redact
from deployments.service.settings import AppArgs
from tests.deployments.conftest import PUBLIC_IP, REFUSED_WEBHOOK_URLS, FakeDns


def test_public_urls_pass_with_the_addresses_that_were_checked():
    dns = FakeDns(**{"two.test": [PUBLIC_IP, "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]})
    policy = AddressPolicy(resolve=dns)
    dest = policy.check("https://public.test:8443/a/b?token=x#frag")
    assert (dest.scheme, dest.host, dest.port, dest.target, dest.addresses) == (
        "https", "public.test", 8443, "/a/b?token=x", (PUBLIC_IP,)
    )  # fmt: skip
    assert dns.lookups == ["public.test"]  # resolved once; the caller connects to what was checked
    assert policy.check("HTTP://Public.TEST./x").addresses == (PUBLIC_IP,)
    assert policy.check("http://two.test").addresses == (PUBLIC_IP, "2606:2800:21f:cb07:6820:80da:af6b:8b2c")
    assert policy.check("http://two.test").target == "/"
    literal = policy.check(f"http://{PUBLIC_IP}:8080/hook")
    assert literal.addresses == (PUBLIC_IP,) and literal.port == 8080
    [mapped] = policy.check(f"http://[::ffff:{PUBLIC_IP}]/").addresses  # a public IPv4, IPv4-mapped
    assert ipaddress.ip_address(mapped).ipv4_mapped == ipaddress.ip_address(PUBLIC_IP)
    assert dns.lookups == ["public.test", "public.test.", "two.test", "two.test"]  # literals: no lookup


@pytest.mark.parametrize("url, reason", REFUSED_WEBHOOK_URLS)
def test_refused_urls_say_why(url, reason):
    with pytest.raises(Refused) as refused:
        AddressPolicy(resolve=FakeDns()).check(url)
    assert reason in str(refused.value)
    query = url.partition("?")[2]
    assert not query or query not in str(refused.value)


def test_a_name_that_does_not_resolve_is_told_apart():
    """At delivery a lookup failure is retried (DNS may be back); every other refusal is final."""
    with pytest.raises(NotResolved):
        AddressPolicy(resolve=FakeDns()).check("http://nowhere.test/")
    with pytest.raises(NotResolved):
        AddressPolicy(resolve=FakeDns(**{"empty.test": []})).check("http://empty.test/")
    with pytest.raises(Refused) as refused:
        AddressPolicy(resolve=FakeDns()).check("http://private.test/")
    assert not isinstance(refused.value, NotResolved)


def test_the_allow_list_admits_internal_receivers_and_nothing_else():
    dns = FakeDns(
        **{"hooks.internal": ["172.16.5.5"], "ten.test": ["10.9.9.9"], "other.internal": ["172.16.5.6"]}
    )
    policy = AddressPolicy(["10.0.0.0/8", "hooks.internal", "127.0.0.1", "fd00::/8"], resolve=dns)
    assert policy.check("http://10.1.2.3/hook").addresses == ("10.1.2.3",)
    assert policy.check("http://ten.test/hook").addresses == ("10.9.9.9",)  # a name resolving inside a CIDR
    assert policy.check("https://hooks.internal:9443/x").addresses == ("172.16.5.5",)  # an allowed name
    assert policy.check("http://HOOKS.internal./x").addresses == ("172.16.5.5",)
    assert policy.check("http://127.0.0.1:6379/").addresses == ("127.0.0.1",)  # one address: a /32
    [mapped] = policy.check("http://[::ffff:10.0.0.1]/").addresses
    assert ipaddress.ip_address(mapped).ipv4_mapped == ipaddress.ip_address("10.0.0.1")
    assert policy.check("http://[fd00::5]/").addresses == ("fd00::5",)
    for url, reason in [
        ("http://127.0.0.2/", "loopback"),  # next to an allowed address
        ("http://192.168.1.1/", "private"),
        ("http://other.internal/", "private"),  # only the exact name is allowed
        ("http://167772161/", "ambiguous"),  # 10.0.0.1 spelled in decimal: never, allowed or not
        ("http://user:pw@hooks.internal/", "credentials"),
        ("ftp://hooks.internal/", "scheme"),
        ("http://169.254.169.254/", "link-local"),
    ]:
        with pytest.raises(Refused, match=reason):
            policy.check(url)


def test_allow_list_entries_are_checked_where_the_settings_are_read(monkeypatch):
    networks, hosts = parse_allow(["10.0.0.0/8", "Hooks.Internal.", " 127.0.0.1 ", "fd00::/8"])
    assert [str(n) for n in networks] == ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"]
    assert hosts == {"hooks.internal"}
    for bad in ("10.0.0.0/33", "*.internal", "http://hooks.internal", "2130706433", "a b"):
        with pytest.raises(ValueError, match="neither a CIDR nor a host name"):
            parse_allow([bad])
    assert AppArgs(webhook_allow=["10.0.0.0/8", "hooks.internal"]).webhook_allow == [
        "10.0.0.0/8",
        "hooks.internal",
    ]
    with pytest.raises(pydantic.ValidationError, match="10.0.0.0/33"):
        AppArgs(webhook_allow=["10.0.0.0/33"])
    monkeypatch.setenv("MUSICGEN_WEBHOOK_ALLOW", "10.0.0.0/8, hooks.internal")
    assert AppArgs().resolved().webhook_allow == ["10.0.0.0/8", "hooks.internal"]
    assert AppArgs(webhook_allow=[]).resolved().webhook_allow == []  # the app's args win over the env
    monkeypatch.setenv("MUSICGEN_WEBHOOK_ALLOW", "10.0.0.0/33")
    with pytest.raises(ValueError, match="10.0.0.0/33"):
        AppArgs().resolved()


def test_logs_see_urls_without_credentials_query_or_fragment():
    assert redact("https://u:p@hooks.example:8443/a/b?token=sekrit#x") == "https://hooks.example:8443/a/b"
    assert redact("http://[::1]:80/?q=1") == "http://[::1]:80/"
    assert redact("http://[::1") == "(unparsable URL)"

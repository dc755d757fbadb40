"""Publish formats (announcer/publish.py): the exact keys and values each consumer reads.

Pure: no etcd. The layouts are the consumers' own, quoted where they are defined.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from announcer.config import Ambient, load_config
from announcer.errors import ConfigError
from announcer.publish import FORMATS, Publishing, dns_label, render_pairs, zone_path
from announcer.record import Record

AMBIENT = Ambient(hostname=lambda: "node-1", ip=lambda: "10.0.0.5")
RECORD = Record("node-1", "10.0.0.5", 8080, {"version": "2.4"})


def pairs(**publishing: Any) -> dict[str, tuple[str, bytes]]:
    rendered = render_pairs(
        RECORD, service="web", json_key="/services/web/10.0.0.5:8080",
        publishing=Publishing(**publishing), lease_ttl=30,
    )  # fmt: skip
    return {p.format: (p.key, p.value) for p in rendered}


def test_json_is_todays_record_at_todays_key() -> None:
    assert pairs() == {
        "json": (
            "/services/web/10.0.0.5:8080",
            b'{"host":"node-1","ipv4_addr":"10.0.0.5","port":8080,"version":"2.4"}',
        )
    }


def test_plain_follows_registrators_etcd_layout() -> None:
    # registrator etcd/etcd.go, Register():
    #   path := r.path + "/" + service.Name + "/" + service.ID
    #   addr := net.JoinHostPort(service.IP, port)
    #   r.client.Set(path, addr, ...)
    # so <prefix>/<service>/<id> = ip:port; the prefix here is /plain, the id the instance.
    assert pairs(formats=("plain",)) == {"plain": ("/plain/web/node-1-8080", b"10.0.0.5:8080")}
    assert pairs(formats=("plain",), plain_key="/services/{service}/{hostname}:{port}")["plain"] == (
        "/services/web/node-1:8080",
        b"10.0.0.5:8080",
    )


def test_traefik_follows_its_kv_provider_layout() -> None:
    # Traefik's KV provider reference (routing/providers/kv):
    #   traefik/http/services/myservice/loadbalancer/servers/0/url = http://<ip-server-1>:<port-server-1>/
    #   traefik/tcp/services/myservice/loadbalancer/servers/0/address = <ip-server-1>:<port-server-1>
    # A server's name is any key segment (checked against a real Traefik in tests/test_traefik.py).
    got = pairs(formats=("traefik", "traefik-tcp"))
    assert got["traefik"] == (
        "traefik/http/services/web/loadBalancer/servers/node-1-8080/url",
        b"http://10.0.0.5:8080",
    )
    assert got["traefik-tcp"] == (
        "traefik/tcp/services/web/loadBalancer/servers/node-1-8080/address",
        b"10.0.0.5:8080",
    )
    https = pairs(formats=("traefik",), traefik_scheme="https", traefik_root="/edge/traefik")
    assert https["traefik"] == (
        "/edge/traefik/http/services/web/loadBalancer/servers/node-1-8080/url",
        b"https://10.0.0.5:8080",
    )


def test_skydns_follows_corednss_etcd_layout() -> None:
    # CoreDNS plugin/etcd README: records live under `path` (default /skydns) at the zone's
    # labels reversed, e.g. /skydns/com/example/... for example.com, and each value is a
    # SkyDNS message (msg.Service): {"host": ..., "port": ..., "priority": ..., "weight": ...,
    # "ttl": ...}. The ttl is always written (GHSA-93mf-426m-g6x9: without one, a lease ID
    # became the DNS TTL).
    key, value = pairs(formats=("skydns",))["skydns"]
    assert key == "/skydns/local/skydns/web/node-1-8080"
    assert json.loads(value) == {"host": "10.0.0.5", "port": 8080, "ttl": 30}
    key, value = pairs(formats=("skydns",), skydns_zone="Example.COM.", skydns_ttl=10,
                       skydns_priority=10, skydns_weight=50)["skydns"]  # fmt: skip
    assert key == "/skydns/com/example/web/node-1-8080"
    assert json.loads(value) == {"host": "10.0.0.5", "port": 8080, "ttl": 10, "priority": 10, "weight": 50}


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("node-1-8080", "node-1-8080"),
        ("Node_1.example-8080", "node-1-example-8080"),
        ("-a-", "a"),
        ("x" * 80, "x" * 63),
    ],
)
def test_the_skydns_instance_is_a_dns_label(name: str, label: str) -> None:
    assert dns_label(name) == label


def test_bad_dns_names_are_refused() -> None:
    with pytest.raises(ConfigError, match="nothing that can make a DNS label"):
        dns_label("___")
    for zone in ("", "a..b", "-x.local", "exa mple.com"):
        with pytest.raises(ConfigError, match="--skydns-zone"):
            zone_path(zone)


def test_the_default_keys_of_every_format_do_not_collide() -> None:
    config = load_config({"service": "web", "port": "8080", "publish": list(FORMATS)}, {}, AMBIENT)
    keys = [pair.key for pair in config.services[0].pairs]
    assert len(keys) == len(set(keys)) == len(FORMATS)
    assert config.services[0].key == "/services/web/10.0.0.5:8080"  # json first: today's key


def test_two_formats_on_one_key_are_one_line_naming_both() -> None:
    with pytest.raises(ConfigError, match=r"the json and plain formats both render the key /x/web"):
        load_config(
            {"service": "web", "port": "8080", "publish": ["json", "plain"], "key": "/x/{service}", "plain_key": "/x/{service}"},
            {}, AMBIENT,
        )  # fmt: skip


def test_two_instances_on_one_key_are_one_line_naming_both(tmp_path: Any) -> None:
    host = tmp_path / "host.toml"
    host.write_text(
        'publish = ["plain"]\nplain_key = "/p/{service}"\n'
        '[[services]]\nservice = "web"\nport = 1\n[[services]]\nservice = "web"\nport = 2\n'
    )
    with pytest.raises(
        ConfigError, match=r"services web:1 \(plain\) and web:2 \(plain\) both render the key /p/web"
    ):
        load_config({"config": str(host)}, {}, AMBIENT)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"publish": ["xml"]}, "--publish must be one of json, plain, traefik, traefik-tcp, skydns"),
        ({"publish": ["traefik"], "traefik_root": "traefik/../x"}, "empty, '.' or '..' segment"),
        ({"publish": ["traefik"], "traefik_scheme": "ftp"}, "--traefik-scheme must be one of http, https"),
        (
            {"publish": ["plain"], "plain_key": "plain/{service}"},
            "--plain-key 'plain/web' must start with '/'",
        ),
        (
            {"publish": ["skydns"], "skydns_weight": "70000"},
            "--skydns-weight must be a whole number from 0 to 65535",
        ),
        ({"instance": "{nope}"}, "--instance '{nope}' uses unknown placeholder"),
    ],
)
def test_bad_publish_settings_are_one_line(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        load_config({"service": "web", "port": "8080", **flags}, {}, AMBIENT)
    assert "\n" not in str(caught.value)


def test_publish_from_the_environment_and_the_file(tmp_path: Any) -> None:
    env = {"ANNOUNCER_PUBLISH": "json, skydns"}
    config = load_config({"service": "web", "port": "8080"}, env, AMBIENT)
    assert [p.format for p in config.services[0].pairs] == ["json", "skydns"]
    host = tmp_path / "host.toml"
    host.write_text(
        'publish = ["traefik"]\n[[services]]\nservice = "web"\nport = 1\npublish = ["plain", "json"]\n[[services]]\nservice = "api"\nport = 2\n'
    )
    config = load_config({"config": str(host)}, {}, AMBIENT)
    assert [[p.format for p in s.pairs] for s in config.services] == [["plain", "json"], ["traefik"]]

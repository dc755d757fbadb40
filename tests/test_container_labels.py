"""What a container asks for (announcer/containers/labels.py): decided from its description alone.

The descriptions are Docker's format (tests/fake_engine.py) and podman's (the shape its
compatible API answered on this machine, podman 4.3); the real engine is tested in
tests/test_containers_podman.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from announcer.containers.labels import Container, describe, image_name, instances
from tests.fake_engine import docker_container, published

CID = "4f2c" + "a" * 60


def wanted(doc: dict[str, Any], **options: Any) -> tuple[list[Any], list[str]]:
    container = describe(doc)
    assert container is not None
    defaults: dict[str, Any] = {
        "host_ip": "10.0.0.5", "host_ip_source": "--ip", "internal": False, "labelled_only": False,
        "allow_exec": False,
    }  # fmt: skip
    return instances(container, **{**defaults, **options})


def test_a_port_published_on_every_address_is_one_record_on_the_host_address() -> None:
    # Docker lists 0.0.0.0 and :: for one published port: one record, not two.
    found, warnings = wanted(docker_container(CID, "web", ports=published(80, 8080)))
    assert warnings == []
    assert [(w.service, w.ip, w.port, w.container_port) for w in found] == [("nginx", "10.0.0.5", 8080, 80)]
    assert found[0].ip_source == "published on every address: the host's (--ip)"
    assert found[0].origin == f"container {CID} port 80/tcp"


def test_a_port_published_on_one_address_is_announced_on_it() -> None:
    found, _ = wanted(docker_container(CID, "web", ports=published(80, 8080, "192.168.1.9")))
    assert [(w.ip, w.port, w.ip_source) for w in found] == [
        ("192.168.1.9", 8080, "published on 192.168.1.9 only")
    ]


def test_a_port_published_on_an_ipv6_address_only_is_skipped_with_a_warning() -> None:
    found, warnings = wanted(docker_container(CID, "web", ports=published(80, 8080, "fd00::1")))
    assert found == []
    assert warnings == [f"container web ({CID[:12]}) port 80: published on fd00::1, not an IPv4 address of this host; the port is skipped"]  # fmt: skip


def test_unpublished_and_udp_ports_are_not_announced_unless_internal() -> None:
    ports = {"80/tcp": None, "53/udp": [{"HostIp": "0.0.0.0", "HostPort": "53"}]}
    assert wanted(docker_container(CID, "web", ports=ports))[0] == []
    found, _ = wanted(docker_container(CID, "web", ports=ports, ip="172.17.0.9"), internal=True)
    assert [(w.ip, w.port, w.ip_source) for w in found] == [
        ("172.17.0.9", 80, "the container's own address (internal mode)")
    ]


def test_internal_mode_without_an_address_warns() -> None:
    found, warnings = wanted(docker_container(CID, "web", ports=published(80, 8080), ip=""), internal=True)
    assert found == []
    assert "no IPv4 address" in warnings[0]


@pytest.mark.parametrize(
    ("labels", "env", "expected"),
    [
        ({}, [], ["nginx-80", "nginx-443"]),  # several ports: registrator's image-port names
        ({"announcer.service": "web"}, [], ["web", "web"]),
        ({"announcer.service": "web", "announcer.443.service": "web-tls"}, [], ["web", "web-tls"]),
        ({}, ["SERVICE_NAME=shop", "SERVICE_443_NAME=shop-tls"], ["shop", "shop-tls"]),
        ({"SERVICE_NAME": "label"}, ["SERVICE_NAME=env"], ["label", "label"]),  # a label over the env
        ({"announcer.service": "mine"}, ["SERVICE_NAME=theirs"], ["mine", "mine"]),
        ({"SERVICE_80_NAME": "http"}, ["SERVICE_NAME=all"], ["http", "all"]),
    ],
)
def test_the_service_name_follows_the_labels_then_registrators_then_the_image(
    labels: dict[str, str], env: list[str], expected: list[str]
) -> None:
    doc = docker_container(
        CID, "web", labels=labels, env=env, ports={**published(80, 8080), **published(443, 8443)}
    )
    assert [w.service for w in wanted(doc)[0]] == expected


@pytest.mark.parametrize(
    ("image", "name"),
    [
        ("nginx", "nginx"),
        ("nginx:1.25", "nginx"),
        ("docker.io/library/nginx:1.25", "nginx"),
        ("registry.example:5000/team/api-server:v2", "api-server"),
        ("quay.io/x/redis@sha256:" + "0" * 64, "redis"),
        ("localhost/bookworm-python3:latest", "bookworm-python3"),
        ("ghcr.io/x/We!rd+name:1", "We-rd-name"),
    ],
)
def test_the_image_name_without_registry_and_tag(image: str, name: str) -> None:
    assert image_name(image) == name


@pytest.mark.parametrize(
    ("labels", "env", "ports"),
    [
        ({"announcer.ignore": "true"}, [], []),
        ({"SERVICE_IGNORE": "1"}, [], []),
        ({}, ["SERVICE_IGNORE=yes"], []),
        ({"announcer.443.ignore": "1"}, [], [80]),
        ({}, ["SERVICE_80_IGNORE=1"], [443]),
        ({"announcer.ignore": "false"}, [], [80, 443]),
    ],
)
def test_ignore_skips_a_container_or_a_port(labels: dict[str, str], env: list[str], ports: list[int]) -> None:
    doc = docker_container(
        CID, "web", labels=labels, env=env, ports={**published(80, 8080), **published(443, 8443)}
    )
    assert [w.container_port for w in wanted(doc)[0]] == ports


def test_labelled_only_mode_skips_containers_that_name_no_service() -> None:
    plain = docker_container(CID, "web", ports=published(80, 8080))
    named = docker_container(CID, "web", env=["SERVICE_80_NAME=web"], ports=published(80, 8080))
    assert wanted(plain, labelled_only=True)[0] == []
    assert [w.service for w in wanted(named, labelled_only=True)[0]] == ["web"]


def test_meta_tags_and_check_come_from_labels() -> None:
    labels = {
        "announcer.service": "web", "announcer.meta.zone": "a", "announcer.80.meta.proto": "h2",
        "announcer.check": "http://{ip}:{port}/health",
    }  # fmt: skip
    doc = docker_container(
        CID, "web", labels=labels, env=["SERVICE_TAGS=blue, canary,"], ports=published(80, 8080)
    )
    [w] = wanted(doc)[0]
    assert w.meta == {"zone": "a", "proto": "h2"}
    assert w.tags == ("blue", "canary")
    assert w.check == "http://{ip}:{port}/health"
    assert not w.healthcheck


def test_the_healthcheck_decides_only_without_a_check_label() -> None:
    doc = docker_container(CID, "web", ports=published(80, 8080), health="starting")
    assert wanted(doc)[0][0].healthcheck
    doc["Config"]["Labels"] = {"announcer.check": "tcp"}
    assert not wanted(doc)[0][0].healthcheck


def test_an_exec_check_from_a_label_is_refused_unless_allowed() -> None:
    doc = docker_container(
        CID, "web", labels={"announcer.check": "exec:/bin/true"}, ports=published(80, 8080)
    )
    found, warnings = wanted(doc)
    assert found == []
    assert "would run a command on the host" in warnings[0]
    assert [w.check for w in wanted(doc, allow_exec=True)[0]] == ["exec:/bin/true"]


def test_a_bad_label_skips_its_port_only() -> None:
    labels = {"announcer.80.service": "bad name!", "announcer.service": "good"}
    doc = docker_container(CID, "web", labels=labels, ports={**published(80, 8080), **published(443, 8443)})
    found, warnings = wanted(doc)
    assert [w.port for w in found] == [8443]
    assert warnings == [
        f"container web ({CID[:12]}) port 80: the service name 'bad name!' may hold only letters, digits, "
        "'.', '_' and '-'; the port is skipped"
    ]


def test_stopped_and_paused_containers_want_nothing() -> None:
    assert wanted(docker_container(CID, "web", ports=published(80, 8080), paused=True))[0] == []
    assert wanted(docker_container(CID, "web", ports=published(80, 8080), running=False))[0] == []


def test_podmans_description_reads_the_same() -> None:
    # As podman 4.3's compatible API described a container here: HostIp "" for every address.
    doc = {
        "Id": CID, "Name": "/hc1",
        "State": {"Status": "running", "Running": True, "Paused": False, "Health": {"Status": "healthy"}},
        "Config": {
            "Image": "localhost/bookworm-python3:latest", "Labels": {"announcer.service": "web"},
            "Env": ["PATH=/usr/bin", "SERVICE_TAGS=a,b", "HOSTNAME=cec4f7c1d689"],
            "Healthcheck": {"Test": ["CMD-SHELL", "true"], "Retries": 1},
            "ExposedPorts": {"8000/tcp": {}, "8001/tcp": {}},
        },
        "NetworkSettings": {
            "Ports": {"8000/tcp": [{"HostIp": "", "HostPort": "18080"}],
                      "8001/tcp": [{"HostIp": "127.0.0.1", "HostPort": "18081"}]},
            "IPAddress": "10.88.0.2", "Networks": {"podman": {"IPAddress": "10.88.0.2"}},
        },
    }  # fmt: skip
    container = describe(doc)
    assert container is not None
    assert container.health == "healthy"
    assert container.env == {"SERVICE_TAGS": "a,b"}  # only registrator's: the rest may hold secrets
    found, _ = wanted(doc)
    assert [(w.service, w.ip, w.port, w.tags, w.healthcheck) for w in found] == [
        ("web", "10.0.0.5", 18080, ("a", "b"), True),
        ("web", "127.0.0.1", 18081, ("a", "b"), True),
    ]


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"Id": 5},
        {"Id": "not hex!"},
        {"Id": CID, "State": [], "Config": "x", "NetworkSettings": 7},
        {"Id": CID, "Config": {"Labels": ["a"], "Env": {"x": 1}, "ExposedPorts": ["80/tcp"]}},
        {"Id": CID, "NetworkSettings": {"Ports": {"80/tcp": "x", "99999/tcp": [{}], "a/tcp": None}}},
        {"Id": CID, "Config": {"Labels": {f"l{i}": "v" * 5000 for i in range(2000)}}},
    ],
)
def test_a_description_of_any_shape_is_read_without_raising(doc: dict[str, Any]) -> None:
    container = describe(doc)
    if container is not None:
        assert len(container.labels) <= 1000
        assert all(len(v) <= 4096 for v in container.labels.values())
        wanted(doc)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
        max_leaves=30,
    )
)
def test_any_json_as_a_description_is_a_container_or_nothing(junk: Any) -> None:
    doc = (
        {"Id": CID, "Config": junk, "State": junk, "NetworkSettings": junk}
        if isinstance(junk, dict)
        else {"Id": junk}
    )
    container = describe(doc)
    assert container is None or isinstance(container, Container)
    if container is not None:
        instances(container, host_ip="10.0.0.5", host_ip_source="--ip", internal=False, labelled_only=False,
                  allow_exec=False)  # fmt: skip

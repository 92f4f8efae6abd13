"""Unit: the job store (a real SQLite file in a temporary directory) and the callback
destination policy."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest

from sdproxy.errors import ConfigError
from sdproxy.runtime.callbacks import Policy, Refused, signature
from sdproxy.runtime.jobstore import JobRecord, JobStatus, SqliteJobStore


def record(job_id: str, *, owner: str = "h:alice", key: str | None = None) -> JobRecord:
    return JobRecord(
        id=job_id,
        owner=owner,
        route="/sdapi/v1/txt2img",
        method="POST",
        path_qs="/sdapi/v1/txt2img",
        headers=(("Content-Type", "application/json"),),
        status=JobStatus.QUEUED,
        created_at=1000.0,
        idempotency_key=key,
        body_bytes=10,
    )


def test_records_survive_reopening_and_bytes_are_counted(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    store.insert(record("a" * 16))
    store.update("a" * 16, status=JobStatus.SUCCEEDED, finished_at=1001.0, body_bytes=0,
                 result_bytes=500)  # fmt: skip
    assert store.bytes == 500
    store.close()
    again = SqliteJobStore(tmp_path)
    found = again.get("a" * 16)
    assert found is not None and found.status is JobStatus.SUCCEEDED
    assert found.headers == (("Content-Type", "application/json"),)
    assert again.bytes == 500
    again.close()


def test_a_second_process_cannot_take_the_directory(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    with pytest.raises(ConfigError, match="another sdproxy process"):
        SqliteJobStore(tmp_path)
    store.close()
    SqliteJobStore(tmp_path).close()  # free again


def test_idempotency_keys_are_per_owner(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    first = store.insert(record("a" * 16, key="k1"))
    dup = store.insert(record("b" * 16, key="k1"))
    assert dup.id == first.id
    other = store.insert(record("c" * 16, owner="h:bob", key="k1"))
    assert other.id == "c" * 16
    assert store.find_idempotent(["h:bob", "a:1.2.3.4"], "k1") == other
    store.close()


def test_pages_are_newest_first_with_a_cursor(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    ids = [f"{i:016d}" for i in range(5)]
    for job_id in ids:
        store.insert(record(job_id))
    store.insert(record("x" * 16, owner="h:bob"))
    page = store.page(owners=["h:alice"], status=None, tenant=None, limit=3, cursor=None)
    assert [r.id for r in page.jobs] == ids[::-1][:3]
    rest = store.page(owners=["h:alice"], status=None, tenant=None, limit=3, cursor=page.cursor)
    assert [r.id for r in rest.jobs] == ids[::-1][3:] and rest.cursor is None
    done = store.page(
        owners=["h:alice"], status=JobStatus.SUCCEEDED, tenant=None, limit=3, cursor=None
    )
    assert done.jobs == ()
    store.close()


def test_orphan_files_of_a_crash_before_the_commit_are_removed(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    store.insert(record("a" * 16))
    store.body_path("a" * 16).write_bytes(b"{}")
    store.body_path("b" * 16).write_bytes(b"{}")  # written, never committed
    store.close()
    SqliteJobStore(tmp_path).close()
    assert store.body_path("a" * 16).exists()
    assert not store.body_path("b" * 16).exists()


@pytest.mark.parametrize(
    ("patterns", "url", "allowed"),
    [
        pytest.param((), "https://hooks.example.com/x", True, id="name-checked-on-resolve"),
        pytest.param((), "http://8.8.8.8/x", True, id="public"),
        pytest.param((), "http://127.0.0.1:9/x", False, id="loopback"),
        pytest.param((), "http://[::1]/x", False, id="loopback6"),
        pytest.param((), "http://169.254.169.254/latest", False, id="metadata"),
        pytest.param((), "http://10.1.2.3/x", False, id="private"),
        pytest.param((), "http://100.64.0.1/x", False, id="shared"),
        pytest.param((), "http://0.0.0.0/x", False, id="unspecified"),
        pytest.param((), "ftp://8.8.8.8/x", False, id="scheme"),
        pytest.param((), "http://u:p@8.8.8.8/x", False, id="credentials"),
        pytest.param(("127.0.0.1/32",), "http://127.0.0.1:9/x", True, id="allowed-cidr"),
        pytest.param(("10.0.0.0/8",), "http://8.8.8.8/x", False, id="allow-list-only"),
        pytest.param(("*.example.com",), "http://a.example.com/x", True, id="allowed-name"),
    ],
)
def test_callback_destinations(patterns: tuple[str, ...], url: str, allowed: bool) -> None:
    policy = Policy(patterns)
    if allowed:
        assert policy.check_url(url)
    else:
        with pytest.raises(Refused):
            policy.check_url(url)


def test_resolved_addresses_are_checked_too() -> None:
    assert not Policy(()).address_allowed(ipaddress.ip_address("192.168.1.1"))
    assert Policy(("192.168.0.0/16",)).address_allowed(ipaddress.ip_address("192.168.1.1"))
    with pytest.raises(ConfigError):
        Policy(("10.0.0.0/40",))


def test_the_signature_is_the_hex_hmac_sha256_of_the_body() -> None:
    # the HMAC-SHA256 example in Wikipedia's HMAC article
    body = b"The quick brown fox jumps over the lazy dog"
    expected = "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
    assert signature("key", body) == "sha256=" + expected


@pytest.mark.parametrize(
    "address",
    ["::ffff:127.0.0.1", "::127.0.0.1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "2002:a00:1::"],
)
def test_ipv6_spellings_of_refused_ipv4_addresses_are_refused(address: str) -> None:
    """An IPv4 address embedded in an IPv6 one (mapped, compatible, NAT64, 6to4) is judged
    as that IPv4 address: a NAT64 or 6to4 gateway would deliver it there."""
    assert not Policy([]).address_allowed(ipaddress.ip_address(address))
    assert Policy([]).address_allowed(ipaddress.ip_address("64:ff9b::808:808"))


def test_an_inserted_finished_record_counts_its_result_bytes(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path)
    store.insert(replace(record("b" * 16), status=JobStatus.SUCCEEDED, body_bytes=0,
                         result_bytes=700, finished_at=1001.0))  # fmt: skip
    assert store.bytes == 700
    store.delete("b" * 16)
    assert store.bytes == 0
    store.close()

"""The outbound policy (issue 9): addresses clients supply are parsed strictly and checked against the rules when
they are sent (400 naming the rule) and again when the service connects (DNS tricks get nowhere); peers' answers
are not relayed to clients.

Before: `notification_url` was accepted and called for 127.0.0.1, localhost, 127.1, 0x7f000001, 2130706433, [::1],
0.0.0.0 and the cloud metadata addresses; a feature group's `host` "127.0.0.1:41100/any/path?q=" made the service
PUT /any/path?q=:9/data-consumer/... and the 502 told internal ports apart.

The peers here are local HTTP servers standing in for an rApp, InfluxDB and the DME; names that "resolve" to them
are made by replacing getaddrinfo in the policy's module, which is how a hostile DNS answer looks to the service.
"""
from __future__ import annotations

import logging
import socket

import pandas as pd
import pytest

from tests.extraction_doubles import InfluxDouble
from tests.factories import FG_V1, assert_problem_details, create_feature_group, feature_group_body
from tests.peers import DmeDouble, RAppReceiver
from tests.test_training_jobs_api import JOBS, counts, job_request
from trainingmgr.adapters import outbound as outbound_module
from trainingmgr.adapters.base import AdapterError
from trainingmgr.adapters.influx_source import read_influx
from trainingmgr.adapters.notifier import HttpNotifier
from trainingmgr.adapters.outbound import OutboundDenied, OutboundPolicy
from trainingmgr.config import Settings, SettingsError

DENIED_URLS = {
    "http://127.0.0.1:8080/notify": "loopback",
    "http://localhost/notify": "a local or cloud metadata host name",
    "http://[::1]:9/x": "loopback",
    "http://0.0.0.0:80/": "unspecified",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/": "link-local (cloud metadata)",
    "http://metadata.google.internal/computeMetadata/v1/": "a local or cloud metadata host name",
    "http://[::ffff:127.0.0.1]/": "loopback",
    "http://224.0.0.1/": "multicast",
    "http://240.0.0.1/": "reserved",
    # Found by the review: IPv6 forms a NAT64 gateway or a tunnel may route to an IPv4 address.
    "http://[::127.0.0.1]/": "IPv6 carrying an IPv4 address",
    "http://[::ffff:0:7f00:1]/": "IPv6 carrying an IPv4 address",
    "http://[64:ff9b:1::7f00:1]/": "IPv6 carrying an IPv4 address",
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/": "IPv6 carrying an IPv4 address",
}
UNPARSABLE_URLS = ["http://[v1.x]/", "http://[127.0.0.1]/", "http://127.1/", "http://0x7f000001/", "http://2130706433/", "http://user:pw@rapp.svc/",
                   "ftp://rapp.svc/", "http://rapp.svc:0/", "http://rapp svc/", "file:///etc/passwd"]


@pytest.fixture
def default_app(build_app):
    """An app with the default outbound policy (the suite's other apps allow loopback for their local peers)."""
    return build_app(outbound_allow="")


@pytest.fixture
def resolving(monkeypatch):
    """resolving({"rapp.example": "127.0.0.1"}): those names resolve to those addresses (a DNS answer we choose)."""
    real = socket.getaddrinfo

    def install(answers: dict[str, str]):
        def fake(host, port, *args, **kwargs):
            if host in answers:
                return real(answers[host], port, *args, **kwargs)
            return real(host, port, *args, **kwargs)

        monkeypatch.setattr(outbound_module.socket, "getaddrinfo", fake)

    return install


# ---------------------------------------------------------------------------------------- at request time
@pytest.mark.parametrize("url, rule", DENIED_URLS.items())
def test_a_notification_url_the_policy_denies_is_a_400_naming_the_rule(default_app, url, rule):
    client = default_app.test_client()
    create_feature_group(client)
    problem = assert_problem_details(client.post(JOBS, json=job_request(notification_url=url)), 400)
    assert rule in problem["errors"]["notification_url"][0], problem
    assert counts(default_app) == (0, 0, 0)


@pytest.mark.parametrize("url", UNPARSABLE_URLS)
def test_a_notification_url_that_is_not_a_plain_http_url_is_a_400(default_app, url):
    client = default_app.test_client()
    create_feature_group(client)
    problem = assert_problem_details(client.post(JOBS, json=job_request(notification_url=url)), 400)
    assert "notification_url" in problem["errors"], problem
    assert counts(default_app) == (0, 0, 0)


@pytest.mark.parametrize("host, message", [
    ("127.0.0.1:41100/any/path?q=", "is not a host name or an IP address"),
    ("127.0.0.1", "loopback"), ("localhost", "local or cloud metadata"), ("127.1", "four numbers"),
    ("169.254.169.254", "link-local"), ("influx/../x", "is not a host name"), ("a@b", "is not a host name"),
    ("[influxdb]", "is not an IPv6 address"), ("::7f00:1", "IPv6 carrying an IPv4 address"),
])
def test_a_feature_group_host_the_policy_denies_is_a_400(default_app, host, message):
    client = default_app.test_client()
    problem = assert_problem_details(client.post(FG_V1, json=feature_group_body(host=host)), 400)
    assert message in problem["errors"]["host"][0], problem
    assert client.get(f"{FG_V1}/cell_kpis").status_code == 404  # nothing stored


def test_private_cluster_addresses_and_names_are_allowed_by_default(default_app):
    client = default_app.test_client()
    for i, host in enumerate(["10.1.2.3", "influxdb.smo.svc.cluster.local", "192.168.1.20", "influxdb", "fd00::5"]):
        assert create_feature_group(client, f"fg_{i}", host=host)["host"] == host


def test_tm_outbound_allow_and_deny_change_the_rules(build_app):
    app = build_app(outbound_allow="127.0.0.1/32,rapp.local", outbound_deny="10.20.0.0/16,*.forbidden.svc")
    client = app.test_client()
    assert create_feature_group(client, "loop", host="127.0.0.1")["host"] == "127.0.0.1"
    for host in ("10.20.3.4", "influx.forbidden.svc"):
        problem = assert_problem_details(client.post(FG_V1, json=feature_group_body("other", host=host)), 400)
        assert "denied by TM_OUTBOUND_DENY" in problem["errors"]["host"][0]
    assert create_feature_group(client, "ten", host="10.21.0.1")["host"] == "10.21.0.1"


def test_a_bad_outbound_setting_is_refused_at_start(tmp_path):
    with pytest.raises(SettingsError, match="TM_OUTBOUND_DENY"):
        Settings(data_dir=str(tmp_path), outbound_deny="10.0.0.0/8,not a host!").validate()


# ---------------------------------------------------------------------------------------- at connect time
def test_a_name_that_resolves_to_a_denied_address_gets_no_notification(resolving, caplog):
    receiver = RAppReceiver().start()
    try:
        resolving({"rapp.example": "127.0.0.1"})
        url = f"http://rapp.example:{receiver.port}/notify"
        # The name passes the request-time check; the address it resolves to when connecting does not.
        OutboundPolicy().check_url(url)
        with caplog.at_level(logging.WARNING, logger="trainingmgr.adapters.notifier"):
            assert HttpNotifier(timeout=2, outbound=OutboundPolicy()).send(url, "body", "d1") is False
        assert receiver.recorded("POST") == []
        assert "loopback" in caplog.text
        # The same call where the operator allows loopback reaches the receiver: the policy made the difference.
        assert HttpNotifier(timeout=2, outbound=OutboundPolicy(allow="127.0.0.1/32")).send(url, "body", "d2")
        assert len(receiver.recorded("POST")) == 1
    finally:
        receiver.stop()


def test_an_influxdb_host_that_resolves_to_a_denied_address_never_gets_the_token(resolving):
    influx = InfluxDouble([pd.DataFrame({"_time": ["2024-01-01T00:00:00Z"], "a": [1.0]})]).start()
    try:
        resolving({"influx.example": "127.0.0.1"})
        source = {"host": "influx.example", "port": str(influx.port), "bucket": "b", "measurement": "m",
                  "db_org": "o", "token": "s3cr3t-token"}
        with pytest.raises(AdapterError) as caught:
            list(read_influx(source, ["a"], timeout=2, outbound=OutboundPolicy()))
        assert caught.value.retryable is False
        assert "may not be called: loopback" in str(caught.value)
        assert influx.recorded("POST") == []  # no request, so no Authorization: Token header went anywhere
    finally:
        influx.stop()


def test_resolve_refuses_a_name_with_any_denied_address(monkeypatch):
    def two_answers(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]

    monkeypatch.setattr(outbound_module.socket, "getaddrinfo", two_answers)
    with pytest.raises(OutboundDenied) as caught:
        OutboundPolicy().resolve("mixed.example", 80)
    assert caught.value.rule == "link-local (cloud metadata)"


def test_a_name_the_operator_allows_may_resolve_anywhere(resolving):
    resolving({"rapp.local": "127.0.0.1"})
    assert OutboundPolicy(allow="rapp.local").resolve("rapp.local", 80)[0][4][0] == "127.0.0.1"
    with pytest.raises(OutboundDenied):
        OutboundPolicy(allow="rapp.local", deny="rapp.local").resolve("rapp.local", 80)


# ---------------------------------------------------------------------------------------- no port oracle
@pytest.mark.parametrize("failure", ["answers 500", "answers 302", "refuses connections"])
def test_a_dme_failure_is_reported_without_the_peers_answer(build_app, failure, caplog):
    dme = DmeDouble().start()
    try:
        app = build_app()  # loopback allowed: the double is local
        client = app.test_client()
        port = dme.port
        if failure == "answers 500":
            dme.fail_with = 500
        elif failure == "answers 302":
            dme.fail_with = 302
        else:
            dme.stop()
        body = feature_group_body(enable_dme=True, host="127.0.0.1", dme_port=port, measured_obj_class="NRCellDU",
                                  source_name="gnb1")
        with caplog.at_level(logging.WARNING):
            problem = assert_problem_details(client.post(FG_V1, json=body), 502)
        assert problem["detail"] == ("The DME information job of 'cell_kpis' could not be created: the feature group "
                                     "was not created; the service log says why")
        assert "DME call failed" in caplog.text  # the operator still learns what happened
    finally:
        dme.stop()

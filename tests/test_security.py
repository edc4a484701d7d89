"""Security: mutual TLS against Mosquitto with require_certificate, `insecure` warnings at start, a
canary secret that must never show up, and warnings for secret files readable by others."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path

import pytest
import yaml

from e2e_support import counter_servers, device_ports, write_config
from gateway.cli import commands as cli
from gateway.app import Gateway
from gateway.config import MqttSinkConfig, load_config
from gateway.health import fetch
from gateway.sinks.mqtt import MqttSink
from gateway.security import startup_warnings
from servers import free_port, make_ca, make_client_cert
from support import STOP, until

CANARY = "canary-5ecr3t-Zq81"


async def _connect_outcome(sink: MqttSink, timeout: float = 30.0) -> bool:
    """True once connected, False once the first attempt failed (``sink.last_error`` says why)."""
    await until(lambda: sink.connected or sink.last_error is not None, timeout, "a first connection outcome")
    return sink.connected


def _sink(broker, **tls) -> MqttSink:
    # keepalive 5 s: the connect timeout (TCP, TLS, CONNACK) is then 10 s, the shortest the sink allows
    cfg = MqttSinkConfig.model_validate({"type": "mqtt", "host": "127.0.0.1", "port": broker.port, "tls": tls,
                                         "keepalive": "5s", "reconnect_min": "1s", "reconnect_max": "5s"})
    return MqttSink("secure", cfg, "gw-test", "lab")


async def test_mutual_tls_with_a_client_certificate_connects(mosquitto_mtls, close_default_executor) -> None:
    cert, key = make_client_cert(mosquitto_mtls.tls.ca.parent)
    async with _sink(mosquitto_mtls, ca_file=str(mosquitto_mtls.tls.ca), cert_file=str(cert), key_file=str(key)) as sink:
        assert await _connect_outcome(sink), sink.last_error
        await sink.send([("sluice/lab/gw-test/probe", b"m,device=x v=1 1")])


async def test_missing_client_certificate_fails_clearly(mosquitto_mtls, close_default_executor, caplog) -> None:
    # With TLS 1.3 the broker rejects the missing certificate after the handshake; aiomqtt only
    # logs that alert, and the connection attempt ends when no CONNACK comes. The hint must say
    # what to check.
    async with _sink(mosquitto_mtls, ca_file=str(mosquitto_mtls.tls.ca)) as sink:
        assert not await _connect_outcome(sink)
    assert "cannot connect to 127.0.0.1" in caplog.text
    assert "client certificate" in caplog.text, caplog.text  # the hint names what is missing


async def test_wrong_ca_fails_clearly(mosquitto_mtls, tmp_path: Path, close_default_executor, caplog) -> None:
    cert, key = make_client_cert(mosquitto_mtls.tls.ca.parent)
    other = make_ca(tmp_path / "other-ca")
    async with _sink(mosquitto_mtls, ca_file=str(other.ca), cert_file=str(cert), key_file=str(key)) as sink:
        assert not await _connect_outcome(sink)
        assert "certificate verify failed" in (sink.last_error or "")
    assert f"check tls.ca_file ({other.ca})" in caplog.text


def _gateway_dir(tmp_path: Path, broker_port: int, servers, health_port: int, **sink_extra) -> Path:
    cfg = write_config(tmp_path / "cfg", devices=device_ports({0: [("tank-a", 1)]}, servers),
                       broker_port=broker_port, sink_extra=sink_extra)
    data = yaml.safe_load((cfg / "gateway.yaml").read_text())
    data["health"] = {"listen": f"127.0.0.1:{health_port}"}
    (cfg / "gateway.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (cfg / "gateway.yaml").chmod(0o640)
    return cfg


async def test_canary_secret_never_appears(tmp_path: Path, mosquitto, monkeypatch, caplog, capsys,
                                           close_default_executor) -> None:
    monkeypatch.setenv("SLUICE_TEST_PASSWORD", CANARY)
    caplog.set_level(logging.DEBUG)
    servers = counter_servers({0: [("tank-a", 1)]})
    port = free_port()
    seen: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        for s in servers:
            await stack.enter_async_context(s)
        cfg = _gateway_dir(tmp_path, mosquitto.port, servers, port, username="gw", password="${SLUICE_TEST_PASSWORD}")
        config = load_config(cfg)
        assert config.gateway.sinks["broker"].password.get_secret_value() == CANARY  # it is really used
        seen += [repr(config), str(config.gateway)]
        stop = asyncio.Event()
        gw = Gateway(config)
        task = asyncio.create_task(gw.run(stop), name="gateway-under-test")
        try:
            await until(lambda: gw.forwarders and gw.forwarders[0].stats.delivered,  # type: ignore[attr-defined]
                        what="a delivery with the secret in use")
            for path in ("/metrics", "/healthz"):
                seen.append((await asyncio.to_thread(fetch, "127.0.0.1", port, path))[1])
            assert await asyncio.to_thread(cli.main, ["status", "-c", str(cfg)]) == 0
        finally:
            stop.set()
            await asyncio.wait_for(task, STOP)
    # error output: a configuration with the secret and a mistake next to it
    bad = yaml.safe_load((cfg / "gateway.yaml").read_text())
    bad["sinks"]["broker"]["qos"] = 7
    bad["sinks"]["broker"]["port"] = "${SLUICE_TEST_PASSWORD}"  # the secret in a field that rejects it
    (cfg / "gateway.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    assert cli.main(["check", "-c", str(cfg)]) == cli.EXIT_CONFIG
    captured = capsys.readouterr()
    seen += [captured.out, captured.err, caplog.text]
    assert "status" in captured.out or "tank-a" in captured.out
    leaks = [text[max(0, text.find(CANARY) - 80):text.find(CANARY) + 40] for text in seen if CANARY in text]
    assert not leaks, leaks


def test_insecure_link_warns_at_every_start(tmp_path: Path, caplog) -> None:
    cfg = write_config(tmp_path / "cfg", devices={}, broker_port=1883,
                       sink_extra={"host": "192.0.2.10", "insecure": True})
    warnings = startup_warnings(load_config(cfg))
    assert any("sink broker: `insecure: true`" in w and "192.0.2.10" in w and "without TLS" in w for w in warnings)


async def test_insecure_warning_is_logged_by_the_gateway(tmp_path: Path, caplog, close_default_executor) -> None:
    cfg = write_config(tmp_path / "cfg", devices={}, broker_port=free_port(),
                       sink_extra={"host": "127.0.0.1", "insecure": True})
    stop = asyncio.Event()
    stop.set()
    for _start in range(2):
        caplog.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(Gateway(load_config(cfg)).run(stop), 20)
        assert [r for r in caplog.records if r.levelno == logging.WARNING and "`insecure: true`" in r.getMessage()]


def test_a_health_endpoint_open_to_the_network_warns(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "cfg", devices={}, broker_port=None)
    gateway_yaml = cfg / "gateway.yaml"
    assert not [w for w in startup_warnings(load_config(cfg)) if "health.listen" in w]
    gateway_yaml.write_text(re.sub(r"(?m)^health:.*\n(  .*\n)*", "health:\n  listen: 0.0.0.0:9108\n", gateway_yaml.read_text()))
    assert [w for w in startup_warnings(load_config(cfg)) if "health.listen is 0.0.0.0:9108" in w]


@pytest.mark.parametrize("literal", [True, False])
def test_secret_files_readable_by_others_warn(tmp_path: Path, monkeypatch, literal: bool) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text(CANARY)
    secret.chmod(0o644)
    monkeypatch.setenv("SLUICE_TEST_PASSWORD", CANARY)
    password = CANARY if literal else f"${{file:{secret}}}"
    cfg = write_config(tmp_path / "cfg", devices={}, broker_port=1883,
                       sink_extra={"username": "gw", "password": password})
    gateway_yaml = cfg / "gateway.yaml"
    gateway_yaml.chmod(0o644)
    warnings = startup_warnings(load_config(cfg))
    flagged = gateway_yaml if literal else secret
    assert any(str(flagged) in w and "readable by every user" in w for w in warnings), warnings
    assert not any(CANARY in w for w in warnings)
    flagged.chmod(0o640)
    assert not [w for w in startup_warnings(load_config(cfg)) if "readable" in w]


def test_a_password_from_the_environment_is_not_a_secret_in_the_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLUICE_TEST_PASSWORD", CANARY)
    cfg = write_config(tmp_path / "cfg", devices={}, broker_port=1883,
                       sink_extra={"username": "gw", "password": "${SLUICE_TEST_PASSWORD}"})
    (cfg / "gateway.yaml").chmod(0o644)
    assert not [w for w in startup_warnings(load_config(cfg)) if "readable" in w]


def test_unauthenticated_receipts_warn_until_a_secret_is_set(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLUICE_TEST_RECEIPT_KEY", CANARY * 2)
    e2e = {"protocol": "5", "delivery": "end_to_end"}
    cfg = write_config(tmp_path / "a", devices={}, broker_port=1883, sink_extra=e2e)
    assert [w for w in startup_warnings(load_config(cfg)) if "publish on sluice-receipts/lab/gw-test can" in w]
    cfg = write_config(tmp_path / "b", devices={}, broker_port=1883,
                       sink_extra={**e2e, "receipt_secret": "${SLUICE_TEST_RECEIPT_KEY}"})
    warnings = startup_warnings(load_config(cfg))
    assert not [w for w in warnings if "receipts are not authenticated" in w]
    assert not any(CANARY in w for w in warnings)

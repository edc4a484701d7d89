"""What survives an InfluxDB outage behind a broker (issue 11 item 6): ``sluice ingest check`` and
the ingest's start-up read the broker's queue limits from its mosquitto.conf (include_dir too, the
last value wins) and say what they mean; without a readable file they say what to check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from gateway.cloud.brokerconf import broker_is_local, read_mosquitto


def _ingest_yaml(path: Path, **mqtt: object) -> Path:
    path.write_text(yaml.safe_dump({"mqtt": {"host": "127.0.0.1", "port": 1883, **mqtt},
                                    "influxdb": {"url": "http://127.0.0.1:8086", "api": "v1", "database": "x"}}))
    return path


def _check(config: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "ingest", "check", "-c", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_reads_limits_with_include_dir_and_mosquittos_defaults(tmp_path: Path) -> None:
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    main = tmp_path / "mosquitto.conf"
    main.write_text(f"# Debian's stock file\npersistence true\nmax_queued_messages 500\ninclude_dir {conf_d}\n")
    (conf_d / "b.conf").write_text("max_queued_messages 0\n")
    (conf_d / "a.conf").write_text("max_queued_bytes 1048576\nmax_queued_messages 7\n")
    (conf_d / "README").write_text("max_queued_messages 3\n")  # not a .conf: Mosquitto ignores it too
    limits = read_mosquitto(main)
    assert limits is not None
    assert (limits.max_queued_messages, limits.max_queued_bytes, limits.persistence) == (0, 1048576, True)
    assert limits.files == [main, conf_d / "a.conf", conf_d / "b.conf"]
    (tmp_path / "empty.conf").write_text("")
    empty = read_mosquitto(tmp_path / "empty.conf")
    assert empty is not None and (empty.max_queued_messages, empty.persistence) == (1000, False)
    assert read_mosquitto(tmp_path / "missing.conf") is None
    assert broker_is_local("127.0.0.1") and broker_is_local("::1") and broker_is_local("localhost")
    assert not broker_is_local("192.0.2.10") and not broker_is_local("broker.example.com")


def test_check_says_what_survives_a_database_outage(tmp_path: Path) -> None:
    stock = tmp_path / "mosquitto.conf"
    stock.write_text("persistence true\npersistence_location /var/lib/mosquitto/\n")  # Debian's settings
    out = _check(_ingest_yaml(tmp_path / "a.yaml", broker_config=str(stock)))
    assert f"warning: the broker ({stock}) queues at most 1000 messages (max_queued_messages) for this ingest's session" in out
    assert "set max_queued_messages 0" in out and "`delivery: end_to_end` publish again" in out

    stock.write_text("persistence true\nmax_queued_messages 0\n")
    out = _check(_ingest_yaml(tmp_path / "b.yaml", broker_config=str(stock)))
    assert "info: the broker" in out and "queues every message (max_queued_messages 0)" in out and "warning" not in out

    stock.write_text("max_queued_messages 0\n")
    out = _check(_ingest_yaml(tmp_path / "c.yaml", broker_config=str(stock)))
    assert "warning:" in out and "persistence is off" in out

    remote = _check(_ingest_yaml(tmp_path / "d.yaml", host="192.0.2.10", insecure=True))
    assert "the broker is not on this machine" in remote and "max_queued_messages" in remote

    off = tmp_path / "e.yaml"
    _ingest_yaml(off, broker_config=str(stock))
    doc = yaml.safe_load(off.read_text())
    doc["receipt_topics"] = []
    off.write_text(yaml.safe_dump(doc))
    out = _check(off)
    assert "warning: receipts are off (receipt_topics: [])" in out
    assert "a broker queue limit bounds what survives an InfluxDB outage" in out

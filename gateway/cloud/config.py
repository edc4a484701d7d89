"""Configuration of ``sluice ingest`` (``ingest.yaml``): validated like gateway.yaml, with every
error reported as ``file:line:col: what is wrong — what to do``. The ``influxdb:`` block takes
the keys of the gateway's influxdb sink (see gateway/config.py), except ``batch``, which is a
top-level block here because it also bounds what is held unacknowledged at the broker."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gateway.config import (
    InfluxSinkConfig,
    ListenConfig,
    LoggingConfig,
    TlsConfig,
    _display,
    check_receipt_secret,
    check_remote_link,
    expand_secrets,
)
from gateway.driver import StrictModel
from gateway.mqtt.client import topic_matches
from gateway.secretref import Secret
from gateway.units import ByteSize, Duration
from gateway.validation import validate_doc
from gateway.yamlpos import ConfigError, ConfigErrors, load_yaml

__all__ = ["IngestConfig", "load_ingest_config"]


def _check_filter(value: str) -> str:
    if not value or value.startswith("$share/"):
        raise ValueError(f"'{value}': give the plain topic filter — `group:` adds the $share/<group>/ prefix")
    levels = value.split("/")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            raise ValueError(f"'{value}' is not a valid topic filter — '+' must be a whole level and '#' the "
                             "whole last level")
    return value


class IngestMqttConfig(StrictModel):
    host: str = Field(min_length=1, description="the broker's address")
    port: int | None = Field(default=None, ge=1, le=65535, description="1883, or 8883 with tls")
    client_id: str | None = Field(default=None, max_length=128,
                                  description="stable id of this worker's persistent session; default sluice-ingest-<hostname>")
    username: str | None = Field(default=None, description="user name at the broker")
    password: Secret | None = Field(default=None, description="better from a file or credential: ${file:/etc/sluice/pw}")
    group: str | None = Field(default=None, pattern=r"^[^/+#]{1,64}$",
                              description="shared-subscription group: workers with the same group share the messages")
    topics: list[str] = Field(default_factory=lambda: ["sluice/+/+/+"], min_length=1,
                              description="topic filters of the gateways' readings")
    qos: Literal[1] = Field(default=1, description="QoS of the subscription (1: at least once, acknowledged after the write)")
    keepalive: Duration = Field(default=30.0, ge=5, le=3600)
    session_expiry: Duration = Field(default=7 * 86400.0, ge=60, le=2**32 - 1,
                                     description="how long the broker keeps this worker's session and messages while it is away")
    reconnect_min: Duration = Field(default=0.5, gt=0)
    reconnect_max: Duration = Field(default=30.0, gt=0)
    tls: TlsConfig | None = Field(default=None, description="TLS: the CA to trust, a client certificate; absent: plaintext")
    insecure: bool = Field(default=False, description="allow plaintext or unverified TLS to a remote host")
    broker_config: Path | None = Field(
        default=None, description="the broker's mosquitto.conf, read by `sluice ingest check` and at start-up to report "
                                  "its queue limits (default: /etc/mosquitto/mosquitto.conf when host is this machine)")

    _topics = field_validator("topics")(lambda v: [_check_filter(t) for t in v])

    @model_validator(mode="after")
    def _secure(self) -> IngestMqttConfig:
        check_remote_link(self.host, plaintext=self.tls is None, tls=self.tls, insecure=self.insecure,
                          protocol="MQTT", fix="add a `tls:` section", peer="broker")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max is smaller than reconnect_min — swap them")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together — give both, or neither")
        return self

    @property
    def effective_port(self) -> int:
        return self.port or (8883 if self.tls else 1883)

    @property
    def effective_client_id(self) -> str:
        return self.client_id or f"sluice-ingest-{socket.gethostname()}"

    def subscriptions(self) -> list[str]:
        return [f"$share/{self.group}/{t}" if self.group else t for t in self.topics]


class IngestInfluxConfig(InfluxSinkConfig):
    """The influxdb sink's keys; ``type`` is implied and ``batch`` lives at the top level."""

    type: Literal["influxdb"] = Field(default="influxdb", description="influxdb (implied; may be left out)")

    @model_validator(mode="before")
    @classmethod
    def _no_batch(cls, data: Any) -> Any:
        if isinstance(data, dict) and "batch" in data:
            raise ValueError("`batch` is a top-level block in ingest.yaml — move it out of `influxdb:`")
        return data


class IngestBatchConfig(StrictModel):
    max_points: int = Field(default=5000, ge=1, le=1_000_000, description="points per write request")
    max_bytes: ByteSize = Field(default=1024**2, ge=1024, le=64 * 1024**2, description="line protocol per write request")
    linger: Duration = Field(default=0.2, le=60, description="wait this long for more messages before a part-full write")
    max_unacked: int = Field(default=1000, ge=1, le=65535,
                             description="messages the broker may hand us before we acknowledge (MQTT 5 receive maximum): "
                                         "the bound on what is held in memory")


class MetricsConfig(ListenConfig):
    listen: str = Field(default="127.0.0.1:9466", description="host:port of GET /metrics (loopback unless you mean it)")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, _port = cls.split_listen(v, "127.0.0.1:9466")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise ValueError(f"'{host}' is not an IP address — give the address to listen on, e.g. 127.0.0.1") from None
        return v


class IngestConfig(StrictModel):
    mqtt: IngestMqttConfig = Field(description="the broker the gateways publish to")
    influxdb: IngestInfluxConfig = Field(description="the database the readings are written to")
    batch: IngestBatchConfig = Field(default=IngestBatchConfig(), description="how messages are grouped into writes")
    format: Literal["auto", "influx", "json"] = Field(
        default="auto", description="payload format; auto: JSON when it starts with '{', else line protocol")
    dead_letter_topic: str = Field(default="sluice-dlq/{topic}", min_length=1,
                                   description="where malformed messages go; {topic} is the original topic")
    receipt_topics: list[str] = Field(
        default_factory=lambda: ["sluice-receipts/#"],
        description="end-to-end receipts are published only to response topics under these filters ([] : none)")
    receipt_secret: Secret | None = Field(
        default=None, description="HMAC key of the receipts; the same as the gateways' sinks' receipt_secret")
    metrics: MetricsConfig | None = Field(default=None, description="serve GET /metrics (Prometheus)")
    logging: LoggingConfig = Field(default=LoggingConfig(), description="what is logged, and how")

    _receipt_topics = field_validator("receipt_topics")(lambda v: [_check_filter(t) for t in v])
    _receipt_secret = field_validator("receipt_secret")(lambda v: check_receipt_secret(v))

    @field_validator("dead_letter_topic")
    @classmethod
    def _dlq(cls, v: str) -> str:
        if "+" in v or "#" in v:
            raise ValueError(f"'{v}' contains a wildcard — a topic to publish to cannot")
        if v.replace("{topic}", "").count("{") or v.replace("{topic}", "").count("}"):
            raise ValueError(f"'{v}': the only placeholder is {{topic}}")
        return v

    @model_validator(mode="after")
    def _no_loop(self) -> IngestConfig:
        for depth in range(1, 6):
            sample = self.dead_letter_topic.format(topic="/".join(["x"] * depth))
            for filt in self.mqtt.topics:
                if topic_matches(filt, sample):
                    raise ValueError(f"dead_letter_topic '{self.dead_letter_topic}' falls under the subscription "
                                     f"'{filt}' — dead letters would be read again; choose a topic outside it")
        return self


def load_ingest_config(path: Path | str, *, secrets: bool = True) -> IngestConfig:
    """Load and validate ``ingest.yaml``; raise :class:`ConfigErrors` with every problem.
    ``secrets=False``: files and credentials are not read (gateway/secretref.py)."""
    path = Path(path)
    errors: list[ConfigError] = []
    doc, errs = load_yaml(path, _display(path))
    errors += errs
    if doc is None:
        raise ConfigErrors(errors)
    config = validate_doc(doc, IngestConfig, errors, expand_secrets(doc, errors, None if secrets else []))
    if errors or config is None:
        raise ConfigErrors(errors or [ConfigError(_display(path), 1, 1, "invalid configuration")])
    return config

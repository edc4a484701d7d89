"""Configuration: gateway.yaml, devices/*.yaml and profiles/*.yaml, validated with every error
reported as ``file:line:col: what is wrong — what to do``, all at once, never as a traceback."""

from __future__ import annotations

import difflib
import ipaddress
import os
import ssl
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from gateway import driver as drivers
from gateway.outbox.space import disk_budget
from gateway.driver import AnyDevice, Device, DriverModule, ProfileConfig, StrictModel
from gateway.secretref import Secret, SecretRef, expand_secrets
from gateway.units import ByteSize, Duration, Identifier
from gateway.validation import validate_doc
from gateway.yamlpos import ConfigError, ConfigErrors, YamlDoc, load_yaml

__all__ = ["Config", "ConfigError", "ConfigErrors", "expand_secrets", "load_config"]

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GatewayIdentity(StrictModel):
    id: Identifier = Field(description="this gateway's id, unique in your fleet")
    site: Identifier = Field(description="the site (farm, workshop) the gateway is installed at")


class BufferConfig(StrictModel):
    path: Path = Field(default=Path("outbox.db"),
                       description="SQLite outbox; relative paths are under $STATE_DIRECTORY or the working directory")
    max_bytes: ByteSize = Field(default=256 * 1024**2, ge=64 * 1024)
    when_full: Literal["drop_oldest", "drop_newest"] = Field(default="drop_oldest",
                                                             description="at max_bytes: drop the oldest readings or the newest")
    synchronous: Literal["full", "normal"] = Field(default="full", description="full: a commit survives a power cut; "
                                                   "normal: faster, the last commits may be lost")
    commit_delay: Duration = Field(default=0.02, le=5,
                                   description="gather readings this long before one commit")

    def resolved_path(self) -> Path:
        if self.path.is_absolute():
            return self.path
        return Path(os.environ.get("STATE_DIRECTORY", ".").split(":")[0]) / self.path


class TlsConfig(StrictModel):
    ca_file: Path | None = Field(default=None, description="CA bundle; the system's when absent")
    cert_file: Path | None = Field(default=None, description="client certificate (PEM), for mutual TLS, with key_file")
    key_file: Path | None = Field(default=None, description="its private key (PEM)")
    verify: bool = Field(default=True, description="check the server's certificate and name")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together — give both for mutual TLS, or neither")
        return self


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The client TLS context for a ``tls:`` block (``ca_file`` or the system CAs, an optional
    client certificate, verification unless ``verify: false``) — one for every sink and ingest."""
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file is not None and tls.key_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_http_url(v: str, example: str, only: str) -> str:
    """An http:// or https:// URL with a host and no query or fragment (``example`` shows the form,
    ``only`` says what to give instead); returned without a trailing slash."""
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"'{v}' is not an http:// or https:// URL — write it like {example}")
    if parts.query or parts.fragment:
        raise ValueError(f"the URL has a query or fragment — give only {only}")
    return v.rstrip("/")


def check_remote_link(host: str, *, plaintext: bool, tls: TlsConfig | None, insecure: bool, protocol: str,
                      fix: str, peer: str) -> None:
    """The security rule for every outgoing link: to a host that is not loopback, no plaintext and
    no unverified TLS unless the operator set ``insecure: true``."""
    if is_loopback(host) or insecure:
        return
    if plaintext:
        raise ValueError(f"plaintext {protocol} to the remote host '{host}' — {fix} (recommended) or set "
                         "`insecure: true` if the link is private")
    if tls is not None and not tls.verify:
        raise ValueError(f"tls.verify is false for a remote host — give the {peer}'s CA in tls.ca_file, or set "
                         "`insecure: true` to accept an unverified link")


class ListenConfig(StrictModel):
    """A ``listen: host:port`` address of a local HTTP endpoint (subclasses give the field)."""

    listen: str

    @staticmethod
    def split_listen(v: str, example: str) -> tuple[str, int]:
        host, sep, port = v.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"'{v}' is not host:port — write it like {example}")
        return host, int(port)

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class BatchConfig(StrictModel):
    max_readings: int = Field(default=500, ge=1, le=100_000, description="readings per message, at most")
    max_bytes: ByteSize = Field(default=64 * 1024, ge=1024, le=64 * 1024**2)
    linger: Duration = Field(default=0.2, le=3600,
                             description="wait this long for more readings before sending a part-full batch")


TOPIC_FIELDS = frozenset({"site", "gateway", "device", "profile", "measurement"})


def _check_template(template: str, allowed: frozenset[str]) -> str:
    for _lit, name, _spec, _conv in string.Formatter().parse(template):
        if name is not None and name not in allowed:
            raise ValueError(f"unknown placeholder {{{name}}} — use one of "
                             + ", ".join("{" + a + "}" for a in sorted(allowed)))
    return template


RECEIPT_SECRET_MIN = 16


def check_receipt_secret(value: SecretStr | None) -> SecretStr | None:
    """A receipt secret must be long enough to be one (the value is never echoed; one not read
    at load time is checked where it is read)."""
    if value is not None and not isinstance(value, SecretRef) and len(value.get_secret_value()) < RECEIPT_SECRET_MIN:
        raise ValueError(f"receipt_secret is shorter than {RECEIPT_SECRET_MIN} characters — use a random one, e.g. "
                         "`openssl rand -hex 32` in a file read with ${file:...}")
    return value


class MqttSinkConfig(StrictModel):
    type: Literal["mqtt"] = Field(description="mqtt: publish to an MQTT broker")
    host: str = Field(min_length=1, description="the broker's address", examples=["127.0.0.1", "broker.example.com"])
    port: int | None = Field(default=None, ge=1, le=65535, description="1883, or 8883 with tls")
    client_id: str | None = Field(default=None, description="defaults to sluice-<gateway id>")
    username: str | None = Field(default=None, description="user name at the broker")
    password: Secret | None = Field(default=None, description="better from a file or credential: ${file:/etc/sluice/pw}")
    protocol: Literal["3.1.1", "5"] = Field(default="3.1.1", description="MQTT version; \"5\" in quotes")
    topic: str = Field(default="sluice/{site}/{gateway}/readings",
                       description="one topic per gateway: a poll cycle's readings share a message (each line "
                                   "names its device); placeholders: site, gateway, device, profile, measurement")
    status_topic: str = Field(default="sluice/{site}/{gateway}/status", description="retained online/offline "
                              "status (the last will); placeholders {site} {gateway}")
    format: Literal["influx", "json"] = Field(default="influx", description="payload: InfluxDB line protocol or JSON")
    qos: Literal[1, 2] = Field(default=1, description="MQTT QoS; 1 with the outbox is at-least-once")
    keepalive: Duration = Field(default=30.0, ge=5, le=3600)
    max_inflight: int = Field(default=8, ge=1, le=100, description="messages awaiting PUBACK at once")
    batch: BatchConfig = Field(default=BatchConfig(), description="how readings are grouped into messages")
    reconnect_min: Duration = Field(default=0.5, gt=0)
    reconnect_max: Duration = Field(default=30.0, gt=0)
    tls: TlsConfig | None = Field(default=None, description="TLS: the CA to trust, a client certificate; absent: plaintext")
    insecure: bool = Field(default=False, description="allow plaintext or unverified TLS to a remote host")
    delivery: Literal["broker", "end_to_end"] = Field(
        default="broker", description="broker: done at the broker's PUBACK; end_to_end: kept in the outbox "
                                      "until `sluice ingest` sends a receipt after its database write (MQTT 5)")
    receipt_topic: str = Field(default="sluice-receipts/{site}/{gateway}",
                               description="end_to_end: where ingest publishes receipts for this gateway")
    receipt_timeout: Duration = Field(default=60.0, ge=1, le=86400,
                                      description="end_to_end: re-send what has no receipt after this long")
    receipt_window: int = Field(default=20_000, ge=1, le=10_000_000,
                                description="end_to_end: readings published but not yet confirmed, at most")
    receipt_secret: Secret | None = Field(
        default=None, description="end_to_end: shared with `sluice ingest`; receipts without its HMAC are ignored")

    _topic = field_validator("topic")(lambda v: _check_template(v, TOPIC_FIELDS))
    _status = field_validator("status_topic")(
        lambda v: _check_template(v, frozenset({"site", "gateway"})))
    _receipts = field_validator("receipt_topic")(
        lambda v: _check_template(v, frozenset({"site", "gateway"})))
    _receipt_secret = field_validator("receipt_secret")(lambda v: check_receipt_secret(v))

    @field_validator("delivery")
    @classmethod
    def _delivery(cls, v: str, info: ValidationInfo) -> str:
        # The batch identity travels as MQTT 5 properties (correlation data, response topic), so the
        # payload and topic stay exactly what Telegraf and other consumers read; 3.1.1 has no properties.
        if v == "end_to_end" and info.data.get("protocol") != "5":
            raise ValueError("end_to_end delivery needs MQTT 5 (the batch id travels in MQTT 5 properties) "
                             "— add `protocol: \"5\"` to this sink, or use `delivery: broker`")
        return v

    @model_validator(mode="after")
    def _secure(self) -> MqttSinkConfig:
        check_remote_link(self.host, plaintext=self.tls is None, tls=self.tls, insecure=self.insecure,
                          protocol="MQTT", fix="add a `tls:` section", peer="broker")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max is smaller than reconnect_min — swap them")
        return self

    @property
    def effective_port(self) -> int:
        return self.port or (8883 if self.tls else 1883)


class HttpBatchConfig(BatchConfig):
    """Batches for an HTTP write API: one request per message, so bigger ones (InfluxDB suggests ~5000 lines)."""

    max_readings: int = Field(default=5000, ge=1, le=100_000, description="readings per request, at most")
    max_bytes: ByteSize = Field(default=1024**2, ge=1024, le=64 * 1024**2)
    linger: Duration = Field(default=0.5, le=3600,
                             description="wait this long for more readings before sending a part-full batch")


class InfluxSinkConfig(StrictModel):
    """InfluxDB written directly over HTTP: ``api: v2`` (``/api/v2/write``: InfluxDB 1.8+, 2.x, 3.x,
    Cloud, VictoriaMetrics) or ``api: v1`` (``/write``: InfluxDB 1.x before 1.8)."""

    # The forwarder's view: one line-protocol payload per message, no topics.
    format: ClassVar[Literal["influx"]] = "influx"
    topic: ClassVar[None] = None

    type: Literal["influxdb"] = Field(description="influxdb: write to InfluxDB over HTTP")
    url: str = Field(min_length=1, description="http(s)://host:port of the database")
    api: Literal["v2", "v1"] = Field(default="v2", description="v2: /api/v2/write (InfluxDB 1.8+, 2.x, 3.x, "
                                     "VictoriaMetrics); v1: /write (InfluxDB 1.x before 1.8)")
    org: str | None = Field(default=None, description="v2: the organisation (InfluxDB 2.x/Cloud need it)")
    bucket: str | None = Field(default=None, description="v2: the bucket (InfluxDB 1.8: database/retention)")
    token: Secret | None = Field(default=None, description="v2: an API token with write access")
    database: str | None = Field(default=None, description="v1: the database")
    retention_policy: str | None = Field(default=None, description="v1: the retention policy (default: the database's)")
    username: str | None = Field(default=None, description="v1: user with write access")
    password: Secret | None = Field(default=None, description="better from a file or credential: ${file:/etc/sluice/pw}")
    gzip: bool = Field(default=True, description="compress request bodies")
    timeout: Duration = Field(default=10.0, gt=0, le=600, description="per HTTP request")
    batch: HttpBatchConfig = Field(default=HttpBatchConfig(), description="how readings are grouped into requests")
    retry_min: Duration = Field(default=1.0, gt=0)
    retry_max: Duration = Field(default=60.0, gt=0)
    tls: TlsConfig | None = Field(default=None, description="TLS: the CA to trust, a client certificate; absent: plaintext")
    insecure: bool = Field(default=False, description="allow plaintext HTTP or unverified TLS to a remote host")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_http_url(v, "https://influx.example.com:8086", "scheme://host:port (and a path prefix)")

    @model_validator(mode="after")
    def _consistent(self) -> InfluxSinkConfig:
        mine: tuple[str, ...] = ("org", "bucket", "token")
        other: tuple[str, ...] = ("database", "retention_policy", "username", "password")
        if self.api == "v1":
            mine, other = other, mine
        for key in other:
            if getattr(self, key) is not None:
                raise ValueError(f"'{key}' is not used with api: {self.api} — remove it, or set the api "
                                 f"it belongs to")
        if self.api == "v2" and not self.bucket:
            raise ValueError("api v2 needs a bucket — add `bucket: ...` (InfluxDB 1.8: database/retention_policy)")
        if self.api == "v1" and not self.database:
            raise ValueError("api v1 needs a database — add `database: ...`")
        if self.api == "v1" and (self.username is None) != (self.password is None):
            raise ValueError("username and password go together — give both, or neither")
        parts = urlsplit(self.url)
        check_remote_link(parts.hostname or "", plaintext=parts.scheme != "https", tls=self.tls,
                          insecure=self.insecure, protocol="HTTP", fix="use an https:// URL", peer="server")
        if self.tls is not None and parts.scheme != "https":
            raise ValueError("a `tls:` section with an http:// URL — use https:// or remove `tls:`")
        if self.retry_max < self.retry_min:
            raise ValueError("retry_max is smaller than retry_min — swap them")
        return self


SinkConfig = Annotated[MqttSinkConfig | InfluxSinkConfig, Field(discriminator="type")]


class LoggingConfig(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="what is logged")
    format: Literal["auto", "text", "journal"] = Field(
        default="auto", description="journal: no timestamps, syslog levels; auto: journal under systemd")


class HealthConfig(ListenConfig):
    enabled: bool = Field(default=True, description="serve /healthz and /metrics over HTTP")
    listen: str = Field(default="127.0.0.1:9108",
                        description="host:port of the health endpoint; loopback unless you need it remote")
    watchdog_margin: Duration = Field(default=10.0, ge=1, le=3600,
                                      description="slack past a loop's own limit or deadline before the watchdog "
                                                  "calls it wedged (and stops pinging systemd)")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        cls.split_listen(v, "127.0.0.1:9108 or [::1]:9108")
        return v


class GatewayFile(StrictModel):
    gateway: GatewayIdentity = Field(description="who this gateway is: its id and site")
    buffer: BufferConfig = Field(default=BufferConfig(), description="the outbox on disk that keeps readings until "
                                 "every sink has them")
    sinks: dict[Identifier, SinkConfig] = Field(default_factory=dict, description="where readings go, by name: "
                                                "type: mqtt or type: influxdb")
    logging: LoggingConfig = Field(default=LoggingConfig(), description="what is logged, and how")
    health: HealthConfig = Field(default=HealthConfig(), description="the local /healthz and /metrics endpoint")
    devices_dir: Path = Field(default=Path("devices"), description="the device files; relative to this file")
    profiles_dir: Path = Field(default=Path("profiles"), description="the profiles; relative to this file")


@dataclass(frozen=True)
class Config:
    """A validated configuration: the gateway file and the enabled devices with their profiles."""

    path: Path
    gateway: GatewayFile
    devices: tuple[AnyDevice, ...]
    profiles: dict[str, ProfileConfig]
    warnings: tuple[ConfigError, ...] = ()  # located, not fatal: `check` prints them, `run` logs them
    secrets_read: bool = True
    """False: ``${file:}``/``${cred:}`` references (and unset ``${ENV}``) were not read (``unread``
    says where); secret fields read them when used (gateway/secretref.py)."""
    unread: tuple[ConfigError, ...] = ()

    @property
    def gateway_id(self) -> str:
        return self.gateway.gateway.id

    @property
    def site(self) -> str:
        return self.gateway.gateway.site


# --------------------------------------------------------------------------- loading
def _display(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def load_config(path: Path | str, *, secrets: bool = True) -> Config:
    """Load and validate a configuration directory (or its gateway.yaml). Raises ConfigErrors.

    ``secrets=False``: files and credentials named by ``${...}`` are not read, for commands run from
    a shell that do not use them (gateway/secretref.py)."""
    path = Path(path)
    gw_path = path / "gateway.yaml" if path.is_dir() else path
    errors: list[ConfigError] = []
    unread: list[ConfigError] | None = None if secrets else []
    doc, errs = load_yaml(gw_path, _display(gw_path))
    errors += errs
    if doc is None:
        raise ConfigErrors(errors)
    gateway = validate_doc(doc, GatewayFile, errors, expand_secrets(doc, errors, unread))
    if gateway is not None:
        too_big = disk_budget(gateway.buffer.resolved_path(), gateway.buffer.max_bytes)
        if too_big is not None:
            errors.append(doc.error(("buffer", "max_bytes"), *too_big, key=True, warning=True))
    if gateway is None:
        # Keep going with the directories as written (or their defaults) so that one run
        # reports the mistakes of every file, not just the first broken one.
        raw = doc.data if isinstance(doc.data, dict) else {}
        gateway = GatewayFile.model_construct(
            gateway=GatewayIdentity.model_construct(id="gateway", site="site"),
            devices_dir=Path(raw["devices_dir"]) if isinstance(raw.get("devices_dir"), str) else Path("devices"),
            profiles_dir=Path(raw["profiles_dir"]) if isinstance(raw.get("profiles_dir"), str) else Path("profiles"))
    base = gw_path.parent
    profiles = load_profiles(base / gateway.profiles_dir, errors)
    devices = _load_devices(base / gateway.devices_dir, profiles, gateway, errors, unread)
    warnings = [e for e in errors if e.warning]
    if len(warnings) < len(errors):
        raise ConfigErrors(errors)  # the warnings too, in file order
    return Config(gw_path, gateway, tuple(d for d in devices if d.config.enabled),
                  {name: p for name, p in profiles.items() if p is not None}, tuple(ConfigErrors(warnings).errors),
                  secrets_read=secrets, unread=tuple(unread or ()))


def _yaml_files(directory: Path, what: str, errors: list[ConfigError], anchor: Path) -> list[Path]:
    if not directory.is_dir():
        errors.append(ConfigError(_display(anchor), 1, 1, f"{what} directory {directory} does not exist",
                                  f"create it or set {what}_dir in gateway.yaml"))
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


FoundT = TypeVar("FoundT")


def _protocol_of(doc: YamlDoc, errors: list[ConfigError], find: Callable[[str], FoundT | None],
                 known: Callable[[], list[str]], what: str) -> FoundT | None:
    """The driver module of the file's ``protocol:`` (``find``); ``known`` lists them all for a hint."""
    proto = doc.data.get("protocol") if isinstance(doc.data, dict) else None
    if not isinstance(doc.data, dict):
        errors.append(doc.error((), f"a {what} file must be a block of `key: value` settings",
                                "see the examples under config/"))
        return None
    if proto is None:
        errors.append(doc.error((), "required key 'protocol' is missing", "add `protocol: " + " | ".join(known()) + "`"))
        return None
    module = find(proto) if isinstance(proto, str) else None
    if module is None:
        close = difflib.get_close_matches(str(proto), known(), n=1)
        errors.append(doc.error(("protocol",), f"unknown protocol {proto!r}",
                                f"did you mean '{close[0]}'?" if close else "use one of " + ", ".join(known())))
    return module


def load_profiles(directory: Path, errors: list[ConfigError]) -> dict[str, ProfileConfig | None]:
    """Profiles by name; None for a profile file that exists but did not validate."""
    profiles: dict[str, ProfileConfig | None] = {}
    for file in _yaml_files(directory, "profiles", errors, directory):
        doc, errs = load_yaml(file, _display(file))
        errors += errs
        if doc is None:
            continue
        module = _protocol_of(doc, errors, drivers.driver_for_profile_kind, drivers.known_profile_kinds, "profile")
        if module is None:
            profiles[file.stem] = None
            continue
        model = validate_doc(doc, module.ProfileModel, errors)
        # A broken profile is kept as None: its own errors are reported, and devices that use it
        # must not add a misleading "unknown profile" on top.
        profiles[file.stem] = model
    return profiles


def _load_devices(directory: Path, profiles: dict[str, ProfileConfig | None], gateway: GatewayFile,
                  errors: list[ConfigError], unread: list[ConfigError] | None = None) -> list[AnyDevice]:
    devices: list[AnyDevice] = []
    driver_of: dict[str, DriverModule] = {}  # device id -> the driver serving its protocol
    docs: dict[str, YamlDoc] = {}
    for file in _yaml_files(directory, "devices", errors, directory):
        doc, errs = load_yaml(file, _display(file))
        errors += errs
        if doc is None:
            continue
        module = _protocol_of(doc, errors, drivers.driver_for_protocol, drivers.known_protocols, "device")
        if module is None:
            continue
        cfg = validate_doc(doc, module.DeviceModel, errors, expand_secrets(doc, errors, unread))
        if cfg is None:
            continue
        if cfg.id in docs:
            other = docs[cfg.id]
            errors.append(doc.error(("id",), f"device id '{cfg.id}' is already used by {other.path}",
                                    "give every device its own id"))
            continue
        docs[cfg.id] = doc
        if cfg.profile in profiles and profiles[cfg.profile] is None:
            continue  # the profile's own errors are reported
        profile = profiles.get(cfg.profile)
        if profile is None:
            close = difflib.get_close_matches(cfg.profile, list(profiles), n=1)
            hint = f"did you mean '{close[0]}'?" if close else (
                f"add {gateway.profiles_dir}/{cfg.profile}.yaml; available: " + (", ".join(sorted(profiles)) or "none"))
            errors.append(doc.error(("profile",), f"unknown profile '{cfg.profile}'", hint))
            continue
        if profile.protocol != module.PROFILE_KIND:
            errors.append(doc.error(("profile",), f"profile '{cfg.profile}' is for {profile.protocol} devices, "
                                    f"this device uses {cfg.protocol}", "choose a profile of the same protocol"))
            continue
        tags = {"site": gateway.gateway.site, "gateway": gateway.gateway.id, "device": cfg.id,
                "profile": cfg.profile, **cfg.tags}
        measurement = cfg.measurement or profile.measurement or cfg.profile
        devices.append(Device(cfg, profile, cfg.profile, tags, measurement, doc.path))
        driver_of[cfg.id] = module
    by_module: dict[str, list[AnyDevice]] = {}
    for dev in devices:
        by_module.setdefault(driver_of[dev.id].__name__, []).append(dev)
    claimed: dict[str, tuple[AnyDevice, tuple[str | int, ...]]] = {}
    for dev in (d for d in devices if d.config.enabled):  # a disabled device holds nothing
        for claim in driver_of[dev.id].claims(dev):
            first, loc = claimed.setdefault(claim.resource, (dev, claim.loc))
            if first.config.protocol != dev.config.protocol:
                line, col = docs[first.id].position(loc)
                errors.append(docs[dev.id].error(claim.loc, f"{claim.resource} is already used by '{first.id}' "
                                                 f"({first.source}:{line}:{col}, {first.config.protocol})",
                                                 "one connection speaks one protocol: give each device its own port "
                                                 "or address, or use the same protocol for both"))
    for group in by_module.values():
        for problem in driver_of[group[0].id].check(group):
            errors.append(docs[problem.device.id].error(problem.loc, problem.message, problem.hint,
                                                        warning=problem.warning))
    return devices

"""The ``trace.yaml`` file: lots, locations, thresholds and how reading fields map to GS1 sensor types.

It lives next to ``gateway.yaml`` and is optional (no file: no traceability feed). It is
validated like the rest of the configuration: every mistake reported as
``file:line:col: what is wrong — what to do``, all at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gateway.config import Config, MqttSinkConfig, TlsConfig, _check_template, _display, check_http_url, \
    check_remote_link, expand_secrets
from gateway.driver import StrictModel
from gateway.secretref import Secret
from gateway.trace.hashing import canonical_id, check_digit
from gateway.units import Duration, Identifier
from gateway.validation import validate_doc
from gateway.yamlpos import ConfigError, ConfigErrors, load_yaml

__all__ = ["DISPOSITIONS", "SENSOR_TYPES", "STEP_DISPOSITION", "UNIT_MAP", "EpcisSinkConfig", "JsonlSinkConfig", "TraceConfig", "TraceFile",
           "TraceMqttSinkConfig", "check_reload", "load_trace_config"]

# Profile `unit:` strings -> (GS1 measurement type, UN/ECE Rec 20 code). Units not here (h, kWh,
# A ...) are not traced unless a `points:` entry names their type and uom.
UNIT_MAP: dict[str, tuple[str, str]] = {
    "°C": ("Temperature", "CEL"), "degC": ("Temperature", "CEL"), "C": ("Temperature", "CEL"),
    "°F": ("Temperature", "FAH"), "K": ("Temperature", "KEL"),
    "%RH": ("RelativeHumidity", "P1"), "%rh": ("RelativeHumidity", "P1"),
    "kg": ("Mass", "KGM"), "g": ("Mass", "GRM"), "t": ("Mass", "TNE"), "lb": ("Mass", "LBR"),
    # ppm of a gas (CO2) is parts per million by volume: a VolumeFraction (MassConcentration is mg/m3)
    "ppm": ("VolumeFraction", "59"), "hPa": ("Pressure", "A97"), "Pa": ("Pressure", "PAL"),
    "lx": ("Illuminance", "LUX"), "m/s": ("Speed", "MTS"),
}
# Threshold keys as people write them -> GS1 measurement type.
SENSOR_TYPES: dict[str, str] = {
    "temperature": "Temperature", "relative_humidity": "RelativeHumidity", "humidity": "RelativeHumidity",
    "mass": "Mass", "weight": "Mass", "co2": "VolumeFraction", "pressure": "Pressure",
    "illuminance": "Illuminance", "speed": "Speed",
}
# CBV 2.0 dispositions (GS1's EPCIS 2.0 JSON schema lists the same).
DISPOSITIONS = frozenset({
    "active", "container_closed", "damaged", "destroyed", "dispensed", "disposed", "encoded", "expired", "in_progress",
    "in_transit", "inactive", "no_pedigree_match", "non_sellable_other", "partially_dispensed", "recalled", "reserved",
    "retail_sold", "returned", "sellable_accessible", "sellable_not_accessible", "stolen", "unknown", "available",
    "completeness_verified", "completeness_inferred", "conformant", "container_open", "mismatch_instance",
    "mismatch_class", "mismatch_quantity", "needs_replacement", "non_conformant", "unavailable"})
# The disposition a bizStep usually leaves goods in (CBV 2.0's pairings); other steps: `unknown`.
STEP_DISPOSITION: dict[str, str] = {
    "arriving": "in_progress", "receiving": "in_progress", "accepting": "in_progress", "departing": "in_transit",
    "shipping": "in_transit", "transporting": "in_transit", "storing": "sellable_not_accessible",
    "holding": "sellable_not_accessible", "packing": "in_progress", "unpacking": "in_progress",
    "loading": "in_progress", "unloading": "in_progress", "picking": "in_progress", "staging_outbound": "in_progress",
    "inspecting": "in_progress", "stocking": "sellable_accessible",
    "retail_selling": "retail_sold"}
_GS1_TYPES = frozenset(t for t, _u in UNIT_MAP.values()) | frozenset(SENSOR_TYPES.values()) | {
    "AbsoluteHumidity", "Count", "Density", "Dimensionless", "Length", "Voltage", "Volume", "VolumeFraction"}
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
_LOT_NUMBER = re.compile(r"^[A-Za-z0-9._-]{1,20}$")


def _uri(value: str) -> str:
    if not _URI.match(value):
        raise ValueError(f"'{value}' is not a URI — use urn:epc:id:sgln:..., https://id.gs1.org/414/<GLN> or any absolute URI")
    canonical_id(value)  # raises for GS1 forms the event hash cannot normalise
    return value


class Range(StrictModel):
    min: float | None = Field(default=None, description="lowest allowed value")
    max: float | None = Field(default=None, description="highest allowed value")
    biz_rules: str | None = Field(default=None, description="URI of the business rule this limit comes from (a "
                                  "spec sheet, a contract); an ALARM_CONDITION's sensorMetadata.bizRules. Default: "
                                  "urn:sluice:threshold:<product|lot>:<name>:<measurement>")
    _u = field_validator("biz_rules")(lambda v: v if v is None else _uri(v))

    @model_validator(mode="after")
    def _order(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("a threshold needs min, max or both — e.g. {min: 0, max: 4}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max} — swap them")
        return self


Thresholds = dict[str, Range]


def _check_thresholds(value: Thresholds) -> Thresholds:
    for key in value:
        if key not in SENSOR_TYPES:
            raise ValueError(f"unknown measurement '{key}' — use one of " + ", ".join(sorted(SENSOR_TYPES)))
    return value


class PointMapping(StrictModel):
    type: str = Field(description="GS1 measurement type, e.g. Temperature")
    uom: str = Field(pattern=r"^[A-Z0-9]{2,3}$", description="UN/ECE Rec 20 code, e.g. CEL")

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        if value not in _GS1_TYPES:
            raise ValueError(f"'{value}' is not a GS1 measurement type Sluice knows — use one of " + ", ".join(sorted(_GS1_TYPES)))
        return value


class ProductConfig(StrictModel):
    name: str | None = Field(default=None, description="a name for people")
    thresholds: Thresholds = Field(default_factory=dict, description="measurement -> {min, max}: outside it, an alarm event")
    _t = field_validator("thresholds")(_check_thresholds)


class LotConfig(StrictModel):
    product: Identifier | None = Field(default=None, description="a product of products:, whose thresholds apply")
    gtin: str | None = Field(default=None, description="GTIN-8/12/13/14 with its check digit")
    lot_number: str | None = Field(default=None, description="the GS1 lot (AI 10), with gtin")
    producer: str | None = Field(default=None, description="the producer's entity code")
    attributes: dict[str, str | int | float | bool] = Field(default_factory=dict, description="ILMD master data of the lot (key: value)")
    thresholds: Thresholds = Field(default_factory=dict, description="measurement -> {min, max}: outside it, an alarm event")
    location: Identifier | None = Field(default=None, description="the location the lot is in at start")
    _t = field_validator("thresholds")(_check_thresholds)

    @field_validator("gtin")
    @classmethod
    def _gtin(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"\d{8}|\d{12}|\d{13}|\d{14}", value):
            raise ValueError(f"'{value}' is not a GTIN — write 8, 12, 13 or 14 digits, in quotes")
        if check_digit(value[:-1]) != int(value[-1]):
            raise ValueError(f"GTIN {value}: wrong check digit (expected {check_digit(value[:-1])}) — copy it from the label")
        return value.zfill(14)

    @field_validator("lot_number")
    @classmethod
    def _lot(cls, value: str | None) -> str | None:
        if value is not None and not _LOT_NUMBER.match(value):
            raise ValueError(f"lot number '{value}': use 1 to 20 letters, digits, '.', '_' or '-'")
        return value

    @model_validator(mode="after")
    def _pair(self) -> LotConfig:
        if (self.gtin is None) != (self.lot_number is None):
            raise ValueError("gtin and lot_number go together — give both, or neither")
        return self


class LocationConfig(StrictModel):
    name: str | None = Field(default=None, description="a name for people")
    devices: list[Identifier] = Field(default_factory=list, description="devices that measure this place")
    scanners: list[Identifier] = Field(default_factory=list,
                                       description="code readers: a scanned lot code moves the lot here")
    scales: list[Identifier] = Field(default_factory=list,
                                     description="weighing scales (format: scale): each stable weight is recorded "
                                                 "for the lot that entered here last")
    record_codes: bool = Field(default=False, description="a scanner's code that is no known lot (a packaging code) "
                                                          "is recorded for the lot that entered here last")
    read_point: str = Field(description="urn:epc:id:sgln:..., https://id.gs1.org/414/<GLN> or a URI")
    biz_location: str | None = Field(default=None, description="defaults to read_point")
    biz_step: str = Field(default="storing", description="CBV bizStep of the window reports: storing, transporting ...")
    disposition: str | None = Field(default=None, description="CBV disposition of the window reports, weighings and "
                                    "codes; default from biz_step (storing: sellable_not_accessible, transporting: "
                                    "in_transit, ...; `unknown` for a bizStep without a usual one)")
    points: list[str] | None = Field(default=None, description="reading fields to report; default: every field of a known unit")
    _u = field_validator("read_point", "biz_location")(lambda v: v if v is None else _uri(v))

    @field_validator("biz_step")
    @classmethod
    def _step(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z_]+", value) and not _URI.match(value):
            raise ValueError(f"'{value}' is not a CBV bizStep — e.g. storing, transporting, sensor_reporting")
        return value

    @field_validator("disposition")
    @classmethod
    def _disposition(cls, value: str | None) -> str | None:
        if value is not None and value not in DISPOSITIONS and not _URI.match(value):
            raise ValueError(f"'{value}' is not a CBV disposition — use one of {', '.join(sorted(DISPOSITIONS))} or a URI")
        return value


class TraceFile(StrictModel):
    window: Duration = Field(default=900.0, ge=10, le=86400, description="report period, e.g. 15m")
    outage_after: Duration | None = Field(default=None, gt=0,
                                          description="a gap longer than this is a device outage; default 3 × the device's interval")
    grace: Duration = Field(default=5.0, le=600, description="wait this long after a window for late readings")
    key_file: Path = Field(default=Path("trace-ed25519.key"), description="the gateway's signing key, created on first start")
    head_interval: Duration = Field(default=300.0, ge=1, le=86400,
                                    description="a signed chain head is published to every sink that takes one when "
                                                "its position moves, and at least this often")
    lot_uri: str = Field(default="urn:sluice:lot:{producer}:{lot}",
                         description="identifier of a lot without GTIN; placeholders {producer} {lot}")
    device_uri: str = Field(default="urn:sluice:device:{gateway}:{device}",
                            description="sensorMetadata deviceID; placeholders {site} {gateway} {device}")
    timezone_offset: str | None = Field(default=None, pattern=r"^[+-](0\d|1[0-3]):[0-5]\d$|^\+14:00$",
                                        description="eventTimeZoneOffset, e.g. +01:00; default: the system's time "
                                                    "zone at each event's time (daylight saving time included)")
    points: dict[str, PointMapping] = Field(default_factory=dict,
                                            description="field name -> GS1 type and uom, overriding the profile's unit")
    products: dict[Identifier, ProductConfig] = Field(default_factory=dict, description="kinds of goods and their thresholds")
    locations: dict[Identifier, LocationConfig] = Field(default_factory=dict,
                                                        description="places (a cold room, a greenhouse) and their devices")
    lots: dict[Identifier, LotConfig] = Field(default_factory=dict, description="the lots traced, by id")
    sinks: dict[Identifier, Annotated[JsonlSinkConfig | TraceMqttSinkConfig | EpcisSinkConfig,
                                      Field(discriminator="type")]] = Field(
        default_factory=dict, description="where events go, by name: type: jsonl, mqtt or epcis")


class JsonlSinkConfig(StrictModel):
    type: Literal["jsonl"] = Field(description="jsonl: a local append-only file")
    path: Path = Field(description="append-only file, one signed EPCIS document per line; relative to the state directory")


_TRACE_TOPIC_FIELDS = frozenset({"site", "gateway"})


class TraceMqttSinkConfig(MqttSinkConfig):
    """An MQTT broker for the feed: every sealed event is one QoS 1 message (the signed one-event
    document, byte for byte the JSON Lines line), acknowledged in the outbox after its PUBACK. The
    same connection takes binding commands on ``command_topic`` and answers on ``reply_topic``."""

    topic: str = Field(default="sluice/{site}/{gateway}/trace/events", description="where events are published")
    status_topic: str = Field(default="sluice/{site}/{gateway}/trace/status", description="retained status of the feed")
    command_topic: str | None = Field(default="sluice/{site}/{gateway}/trace/cmd",
                                      description="lot bindings as JSON {op, lot, location}; null: no commands")
    reply_topic: str = Field(default="sluice/{site}/{gateway}/trace/cmd/reply", description="answers to commands")
    head_topic: str | None = Field(default="sluice/{site}/{gateway}/trace/head",
                                   description="signed chain heads (QoS 1); null: none published")
    qos: Literal[1] = Field(default=1, description="MQTT QoS: 1")

    _topics = field_validator("topic", "command_topic", "reply_topic", "head_topic")(
        lambda v: v if v is None else _check_template(v, _TRACE_TOPIC_FIELDS))


class EpcisSinkConfig(StrictModel):
    """An EPCIS 2.0 repository's capture interface: ``POST <url><path>`` with one signed
    EPCISDocument per event, ``Content-Type: application/ld+json``."""

    type: Literal["epcis"] = Field(description="epcis: an EPCIS 2.0 repository's capture interface")
    url: str = Field(min_length=1, description="base URL of the EPCIS 2.0 REST interface, e.g. https://epcis.example.com/epcis")
    path: Literal["/capture", "/events"] = Field(default="/capture", description="capture endpoint")
    auth_header: str = Field(default="Authorization", description="header that carries `auth`")
    auth: Secret | None = Field(default=None, description="header value, e.g. 'Bearer ${file:/etc/sluice/epcis.token}'")
    timeout: Duration = Field(default=15.0, gt=0, le=600, description="per HTTP request")
    retry_min: Duration = Field(default=1.0, gt=0, description="first wait before a retry")
    retry_max: Duration = Field(default=300.0, gt=0, description="longest wait between retries")
    tls: TlsConfig | None = Field(default=None, description="TLS: the CA to trust, a client certificate; absent: plaintext")
    insecure: bool = Field(default=False, description="allow plaintext HTTP or unverified TLS to a remote host")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_http_url(v, "https://epcis.example.com/epcis", "the base of the EPCIS interface")

    @model_validator(mode="after")
    def _secure(self) -> EpcisSinkConfig:
        check_remote_link(urlsplit(self.url).hostname or "", plaintext=self.url.startswith("http://"), tls=self.tls,
                          insecure=self.insecure, protocol="HTTP", fix="use https://", peer="server")
        if self.retry_max < self.retry_min:
            raise ValueError("retry_max is smaller than retry_min — swap them")
        return self


TraceFile.model_rebuild()


@dataclass(frozen=True)
class TracedPoint:
    device: str
    field: str
    type: str
    uom: str


@dataclass(frozen=True)
class TraceConfig:
    """A validated trace configuration with every location's traced points resolved."""

    path: Path
    file: TraceFile
    gateway_id: str
    site: str
    points: dict[str, tuple[TracedPoint, ...]]  # location -> points
    intervals: dict[str, float]  # device -> poll interval (s)
    database: Path  # the gateway's outbox (buffer.path, relative to the state directory): the journal's tables live there
    gateway_file: Path  # the gateway.yaml that named it

    def outage_after(self, device: str) -> float:
        return self.file.outage_after or 3 * self.intervals.get(device, 1.0)


def load_trace_config(config: Config) -> TraceConfig | None:
    """``trace.yaml`` next to the gateway file, validated against the devices; None if absent."""
    path = config.path.parent / "trace.yaml"
    if not path.exists():
        return None
    errors: list[ConfigError] = []
    doc, errs = load_yaml(path, _display(path))
    errors += errs
    if doc is None:
        raise ConfigErrors(errors)
    tf: TraceFile | None = validate_doc(doc, TraceFile, errors, expand_secrets(doc, errors, None if config.secrets_read else []))
    if tf is None:
        raise ConfigErrors(errors)
    devices = {d.id: d for d in config.devices}
    points: dict[str, tuple[TracedPoint, ...]] = {}
    owner: dict[str, str] = {}
    scale_owner: dict[str, str] = {}
    for name, loc in tf.locations.items():
        traced: list[TracedPoint] = []
        for key in ("devices", "scanners", "scales"):
            for i, dev_id in enumerate(getattr(loc, key)):
                if dev_id not in devices:
                    errors.append(doc.error(("locations", name, key, i), f"unknown device '{dev_id}'",
                                            "use the id of an enabled device under devices/"))
        for i, dev_id in enumerate(loc.scales):
            if dev_id in scale_owner:
                errors.append(doc.error(("locations", name, "scales", i), f"scale '{dev_id}' is already in location "
                                        f"'{scale_owner[dev_id]}'", "a scale weighs in one place; give it to one location"))
            scale_owner.setdefault(dev_id, name)
        for i, dev_id in enumerate(loc.devices):
            if dev_id in owner:
                errors.append(doc.error(("locations", name, "devices", i), f"device '{dev_id}' is already in location "
                                        f"'{owner[dev_id]}'", "a device measures one place; give it to one location"))
                continue
            owner[dev_id] = name
            dev = devices.get(dev_id)
            if dev is None:
                continue
            for p in getattr(dev.profile, "points", ()) or ():
                pname = getattr(p, "name", None)
                if pname is None or (loc.points is not None and pname not in loc.points):
                    continue
                mapped = tf.points.get(pname)
                kind = (mapped.type, mapped.uom) if mapped else UNIT_MAP.get(getattr(p, "unit", None) or "")
                if kind is not None:
                    traced.append(TracedPoint(dev_id, pname, *kind))
        for i, pname in enumerate(loc.points or ()):
            if not any(t.field == pname for t in traced):
                errors.append(doc.error(("locations", name, "points", i), f"no device of '{name}' has a point '{pname}' "
                                        "with a known unit", "check the name, or add it under `points:` with its type and uom"))
        points[name] = tuple(traced)
    for lot_id, lot in tf.lots.items():
        if lot.product is not None and lot.product not in tf.products:
            errors.append(doc.error(("lots", lot_id, "product"), f"unknown product '{lot.product}'",
                                    "add it under `products:`"))
        if lot.location is not None and lot.location not in tf.locations:
            errors.append(doc.error(("lots", lot_id, "location"), f"unknown location '{lot.location}'",
                                    "use one of " + (", ".join(tf.locations) or "the locations (none defined)")))
    if errors:
        raise ConfigErrors(errors)
    intervals = {d.id: float(d.config.interval) for d in config.devices}
    return TraceConfig(path, tf, config.gateway_id, config.site, points, intervals, config.gateway.buffer.path,
                       config.path)


def check_reload(old: TraceConfig, new: TraceConfig, present: dict[str, str]) -> None:
    """Raise ConfigErrors, located in the new trace.yaml, for what a running feed cannot take on a
    reload: another outbox file or key (the chain lives there), or a removed location that a lot
    (``present``: lot -> location) is still in."""
    doc, errors = load_yaml(new.path, _display(new.path))
    if doc is None:
        raise ConfigErrors(errors)
    if old.file.key_file != new.file.key_file:
        errors.append(doc.error(("key_file",), f"key_file cannot change while the gateway runs (the chain is signed with "
                                f"{old.file.key_file})", "restore it, or restart the gateway to use the new one"))
    if old.database != new.database:
        gdoc, gerrs = load_yaml(new.gateway_file, _display(new.gateway_file))
        errors += gerrs
        if gdoc is not None:
            errors.append(gdoc.error(("buffer", "path"), f"buffer.path cannot change while the trace feed runs (its "
                                     f"journal and chain continue in {old.database})", "restore it, or restart the gateway"))
    for lot, location in sorted(present.items()):
        if location not in new.file.locations:
            errors.append(doc.error(("locations",), f"location '{location}' is removed, but lot '{lot}' is in it",
                                    f"`sluice lot move {lot} LOCATION` or `sluice lot end {lot}` first, then reload"))
    if errors:
        raise ConfigErrors(errors)

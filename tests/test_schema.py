"""JSON Schemas of the configuration files (issue 15, part 2): generated from the models `sluice
check` uses, shipped in config/schemas/ exactly as generated, named on the first line of every
shipped YAML file and of every file `sluice init` writes; every shipped file validates, and the
schema rejects every file of the broken-configuration corpus (tests/cases/config/) that `sluice
check` rejects for a structural reason."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.cli.commands import main
from gateway.cli.examples import EXAMPLES, shipped_config
from gateway.cli.schema import KINDS, MODELINE, kind_of, schema_of, schemas
from gateway.cloud.config import load_ingest_config
from gateway.config import ConfigErrors, load_config
from gateway.trace.config import load_trace_config
from simulators.simulation import load_simulation

CONFIG = Path(__file__).resolve().parent.parent / "config"
CASES = Path(__file__).resolve().parent / "cases" / "config"
KIND_CASES = Path(__file__).resolve().parent / "cases" / "schema"
VALIDATORS = {k.name: jsonschema.Draft202012Validator(schema_of(k)) for k in KINDS}


def config_relative(path: Path) -> Path:
    """A shipped file's path inside its configuration directory (config/ itself, or an example's)."""
    rel = path.relative_to(CONFIG)
    return Path(*rel.parts[2:]) if rel.parts[0] == "examples" and len(rel.parts) > 2 else rel


def schema_errors(path: Path, rel: Path) -> list[str]:
    kind = kind_of(rel)
    assert kind is not None, f"{rel}: no kind of file in gateway/cli/schema.py KINDS"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATORS[kind.name].iter_errors(data)]


SHIPPED = sorted(CONFIG.rglob("*.yaml"))


def test_the_checked_in_schemas_are_the_generated_ones() -> None:
    generated = schemas()
    shipped = {p.name: p.read_text(encoding="utf-8") for p in (CONFIG / "schemas").glob("*.json")}
    assert set(shipped) == set(generated), "run `sluice schema config/schemas`"
    for name, text in generated.items():
        assert shipped[name] == text, f"config/schemas/{name} is out of date: run `sluice schema config/schemas`"


def test_schemas_carry_descriptions_enums_and_examples() -> None:
    device = schema_of(next(k for k in KINDS if k.name == "device"))
    assert device["discriminator"]["propertyName"] == "protocol"
    assert {"modbus_tcp", "modbus_rtu", "serial"} <= set(device["discriminator"]["mapping"])
    tcp = next(d for d in device["$defs"].values() if d.get("properties", {}).get("protocol", {}).get("const") == "modbus_tcp")
    assert tcp["additionalProperties"] is False
    assert tcp["properties"]["interval"]["pattern"] and tcp["properties"]["interval"]["default"] == "1s"
    assert "time between polls" in tcp["properties"]["interval"]["description"]
    profile = schema_of(next(k for k in KINDS if k.name == "profile"))
    point = profile["$defs"]["PointModel"]["properties"]
    assert set(point["byte_order"]["enum"]) == {"ABCD", "DCBA", "BADC", "CDAB"}
    assert "kWh" in point["unit"]["examples"]
    assert "url" in profile["$defs"]["ProfileSource"]["properties"]


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIG)) for p in SHIPPED])
def test_every_shipped_file_names_its_schema_and_validates(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(MODELINE), f"{path}: the first line must be '{MODELINE}...'"
    target = (path.parent / first.removeprefix(MODELINE)).resolve()
    kind = kind_of(config_relative(path))
    assert kind is not None and target == (CONFIG / "schemas" / kind.filename).resolve(), (path, first)
    assert not schema_errors(path, config_relative(path))


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_file_init_writes_names_its_schema_next_to_it(example: str, tmp_path: Path, capsys) -> None:
    target = tmp_path / "site"
    assert main(["init", str(target), "--example", example]) == 0, capsys.readouterr().err
    assert "schemas/" in capsys.readouterr().out
    written = sorted(target.rglob("*.yaml"))
    assert written
    for path in written:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith(MODELINE), path
        schema = (path.parent / first.removeprefix(MODELINE)).resolve()
        assert schema.is_file() and schema.parent == (target / "schemas").resolve(), (path, first)
        assert not schema_errors(path, path.relative_to(target)), path
    assert {p.name for p in (target / "schemas").iterdir()} == {k.filename for k in KINDS}
    assert (shipped_config() / "schemas").is_dir()


def test_sluice_schema_writes_every_schema(tmp_path: Path, capsys) -> None:
    assert main(["schema", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    for kind in KINDS:
        assert (tmp_path / "out" / kind.filename).read_text(encoding="utf-8") == schemas()[kind.filename]
        assert kind.filename in out


# --------------------------------------------------------------------------- the broken corpus
STRUCTURAL = re.compile(
    r"^(unknown key '(?P<unknown>[^']+)'|required key '(?P<required>[^']+)'|unknown type '|unknown protocol '"
    r"|(?P<key>[\w]+): (.* is not allowed|input should be a valid|.* is not a valid id|.* is not a size"
    r"|duration .* has no unit|YAML reads .* as (true|false|a number)|.* is not how parity is written|.* is out of range))")
"""Messages of `sluice check` for a structural mistake: an unknown key, a missing one, a wrong type,
a value outside an enum or a pattern — what a schema states. The rest (ranges that depend on other
keys, one file against another, security rules) only `sluice check` can say."""


def corpus() -> list[tuple[str, str, int, str]]:
    found = []
    for case in sorted(CASES.iterdir()):
        for line in (case / "expected.txt").read_text(encoding="utf-8").splitlines():
            match = re.match(r"^(\S+?):(\d+):\d+: (.*)$", line)
            assert match is not None, line
            if STRUCTURAL.match(match.group(3)):
                found.append((case.name, match.group(1), int(match.group(2)), match.group(3)))
    return found


CORPUS = corpus()


def _flatten(errors: Any) -> list[jsonschema.ValidationError]:
    out: list[jsonschema.ValidationError] = []
    for e in errors:
        out.append(e)
        out += _flatten(e.context or [])
    return out


def test_the_corpus_has_structural_mistakes_of_every_sort() -> None:
    messages = " | ".join(m for *_rest, m in CORPUS)
    for sort in ("unknown key", "required key", "is not allowed", "input should be a valid", "unknown protocol",
                 "unknown type", "has no unit", "YAML reads"):
        assert sort in messages, sort


@pytest.mark.parametrize(("case", "file", "line", "message"), CORPUS,
                         ids=[f"{c}/{f}:{n}" for c, f, n, _m in CORPUS])
def test_the_schema_rejects_every_structural_mistake_of_the_corpus(case: str, file: str, line: int, message: str) -> None:
    path = CASES / case / file
    kind = kind_of(Path(file))
    assert kind is not None
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = _flatten(VALIDATORS[kind.name].iter_errors(data))
    assert errors, f"{case}/{file}: `sluice check` says {message!r}, the schema accepts the file"
    match = STRUCTURAL.match(message)
    assert match is not None
    key = match.group("unknown") or match.group("required") or match.group("key")
    if key is not None:  # the schema finds the mistake at the same key
        assert any(key in map(str, e.absolute_path) or f"'{key}'" in e.message for e in errors), \
            (case, file, message, [e.message for e in errors])


def test_every_key_of_every_file_has_a_description() -> None:
    """What the editor shows when the cursor is on a key: no key without a word on what it is."""
    missing = []
    for kind in KINDS:
        schema = schema_of(kind)
        for name, block in [("(top)", schema), *schema.get("$defs", {}).items()]:
            missing += [f"{kind.name}: {name}.{key}" for key, prop in block.get("properties", {}).items()
                        if not prop.get("description")]
    assert not missing, "add description= to these fields in their model: " + ", ".join(missing)


# --------------------------------------------------------------------------- a corpus for every kind of file
# tests/cases/config/ holds whole configurations (gateway.yaml, devices, profiles); tests/cases/schema/<kind>/
# holds one broken file of every other kind too (trace.yaml, ingest.yaml, sim.yaml, more devices and
# profiles), with what `sluice check` (or `sluice ingest check`, `sluice sim`) says in expected.txt.
MODBUS_PROFILE = "protocol: modbus\npoints:\n  - {name: v, kind: holding, address: 0, type: uint16}\n"


def loader_errors(kind: str, path: Path, tmp: Path) -> list[str]:
    """``line:col: message`` of every error the command that reads such a file reports."""
    root = tmp / "cfg"
    for sub in ("devices", "profiles"):
        (root / sub).mkdir(parents=True)
    (root / "gateway.yaml").write_text("gateway: {id: gw, site: s}\n")
    (root / "profiles" / "p.yaml").write_text(MODBUS_PROFILE)
    try:
        if kind == "ingest":
            load_ingest_config(path, secrets=False)
        elif kind == "sim":
            load_simulation(path)
        else:
            target = {"gateway": "gateway.yaml", "device": f"devices/{path.name}", "profile": f"profiles/{path.name}",
                      "trace": "trace.yaml"}[kind]
            shutil.copy(path, root / target)
            config = load_config(root, secrets=False)
            if kind == "trace":
                load_trace_config(config)
    except ConfigErrors as exc:
        return [f"{e.line}:{e.col}: {e.message}" for e in exc.errors if not e.warning]
    return []


KIND_CORPUS = [tuple(line.split(":", 1)) for line in (KIND_CASES / "expected.txt").read_text(encoding="utf-8").splitlines()]


def test_the_corpus_covers_every_kind_of_file() -> None:
    assert {file.split("/")[0] for file, _rest in KIND_CORPUS} == {k.name for k in KINDS}
    assert {str(p.relative_to(KIND_CASES)) for p in KIND_CASES.rglob("*.yaml")} == {file for file, _rest in KIND_CORPUS}


@pytest.mark.parametrize(("file", "expected"), KIND_CORPUS, ids=[f"{f}:{e.split(':')[0]}" for f, e in KIND_CORPUS])
def test_check_and_the_schema_both_reject_every_file_of_the_corpus(file: str, expected: str, tmp_path: Path) -> None:
    path = KIND_CASES / file
    kind = path.parent.name
    found = loader_errors(kind, path, tmp_path)
    assert any(e.startswith(expected) for e in found), (file, expected, found)
    message = expected.split(": ", 1)[1]
    match = STRUCTURAL.match(message)
    assert match is not None, f"{file}: not a structural mistake: {message}"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = _flatten(VALIDATORS[kind].iter_errors(data))
    assert errors, f"{file}: the {kind} schema accepts what `sluice check` refuses: {message}"
    key = match.group("unknown") or match.group("required") or match.group("key")
    if key not in (None, "value"):  # "value": the loader does not name a key whose block has the wrong type
        assert any(key in map(str, e.absolute_path) or f"'{key}'" in e.message for e in errors), \
            (file, message, [e.message for e in errors])

"""scripts/install.sh and scripts/uninstall.sh run into a temporary root: every file, mode and owner,
re-running as an upgrade leaves configuration and outbox alone, uninstall keeps data unless --purge."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> str:
    result = subprocess.run(["bash", str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _install(root: Path) -> str:
    return _run("install.sh", "--root", str(root), "--no-pip", "--python", sys.executable)


def _manifest(out: str) -> dict[str, tuple[str, str]]:
    entries = {}
    for line in out.splitlines():
        if line.startswith("install: "):
            path, mode, owner = line.removeprefix("install: ").split()
            entries[path] = (mode, owner)
    return entries


def _tree(root: Path) -> set[str]:
    return {"/" + str(p.relative_to(root)) for p in root.rglob("*")
            if "/opt/sluice/venv/" not in "/" + str(p.relative_to(root))}


def test_install_creates_every_file_with_its_mode_and_owner(tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = _install(root)
    manifest = _manifest(out)
    profiles = sorted(p.name for p in (REPO / "config" / "profiles").glob("*.yaml"))
    examples = sorted(p.name for p in (REPO / "config" / "devices").glob("*.yaml"))
    expected = {
        "/opt/sluice": ("0755", "root:root"),
        "/opt/sluice/venv": ("0755", "root:root"),
        "/opt/sluice/README.md": ("0644", "root:root"),
        "/opt/sluice/examples": ("0755", "root:root"),
        "/opt/sluice/examples/devices": ("0755", "root:root"),
        "/opt/sluice/examples/gateway.yaml": ("0644", "root:root"),
        **{f"/opt/sluice/examples/devices/{n}": ("0644", "root:root") for n in examples},
        "/etc/sluice": ("0750", "root:sluice"),
        "/etc/sluice/devices": ("0750", "root:sluice"),
        "/etc/sluice/profiles": ("0750", "root:sluice"),
        "/etc/sluice/gateway.yaml": ("0640", "root:sluice"),
        **{f"/etc/sluice/profiles/{n}": ("0640", "root:sluice") for n in profiles},
        "/var/lib/sluice": ("0750", "sluice:sluice"),
        "/etc/systemd/system": ("0755", "root:root"),
        "/etc/systemd/system/sluice.service": ("0644", "root:root"),
        "/etc/systemd/system/sluice-ingest.service": ("0644", "root:root"),
    }
    assert manifest == expected
    # Nothing else was created (the venv's own content aside), and every mode is applied.
    parents = {"/etc", "/etc/systemd", "/var", "/var/lib", "/opt"}
    assert _tree(root) - parents == set(expected)
    for path, (mode, _owner) in expected.items():
        assert oct(stat.S_IMODE((root / path.lstrip("/")).stat().st_mode)) == oct(int(mode, 8)), path
    assert (root / "opt/sluice/venv/bin/python").exists()
    assert (root / "etc/systemd/system/sluice.service").read_text() == (REPO / "systemd/sluice.service").read_text()
    # Under --root nothing touches the live system: account and systemctl are only reported.
    skipped = [line.removeprefix("skip: ") for line in out.splitlines() if line.startswith("skip: ")]
    assert any(s.startswith("useradd --system") and s.endswith(" sluice") for s in skipped)
    assert "systemctl daemon-reload" in skipped
    assert "systemctl enable sluice.service" in skipped  # the ingest unit is installed, not enabled


def test_reinstall_is_an_upgrade_that_keeps_configuration_and_outbox(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _install(root)
    gateway_yaml = root / "etc/sluice/gateway.yaml"
    gateway_yaml.write_text("gateway: {id: mine, site: here}\n")
    profile = root / "etc/sluice/profiles/pms5003.yaml"
    profile.write_text("# edited by the operator\n")
    device = root / "etc/sluice/devices/meter.yaml"
    device.write_text("id: meter\n")
    outbox = root / "var/lib/sluice/outbox.db"
    outbox.write_bytes(b"SQLite format 3\x00readings")
    unit = root / "etc/systemd/system/sluice.service"
    unit.write_text("old unit\n")

    out = _run("install.sh", "--root", str(root), "--no-pip", "--python", sys.executable, "--ingest")
    assert gateway_yaml.read_text() == "gateway: {id: mine, site: here}\n"
    assert profile.read_text() == "# edited by the operator\n"
    assert device.read_text() == "id: meter\n"
    assert outbox.read_bytes() == b"SQLite format 3\x00readings"
    assert unit.read_text() == (REPO / "systemd/sluice.service").read_text()  # code and units are replaced
    assert "keep: /etc/sluice/gateway.yaml" in out and "keep: /etc/sluice/profiles/pms5003.yaml" in out
    assert "/etc/sluice/gateway.yaml" not in _manifest(out)
    assert "skip: systemctl enable sluice.service sluice-ingest.service" in out
    assert "skip: systemctl try-restart sluice.service sluice-ingest.service" in out
    # --ingest installs the ingest's configuration too (once), and says where it is.
    assert _manifest(out)["/etc/sluice/ingest.yaml"] == ("0640", "root:sluice")
    assert (root / "etc/sluice/ingest.yaml").read_text() == (REPO / "config/ingest.yaml").read_text()
    assert "edit /etc/sluice/ingest.yaml" in out and "sluice ingest check -c /etc/sluice/ingest.yaml" in out
    (root / "etc/sluice/ingest.yaml").write_text("# mine\n")
    out = _run("install.sh", "--root", str(root), "--no-pip", "--python", sys.executable, "--ingest")
    assert "keep: /etc/sluice/ingest.yaml" in out and (root / "etc/sluice/ingest.yaml").read_text() == "# mine\n"


def test_install_from_something_that_is_not_a_bundle_for_this_python_refuses(tmp_path: Path) -> None:
    bundle_dir = tmp_path / "sluice-bundle-0.1.0-x86_64"
    (bundle_dir / "wheelhouse").mkdir(parents=True)
    (bundle_dir / "BUNDLE.txt").write_text("Sluice 0.1.0 offline bundle for x86_64 (Linux, glibc >= 2.17), CPython 2.7\n")
    tarball = tmp_path / "bundle.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(tmp_path), bundle_dir.name], check=True)
    for source, message in ((tarball, "the bundle is for CPython 2.7"), (tmp_path / "missing.tar.gz", "no such file")):
        result = subprocess.run(["bash", str(REPO / "scripts/install.sh"), "--from", str(source), "--root",
                                 str(tmp_path / "root"), "--python", sys.executable], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "root" / "opt").exists()  # refused before anything was installed


def test_uninstall_keeps_data_unless_purge(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _install(root)
    (root / "var/lib/sluice/outbox.db").write_bytes(b"undelivered")

    out = _run("uninstall.sh", "--root", str(root))
    assert not (root / "opt/sluice").exists()
    assert not (root / "etc/systemd/system/sluice.service").exists()
    assert not (root / "etc/systemd/system/sluice-ingest.service").exists()
    assert (root / "etc/sluice/gateway.yaml").exists()
    assert (root / "var/lib/sluice/outbox.db").read_bytes() == b"undelivered"
    assert "skip: systemctl disable --now sluice.service sluice-ingest.service" in out
    assert "keep: /var/lib/sluice" in out and "userdel" not in out

    out = _run("uninstall.sh", "--root", str(root), "--purge")
    assert not (root / "etc/sluice").exists() and not (root / "var/lib/sluice").exists()
    assert "skip: userdel sluice" in out
    assert _tree(root) <= {"/etc", "/etc/systemd", "/etc/systemd/system", "/var", "/var/lib", "/opt"}


def test_install_refuses_without_root_or_prefix(tmp_path: Path) -> None:
    if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0":
        result = subprocess.run(["bash", str(REPO / "scripts/install.sh"), "--bogus"], capture_output=True, text=True)
        assert result.returncode == 2 and "unknown option --bogus" in result.stderr
        return
    result = subprocess.run(["bash", str(REPO / "scripts/install.sh")], capture_output=True, text=True)
    assert result.returncode == 1 and "run as root" in result.stderr

"""The secret scan itself (tests/secret_scan.py): it finds a registered secret wherever
the session could show one, never prints it, fails the session, and really watches
this session (the cluster's password is registered, DEBUG records are scanned).

Secrets planted here live in registries of their own, so that the session's scan
has nothing to find.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pgreplica.testing import LocalCluster
from secret_scan import SCANNER, LevelGate, ScanHandler, Scanner, SecretScan
from secrets_registry import REGISTRY, Registry, cluster_password

PLANTED = "planted-Secret-4f9c2e"


@pytest.fixture
def scanner() -> Scanner:
    registry = Registry()
    registry.register(PLANTED, "planted secret")
    return Scanner(registry)


def report(sections: list[tuple[str, str]], longrepr: str | None = None) -> pytest.TestReport:
    return pytest.TestReport(
        nodeid=f"tests/test_x.py::test_x[{PLANTED}]",
        location=("tests/test_x.py", 1, "test_x"),
        keywords={},
        outcome="passed" if longrepr is None else "failed",
        longrepr=longrepr,
        when="call",
        sections=sections,
    )


def shown(findings: list[Any]) -> str:
    return "\n".join(f.describe() for f in findings)


def test_finds_a_secret_in_the_captured_output_of_a_passed_test(scanner: Scanner) -> None:
    clean = report([("Captured stdout call", "nothing to see\n")])
    assert scanner.scan_report(clean) == []
    leaky = report(
        [
            ("Captured stdout call", f"dsn: postgresql://u:{PLANTED}@h/db\n"),
            ("Captured log call", f"WARNING pgreplica: password={PLANTED}"),
        ]
    )
    found = scanner.scan_report(leaky)
    assert [(f.where, f.label) for f in found] == [
        ("Captured stdout call", "planted secret"),
        ("Captured log call", "planted secret"),
    ]
    assert "postgresql://u:[REDACTED]@h/db" in found[0].excerpt
    assert found[0].test == "tests/test_x.py::test_x[[REDACTED]]"
    assert PLANTED not in shown(found)
    assert scanner.scan_report(leaky) == []  # once per test and place
    assert scanner.reports == 3 and len(scanner.findings) == 2


def test_finds_a_secret_in_a_failure_and_in_its_url_encoded_form() -> None:
    registry = Registry()
    registry.register("p@ss/w:rd-1234", "url password")
    scanner = Scanner(registry)
    found = scanner.scan_report(report([], longrepr="E   assert 'p%40ss%2Fw%3Ard-1234' in ''"))
    assert [(f.where, f.label) for f in found] == [("failed report (call)", "url password")]
    assert "p%40ss" not in shown(found) and "[REDACTED]" in found[0].excerpt


def test_finds_a_secret_in_a_log_record_message_and_traceback(scanner: Scanner) -> None:
    def record(msg: str, args: tuple[Any, ...], exc_info: Any = None) -> logging.LogRecord:
        name = "pgreplica.health"
        return logging.LogRecord(name, logging.DEBUG, __file__, 1, msg, args, exc_info)

    ScanHandler(scanner).handle(record("host_online host=%s", ("h:5432/db",)))
    assert scanner.findings == [] and scanner.records == 1
    found = scanner.scan_record(record("connect to %s failed", (f"password={PLANTED}",)))
    assert [f.where for f in found] == ["log record of pgreplica.health"]
    try:
        raise RuntimeError(f"conninfo user=app password={PLANTED}")
    except RuntimeError:
        leaked = record("probe failed", (), sys.exc_info())
    scanner.current_test = "tests/test_y.py::test_y"
    found = scanner.scan_record(leaked)
    assert [f.test for f in found] == ["tests/test_y.py::test_y"]
    assert "RuntimeError" in found[0].excerpt and PLANTED not in shown(found)
    assert scanner.scan_record(leaked) == []  # a record is scanned once
    assert scanner.records == 3


def test_the_gate_scans_records_below_the_level_and_keeps_them_away(scanner: Scanner) -> None:
    top = logging.getLogger("pgreplica")
    gate = LevelGate(scanner, top)
    gate.intended = logging.WARNING
    debug = logging.LogRecord("pgreplica", logging.DEBUG, __file__, 1, PLANTED, (), None)
    warning = logging.LogRecord("pgreplica", logging.WARNING, __file__, 1, "ok", (), None)
    level = top.level
    top.setLevel(1)
    try:
        assert gate.filter(debug) is False  # scanned, then dropped as WARNING would
        assert gate.filter(warning) is True
    finally:
        top.setLevel(level)
    assert [f.where for f in scanner.findings] == ["log record of pgreplica"]


def test_short_values_are_noted_and_ignored() -> None:
    registry = Registry()
    assert registry.register("s3cret", "a short key") == "s3cret"
    assert registry.register(b"\xff\xfe-not-utf8", "a binary key") == b"\xff\xfe-not-utf8"
    assert len(registry) == 0
    assert registry.ignored == ["a short key (6 characters)", "a binary key (not UTF-8)"]


def test_findings_fail_the_session_and_are_printed_redacted(scanner: Scanner) -> None:
    plugin = SecretScan(scanner)
    session = SimpleNamespace(exitstatus=pytest.ExitCode.OK)
    plugin.pytest_sessionfinish(session)  # type: ignore[arg-type]
    assert session.exitstatus == pytest.ExitCode.OK
    scanner.scan_text(f"token={PLANTED}", where="stderr read by readouterr()", test="t")
    plugin.pytest_sessionfinish(session)  # type: ignore[arg-type]
    assert session.exitstatus == pytest.ExitCode.TESTS_FAILED
    lines: list[str] = []
    terminal = SimpleNamespace(write_line=lambda line, **markup: lines.append(line))
    plugin.pytest_terminal_summary(terminal)
    assert lines[-1] == "secret scan: 1 finding in 0 test reports, 0 log records, 1 secrets"
    assert any("planted secret in t [stderr read by readouterr()]" in line for line in lines)
    assert PLANTED not in "\n".join(lines)


# ---------------------------------------------------------------------- this session


def test_the_session_cluster_password_is_registered(cluster: LocalCluster) -> None:
    secret = REGISTRY.get(cluster_password(cluster))
    assert secret is not None and secret.label == "session cluster password"


def test_any_local_cluster_password_is_registered_when_read(tmp_path: Path) -> None:
    other = LocalCluster(tmp_path, replicas=1)
    (tmp_path / "pwfile").write_text("a-password-of-another-cluster\n")
    assert REGISTRY.get("a-password-of-another-cluster") is None
    assert other._read_password() == "a-password-of-another-cluster"
    secret = REGISTRY.get("a-password-of-another-cluster")
    assert secret is not None and secret.label.startswith("LocalCluster password")


def test_debug_records_of_pgreplica_are_scanned_but_not_captured(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = SCANNER.records
    logging.getLogger("pgreplica.routing").debug("secret scan probe at DEBUG")
    logging.getLogger("pgreplica.routing").warning("secret scan probe at WARNING")
    assert SCANNER.records == before + 2
    assert "probe at DEBUG" not in caplog.text  # WARNING, as without the scan
    assert "probe at WARNING" in caplog.text
    with caplog.at_level(logging.DEBUG, logger="pgreplica.routing"):
        logging.getLogger("pgreplica.routing").debug("secret scan probe, asked for")
    assert "probe, asked for" in caplog.text


def test_what_tests_read_with_capsys_is_scanned(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(
        SCANNER, "scan_text", lambda text, *, where, test=None: seen.append((where, text))
    )
    print("printed for the scan")
    assert capsys.readouterr().out == "printed for the scan\n"
    assert ("stdout read by readouterr()", "printed for the scan\n") in seen

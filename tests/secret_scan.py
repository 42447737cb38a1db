"""The secret scan: no registered secret (tests/secrets_registry.py) may appear in what
the test suite prints or logs. Loaded by conftest.py (``pytest_plugins``).

What is scanned, for every secret of the registry:

- every test report: the captured stdout, stderr and log of each phase (setup, call,
  teardown), for passed tests too, and the failure or skip text; collection reports;
- what tests read back with ``capsys`` / ``capfd`` (``readouterr()``), which never
  reaches the report;
- every log record: a handler on the root logger formats each record that reaches it
  (message, traceback and stack), and a filter on each ``pgreplica`` logger checks its
  records as they are made. So that DEBUG and INFO records are made at all, the
  ``pgreplica`` logger's level is lowered to 1 (a level nothing else uses); the filter
  then drops every record the logger's own level would not have let through, so that
  handlers, ``caplog`` and the captured logs see exactly what they would see without
  the scan. Levels set by tests (``caplog.set_level``, ``dictConfig``) still apply.
  The filter goes on every ``pgreplica`` logger named in the package's source at the
  start, and on any other one at the start of each test;
- the text of warnings.

LocalCluster passwords are registered as soon as a cluster reads its password file,
whoever made the cluster.

At the end of the session each finding is printed with its test, where it was found
and an excerpt in which every secret is replaced by ``[REDACTED]``, and the session
fails. A summary line is printed always.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import pgreplica
from pgreplica._fork import ForkSafeLock
from pgreplica.localcluster.servers import _Servers
from secrets_registry import MIN_LENGTH, REDACTED, REGISTRY, Registry

__all__ = ["Finding", "Scanner"]

#: The level of the ``pgreplica`` logger during the session: every record is made.
SCAN_LEVEL = 1
EXCERPT = 60
BETWEEN_TESTS = "(outside any test)"
_SCANNED = "_pgreplica_secret_scanned"


@dataclass(frozen=True)
class Finding:
    test: str
    where: str
    label: str
    excerpt: str

    def describe(self) -> str:
        return f"{self.label} in {self.test} [{self.where}]: {self.excerpt}"


def excerpt(registry: Registry, text: str) -> str:
    """The text around the first secret of ``text``, every secret redacted."""
    redacted = registry.redact(text)
    at = redacted.find(REDACTED)
    if at < 0:  # pragma: no cover - only called for text holding a secret
        at = 0
    start, end = max(at - EXCERPT, 0), at + len(REDACTED) + EXCERPT
    piece = redacted[start:end].replace("\n", "\\n")
    return f"{'...' if start else ''}{piece}{'...' if end < len(redacted) else ''}"


_FORMATTER = logging.Formatter("%(levelname)s %(name)s: %(message)s")


def format_record(record: logging.LogRecord) -> str:
    """The record as a handler would print it: message, traceback and stack."""
    try:
        return _FORMATTER.format(record)
    except Exception:  # a record whose arguments do not fit its message
        return f"{record.levelname} {record.name}: {record.msg!r} {record.args!r}"


class Scanner:
    """Looks for the secrets of ``registry`` in text and log records; keeps findings."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.findings: list[Finding] = []
        self.reports = 0
        self.records = 0
        self.current_test = BETWEEN_TESTS
        self._seen: set[tuple[str, str, str]] = set()
        self._lock = ForkSafeLock()  # renewed in a forked child, which may log

    def scan_text(self, text: str, *, where: str, test: str | None = None) -> list[Finding]:
        """Record a finding for each secret in ``text``; returns the new findings."""
        if not text:
            return []
        found = self.registry.find(text)
        if not found:
            return []
        test_id = self.registry.redact(test or self.current_test)
        where = self.registry.redact(where)
        shown = excerpt(self.registry, text)
        new = []
        with self._lock:
            for secret in found:
                key = (test_id, where, secret.label)
                if key not in self._seen:
                    self._seen.add(key)
                    new.append(Finding(test_id, where, secret.label, shown))
            self.findings.extend(new)
        return new

    def scan_report(self, report: Any) -> list[Finding]:
        """The captured sections of a test or collection report, and its failure or
        skip text."""
        with self._lock:
            self.reports += 1
        test = str(report.nodeid) or "(collection)"
        found = []
        for title, content in report.sections:
            found += self.scan_text(content, where=title, test=test)
        if report.longrepr is not None:
            when = getattr(report, "when", "collect")
            found += self.scan_text(
                report.longreprtext, where=f"{report.outcome} report ({when})", test=test
            )
        return found

    def scan_record(self, record: logging.LogRecord) -> list[Finding]:
        """A log record, formatted with its traceback; each record is scanned once."""
        if getattr(record, _SCANNED, False):
            return []
        setattr(record, _SCANNED, True)
        with self._lock:
            self.records += 1
        return self.scan_text(format_record(record), where=f"log record of {record.name}")

    def summary(self) -> str:
        count = len(self.findings)
        return (
            f"secret scan: {count} finding{'' if count == 1 else 's'} in {self.reports}"
            f" test reports, {self.records} log records, {len(self.registry)} secrets"
        )


class ScanHandler(logging.Handler):
    """On the root logger: scans every record that reaches it."""

    def __init__(self, scanner: Scanner) -> None:
        super().__init__(logging.DEBUG)
        self.scanner = scanner

    def emit(self, record: logging.LogRecord) -> None:
        self.scanner.scan_record(record)


class LevelGate(logging.Filter):
    """On each ``pgreplica`` logger: scans each record the logger makes, then lets
    through only those its level would have let through without :data:`SCAN_LEVEL`
    (``intended`` stands for the level the ``pgreplica`` logger had)."""

    def __init__(self, scanner: Scanner, top: logging.Logger) -> None:
        super().__init__()
        self.scanner = scanner
        self.top = top
        self.intended = logging.NOTSET

    def filter(self, record: logging.LogRecord) -> bool:
        self.scanner.scan_record(record)
        return record.levelno >= self.level_of(record.name)

    def level_of(self, name: str) -> int:
        found = logging.Logger.manager.loggerDict.get(name)
        logger = found if isinstance(found, logging.Logger) else None
        while logger is not None:
            level = logger.level
            if logger is self.top and level == SCAN_LEVEL:
                level = self.intended
            if level:
                return level
            logger = logger.parent
        return logging.NOTSET


def _logger_names() -> set[str]:
    """The ``pgreplica`` loggers of the package, found in its source, so that each has
    its gate before the module that logs to it is imported."""
    names = {"pgreplica"}
    pattern = re.compile(r"""getLogger\(\s*["'](pgreplica(?:\.[\w.]+)?)["']""")
    for path in Path(pgreplica.__file__).parent.rglob("*.py"):
        names.update(pattern.findall(path.read_text(encoding="utf-8")))
    return names


class SecretScan:
    """The plugin: its hooks and what it installs for the session."""

    def __init__(self, scanner: Scanner) -> None:
        self.scanner = scanner
        self.top = logging.getLogger("pgreplica")
        self.gate = LevelGate(scanner, self.top)
        self.handler = ScanHandler(scanner)
        self._restore: list[Callable[[], None]] = []

    # -- session --------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        root = logging.getLogger()
        root.addHandler(self.handler)
        self._restore.append(lambda: root.removeHandler(self.handler))
        original_level = self.top.level
        self._restore.append(lambda: self.top.setLevel(original_level))
        for name in _logger_names():
            logging.getLogger(name)
        self.arm()
        self._patch(pytest.CaptureFixture, "readouterr", self._scanning_readouterr)
        self._patch(_Servers, "_read_password", self._registering_read_password)

    def _patch(self, owner: type, name: str, make: Callable[[Any], Any]) -> None:
        original = owner.__dict__[name]
        setattr(owner, name, make(original))
        self._restore.append(lambda: setattr(owner, name, original))

    def _scanning_readouterr(self, original: Any) -> Any:
        scanner = self.scanner

        def readouterr(fixture: Any) -> Any:
            result = original(fixture)
            for stream, text in (("stdout", result.out), ("stderr", result.err)):
                if isinstance(text, bytes):
                    text = text.decode(errors="replace")
                scanner.scan_text(text, where=f"{stream} read by readouterr()")
            return result

        return readouterr

    @staticmethod
    def _registering_read_password(original: Any) -> Any:
        def read_password(cluster: Any) -> str:
            password: str = original(cluster)
            if REGISTRY.get(password) is None:
                REGISTRY.register(password, f"LocalCluster password ({cluster.directory.name})")
            return password

        return read_password

    def arm(self) -> None:
        """Put the gate on every ``pgreplica`` logger and lower the level of
        ``pgreplica`` to :data:`SCAN_LEVEL`, remembering the level it had (a test,
        or Django's ``LOGGING``, may have set one since)."""
        for logger in _pgreplica_loggers():
            if self.gate not in logger.filters:
                logger.addFilter(self.gate)
                self._restore.append(lambda lg=logger: lg.removeFilter(self.gate))
        if self.top.level != SCAN_LEVEL:
            self.gate.intended = self.top.level
            self.top.setLevel(SCAN_LEVEL)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        while self._restore:
            self._restore.pop()()
        if self.scanner.findings and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        write = terminalreporter.write_line
        ignored = self.scanner.registry.ignored
        if ignored:
            write(
                f"secret scan: not looking for values shorter than {MIN_LENGTH} characters"
                f" (or not text): {', '.join(ignored)}"
            )
        for finding in self.scanner.findings:
            write(f"secret scan: FOUND {finding.describe()}", red=True)
        write(self.scanner.summary(), red=bool(self.scanner.findings))

    # -- tests ----------------------------------------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.scanner.current_test = nodeid

    def pytest_runtest_logfinish(self) -> None:
        self.scanner.current_test = BETWEEN_TESTS

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self) -> None:
        self.arm()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.scanner.scan_report(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.sections or report.longrepr is not None:
            self.scanner.scan_report(report)

    def pytest_warning_recorded(self, warning_message: Any, nodeid: str) -> None:
        self.scanner.scan_text(
            str(warning_message.message), where="warning", test=nodeid or BETWEEN_TESTS
        )


def _pgreplica_loggers() -> Iterator[logging.Logger]:
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and (
            name == "pgreplica" or name.startswith("pgreplica.")
        ):
            yield logger


SCANNER = Scanner(REGISTRY)


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(SecretScan(SCANNER), "secret-scan")

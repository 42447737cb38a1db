"""A small authoritative DNS server on loopback for the tests of ``replicas_dns``: it
answers SRV and A questions from a dict the test changes while it runs, or fails on
demand (SERVFAIL)."""

from __future__ import annotations

import socket
import threading
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    """``records[name] = [("SRV", "0 0 5433 127.0.0.1."), ("A", "127.0.0.1")]``."""

    def __init__(self, ttl: int = 0) -> None:
        self.ttl = ttl
        self.records: dict[str, list[tuple[str, str]]] = {}
        self.fail = False
        self.queries = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-dns", daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> DnsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()

    def set(self, name: str, records: list[tuple[str, str]]) -> None:
        with self._lock:
            self.records[name.rstrip(".") + "."] = list(records)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self._sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            try:
                query = dns.message.from_wire(wire)
            except Exception:
                continue
            self.queries += 1
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            if self.fail:
                response.set_rcode(dns.rcode.SERVFAIL)
            else:
                question = query.question[0]
                name = question.name.to_text()
                kind = dns.rdatatype.to_text(question.rdtype)
                with self._lock:
                    known = name in self.records
                    values = [v for k, v in self.records.get(name, []) if k == kind]
                if values:
                    response.answer.append(
                        dns.rrset.from_text_list(name, self.ttl, "IN", kind, values)
                    )
                elif not known:
                    response.set_rcode(dns.rcode.NXDOMAIN)
            try:
                self._sock.sendto(response.to_wire(), peer)
            except OSError:
                continue

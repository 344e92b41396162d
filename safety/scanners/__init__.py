"""The scanners, by the ``type`` a policy names them with."""

from __future__ import annotations

from typing import Any

from safety.base import Scanner


def build_scanner(kind: str, options: dict[str, Any], shared: dict[str, Any]) -> Scanner:
    """A scanner from its policy entry; ``shared["embedder"]`` serves the embedding scanners."""
    if kind == "unicode":
        from safety.scanners.unicode import UnicodeScanner

        return UnicodeScanner(**options)
    if kind == "secrets":
        from safety.scanners.secrets import SecretsScanner

        return SecretsScanner(**options)
    if kind == "pii":
        from safety.scanners.pii import PiiScanner

        opts = dict(options)
        if "types" in opts:
            opts["types"] = tuple(opts["types"])
        return PiiScanner(**opts)
    if kind == "length":
        from safety.scanners.length import LengthScanner

        return LengthScanner(**options)
    if kind == "injection":
        from safety.scanners.injection import InjectionScanner

        return InjectionScanner(embedder=shared.get("embedder"), **options)
    if kind == "topics":
        from safety.scanners.topics import TopicsScanner

        return TopicsScanner(embedder=shared.get("embedder"), **options)
    raise ValueError(f"unknown scanner type {kind!r}")

"""Persistent verdict cache: sqlite keyed by sha256(backend, model, prompt). Survives restarts.

Only "ok" verdicts are stored: a fallback is retried on the next run. Export/import as a dict or
bytes puts the cache into a checkpoint so a resumed run does not pay for judged actions again.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from typing import Any

from mappa_jax.coach.types import Verdict


def cache_key(backend: str, model: str, prompt_text: str) -> str:
    payload = json.dumps([backend, model, prompt_text], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class VerdictCache:
    """path "" keeps the cache in memory (still exportable)."""

    def __init__(self, path: str = ""):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path or ":memory:", check_same_thread=False, isolation_level=None)
        if path:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict TEXT NOT NULL)")

    def get(self, key: str) -> Verdict | None:
        with self._lock:
            row = self._db.execute("SELECT verdict FROM verdicts WHERE key = ?", (key,)).fetchone()
        return Verdict.from_dict(json.loads(row[0])) if row else None

    def put(self, key: str, verdict: Verdict) -> None:
        if not verdict.ok:
            raise ValueError("VerdictCache stores only ok verdicts; a fallback must be retried later")
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?)",
                             (key, json.dumps(verdict.to_dict(), sort_keys=True)))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def export_dict(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT key, verdict FROM verdicts ORDER BY key").fetchall()
        return {key: json.loads(text) for key, text in rows}

    def import_dict(self, entries: dict[str, dict[str, Any]]) -> int:
        """Merge entries (validated); returns how many were read."""
        rows = []
        for key, data in entries.items():
            verdict = Verdict.from_dict(data)
            if len(key) != 64 or not verdict.ok:
                raise ValueError(f"coach cache import: bad entry {key[:16]!r} (expects sha256 keys, ok verdicts)")
            rows.append((key, json.dumps(verdict.to_dict(), sort_keys=True)))
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?)", rows)
            self._db.execute("COMMIT")
        return len(rows)

    def export_bytes(self) -> bytes:
        return json.dumps(self.export_dict(), sort_keys=True).encode("utf-8")

    def import_bytes(self, blob: bytes) -> int:
        return self.import_dict(json.loads(blob.decode("utf-8")))

    def close(self) -> None:
        with self._lock:
            self._db.close()

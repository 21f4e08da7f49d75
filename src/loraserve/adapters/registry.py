"""Adapter identity: the typed key of an adapter at its source, and the operator's names for adapters.

A name (vLLM's `--lora-modules NAME=PATH`, or `POST /v1/load_lora_adapter`) stands for an adapter at a source, so
clients can say `model="sql"` instead of a path. Names and raw ids both work wherever an adapter is named: a
registered name is looked up first.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from loraserve.errors import InvalidRequest


@dataclass(frozen=True)
class AdapterKey:
    """Where an adapter's files are: `source` is one of hub, local, s3; `adapter_id` the repo, folder or URI."""

    source: str
    adapter_id: str

    def __str__(self) -> str:
        return f"{self.source}:{self.adapter_id}"


class AdapterNames:
    """Thread-safe map of public names to adapter keys."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: dict[str, AdapterKey] = {}

    def register(self, name: str, key: AdapterKey, replace: bool = False) -> None:
        if not name or not name.strip():
            raise InvalidRequest("an adapter name must not be empty")
        with self._lock:
            if name in self._names and not replace and self._names[name] != key:
                raise InvalidRequest(f"the adapter name {name!r} is already registered for {self._names[name]}")
            self._names[name] = key

    def unregister(self, name: str) -> AdapterKey | None:
        with self._lock:
            return self._names.pop(name, None)

    def lookup(self, name: str) -> AdapterKey | None:
        with self._lock:
            return self._names.get(name)

    def items(self) -> list[tuple[str, AdapterKey]]:
        with self._lock:
            return list(self._names.items())

    def names_of(self, key: AdapterKey) -> list[str]:
        with self._lock:
            return [name for name, registered in self._names.items() if registered == key]

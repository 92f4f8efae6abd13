"""Sim: the checkpoints a pod knows and the names a request may use for them.

sd-webui (modules/sd_models.py ``CheckpointInfo``) lists each checkpoint with a ``title``
("name.safetensors [shorthash]"), a ``model_name`` (file stem), a 10-hex ``hash`` and a
``filename`` (full path); ``checkpoint_aliases`` lets requests name it by any of title,
name, model_name or hash. The simulator derives the hash from the name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

MODELS_DIR = "/stable-diffusion-webui/models/Stable-diffusion"


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    name: str  # file name relative to the models dir, e.g. "v1-5-pruned-emaonly.safetensors"
    sha256: str

    @property
    def shorthash(self) -> str:
        return self.sha256[:10]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]"

    @property
    def model_name(self) -> str:
        stem = self.name.rsplit("/", 1)[-1]
        return stem.rsplit(".", 1)[0] if "." in stem else stem

    def as_json(self) -> dict[str, object]:
        """One entry of GET /sdapi/v1/sd-models (modules/api/models.py SDModelItem)."""
        return {
            "title": self.title,
            "model_name": self.model_name,
            "hash": self.shorthash,
            "sha256": self.sha256,
            "filename": f"{MODELS_DIR}/{self.name}",
            "config": None,
        }


class Catalog:
    """The pod's checkpoints; the first is the default."""

    def __init__(self, names: Sequence[str]) -> None:
        self.items = tuple(
            Checkpoint(name=name, sha256=hashlib.sha256(name.encode()).hexdigest())
            for name in names
        )
        self._aliases: dict[str, Checkpoint] = {}
        for item in self.items:
            for alias in (item.title, item.name, item.model_name, item.shorthash, item.sha256):
                self._aliases.setdefault(alias, item)

    @property
    def default(self) -> Checkpoint:
        return self.items[0]

    def resolve(self, alias: object) -> Checkpoint | None:
        """The checkpoint a request names, or None (sd-webui then ignores the override)."""
        return self._aliases.get(alias) if isinstance(alias, str) else None

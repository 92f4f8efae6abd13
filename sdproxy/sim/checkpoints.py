"""Sim: the checkpoints a pod knows and the names a request may use for them.

sd-webui (modules/sd_models.py ``CheckpointInfo``) lists each checkpoint with a ``title``,
a ``model_name`` (the name with "/" → "_", extension dropped), ``hash``/``sha256`` and a
``filename`` (full path). The sha256 is only known once the file was hashed, which a
fresh pod does on a checkpoint's first load (``calculate_shorthash``): until then the
title is the bare file name ("name.safetensors") and ``hash``/``sha256`` are null, and
after it the title is "name.safetensors [shorthash]" (docs/sd-webui.md, "Observed on a
real v1.10.1"). ``checkpoint_aliases`` lets requests name a checkpoint by its name,
model_name, title or basename stem, and — once hashed — by its hashes and hashed titles;
a hashed title the pod has not computed yet is unknown to it. The simulator derives the
sha256 from the name.
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
    def model_name(self) -> str:
        return _stem(self.name.replace("/", "_").replace("\\", "_"))

    @property
    def name_for_extra(self) -> str:
        """The basename's stem (differs from model_name for files in sub-folders)."""
        return _stem(self.name.replace("\\", "/").rsplit("/", 1)[-1])

    def title(self, *, hashed: bool) -> str:
        return f"{self.name} [{self.shorthash}]" if hashed else self.name

    def aliases(self, *, hashed: bool) -> tuple[str, ...]:
        """CheckpointInfo.ids (without the legacy 8-hex partial hash, never shown)."""
        plain = (self.model_name, self.name, self.name_for_extra)
        if not hashed:
            return plain
        return (
            *plain,
            self.shorthash,
            self.sha256,
            self.title(hashed=True),
            f"{self.name_for_extra} [{self.shorthash}]",
        )


def _stem(name: str) -> str:
    """os.path.splitext(name)[0]."""
    dot = name.rfind(".")
    return name[:dot] if dot > 0 else name


class Catalog:
    """One pod's checkpoints (the first is the default) and which of them it has hashed."""

    def __init__(self, names: Sequence[str]) -> None:
        self.items = tuple(
            Checkpoint(name=name, sha256=hashlib.sha256(name.encode()).hexdigest())
            for name in names
        )
        self._hashed: set[str] = set()
        self._aliases: dict[str, Checkpoint] = {}
        for item in self.items:
            self._register(item)

    @property
    def default(self) -> Checkpoint:
        return self.items[0]

    def is_hashed(self, item: Checkpoint) -> bool:
        return item.name in self._hashed

    def title(self, item: Checkpoint) -> str:
        return item.title(hashed=self.is_hashed(item))

    def mark_hashed(self, item: Checkpoint) -> bool:
        """calculate_shorthash on a load; True if the title changed (first hash)."""
        if self.is_hashed(item):
            return False
        self._hashed.add(item.name)
        self._register(item)
        return True

    def _register(self, item: Checkpoint) -> None:
        for alias in item.aliases(hashed=self.is_hashed(item)):
            self._aliases[alias] = item  # CheckpointInfo.register: the last one wins

    def resolve(self, alias: object) -> Checkpoint | None:
        """The checkpoint a request names, or None (sd-webui then ignores the override)."""
        return self._aliases.get(alias) if isinstance(alias, str) else None

    def as_json(self, item: Checkpoint) -> dict[str, object]:
        """One entry of GET /sdapi/v1/sd-models (modules/api/models.py SDModelItem)."""
        hashed = self.is_hashed(item)
        return {
            "title": item.title(hashed=hashed),
            "model_name": item.model_name,
            "hash": item.shorthash if hashed else None,
            "sha256": item.sha256 if hashed else None,
            "filename": f"{MODELS_DIR}/{item.name}",
            "config": None,
        }

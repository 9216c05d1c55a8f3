"""Orbax checkpoints of a whole MAPPA run: every policy's trainable params and optimizer state, plus
JSON metadata (step, data position, seed, coach cache, baseline eval) so a resume continues exactly.

Orbax writes each step to a temporary directory and renames it when complete, so a kill mid-save
leaves the previous checkpoint intact; `keep` bounds how many are kept.
"""
from __future__ import annotations

import base64
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class RunCheckpointer:
    def __init__(self, directory: str | pathlib.Path, keep: int, *, async_save: bool = False):
        directory = pathlib.Path(directory).absolute() if "://" not in str(directory) else directory
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("policies", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, policies: dict[str, Any], meta: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            policies=ocp.args.StandardSave(policies), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_policies: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restores onto the shardings of `abstract_policies` (arrays or ShapeDtypeStructs)."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_policies)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            policies=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored["policies"], restored["meta"]

    def close(self) -> None:
        self.manager.close()


def encode_bytes(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")


def decode_bytes(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))

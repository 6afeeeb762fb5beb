"""Orbax checkpoints of a run: train state (params, both optimiser states, step counters) and the
controller's host state (buffer, data cursor, counters) as JSON, saved together and atomically
(Orbax writes to a temporary folder and renames it when complete), plus Hugging Face exports.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from relift_jax import hf
from relift_jax.model import ModelConfig


class Checkpointer:
    """Saves every `save_every` iterations into `<run_dir>/checkpoints/<iteration>`."""

    def __init__(self, run_dir: str, *, keep: int = 2):
        self.dir = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "controller"))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, iteration: int, state: Any, controller: dict) -> None:
        self.manager.save(iteration, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), controller=ocp.args.JsonSave(controller)),
            force=True)
        self.manager.wait_until_finished()

    def restore(self, iteration: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores onto the shardings/dtypes of `abstract_state` (arrays or ShapeDtypeStructs)."""
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            abstract_state)
        out = self.manager.restore(iteration, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), controller=ocp.args.JsonRestore()))
        return out["state"], out["controller"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def export_hf(config: ModelConfig, params: Any, path: str, *, tokenizer=None,
              info: dict | None = None) -> None:
    """A Hugging Face folder (config, safetensors, tokenizer) that transformers and evaluate load."""
    hf.save_checkpoint(config, params, path, tokenizer=tokenizer)
    if info is not None and jax.process_index() == 0:
        with open(os.path.join(path, "relift_info.json"), "w") as f:
            json.dump(info, f, indent=1)

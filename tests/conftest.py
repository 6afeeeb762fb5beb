"""Shared test setup: 8 fake CPU devices and the tiny Hugging Face checkpoints, made once per session.

The environment variables must be set before anything imports jax (pytest imports this file first),
because XLA reads them once when the CPU backend starts.
"""
from __future__ import annotations

import os

# 8 host devices let test_sharding.py build a real 2x2x2 mesh on one CPU; harmless elsewhere
# (arrays still land on device 0 unless a test places them).
_DEVICES_FLAG = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("XLA_FLAGS", _DEVICES_FLAG)
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _DEVICES_FLAG
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "hf_reference: compares against Hugging Face transformers (PyTorch) outputs")


@dataclasses.dataclass(eq=False)  # hashable by identity: tests memoise on it
class TinyCheckpoints:
    """Paths of the tiny random checkpoints (written by transformers) and cached loaders."""

    paths: dict[str, str]
    _hf: dict = dataclasses.field(default_factory=dict)
    _ours: dict = dataclasses.field(default_factory=dict)

    def hf_model(self, kind: str):
        """The reference: transformers' own model read back from the folder (float32, eval mode)."""
        if kind not in self._hf:
            import transformers

            self._hf[kind] = transformers.AutoModelForCausalLM.from_pretrained(
                self.paths[kind], dtype="float32").eval()
        return self._hf[kind]

    def ours(self, kind: str):
        """(ModelConfig, params) from relift_jax.hf.load_checkpoint in float32."""
        if kind not in self._ours:
            from relift_jax import hf

            self._ours[kind] = hf.load_checkpoint(self.paths[kind])
        return self._ours[kind]


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    """The three tiny kinds (qwen2_tied, qwen2_untied, llama3) saved by `save_pretrained` once."""
    from hf_fixtures import KINDS, save_hf_model

    root = tmp_path_factory.mktemp("hf_tiny")
    paths = {}
    for kind in KINDS:
        path = root / kind
        save_hf_model(kind, path)
        paths[kind] = str(path)
    return TinyCheckpoints(paths)

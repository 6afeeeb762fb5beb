"""What makes the toy numbers differ between machines: the same training job under settings that
differ between machines of one kind (CPU instruction set, XLA thread count), compared parameter by
parameter with a rerun under the default setting.

    python bench/cross_machine.py [--steps 30] [--gin gin/toy/base.gin] [--out /tmp/cross_machine]

Each variant trains the toy base recipe (SFT, `--steps` steps) in its own process and exports its
parameters; the table gives max |difference| to the default run and the share of parameters that
differ at all. XLA compiles for the CPU it runs on: `--xla_cpu_max_isa` caps the instruction set the
way an older CPU would (AVX2 instead of AVX-512: other vector widths, so other summation orders);
`intra_op_parallelism_threads=1` is a machine with one core for XLA (other work splits).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

VARIANTS = {
    "default": "",
    "default (rerun)": "",
    "1 XLA thread": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "AVX2 (no AVX-512)": "--xla_cpu_max_isa=AVX2",
    "SSE4.2": "--xla_cpu_max_isa=SSE4_2",
}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(gin: str, run_dir: str, steps: int, xla_flags: str) -> float:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip())
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "relift_jax.main", f"--gin_file={gin}",
                    f"--run_dir={run_dir}", f"--gin.TrainConfig.iterations={steps}",
                    "--gin.TrainConfig.resume=False"], check=True, cwd=_REPO, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def params(run_dir: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    folder = os.path.join(run_dir, "export", "final")
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--gin", default="gin/toy/base.gin")
    p.add_argument("--out", default="/tmp/cross_machine")
    a = p.parse_args()
    rows, ref = [], None
    for i, (name, flags) in enumerate(VARIANTS.items()):
        run_dir = os.path.join(a.out, f"v{i}")
        sec = train(a.gin, run_dir, a.steps, flags)
        w = params(run_dir)
        if ref is None:
            ref = w
            rows.append((name, flags, 0.0, 0.0, sec))
            continue
        diffs = [np.abs(w[k].astype(np.float64) - ref[k]) for k in ref]
        mx = max(float(d.max()) for d in diffs)
        frac = sum(int((d > 0).sum()) for d in diffs) / sum(d.size for d in diffs)
        rows.append((name, flags, mx, frac, sec))
    print(f"toy base recipe, {a.steps} SFT steps; difference to the first default run\n")
    print("| variant | XLA_FLAGS | max abs diff | params that differ | wall s |")
    print("|---|---|---:|---:|---:|")
    for name, flags, mx, frac, sec in rows:
        print(f"| {name} | `{flags or '-'}` | {mx:.3g} | {100 * frac:.1f}% | {sec:.0f} |")
    with open(os.path.join(a.out, "cross_machine.json"), "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main()

"""Per-chip memory of the mini and flash train steps on 256-chip TPU slices, compiled ahead of time.

Each case is one `python -m llada2_jax.aot` run (a fresh process, one at a time: a flash compile
holds GBs of host memory): the real train step of the experiment's training stage (its objective,
AdamW update, shardings, remat policy and the TPU kernels) is lowered and compiled for the slice's
devices described by libtpu, with no TPU attached and no weight allocated. Needs libtpu
(`bash bench/aot_table.sh` installs it in a throw-away venv).

    python bench/aot_table.py [--cases=tiny,mini_wsd,...] [--timeout=2400] [--nowrite]

Columns, per chip: `args` = the executable's arguments (train state + batch shard), `temp` = its
temporaries (activations kept for the backward pass, gradients, the update's scratch), `peak` =
args + outputs - outputs aliased onto the donated state + temp + code; `% HBM` of the chip's
nominal HBM. `state vs dry run`: params + buffers + optimizer state as compiled (args minus the
batch) against `training.dry_run`'s arithmetic (+ the frozen reference for DPO). `dominant`:
activations when temp exceeds the state. FLOPs: `llada2_jax.aot.model_flops` (matmuls of the
step, per chip; XLA's cost analysis counts the layer scan's body once, so it is printed by the
entry point but not tabled). The WSD row compiles the longest block (the MDLM phase,
block = seq_len); SFT and DPO their one block size. `compile s` is wall time on this (shared) host.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from absl import flags

import _cli
import _results

GiB = 2**30
CHILD_ENV = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # several compiles may share the host

# label -> (experiment, topology, config overrides): the settings that make each step fit
CASES = {
    "tiny": ("experiments/mini_wsd.py", "v5e-4", ("--config.smoke=True",)),
    "flash_wsd": ("experiments/flash_wsd.py", "v5p-512", ()),
    "mini_wsd": ("experiments/mini_wsd.py", "v5p-512", ()),
    "mini_sft": ("experiments/mini_sft.py", "v5p-512", ()),
    "mini_dpo": ("experiments/mini_dpo.py", "v5p-512", ()),
    "flash_sft": ("experiments/flash_sft.py", "v5p-512", ()),
    "flash_dpo": ("experiments/flash_dpo.py", "v5p-512", ()),
}

SELECTED = flags.DEFINE_list("cases", list(CASES), f"cases to compile, in order (known: {', '.join(CASES)})")
EXTRA = flags.DEFINE_multi_string("case", [], "an extra case 'label=experiment,topology[,--config.x=v ...]'")
TIMEOUT = flags.DEFINE_integer("timeout", 2400, "seconds allowed for one case's compile", lower_bound=1)
JSON_DIR = flags.DEFINE_string("json_dir", "", "keep each case's measurements here (default: a temporary folder)")
REUSE = flags.DEFINE_boolean("reuse", False, "take a case from --json_dir when its file is there, else compile it")
WRITE = flags.DEFINE_boolean("write", True, "write the table to bench/results/aot.md")


def run_case(label: str, experiment: str, topology: str, overrides, workdir: str) -> dict:
    out = os.path.join(workdir, f"{label}.json")
    log = os.path.join(workdir, f"{label}.log")
    cmd = [sys.executable, "-m", "llada2_jax.aot", f"--config={experiment}", f"--topology={topology}",
           f"--json_out={out}", *overrides]
    print(f"[aot_table] {label}: {' '.join(cmd[1:])}", flush=True)
    base = {"label": label, "experiment": experiment, "topology_name": topology, "overrides": overrides}
    if REUSE.value and os.path.exists(out):
        print(f"[aot_table] {label}: reusing {out}", flush=True)
        return {**base, "wall_s": 0.0, **json.load(open(out))}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=TIMEOUT.value,
                                cwd=_results.ROOT, env=CHILD_ENV).returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - t0
    lines = [ln for ln in open(log).read().splitlines() if ln.startswith(("[aot]", "config error", "aot:"))]
    print("\n".join(lines), flush=True)
    base["wall_s"] = wall
    if rc is None:
        return {**base, "error": f"not compiled within --timeout={TIMEOUT.value} s"}
    if os.path.exists(out):
        return {**base, **json.load(open(out))}
    tail = lines[-1] if lines else (open(log).read().strip().splitlines() or ["no output"])[-1]
    return {**base, "error": f"rc={rc}: {tail[:300]}"}


def size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def row(r: dict) -> list:
    g = size
    settings = " ".join(o.replace("--config.", "") for o in r["overrides"]) or "as configured"
    if "stage" not in r:
        return [r["label"], "", r["topology_name"], "", settings] + [""] * 7 + [f"{r['wall_s']:.0f}", r["error"]]
    shape = (f"{r['batch_size']} x {r['seq_len']}, accum {r['grad_accum']}, remat {r['remat_policy']}")
    step = f"{r['stage']} {r['segment']} (block {r['block_size']})"
    if r["error"]:
        return [r["label"], step, r["topology_name"], shape, settings] + [""] * 7 + \
               [f"{r['compile_s']:.0f}", r["error"]]
    est, got = r["estimate_bytes"], r["compiled_state_bytes"]
    diff = 100 * (got - est) / max(est, 1)
    dominant = "activations" if r["temp_bytes"] > r["compiled_state_bytes"] else "state"
    return [r["label"], step, r["topology_name"], shape, settings, g(r["argument_bytes"]), g(r["temp_bytes"]),
            g(r["total_bytes"]), f"{100 * r['total_bytes'] / r['hbm_bytes']:.1f}",
            f"{g(got)} vs {g(est)} ({diff:+.1f} %)", dominant, f"{r['model_flops'] / r['topology']['chips'] / 1e12:.1f}",
            f"{r['compile_s']:.0f}", f"peak host RSS {r['peak_rss_bytes'] / GiB:.1f} GiB"]


def _extra_cases() -> dict:
    out = {}
    for spec in EXTRA.value:
        label, _, rest = spec.partition("=")
        parts = rest.split(",")
        if not label or len(parts) < 2:
            _cli.fail(f"--case={spec!r}: expected 'label=experiment,topology[,--config.x=v ...]'")
        out[label] = (parts[0], parts[1], tuple(parts[2:]))
    return out


def main() -> int:
    # SIGTERM (e.g. from `timeout`) raises SystemExit, and subprocess.run kills the running compile
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cases = {**CASES, **_extra_cases()}
    selected = SELECTED.value + [label for label in _extra_cases() if label not in SELECTED.value]
    unknown = [c for c in selected if c not in cases]
    if unknown:
        _cli.fail(f"--cases: unknown {unknown}; known: {', '.join(cases)}")
    # in a child: a process that loaded libtpu holds its lock file for its lifetime
    probe = subprocess.run([sys.executable, "-c", "from jax.experimental import topologies; "
                            "topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu')"],
                           capture_output=True, text=True, env=CHILD_ENV)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"AOT table skipped: libtpu cannot describe a TPU topology: {last[:300]}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="aot_table_") as scratch:
        workdir = JSON_DIR.value or scratch
        os.makedirs(workdir, exist_ok=True)
        for label in selected:
            results.append(run_case(label, *cases[label], workdir))
    header = ["case", "step", "slice", "global batch x seq", "overrides", "args", "temp", "peak",
              "% HBM", "state: compiled vs dry run", "dominant", "model TFLOP/step/chip", "compile s", "notes"]
    kinds = sorted({(r["topology"]["name"], r["topology"]["chips"], r["device_kind"], r["topology"]["hbm_gib"])
                    for r in results if "topology" in r})
    slices = "; ".join(f"{n} = {c} x {k} ({h:g} GiB HBM each)" for n, c, k, h in kinds)
    _results.publish("aot", f"Slices: {slices}.\n\n" + _results.markdown_table(header, [row(r) for r in results]),
                     WRITE.value)
    return 0 if all(not r.get("error") for r in results) else 1


if __name__ == "__main__":
    _cli.run(main)

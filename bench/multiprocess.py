"""CPU check of a pod-shaped job: 2 processes x 4 devices vs 1 process x 8, then elastic restores.

Runs `experiments/tiny_moe.py` (a tiny BailingMoeV2 WSD stage, mesh fsdp=4 x expert=2, 2 data
shards, 6 steps) four ways, each as its own `python -m llada2_jax.main` job:
  reference   1 process x 8 CPU devices, all 6 steps
  2x4         2 processes x 4 CPU devices (`bench/multiprocess_cpu.sh`), stopped after step 3
  1x8 restore a copy of the 2x4 workdir continued on 1 process x 8 devices, mesh fsdp=2 x expert=4
  1x1 restore a copy of the 2x4 workdir continued on 1 device
  1x8 -> 2x4  the other way: 1 process x 8 devices (fsdp=2 x expert=4) stopped after step 3,
              continued by 2 processes x 4 devices
and tabulates the per-step training losses, their largest difference from the reference, and
whether each run's saved data state (per shard Grain state + global position) equals the
reference's at the same step. Writes bench/results/multiprocess.md.

    python bench/multiprocess.py [--workdir=/tmp/multiprocess] [--python=python3] [--nowrite]
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

import _cli
import _results

WORKDIR = flags.DEFINE_string("workdir", "/tmp/multiprocess", "where the four runs' workdirs go (replaced)")
PYTHON = flags.DEFINE_string("python", sys.executable, "interpreter of the runs")
WRITE = flags.DEFINE_boolean("write", True, "write the table to bench/results/multiprocess.md")
TIMEOUT = flags.DEFINE_integer("timeout", 1200, "seconds each run may take", lower_bound=1)

CONFIG = "experiments/tiny_moe.py"
STOP_AT = 3  # the 2-process run checkpoints and exits after this step
RUNS = ("reference", "2x4", "1x8 restore", "1x1 restore", "1x8 -> 2x4")
LAYOUTS = {"reference": "1 x 8 (fsdp 4 x expert 2)", "2x4": "2 x 4 (fsdp 4 x expert 2)",
           "1x8 restore": "1 x 8 (fsdp 2 x expert 4)", "1x1 restore": "1 x 1",
           "1x8 -> 2x4": "1 x 8 (fsdp 2 x expert 4), then 2 x 4 (fsdp 4 x expert 2)"}


def _main_cmd(workdir: str, *flags_: str) -> list[str]:
    return [PYTHON.value, "-m", "llada2_jax.main", f"--config={CONFIG}", f"--workdir={workdir}", *flags_]


def _run(cmd: list[str], devices: int, log: str, env_extra: dict | None = None) -> float:
    """Run `cmd` from the repository root with `devices` CPU devices; its wall time in seconds."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=_results.ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=TIMEOUT.value)
    if proc.returncode != 0:
        raise app.UsageError(f"{' '.join(cmd[:6])} ... exited with {proc.returncode}; see {log}")
    return time.perf_counter() - start


def losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def data_state(workdir: str, step: int) -> dict:
    with open(os.path.join(workdir, "checkpoints", "wsd", str(step), "data_shards", "metadata")) as f:
        return json.load(f)


def main() -> int:
    root = os.path.abspath(WORKDIR.value)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    dirs = {name: os.path.join(root, name.replace(" -> ", "_then_").replace(" ", "_")) for name in RUNS}
    seconds = {}
    seconds["reference"] = _run(_main_cmd(dirs["reference"]), 8, f"{dirs['reference']}.log")
    script = str(_results.ROOT / "bench" / "multiprocess_cpu.sh")
    seconds["2x4"] = _run(["bash", script, dirs["2x4"], f"--config.train.stop_after_steps={STOP_AT}"], 1,
                          f"{dirs['2x4']}.log", dict(PYTHON=PYTHON.value, CONFIG=CONFIG))
    for name, devices, mesh in (("1x8 restore", 8, ("--config.mesh.fsdp=2", "--config.mesh.expert=4")),
                                ("1x1 restore", 1, ("--config.mesh.fsdp=1", "--config.mesh.expert=1"))):
        shutil.copytree(dirs["2x4"], dirs[name])
        seconds[name] = _run(_main_cmd(dirs[name], *mesh), devices, f"{dirs[name]}.log")
    name = "1x8 -> 2x4"
    seconds[name] = _run(_main_cmd(dirs[name], "--config.mesh.fsdp=2", "--config.mesh.expert=4",
                                   f"--config.train.stop_after_steps={STOP_AT}"), 8, f"{dirs[name]}.log")
    seconds[name] += _run(["bash", script, dirs[name]], 1, f"{dirs[name]}.2x4.log",
                          dict(PYTHON=PYTHON.value, CONFIG=CONFIG))

    curves = {name: losses(d) for name, d in dirs.items()}
    ref = curves["reference"]
    rows, worst = [], {}
    for step in sorted(ref):
        row = [step, f"{ref[step]:.7f}"]
        for name in RUNS[1:]:
            # a restored workdir's metrics.jsonl starts with the 2x4 run's steps
            ran = {"2x4": step <= STOP_AT, "1x8 -> 2x4": True}.get(name, step > STOP_AT)
            if ran and step in curves[name]:
                diff = abs(curves[name][step] - ref[step])
                worst[name] = max(worst.get(name, 0.0), diff)
                row.append(f"{curves[name][step]:.7f} ({diff:.1e})")
            else:
                row.append("-")
        rows.append(row)
    states = {"2x4": (STOP_AT, data_state(dirs["2x4"], STOP_AT)),
              "1x8 restore": (max(ref), data_state(dirs["1x8 restore"], max(ref))),
              "1x1 restore": (max(ref), data_state(dirs["1x1 restore"], max(ref))),
              "1x8 -> 2x4": (max(ref), data_state(dirs["1x8 -> 2x4"], max(ref)))}
    same_data = {name: state == data_state(dirs["reference"], step) for name, (step, state) in states.items()}
    summary = [[name, LAYOUTS[name],
                {"2x4": f"1-{STOP_AT}", "1x8 restore": f"{STOP_AT + 1}-{max(ref)}",
                 "1x1 restore": f"{STOP_AT + 1}-{max(ref)}"}.get(name, f"1-{max(ref)}"),
                f"{seconds[name]:.0f}", "-" if name == "reference" else f"{worst[name]:.1e}",
                "-" if name == "reference" else ("yes" if same_data[name] else "NO")]
               for name in RUNS]
    text = "\n\n".join([
        f"`{CONFIG}`: tiny BailingMoeV2 (8 experts, top-2), WSD decay phase at block 16, global batch 8 x 32 "
        "tokens, 2 data shards. The 2-process run checkpoints after step "
        f"{STOP_AT} and exits; copies of its workdir continue on other layouts. The last run goes the other "
        "way: a 1-process checkpoint continued by 2 processes. Data state: the saved per-shard Grain states "
        "and global position at the run's last step, compared with the reference's at the same step.",
        _results.markdown_table(["run", "processes x devices (mesh)", "steps", "wall s",
                                 "max abs loss diff vs reference", "data state = reference's"], summary),
        "Per-step training loss (difference from the reference):",
        _results.markdown_table(["step", "reference 1x8", "2x4", "restored 1x8", "restored 1x1", "1x8 -> 2x4"],
                                rows),
        "Wall times include start-up, tokenizer training and compilation on a shared 2-core machine.",
    ])
    _results.publish("multiprocess", text, WRITE.value)
    ok = all(v <= 1e-5 for v in worst.values()) and all(same_data.values())
    print(f"[bench] max |loss diff| {max(worst.values()):.2e}; data states equal: {all(same_data.values())}",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    _cli.run(main)

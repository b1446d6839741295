"""Run untrusted generated Python in a separate process, never in ours.

Each program is written to a fresh temporary directory and run there by a new interpreter
(`python -I`: no user site, no PYTHON* environment) in its own process group, with its stdin
closed and its address space and CPU time capped. Past `timeout` seconds the whole group is
killed. This isolates our process from crashes, hangs and leaked state; it is not a security
sandbox (the program can still touch the file system and network as our user).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile

_PROGRAM_FILE = "program.py"
# Runs in the child before the program: caps memory and CPU, then executes it as __main__.
_BOOTSTRAP = """
import resource, runpy, sys
limit = int(sys.argv[2])
if limit > 0:
    for name in ("RLIMIT_AS", "RLIMIT_DATA"):
        if hasattr(resource, name):
            resource.setrlimit(getattr(resource, name), (limit, limit))
cpu = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
sys.argv = [sys.argv[1]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    """status: 'passed' (exit code 0), 'failed' (any other exit) or 'timed out'."""
    status: str
    returncode: int | None
    stderr_tail: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(program: str, *, timeout: float = 10.0, memory_bytes: int = 4 << 30,
               stderr_chars: int = 2000) -> ExecutionResult:
    """Execute `program` in a subprocess; passed means it exited with code 0 within `timeout` s.

    `memory_bytes` caps the child's address space (0: no cap).
    """
    if timeout <= 0:
        raise ValueError(f"timeout={timeout} must be > 0 seconds")
    if memory_bytes < 0:
        raise ValueError(f"memory_bytes={memory_bytes} must be >= 0")
    with tempfile.TemporaryDirectory(prefix="llada2_exec_") as workdir:
        path = os.path.join(workdir, _PROGRAM_FILE)
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        cpu_seconds = max(1, int(timeout) + 1)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, path, str(memory_bytes), str(cpu_seconds)],
            cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return ExecutionResult("timed out", None, "")
        finally:
            if proc.poll() is None:
                _kill_group(proc)
                proc.wait()
    text = err.decode("utf-8", errors="replace")[-stderr_chars:]
    return ExecutionResult("passed" if proc.returncode == 0 else "failed", proc.returncode, text)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the program and anything it spawned (it leads its own session/process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

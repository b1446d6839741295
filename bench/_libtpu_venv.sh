# Sourced by the TPU AOT scripts: a throw-away venv (system site-packages visible, so an installed
# jax stack is reused) with the repo and the libtpu that the installed jax's `jax[tpu]` extra pins.
# The caller defines `skip REASON` (print and exit 0) and runs from the repository root; afterwards
# `$py` is the venv's python. PYTHON picks the interpreter.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
trap 'exit 143' TERM INT  # so the EXIT trap cleans up under `timeout`

"${PYTHON:-python3}" -m venv --system-site-packages "$work/venv" || skip "cannot create a venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --no-cache-dir -e . >"$work/pip.log" 2>&1 \
  || { tail -5 "$work/pip.log"; skip "pip install -e . failed"; }
# the libtpu requirement of jax's "tpu" extra, e.g. libtpu==0.0.42.*
pin=$("$py" -c 'import importlib.metadata as m, re
print(next((re.split(r";", r)[0].replace(" ", "") for r in m.requires("jax") or []
            if r.startswith("libtpu") and "tpu" in r), ""))') || skip "cannot read jax metadata"
[ -n "$pin" ] || skip "the installed jax declares no libtpu pin"
echo "installing $pin (jax $("$py" -c 'import jax; print(jax.__version__)'))"
"$py" -m pip install -q --no-cache-dir --no-deps "$pin" >"$work/pip_tpu.log" 2>&1 \
  || { tail -5 "$work/pip_tpu.log"; skip "pip could not install $pin"; }
# libtpu logs its missing-host warnings (no TPU VM metadata here); they are harmless for AOT.

"""GPU check of the Pallas (Triton) kernels: correctness vs the XLA references, then timings.

Needs only jax (CUDA) + numpy + this repo. Every section runs in its own try/except; the summary
tables are printed at the end and written to bench/results/gpu_check.md (--nowrite: print only);
the exit status is 1 if any check failed or errored.

    bash bench/gpu_check.sh   (about 3 minutes on one H100)
"""
from __future__ import annotations

import contextlib
import functools
import time
import traceback

import numpy as np

import jax
import jax.numpy as jnp
from absl import flags

import _cli
import _results
from _timing import median_ms
from kernels_pallas.block_sparse_attention import gpu as attn_gpu
from kernels_pallas.grouped_matmul import gpu as gmm_gpu
from llada2_jax.core.masks import MaskSpec
from llada2_jax.ops.attention import xla_attention

RESULTS: list[tuple[str, str, str]] = []  # (check, status, detail)
TIMINGS: list[tuple[str, str, float]] = []  # (case, impl, ms)
TOL = {jnp.float32: 2e-4, jnp.bfloat16: 3e-2}
WRITE = flags.DEFINE_boolean("write", True, "write the tables to bench/results/gpu_check.md")


@contextlib.contextmanager
def guarded(check):
    """Report an exception as an ERROR row for `check` and go on with the next case or section."""
    try:
        yield
    except Exception as exc:
        traceback.print_exc()
        report(check, "ERROR", f"{type(exc).__name__}: {str(exc)[:200]}")


def section(fn):
    @functools.wraps(fn)
    def run():
        with guarded(fn.__name__):
            fn()
    return run


def report(check, status, detail):
    RESULTS.append((check, status, detail))
    print(f"  {status:5s} {check}: {detail}", flush=True)


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-6))


def compare(check, names, got, ref, tol):
    """ok if every output is finite and within `tol` relative error of the reference."""
    errs = [rel_err(g, r) for g, r in zip(got, ref)]
    finite = all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in got)
    ok = finite and max(errs) <= tol
    report(check, "ok" if ok else "FAIL", f"rel err {names} " + " ".join(f"{e:.1e}" for e in errs))


def time_all(case, impls, args, tag=""):
    """Median time of each impl(*args) into TIMINGS; an impl that fails is an ERROR row."""
    for impl, fn in impls.items():
        with guarded(f"time {impl}{tag}"):
            TIMINGS.append((case, impl, median_ms(fn, *args)))
            print(f"  {impl}: {TIMINGS[-1][2]:.2f} ms", flush=True)


def bdlm_spec(batch, length, block, docs):
    seg = np.zeros((batch, length), np.int32)
    for r in range(batch):
        cuts = np.linspace(0, length, docs + 1).astype(int)
        for d in range(docs):
            seg[r, cuts[d]:cuts[d + 1]] = d + 1
    if batch > 1:
        seg[1, -length // 8:] = 0  # padding tail on the second row
    return MaskSpec.block_diffusion(seg, block)


def decode_spec(batch, block, cache_len, filled):
    """Queries = the current block; keys = cache slots (unwritten slots belong to no document)."""
    cur = filled // block
    pos = np.arange(cache_len)
    k_seg = np.where(pos < filled + block, 1, -1)[None].repeat(batch, 0)
    q = lambda v: jnp.full((batch, block), v, jnp.int32)  # noqa: E731
    return MaskSpec(q(0), q(cur), q(1), jnp.zeros((batch, cache_len), jnp.int32),
                    jnp.asarray((pos // block)[None].repeat(batch, 0), jnp.int32),
                    jnp.asarray(k_seg, jnp.int32), "block_causal")


def qkv(spec, hq, hkv, d, dtype, seed=0):
    b, t, s = spec.shape
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, t, hq, d), jnp.float32).astype(dtype)
    return q, k, v, do


def fwd_bwd(attn):
    def run(q, k, v, do, spec):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, spec), q, k, v)
        return (out, *vjp(do))
    return jax.jit(run)


REF = fwd_bwd(lambda q, k, v, spec: xla_attention(q, k, v, spec.dense()))


def pallas(block_q=64, block_k=64):
    return fwd_bwd(lambda q, k, v, spec: attn_gpu.attention(q, k, v, spec, block_q=block_q, block_k=block_k))


@section
def attention_correctness():
    cases = [  # (name, spec, Hq, Hkv, D, dtype)
        ("bdlm 2docs+pad L=256 LB=32", bdlm_spec(2, 256, 32, 2), 4, 2, 64, jnp.float32),
        ("bdlm odd L=200 LB=8 3docs", bdlm_spec(1, 200, 8, 3), 4, 1, 64, jnp.float32),
        ("decode T=32 S=512", decode_spec(2, 32, 512, 288), 4, 1, 128, jnp.float32),
        ("causal docs+pad T=320", MaskSpec.causal(np.repeat([[1, 1, 2, 2, 0]], 64, 1)), 4, 2, 128, jnp.bfloat16),
        ("bdlm 2docs+pad L=256 LB=32", bdlm_spec(2, 256, 32, 2), 4, 1, 128, jnp.bfloat16),
    ]
    for name, spec, hq, hkv, d, dtype in cases:
        label = f"attn {name} H{hq}/{hkv} D{d} {jnp.dtype(dtype).name}"
        with guarded(label):
            q, k, v, do = qkv(spec, hq, hkv, d, dtype)
            with jax.default_matmul_precision("highest"):
                ref = REF(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                          do.astype(jnp.float32), spec)
            compare(label, "out/dq/dk/dv", pallas()(q, k, v, do, spec), ref, TOL[dtype])


@section
def attention_timing():
    length, block = 4096, 32
    for docs in (1, 4):
        spec = bdlm_spec(1, length, block, docs)
        q, k, v, do = qkv(spec, 8, 2, 128, jnp.bfloat16)
        case = f"BDLM L={length} (T=2L) LB={block} docs={docs} B=1 H8/2 D128 bf16 fwd+bwd"
        # (the xla_sparse path is for CPU: its XLA GPU compile at T=8192 took > 3 minutes)
        impls = {"dense XLA": REF, "pallas 64x64": pallas(64, 64), "pallas 128x64": pallas(128, 64)}
        time_all(case, impls, (q, k, v, do, spec), tag=f" docs={docs}")


def _groups(rows, experts, seed):
    rng = np.random.default_rng(seed)
    sizes = rng.multinomial(rows, rng.dirichlet(np.ones(experts)))
    sizes[rng.choice(experts, size=max(1, experts // 8), replace=False)] = 0  # empty groups
    sizes[0] += rows - sizes.sum()
    return jnp.asarray(sizes, jnp.int32)


@section
def gmm_correctness():
    for dtype in (jnp.float32, jnp.bfloat16):
        for m, kd, n, e in ((1000, 128, 200, 16),):
            label = f"gmm M{m} K{kd} N{n} E{e} {jnp.dtype(dtype).name}"
            with guarded(label):
                gs = _groups(m - 40, e, m)  # 40 trailing rows in no group
                ks = jax.random.split(jax.random.PRNGKey(m), 3)
                x = jax.random.normal(ks[0], (m, kd), jnp.float32).astype(dtype)
                w = (jax.random.normal(ks[1], (e, kd, n), jnp.float32) / kd ** 0.5).astype(dtype)
                dy = jax.random.normal(ks[2], (m, n), jnp.float32)

                def run(f):
                    out, vjp = jax.vjp(lambda x, w: f(x, w, gs), x, w)
                    return (out, *vjp(dy))
                with jax.default_matmul_precision("highest"):
                    ref = jax.jit(lambda: run(lambda x, w, g: jax.lax.ragged_dot(
                        x.astype(jnp.float32), w.astype(jnp.float32), g)))()
                got = jax.jit(lambda: run(lambda x, w, g: gmm_gpu.grouped_matmul(x, w, g)))()
                compare(label, "out/dx/dw", got, ref, TOL[dtype])


@section
def gmm_timing():
    tokens, k_top, e, d, inter = 4096, 8, 64, 1024, 512
    m = tokens * k_top
    gs = _groups(m, e, 0)
    x = jax.random.normal(jax.random.PRNGKey(1), (m, d), jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(2), (e, d, inter), jnp.bfloat16)
    case = f"gmm M={m} (N_tok={tokens}, k={k_top}) E={e} K={d} N={inter} bf16 fwd+bwd"

    def bench(f):
        return jax.jit(jax.grad(lambda x, w: f(x, w, gs).astype(jnp.float32).sum(), (0, 1)))
    ragged_dot = functools.partial(jax.lax.ragged_dot, preferred_element_type=jnp.float32)
    impls = {"ragged_dot": bench(ragged_dot), "pallas gmm": bench(gmm_gpu.grouped_matmul)}
    time_all(case, impls, (x, w))


def main() -> int:
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    for step in (attention_correctness, gmm_correctness, attention_timing, gmm_timing):
        t0 = time.perf_counter()
        step()
        print(f"[{step.__name__}] {time.perf_counter() - t0:.1f}s", flush=True)
    bad = [r for r in RESULTS if r[1] != "ok"]
    _results.publish("gpu_check", "\n\n".join([
        "## Correctness", _results.markdown_table(["check", "status", "detail"], RESULTS),
        "## Timings (median of 5, ms)",
        _results.markdown_table(["case", "impl", "ms"], [(c, i, f"{ms:.2f}") for c, i, ms in TIMINGS]),
        f"{len(RESULTS) - len(bad)}/{len(RESULTS)} checks ok"]), WRITE.value)
    return 1 if bad else 0


if __name__ == "__main__":
    _cli.run(main)

"""``orz_jax.hlo_cost``: compiled-HLO FLOPs / bytes / collectives with nested loop trip counts, against hand
numbers (2mkn per matmul x trips) and XLA's own ``cost_analysis`` on loop-free programs.

CPU programs compile in this process. The TPU checks (libtpu's compile-only ``v5p:2x2x1`` devices, whose HLO
carries no ``known_trip_count`` so the induction pattern must be read) run in ONE subprocess, as
tests/test_compile.py does, and are skipped without libtpu.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, run_aot_script
from orz_jax.hlo_cost import analyze_hlo, parse_hlo, trip_count

M, K, N = 64, 128, 96  # odd sizes: no tile-aligned shortcut can hide a wrong contraction dimension


def _nested(x, ws):
    """An outer scan of 3 over an inner scan of 7 matmuls [M, K] x [K, K] (K == N keeps the carry's shape)."""
    def outer(c, _):
        def inner(h, w):
            return jnp.tanh(h @ w), None
        return jax.lax.scan(inner, c, ws)[0], None
    return jax.lax.scan(outer, x, None, length=3)[0]


def _compile(f, *shapes):
    return jax.jit(f).lower(*shapes).compile()


def test_nested_scans_count_every_matmul_cpu():
    x = jax.ShapeDtypeStruct((M, K), jnp.float32)
    ws = jax.ShapeDtypeStruct((7, K, K), jnp.float32)
    c = _compile(_nested, x, ws)
    hc = analyze_hlo(c.as_text())
    assert hc.flops == 21 * 2 * M * K * K  # hand number: 3 x 7 matmuls
    assert sorted(loop["trips"] for loop in hc.loops) == [3, 7] and hc.unknown_loops == []
    # each of the 21 steps reads its one [K, K] layer (the slice, not the 7-layer stack) and reads + writes h
    assert 21 * (K * K * 4 + 2 * M * K * 4) <= hc.bytes_accessed < 21 * 7 * K * K * 4
    # XLA's figure counts each body once: one matmul (plus a few scalar flops), 21x short
    xla = c.cost_analysis()["flops"]
    assert 2 * M * K * K <= xla < 1.01 * 2 * M * K * K


def test_loop_free_matmul_chain_equals_xla_flops_and_bytes():
    a = jax.ShapeDtypeStruct((M, K), jnp.float32)
    b = jax.ShapeDtypeStruct((K, N), jnp.float32)
    d = jax.ShapeDtypeStruct((N, 48), jnp.float32)
    e = jax.ShapeDtypeStruct((4, 48, 32), jnp.float32)  # a batched dot too

    def chain(a, b, d, e):
        return jnp.einsum("mn,bnk->bmk", (a @ b) @ d, e)

    c = _compile(chain, a, b, d, e)
    hc = analyze_hlo(c.as_text())
    want = 2 * M * K * N + 2 * M * N * 48 + 2 * 4 * M * 48 * 32
    assert hc.flops == want
    assert hc.flops == c.cost_analysis()["flops"]  # matmul-only: XLA's convention exactly
    # bytes: operands + results of each top-level op, XLA's CPU convention (no layout padding on CPU): equal
    assert hc.bytes_accessed == c.cost_analysis()["bytes accessed"]


def test_sliced_and_in_place_fusion_bytes_equal_xla_cpu():
    """A layer read through dynamic-slice and a donated buffer updated in place: XLA's bytes, not the stack's."""
    ws, i = jax.ShapeDtypeStruct((7, K, K), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)
    c = _compile(lambda ws, i, x: jnp.tanh(x @ jax.lax.dynamic_index_in_dim(ws, i, keepdims=False)),
                 ws, i, jax.ShapeDtypeStruct((M, K), jnp.float32))
    assert analyze_hlo(c.as_text()).bytes_accessed == c.cost_analysis()["bytes accessed"]
    c = jax.jit(lambda buf, u, i: jax.lax.dynamic_update_index_in_dim(buf, u * 2, i, 0), donate_argnums=0).lower(
        ws, jax.ShapeDtypeStruct((K, K), jnp.float32), i).compile()
    assert analyze_hlo(c.as_text()).bytes_accessed == c.cost_analysis()["bytes accessed"]


def test_dynamic_bound_loop_is_reported_unknown_and_the_hint_applies():
    def f(x, w, n):
        return jax.lax.fori_loop(0, n, lambda i, h: h @ w, x)

    c = _compile(f, jax.ShapeDtypeStruct((M, K), jnp.float32), jax.ShapeDtypeStruct((K, K), jnp.float32),
                 jax.ShapeDtypeStruct((), jnp.int32))
    one = analyze_hlo(c.as_text())
    assert len(one.unknown_loops) == 1 and one.loops[0]["known"] is False
    assert one.flops == 2 * M * K * K  # counted once without a hint
    five = analyze_hlo(c.as_text(), unknown_trips=5)
    assert five.flops == 5 * 2 * M * K * K and five.unknown_loops == one.unknown_loops


def test_induction_pattern_without_known_trip_count():
    """The TPU compiler writes no known_trip_count: the count comes from init / compare / step. Same loops with
    the backend_config stripped from CPU HLO, and a loop stepping by 3 from 2 while i <= 20 (7 trips)."""
    c = _compile(_nested, jax.ShapeDtypeStruct((M, K), jnp.float32), jax.ShapeDtypeStruct((7, K, K), jnp.float32))
    text = c.as_text()
    assert '"known_trip_count":{"n":"7"}' in text  # the CPU spelling this module reads first
    stripped = text.replace('"known_trip_count"', '"unknown_key"')
    assert analyze_hlo(stripped).flops == 21 * 2 * M * K * K

    hlo = textwrap.dedent("""\
        HloModule m

        %cond (p: (s32[], f32[4,8])) -> pred[] {
          %p = (s32[], f32[4,8]{1,0}) parameter(0)
          %i = s32[] get-tuple-element(%p), index=0
          %n = s32[] constant(20)
          ROOT %lt = pred[] compare(%i, %n), direction=LE
        }

        %body (q: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
          %q = (s32[], f32[4,8]{1,0}) parameter(0)
          %j = s32[] get-tuple-element(%q), index=0
          %h = f32[4,8]{1,0} get-tuple-element(%q), index=1
          %three = s32[] constant(3)
          %next = s32[] add(%three, %j)
          %w = f32[8,8]{1,0} constant({...})
          %d = f32[4,8]{1,0} dot(%h, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
          ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%next, %d)
        }

        ENTRY %main (x: f32[4,8]) -> f32[4,8] {
          %x = f32[4,8]{1,0} parameter(0)
          %two = s32[] constant(2)
          %init = (s32[], f32[4,8]{1,0}) tuple(%two, %x)
          %loop = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body
          ROOT %r = f32[4,8]{1,0} get-tuple-element(%loop), index=1
        }
        """)
    comps = parse_hlo(hlo)
    entry = comps["main"]
    assert trip_count(comps, entry, entry.by_name["loop"]) == 7  # i = 2, 5, 8, 11, 14, 17, 20
    assert analyze_hlo(hlo).flops == 7 * 2 * 4 * 8 * 8


def test_tpu_convolution_and_pallas_cost_estimate_from_text():
    """Matmuls as TPU ``convolution`` (dim_labels bf_io->bf, and a padded 1-D window), and a Pallas kernel's
    CostEstimate in its tpu_custom_call backend_config, each inside a loop of 4."""
    hlo = textwrap.dedent("""\
        HloModule m

        %fused (a: bf16[16,32], b: bf16[32,48]) -> bf16[16,48] {
          %a = bf16[16,32]{1,0:T(8,128)(2,1)} parameter(0)
          %b = bf16[32,48]{1,0:T(8,128)(2,1)} parameter(1)
          ROOT %c = bf16[16,48]{1,0:T(8,128)(2,1)} convolution(%a, %b), dim_labels=bf_io->bf
        }

        %cond (p: (s32[], bf16[16,32], bf16[32,48], f32[2,10,3])) -> pred[] {
          %p = (s32[], bf16[16,32], bf16[32,48], f32[2,10,3]) parameter(0)
          %four = s32[] constant(4)
          %i = s32[] get-tuple-element(%p), index=0
          ROOT %lt = pred[] compare(%i, %four), direction=LT
        }

        %body (q: (s32[], bf16[16,32], bf16[32,48], f32[2,10,3])) -> (s32[], bf16[16,32], bf16[32,48], f32[2,10,3]) {
          %q = (s32[], bf16[16,32], bf16[32,48], f32[2,10,3]) parameter(0)
          %i = s32[] get-tuple-element(%q), index=0
          %one = s32[] constant(1)
          %i2 = s32[] copy(%i)
          %next = s32[] add(%i2, %one)
          %a = bf16[16,32] get-tuple-element(%q), index=1
          %b = bf16[32,48] get-tuple-element(%q), index=2
          %x = f32[2,10,3] get-tuple-element(%q), index=3
          %f = bf16[16,48]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused
          %k = f32[5,3,4]{2,1,0} constant({...})
          %conv = f32[2,10,4]{2,1,0} convolution(%x, %k), window={size=5 pad=2_2}, dim_labels=b0f_0io->b0f
          %pk = f32[8,8]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"custom_call_config": {"body": "TUxJUgA=", "cost_estimate": {"flops": 1000, "transcendentals": 0, "bytes_accessed": 640, "remote_bytes_transferred": 0}}}
          ROOT %t = (s32[], bf16[16,32], bf16[32,48], f32[2,10,3]) tuple(%next, %a, %b, %x)
        }

        ENTRY %main (a: bf16[16,32], b: bf16[32,48], x: f32[2,10,3]) -> s32[] {
          %a = bf16[16,32]{1,0} parameter(0)
          %b = bf16[32,48]{1,0} parameter(1)
          %x = f32[2,10,3]{2,1,0} parameter(2)
          %zero = s32[] constant(0)
          %c0 = s32[] copy(%zero)
          %init = (s32[], bf16[16,32], bf16[32,48], f32[2,10,3]) tuple(%c0, %a, %b, %x)
          %loop = (s32[], bf16[16,32], bf16[32,48], f32[2,10,3]) while(%init), condition=%cond, body=%body
          ROOT %r = s32[] get-tuple-element(%loop), index=0
        }
        """)
    hc = analyze_hlo(hlo)
    # 1-D conv, 10 positions, kernel 5, pad 2 each side: valid (output, tap) pairs = 50 - (2+1) - (2+1) = 44
    conv = 2 * 3 * 4 * 2 * 44
    assert hc.flops == 4 * (2 * 16 * 48 * 32 + conv + 1000)
    # the fusion reads a and b and writes its result; the custom call brings its own bytes
    fusion_bytes = (16 * 32 + 32 * 48 + 16 * 48) * 2
    assert hc.bytes_accessed >= 4 * (fusion_bytes + 640)


def test_collectives_in_a_scan_are_multiplied_cpu_devices():
    """A sharded matmul inside a scan of 5 on 4 fake CPU devices: its all-reduce counts 5 times, with its bytes."""
    code = textwrap.dedent("""
        import os, json
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from orz_jax.hlo_cost import analyze_hlo
        mesh = Mesh(np.asarray(jax.devices()[:4]), ("x",))
        x = jax.ShapeDtypeStruct((32, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "x")))
        ws = jax.ShapeDtypeStruct((5, 64, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "x", None)))
        def f(x, ws):
            return jax.lax.scan(lambda h, w: (jax.lax.with_sharding_constraint(h @ w, NamedSharding(mesh, P(None, "x"))), None), x, ws)[0]
        c = jax.jit(f).lower(x, ws).compile()
        hc = analyze_hlo(c.as_text())
        print(json.dumps({"coll": hc.collectives, "flops": hc.flops, "loops": hc.loops}))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert [loop["trips"] for loop in r["loops"]] == [5]
    # each device contracts its 16 of the 64 inner rows, so every step all-reduces the [32, 64] float32 partial
    # product (then keeps its column slice): 5 all-reduces of 8 KiB, all inside the loop body
    assert r["coll"] == {"all-reduce": {"count": 5, "bytes": 5 * 32 * 64 * 4}}
    # each device contracts its 16-wide slice: [32, 16] x [16, 64] per step
    assert r["flops"] == 5 * 2 * 32 * 16 * 64


TPU_SCRIPT = """
import json, sys, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from orz_jax.compile import parse_topology, topology_devices
from orz_jax.hlo_cost import analyze_hlo
sys.path.insert(0, sys.argv[2])
from test_hlo_cost import _nested, M, K
devs = topology_devices(parse_topology("v5p:2x2x1"))
mesh = Mesh(np.asarray(devs).reshape(4), ("x",))
rep = NamedSharding(mesh, P())
res = {}
c = jax.jit(_nested).lower(jax.ShapeDtypeStruct((M, K), jnp.float32, sharding=rep),
                           jax.ShapeDtypeStruct((7, K, K), jnp.float32, sharding=rep)).compile()
hc = analyze_hlo(c.as_text())
res["nested"] = {"flops": hc.flops, "trips": sorted(l["trips"] for l in hc.loops), "unknown": hc.unknown_loops,
                 "known_trip_count_in_text": "known_trip_count" in c.as_text()}
# sharded weights in the inner scan: an all-gather per inner step
wsh = jax.ShapeDtypeStruct((7, K, K), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, None, "x")))
c = jax.jit(_nested, out_shardings=rep).lower(jax.ShapeDtypeStruct((M, K), jnp.bfloat16, sharding=rep), wsh).compile()
hc = analyze_hlo(c.as_text())
res["coll"] = {"flops": hc.flops, "collectives": hc.collectives,
               "top_fusion": [t for t in hc.top("bytes", 5) if t[2] == "fusion"][0]}
# loop-free matmul chain: XLA's flops
a = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
b = jax.ShapeDtypeStruct((512, 768), jnp.bfloat16, sharding=rep)
d = jax.ShapeDtypeStruct((768, 256), jnp.bfloat16, sharding=rep)
c = jax.jit(lambda a, b, d: (a @ b) @ d).lower(a, b, d).compile()
hc = analyze_hlo(c.as_text())
res["chain"] = {"flops": hc.flops, "xla_flops": c.cost_analysis()["flops"], "bytes": hc.bytes_accessed,
                "xla_bytes": c.cost_analysis()["bytes accessed"]}
# a batched matmul: the TPU writes it as a convolution over the batch with an lhs-dilated window
x = jax.ShapeDtypeStruct((3, 40, 64), jnp.bfloat16, sharding=rep)
y = jax.ShapeDtypeStruct((3, 24, 64), jnp.bfloat16, sharding=rep)
c = jax.jit(lambda x, y: jnp.einsum("bqd,bkd->bqk", x, y)).lower(x, y).compile()
res["bmm"] = {"flops": analyze_hlo(c.as_text()).flops, "xla_flops": c.cost_analysis()["flops"],
              "window": "lhs_dilate" in c.as_text()}
# a Pallas kernel with a CostEstimate, called in a scan of 3: libtpu keeps the estimate in the tpu_custom_call's
# backend_config (as strings: {"flops":"12345",...})
from jax.experimental import pallas as pl
def kern(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2.0
def scaled(x):
    return pl.pallas_call(kern, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          cost_estimate=pl.CostEstimate(flops=12345, transcendentals=0, bytes_accessed=678))(x)
one_dev = NamedSharding(Mesh(np.asarray(devs[:1]), ("x",)), P())
xs = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=one_dev)
c = jax.jit(lambda x: jax.lax.scan(lambda h, _: (scaled(h), None), x, None, length=3)[0]).lower(xs).compile()
hc = analyze_hlo(c.as_text())
res["pallas"] = {"flops": hc.flops, "xla_flops": c.cost_analysis()["flops"],
                 "kernel_bytes": sum(t[4] for t in hc.top("bytes", 50) if t[2] == "custom-call")}
json.dump(res, open(sys.argv[1], "w"))
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install -e '.[tpu-aot]')")
def test_tpu_aot_nested_scans_collectives_and_chain(tmp_path):
    (tmp_path / "run.py").write_text(TPU_SCRIPT)
    run_aot_script(tmp_path / "run.py", tmp_path / "out.json", REPO / "tests")
    r = json.loads((tmp_path / "out.json").read_text())
    # the TPU HLO has no known_trip_count: the induction pattern gives 3 and 7
    assert r["nested"]["trips"] == [3, 7] and r["nested"]["unknown"] == []
    assert r["nested"]["flops"] == 21 * 2 * M * K * K
    # weights split by output column: each device computes its quarter of every matmul, and the [M, K] bf16
    # activation is all-gathered back each inner step (21) and once more for the replicated output
    assert r["coll"]["flops"] == 21 * 2 * M * K * K / 4
    assert r["coll"]["collectives"]["all-gather"] == {"count": 22, "bytes": 22 * M * K * 2}
    # the inner step's matmul fusion reads the gathered h, ONE layer's [K, K/4] slice of the 7-layer stack (the
    # dynamic-slice sits in a nested fusion), the s32 index, and writes [M, K/4]: 21 times
    assert r["coll"]["top_fusion"][4] == 21 * (M * K * 2 + K * K // 4 * 2 + 4 + M * K // 4 * 2)
    ch = r["chain"]
    assert ch["flops"] == 2 * 256 * 512 * 768 + 2 * 256 * 768 * 256  # a quarter of the rows per device
    assert ch["flops"] == ch["xla_flops"]
    # bytes: at least every argument and the result once (the compiler fuses the chain: [256, 768] stays on
    # chip), at most XLA's TPU figure, which models re-reads per output tile (a single 256x512x768 matmul: its
    # lhs counted 4x, its output 7x) where this module counts operands + results once
    a_, b_, d_, out_ = 256 * 512 * 2, 512 * 768 * 2, 768 * 256 * 2, 256 * 256 * 2
    assert a_ + b_ + d_ + out_ <= ch["bytes"] <= ch["xla_bytes"]
    assert r["pallas"]["flops"] == 3 * 12345 and r["pallas"]["kernel_bytes"] == 3 * 678
    assert 12345 <= r["pallas"]["xla_flops"] < 2 * 12345  # XLA: the body once (+ the loop counter's scalar ops)
    assert r["bmm"] == {"flops": 2 * 3 * 40 * 24 * 64, "xla_flops": 2 * 3 * 40 * 24 * 64, "window": True}


def test_splash_kernels_flops_from_their_scope_across_multiline_instructions():
    """libtpu writes a splash tpu_custom_call over several lines (its kernel_metadata JSON holds newlines) with
    the op_name after them; the kernels have no cost_estimate, so their FLOPs come from the splash_flops scope
    orz_jax.models.attention wraps them in, picked by the kernel's name. In a loop of 3; bytes = operands +
    results as for any op. A custom call without the scope counts no FLOPs."""
    def call(name, kind, shape):
        return (f'  %{name} = {shape} custom-call(%x), custom_call_target="tpu_custom_call", '
                'frontend_attributes={kernel_metadata={\n"xprof_metadata":"{\\"block_q\\": 128}"\n}}, '
                'metadata={op_name="jit(f)/transpose(jvp())/shard_map/splash_flops[fwd=100,dq=20,dkv=3]/'
                f'vmap(static_sparsity_splash)/jit(_splash_attention)/splash_mha_{kind}/splash_mha_{kind}/'
                'pallas_call" stack_frame_id=8}, backend_config={"custom_call_config":{"body":"TUxJUgA="}}\n')
    hlo = ("HloModule m\n\n"
           "%cond (p: (s32[], f32[8,128])) -> pred[] {\n"
           "  %p = (s32[], f32[8,128]) parameter(0)\n  %three = s32[] constant(3)\n"
           "  %i = s32[] get-tuple-element(%p), index=0\n"
           "  ROOT %lt = pred[] compare(%i, %three), direction=LT\n}\n\n"
           "%body (q: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {\n"
           "  %q = (s32[], f32[8,128]) parameter(0)\n  %i = s32[] get-tuple-element(%q), index=0\n"
           "  %one = s32[] constant(1)\n  %next = s32[] add(%i, %one)\n"
           "  %x = f32[8,128]{1,0} get-tuple-element(%q), index=1\n"
           + call("fwd", "fwd_segmented_residuals", "f32[8,128]{1,0}")
           + call("dq", "dq_segmented_no_residuals", "f32[8,128]{1,0}")
           + call("dkv", "dkv_segmented_no_residuals", "f32[8,128]{1,0}")
           + '  %other = f32[8,128]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", '
             'metadata={op_name="jit(f)/pallas_call"}\n'
           "  ROOT %t = (s32[], f32[8,128]) tuple(%next, %dkv)\n}\n\n"
           "ENTRY %main (x: f32[8,128]) -> s32[] {\n  %x = f32[8,128]{1,0} parameter(0)\n"
           "  %zero = s32[] constant(0)\n  %init = (s32[], f32[8,128]) tuple(%zero, %x)\n"
           "  %loop = (s32[], f32[8,128]) while(%init), condition=%cond, body=%body\n"
           "  ROOT %r = s32[] get-tuple-element(%loop), index=0\n}\n")
    hc = analyze_hlo(hlo)
    assert hc.flops == 3 * (100 + 20 + 3)
    per = {t[1]: (t[3], t[4]) for t in hc.top("flops", 20) if t[2] == "custom-call"}
    # operands + result: two [8, 128] float32 arrays per call, 3 times
    assert per == {"fwd": (300, 3 * 8192), "dq": (60, 3 * 8192), "dkv": (9, 3 * 8192), "other": (0, 3 * 8192)}


def test_in_place_scatter_counts_the_rows_it_writes_not_the_buffer():
    """The KV cache takes each decode step's token by a scatter into the donated buffer: the step touches the
    updated rows, not the whole cache (counting the buffer made a decode step of 0.5B read 4 TB)."""
    import jax
    import jax.numpy as jnp
    from orz_jax.hlo_cost import analyze_hlo

    rows, width, n = 4096, 256, 8
    f = jax.jit(lambda buf, idx, upd: buf.at[idx].set(upd), donate_argnums=0)
    args = (jax.ShapeDtypeStruct((rows, width), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32),
            jax.ShapeDtypeStruct((n, width), jnp.float32))
    hc = analyze_hlo(f.lower(*args).compile().as_text())
    upd_bytes, buf_bytes = n * width * 4, rows * width * 4
    assert 2 * upd_bytes <= hc.bytes_accessed <= 4 * upd_bytes + 4 * n  # indices + updates read, rows written
    assert hc.bytes_accessed < buf_bytes / 100


def test_computation_on_another_execution_thread_does_not_hide_the_rest():
    """v5p's compiler puts some embedding scatters on the SparseCore: such a computation ends in
    ``}, execution_thread="sparsecore"``, and every computation after it (the ENTRY included) must still parse."""
    from orz_jax.hlo_cost import analyze_hlo

    text = """HloModule m

%sc (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %n = f32[4]{0} negate(%p)
}, execution_thread="sparsecore"

ENTRY %main (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  ROOT %d = f32[4,2]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
    assert analyze_hlo(text).flops == 2 * 4 * 8 * 2

"""Issue #14's last two cuts of the 7B train steps' temporaries (docs/tpu/README.md), pinned for numerics:

* ``orz_jax.ppo.train.row_part``: the micro-batch loop slices each micro-batch out of the mini-batch instead of
  scanning over ``split_rows``'s [parts, rows // parts, L] copy; it must pick exactly ``split_rows``'s rows.
* ``orz_jax.models.layer_scan._loop_variant``: each layer's weights with an integer 0 that XLA cannot prove
  is 0 added to their bits (so the compute-dtype cast is not hoisted over the whole stack); it must be the
  identity, bit for bit (a float ``w * 1`` is not: XLA:CPU flushes subnormals).

The accumulated gradients themselves are pinned by the existing tests (tests/test_ppo_train.py against unpacked
rows, tests/test_sequence_parallel.py: in place vs plain bitwise, and both against float64 on a mesh).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from orz_jax.models.layer_scan import _loop_variant
from orz_jax.ppo.train import row_part, split_rows

from conftest import run_with_devices


def test_row_part_picks_split_rows_rows():
    """Reference: numpy's strided rows ``x[p::parts]`` (what ``split_rows`` documents), for every part."""
    x = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for parts in (1, 3, 4, 12):
        f = jax.jit(lambda x, p, parts=parts: row_part(x, parts, p, None))
        for p in range(parts):
            got = np.asarray(f(jnp.asarray(x), jnp.int32(p)))  # p traced: one compile for every part
            np.testing.assert_array_equal(got, x[p::parts])
            np.testing.assert_array_equal(got, np.asarray(split_rows(jnp.asarray(x), parts, None)[p]))


MESH_ROW_PART = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding
from orz_jax.config import MeshConfig
from orz_jax.ppo.train import BATCH_AXES, batch_shardings, row_part
from orz_jax.sharding import logical_to_spec, make_mesh, use_mesh
mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
x = np.arange(16 * 8, dtype=np.int32).reshape(16, 8)
xs = jax.device_put(x, NamedSharding(mesh, logical_to_spec(BATCH_AXES)))
with use_mesh(mesh):
    f = jax.jit(lambda x, p: row_part(x, 4, p, mesh))
    for p in range(4):
        y = f(xs, jnp.int32(p))
        np.testing.assert_array_equal(np.asarray(y), x[p::4])
        assert y.sharding.is_equivalent_to(NamedSharding(mesh, logical_to_spec(BATCH_AXES)), 2), y.sharding
print("OK")
"""


def test_row_part_on_a_mesh_keeps_rows_and_batch_sharding():
    """8 fake CPU devices, rows over fsdp (4): each micro-batch is rows p, p + 4, ... spread over the shards."""
    assert "OK" in run_with_devices(MESH_ROW_PART, 8)


def test_loop_variant_is_the_identity_bit_for_bit():
    """Reference: the input itself, compared as raw bits (signed zeros, inf, NaN, subnormals), inside a scan
    whose index is traced; integer leaves pass through untouched."""
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -3.5, 3.4e38], np.float32)
    params = {"w": jnp.asarray(np.tile(special, (3, 1))), "b": jnp.asarray(special.astype(jnp.bfloat16)[None]
                                                                              .repeat(3, 0)),
              "n": jnp.arange(3, dtype=jnp.int32)}

    def body(c, xs):
        p, i = xs
        return c, _loop_variant(p, i)

    _, out = jax.jit(lambda ps: jax.lax.scan(body, None, (ps, jnp.arange(3, dtype=jnp.int32))))(params)
    assert out["n"].dtype == jnp.int32 and out["b"].dtype == jnp.bfloat16
    for k in params:
        a, b = np.asarray(params[k]), np.asarray(out[k])
        np.testing.assert_array_equal(b.view(np.uint8), a.view(np.uint8), err_msg=k)

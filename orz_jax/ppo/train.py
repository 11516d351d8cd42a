"""Jitted PPO updates: train state, optimizer, old log-probs / values, actor and critic steps.

One rollout buffer is one :class:`~orz_jax.ppo.packing.PackedBatch` of ``[rows, pack_len]``. An
update splits its rows into ``steps_per_batch`` mini-batches (one optimizer step each; ORZ: the
actor takes 1, the critic 12) and each mini-batch into micro-batches of ``ppo.micro_batch_rows``
rows whose gradients are summed with ``lax.scan``. Losses are divided by the valid-token count of
the whole mini-batch, so the accumulated gradient equals the gradient of one big step exactly.

Rows are split *interleaved* (mini-batch ``s`` = rows ``s, s + steps, ...``): with the row axis
sharded in contiguous blocks over the mesh's batch axes, every mini-batch and micro-batch then stays
spread evenly over all devices without moving data. The packer shuffles rows, so the mini-batches
are random subsets of the buffer.

    actor = create_train_state(policy_module, cfg.ppo.actor, mesh)
    fns = PPOFunctions.build(cfg.ppo, mesh, actor, critic)
    batch = fns.prepare_batch(actor, critic, batch, response_index, response_mask, rewards, group_ids)
    actor, actor_metrics = fns.actor_step(actor, batch)
    critic, critic_metrics = fns.critic_step(critic, batch)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from orz_jax.config import OptimConfig, PPOConfig, resolve_train_layers
from orz_jax.models.attention import mesh_platform
from orz_jax.models.layer_layout import PerLayerParams, merge_model, split_layers
from orz_jax.ppo.advantages import compute_advantages
from orz_jax.ppo.losses import finalize_metrics, policy_loss, shift_right, value_loss
from orz_jax.ppo.packing import PackedBatch, pack_response, unpack_response
from orz_jax.sharding import logical_to_spec, state_shardings, use_mesh

BATCH_AXES = ("batch", None)  # logical axes of every [rows, pack_len] field


@flax.struct.dataclass
class TrainState:
    """Model parameters + optimizer state as one pytree. ``graphdef`` is static (part of the jit
    cache key); ``rest`` holds non-``nnx.Param`` model state, carried along but never optimised.

    ``params`` holds the decoder layers stacked (``ppo.train_layers: stacked``) or one state per layer
    (``per_layer``: a :class:`~orz_jax.models.layer_layout.PerLayerParams`, and the optimizer moments likewise);
    :meth:`module`, checkpoints and exports see the stacked layout either way."""

    graphdef: Any = flax.struct.field(pytree_node=False)
    params: Any  # nnx.State of nnx.Param, or PerLayerParams of them
    opt_state: Any  # optax state; mirrors params (keeps their sharding metadata)
    step: jax.Array  # int32 [], optimizer steps taken
    rest: Any  # nnx.State, usually empty

    def module(self) -> nnx.Module:
        """The model (stacked layers: per-layer parameters are stacked into new arrays)."""
        return merge_model(self.graphdef, self.params, self.rest)[0]


# ----------------------------------------------------------------------------------------------
# Optimizer and state
# ----------------------------------------------------------------------------------------------


def lr_schedule(o: OptimConfig) -> Callable[[jax.Array], jax.Array]:
    """Learning rate of optimizer step ``count`` (0-based).

    Warmup: step ``k`` < warmup_steps uses lr * (k + 1) / warmup_steps, so the first update is not a
    wasted zero-lr step. Then ``o.schedule``: "constant" stays at lr; "linear" / "cosine" go from lr at
    step warmup_steps to final_lr at step warmup_steps + decay_steps and stay there (optax schedules).
    """
    if o.schedule == "constant":
        after = optax.constant_schedule(o.lr)
    elif o.schedule == "linear":
        after = optax.linear_schedule(o.lr, o.final_lr, o.decay_steps)
    elif o.schedule == "cosine":
        after = optax.cosine_decay_schedule(o.lr, o.decay_steps, alpha=o.final_lr / o.lr)
    else:
        raise ValueError(f"ppo.*.schedule: unknown schedule {o.schedule!r}")
    if o.warmup_steps == 0:
        return lambda count: jnp.asarray(after(count), jnp.float32)
    warmup = lambda count: o.lr * jnp.minimum(1.0, (count + 1.0) / o.warmup_steps)  # noqa: E731
    joined = optax.join_schedules([warmup, after], boundaries=[o.warmup_steps])
    return lambda count: jnp.asarray(joined(count), jnp.float32)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales the gradients by ``min(1, max_norm / global_norm)``: ``optax.clip_by_global_norm`` up to rounding
    (a product with one scalar instead of a division then a product).

    Why not optax's: its per-entry divide is what XLA will not recompute in each consumer, so the clipped
    gradients become one more full-size buffer that AdamW's two moment updates read back. A product with a
    scalar is fused into both. On a 2-core CPU the 0.5B shape's actor step held 2 GB less in temporaries."""

    def update(updates, state, params=None):
        del params
        norm = optax.global_norm(updates)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)  # [] ; NaN for a NaN norm, as optax
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(o: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decoupled weight decay on matrices only, not on biases and
    norm scales), every figure from ``o``."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        clip_by_global_norm(o.grad_clip),
        optax.adamw(lr_schedule(o), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask),
    )


def train_state_shardings(mesh: Mesh, state: TrainState) -> TrainState:
    """NamedShardings for every leaf of ``state`` (a concrete or abstract state): params and optimizer
    moments by their ``sharding_names`` metadata, scalars replicated."""
    return TrainState(graphdef=state.graphdef, params=state_shardings(mesh, state.params),
                      opt_state=state_shardings(mesh, state.opt_state),
                      step=NamedSharding(mesh, PartitionSpec()), rest=state_shardings(mesh, state.rest))


def batch_shardings(mesh: Mesh) -> PackedBatch:
    s = NamedSharding(mesh, logical_to_spec(BATCH_AXES))
    return PackedBatch(*([s] * len(dataclasses.fields(PackedBatch))))


def _state_init(model: nnx.Module, o: OptimConfig, layers: str = "stacked"):
    """(init(params, rest) -> TrainState, params, rest) for ``model``: shared by the real and abstract states.
    ``layers``: the resolved ``ppo.train_layers`` ("stacked" or "per_layer")."""
    if layers not in ("stacked", "per_layer"):
        raise ValueError(f"train state layers must be 'stacked' or 'per_layer' (resolve ppo.train_layers with "
                         f"config.resolve_train_layers), got {layers!r}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(o)

    def init(params, rest):
        # explicit copies: the steps donate the state, and the caller's module must not lose its arrays
        params, rest = jax.tree.map(jnp.copy, (params, rest))
        if layers == "per_layer":  # split once here, so no step ever copies a layer out of a stack
            params = split_layers(params)
        return TrainState(graphdef=graphdef, params=params, opt_state=tx.init(params),
                          step=jnp.zeros((), jnp.int32), rest=rest)

    return init, params, rest


def abstract_train_state(model: nnx.Module, o: OptimConfig, layers: str = "stacked") -> TrainState:
    """The TrainState :func:`create_train_state` builds for ``model`` (a concrete or ``nnx.eval_shape``
    module), with ShapeDtypeStruct leaves: no device memory (ahead-of-time compiles, ``orz_jax.compile``).
    Its shardings are :func:`train_state_shardings` of it."""
    init, params, rest = _state_init(model, o, layers)
    return jax.eval_shape(init, params, rest)


def train_layers(cfg: PPOConfig, mesh: Optional[Mesh] = None) -> str:
    """``ppo.train_layers`` resolved for ``mesh``'s platform (none: JAX's default devices): the ``layers`` argument
    of :func:`create_train_state` ("stacked" or "per_layer")."""
    return resolve_train_layers(cfg.train_layers, mesh_platform(mesh), cfg.grad_accumulation)


def create_train_state(model: nnx.Module, o: OptimConfig, mesh: Optional[Mesh] = None,
                       layers: str = "stacked") -> TrainState:
    """Split ``model`` into a TrainState and initialise the optimizer; with a mesh, every leaf is
    placed by :func:`train_state_shardings` (the optimizer state is created sharded, never whole).
    ``layers``: how the state holds the decoder layers, "stacked" or "per_layer" (``ppo.train_layers`` resolved by
    ``config.resolve_train_layers``; see :class:`TrainState`).

    The state holds fresh copies of the parameters (the jitted init writes new buffers), so ``model``
    stays usable after the steps donate the state."""
    init, params, rest = _state_init(model, o, layers)
    if mesh is None:
        return jax.jit(init)(params, rest)
    shardings = train_state_shardings(mesh, jax.eval_shape(init, params, rest))
    # the model's parameters come in stacked whatever the state's layout
    return jax.jit(init, in_shardings=(state_shardings(mesh, params), shardings.rest),
                   out_shardings=shardings)(params, rest)


# ----------------------------------------------------------------------------------------------
# Row splitting
# ----------------------------------------------------------------------------------------------


def split_rows(x: jax.Array, parts: int, mesh: Optional[Mesh]) -> jax.Array:
    """[rows, ...] -> [parts, rows // parts, ...], part ``p`` = rows p, p + parts, p + 2 * parts, ...

    Interleaving keeps each part evenly spread over the row shards (see the module docstring)."""
    rows = x.shape[0]
    y = jnp.swapaxes(x.reshape(rows // parts, parts, *x.shape[1:]), 0, 1)
    if mesh is not None and mesh.size > 1:
        y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, logical_to_spec((None,) + BATCH_AXES)))
    return y


def row_part(x: jax.Array, parts: int, p: jax.Array, mesh: Optional[Mesh]) -> jax.Array:
    """``split_rows(x, parts, mesh)[p]`` without the split copy: [rows, ...] -> [rows // parts, ...], rows
    p, p + parts, ... (``p`` an int32 [] that may be traced).

    Why: on TPU ``split_rows``'s [parts, rows // parts, L] has another tiled layout than the [rows, L] it comes
    from, so scanning over it copied each batch field whole for the length of the loop (7B on v5p-32: the actor's
    micro-batches, five [2052, 1, 16384] copies, 0.63 GiB per device; the critic's 12 mini-batches, 1 GiB more).
    Here ``x`` is only viewed as [rows // parts, parts, ...] and one part is sliced, inside the loop: the slice
    reads the view in place (a bitcast when rows // parts is the number of row shards), so only the part is new.
    """
    if parts == 1:  # the whole array: no [rows, 1, ...] view (its size-1 axis would be tiled differently too)
        y = x
    else:
        y = jax.lax.dynamic_index_in_dim(x.reshape(x.shape[0] // parts, parts, *x.shape[1:]), p, axis=1,
                                         keepdims=False)
    if mesh is not None and mesh.size > 1:
        y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, logical_to_spec(BATCH_AXES)))
    return y


def merge_rows(y: jax.Array) -> jax.Array:
    """Inverse of :func:`split_rows`: [parts, rows // parts, ...] -> [rows, ...]."""
    return jnp.swapaxes(y, 0, 1).reshape(-1, *y.shape[2:])


def _check_rows(rows: int, steps: int, micro: int, mesh: Optional[Mesh], what: str) -> int:
    if rows % steps:
        raise ValueError(f"{what}: {rows} packed rows do not split into {steps} optimizer steps "
                         f"(pack with row_multiple=required_row_multiple(cfg, mesh))")
    mb = rows // steps
    micro = min(micro, mb)
    if mb % micro:
        raise ValueError(f"{what}: a mini-batch of {mb} rows does not split into micro-batches of "
                         f"ppo.micro_batch_rows={micro} rows")
    shards = _batch_shards(mesh)
    if micro % shards:
        raise ValueError(f"{what}: micro-batches of {micro} rows do not divide over the {shards} batch shards of "
                         f"the mesh {dict(mesh.shape)}; make ppo.micro_batch_rows a multiple of {shards}")
    return mb // micro


def _batch_shards(mesh: Optional[Mesh]) -> int:
    if mesh is None:
        return 1
    spec = logical_to_spec(("batch",))[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return math.prod(mesh.shape[a] for a in names)


def required_row_multiple(cfg: PPOConfig, mesh: Optional[Mesh] = None) -> int:
    """The packer's ``row_multiple``: rows must split into every step count and micro-batch size."""
    micro = math.lcm(cfg.micro_batch_rows, _batch_shards(mesh))
    return math.lcm(cfg.actor_steps_per_batch, max(cfg.critic_steps_per_batch, 1)) * micro


# ----------------------------------------------------------------------------------------------
# Losses on a micro-batch
# ----------------------------------------------------------------------------------------------


def actor_loss(params, rest, graphdef, mb: PackedBatch, denom: jax.Array, cfg: PPOConfig, layer_grad_acc=None):
    """PPO policy loss of one micro-batch ``mb`` ([micro_rows, pack_len] fields) -> (loss, metrics).
    ``params``: the model's nnx.State, or a :class:`PerLayerParams` view of it (``ppo.train_layers: per_layer``).
    ``layer_grad_acc``: see :func:`accumulate_gradients` (``ppo.grad_accumulation: in_place``)."""
    model, layers = merge_model(graphdef, params, rest)
    # chunked LM head: no [micro_rows, pack_len, vocab] logits in the forward or the backward pass
    logp, ent = model.token_logprobs(mb.tokens, mb.positions, mb.segment_ids, chunk=cfg.logprob_chunk,
                                     with_entropy=cfg.entropy_metric or cfg.entropy_coef > 0,
                                     grad_acc=layer_grad_acc, layer_params=layers)  # [micro_rows, pack_len]
    return policy_loss(logp, mb.old_logprobs, mb.advantages, mb.loss_mask, denom, clip_eps=cfg.clip_eps,
                       kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, entropy=ent,
                       entropy_coef=cfg.entropy_coef)


def critic_loss(params, rest, graphdef, mb: PackedBatch, denom: jax.Array, cfg: PPOConfig, layer_grad_acc=None):
    """Value loss of one micro-batch -> (loss, metrics). ``params``, ``layer_grad_acc``: see :func:`actor_loss`."""
    model, layers = merge_model(graphdef, params, rest)
    values = shift_right(model(mb.tokens, mb.positions, mb.segment_ids, grad_acc=layer_grad_acc,
                               layer_params=layers))  # [micro_rows, pack_len], V(s_t)
    return value_loss(values, mb.old_values, mb.returns, mb.loss_mask, denom, value_clip=cfg.value_clip)


# ----------------------------------------------------------------------------------------------
# Update
# ----------------------------------------------------------------------------------------------


def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _is_layer_path(path) -> bool:
    """Whether a parameter path lies in the stacked decoder blocks (``transformer/layers/...``)."""
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path[:2]]
    return keys == ["transformer", "layers"]


def accumulate_gradients(loss_fn, params, rest, graphdef, minibatch: PackedBatch, n_micro: int,
                         mesh: Optional[Mesh], cfg: PPOConfig):
    """Sum of gradients and metrics over ``n_micro`` micro-batches of ``minibatch`` (lax.scan), each
    loss normalised by the mini-batch's valid-token count. Returns (grads f32, metrics), ``grads`` in the structure
    of ``params`` (an nnx.State, or a :class:`PerLayerParams` view: then one gradient per layer).

    ``cfg.grad_accumulation == "in_place"``: the accumulator's ``transformer/layers`` part goes into the loss
    (``layer_grad_acc``), and the layers' backward pass returns it with this micro-batch's gradient already added
    (``orz_jax.models.layer_scan``): that part of the gradient is taken as the new accumulator, not added again.
    Every other leaf (embedding, heads, final norm) is added as usual."""
    denom = jnp.maximum(jnp.sum(minibatch.loss_mask), 1.0)
    micro = lambda p: jax.tree.map(lambda x: row_part(x, n_micro, p, mesh), minibatch)  # noqa: E731 (no split copy)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    in_place = cfg.grad_accumulation == "in_place"
    if in_place and isinstance(params, PerLayerParams):
        raise ValueError("accumulate_gradients: ppo.grad_accumulation: in_place needs the stacked layers, "
                         "got a PerLayerParams view (ppo.train_layers: per_layer)")

    def body(carry, p):
        g_acc, m_acc = carry
        mb = micro(p)
        seed = g_acc["transformer"]["layers"] if in_place else None
        (_, metrics), g = grad_fn(params, rest, graphdef, mb, denom, cfg, seed)
        g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
        if in_place:  # the layers' leaves of g already are g_acc + this micro-batch's gradient
            g_acc = jax.tree_util.tree_map_with_path(lambda p, a, b: b if _is_layer_path(p) else a + b, g_acc, g)
        else:
            g_acc = _tree_add(g_acc, g)
        return (g_acc, _tree_add(m_acc, metrics)), None

    g0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    m_shape = jax.eval_shape(lambda: grad_fn(params, rest, graphdef, micro(jnp.int32(0)), denom,
                                             cfg)[0][1])
    m0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
    (grads, metrics), _ = jax.lax.scan(body, (g0, m0), jnp.arange(n_micro, dtype=jnp.int32))
    return grads, metrics


def _update(state: TrainState, batch: PackedBatch, *, loss_fn, steps: int, cfg: PPOConfig, o: OptimConfig,
            mesh: Optional[Mesh], what: str) -> tuple[TrainState, dict]:
    """``steps`` optimizer steps over the interleaved mini-batches of ``batch``."""
    tx, schedule = make_optimizer(o), lr_schedule(o)
    rows = batch.tokens.shape[0]
    n_micro = _check_rows(rows, steps, cfg.micro_batch_rows, mesh, what)

    def opt_step(carry, k):
        params, opt_state, step = carry
        mb = jax.tree.map(lambda x: row_part(x, steps, k, mesh), batch)  # [rows/steps, L]: split_rows(...)[k]
        grads, metrics = accumulate_gradients(loss_fn, params, state.rest, state.graphdef, mb, n_micro, mesh, cfg)
        metrics = dict(metrics)
        metrics[f"{what}/grad_norm"] = optax.global_norm(grads)  # before clipping
        metrics[f"{what}/lr"] = schedule(step)
        metrics[f"{what}/tokens_per_step"] = jnp.sum(mb.loss_mask)
        # accumulated in f32; handed to the optimizer in the parameter dtype so that its state keeps
        # one dtype across steps (bf16 params -> bf16 moments; float32 master params are the default)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # non-finite guard, part 1: this step's loss and gradient norm (part 2, the parameters, is below)
        metrics[f"{what}/nonfinite"] = 1.0 - (jnp.isfinite(metrics[_loss_key(metrics, what)])
                                              & jnp.isfinite(metrics[f"{what}/grad_norm"])).astype(jnp.float32)
        return (params, opt_state, step + 1), metrics

    with use_mesh(mesh):
        (params, opt_state, step), metrics = jax.lax.scan(
            opt_step, (state.params, state.opt_state, state.step), jnp.arange(steps, dtype=jnp.int32))
        # Part 2, the updated parameters, once after the last step: an optimizer step adds its update to the
        # parameters, and p + u is NaN or Inf whenever p is, so a parameter that went non-finite in any step is
        # still non-finite now. One read of the parameters per update, outside the loop: inside it, a read of
        # the new parameters (or of the Adam updates, for a norm) cost 6-10% of a 1 x 128 step of the 0.5B
        # shape on a 2-core CPU, and XLA copied the old parameters to keep them alive next to the new ones.
        bad_params = 1.0 - all_finite(params).astype(jnp.float32)
    flags = {f"{what}/nonfinite": jnp.maximum(jnp.max(metrics.pop(f"{what}/nonfinite")), bad_params),  # any step
             f"{what}/nonfinite_params": bad_params}
    metrics = finalize_metrics(jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics))
    metrics.update(flags)
    return state.replace(params=params, opt_state=opt_state, step=step), metrics


def all_finite(tree: Any) -> jax.Array:
    """Whether every entry of every floating leaf of ``tree`` is finite -> bool [].

    First each leaf's plain sum: it is NaN or Inf whenever an entry is, and a bare sum is the cheapest read of
    the leaf (XLA:CPU's reduction kernel takes it without an elementwise pass). A non-finite sum can also be an
    overflow of finite entries (near the float32 maximum), so only then the exact check runs (``lax.cond``): a
    float sum of ``x * 0``, 0 for finite entries and NaN for NaN or +-Inf, which cannot overflow. (A boolean
    ``all(isfinite(x))`` lowers to an is-finite pass plus a reduce-window on XLA:CPU, ~0.8 s for the 0.5B shape's
    parameters on a 2-core CPU, and ``x * 0`` before the sum cost ~0.1 s more than the bare sum in the actor step.)
    """
    leaves = [a for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)]
    if not leaves:
        return jnp.asarray(True)
    sums = sum(jnp.sum(a, dtype=jnp.float32) * 0 for a in leaves)  # NaN iff some leaf's sum is not finite

    def exact(leaves):
        return jnp.isfinite(sum(jnp.sum(a.astype(jnp.float32) * 0) for a in leaves))

    return jax.lax.cond(jnp.isfinite(sums), lambda _: jnp.asarray(True), exact, leaves)


def _loss_key(metrics: dict, what: str) -> str:
    """The loss among the metrics: ``actor/loss`` or ``critic/value_loss``."""
    return next(k for k in (f"{what}/loss", f"{what}/value_loss") if k in metrics)


# ----------------------------------------------------------------------------------------------
# Packed forwards for the rollout buffer
# ----------------------------------------------------------------------------------------------


def _packed_forward(state: TrainState, batch: PackedBatch, fn, micro_rows: int, mesh: Optional[Mesh]) -> jax.Array:
    """Run ``fn(model, layer_params, micro_batch) -> [micro_rows, pack_len]`` over the buffer in micro-batches
    (bounded activation memory, one compiled body) and reassemble [rows, pack_len]. ``layer_params``: the state's
    per-layer parameters, or None when it holds them stacked."""
    rows = batch.tokens.shape[0]
    micro = min(micro_rows, rows)
    if rows % micro:
        raise ValueError(f"packed forward: {rows} rows do not split into micro-batches of {micro} rows")
    parts = rows // micro
    def body(carry, mb):
        # The weights ride in the scan carry (unchanged) so that the module is merged from tracers of the
        # loop body: merged from the outer trace's arrays, an nnx.remat layer (model.remat != "none")
        # refuses to update it (flax TraceContextError), which broke every ORZ config here.
        params, rest = carry
        return carry, fn(*merge_model(state.graphdef, params, rest), mb)

    with use_mesh(mesh):
        xs = jax.tree.map(lambda x: split_rows(x, parts, mesh), batch)
        _, ys = jax.lax.scan(body, (state.params, state.rest), xs)  # [parts, micro, pack_len]
    return merge_rows(ys)


def logprobs_fn(model, layer_params, mb: PackedBatch, chunk: int) -> jax.Array:
    logp, _ = model.token_logprobs(mb.tokens, mb.positions, mb.segment_ids, chunk=chunk, layer_params=layer_params)
    return logp * mb.loss_mask


def values_fn(model, layer_params, mb: PackedBatch) -> jax.Array:
    return shift_right(model(mb.tokens, mb.positions, mb.segment_ids, layer_params=layer_params)) * mb.loss_mask


def _prepare(actor: TrainState, critic: Optional[TrainState], batch: PackedBatch, response_index: jax.Array,
             response_mask: jax.Array, rewards: jax.Array, group_ids: jax.Array, *, cfg: PPOConfig,
             mesh: Optional[Mesh]) -> PackedBatch:
    rows, pack_len = batch.tokens.shape
    old_logprobs = _packed_forward(actor, batch, functools.partial(logprobs_fn, chunk=cfg.logprob_chunk),
                                   cfg.micro_batch_rows, mesh)
    if critic is not None:
        old_values = _packed_forward(critic, batch, values_fn, cfg.micro_batch_rows, mesh)
    else:
        old_values = jnp.zeros_like(old_logprobs)
    values_resp = unpack_response(old_values, response_index)  # [n, max_response_len]
    adv, ret = compute_advantages(cfg, rewards, values_resp, response_mask, group_ids)
    return batch.replace(old_logprobs=old_logprobs, old_values=old_values,
                         advantages=pack_response(adv, response_index, rows, pack_len),
                         returns=pack_response(ret, response_index, rows, pack_len))


# ----------------------------------------------------------------------------------------------
# Compiled entry points
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PPOFunctions:
    """The jitted PPO entry points for one config and mesh. Each compiles once per input shape.

    actor_step(state, batch) -> (state, metrics)      # state donated
    critic_step(state, batch) -> (state, metrics)     # state donated
    compute_logprobs(state, batch) -> [rows, pack_len] token-aligned log-probs (0 off the loss mask)
    compute_values(state, batch) -> [rows, pack_len] token-aligned V(s_t) (0 off the loss mask)
    prepare_batch(actor, critic|None, batch, response_index [n, R], response_mask [n, R], rewards [n],
                  group_ids [n]) -> batch with old_logprobs, old_values, advantages, returns filled
    """

    actor_step: Callable
    critic_step: Callable
    compute_logprobs: Callable
    compute_values: Callable
    prepare_batch: Callable

    @staticmethod
    def build(cfg: PPOConfig, mesh: Optional[Mesh] = None, actor: Optional[TrainState] = None,
              critic: Optional[TrainState] = None) -> "PPOFunctions":
        """With a mesh, pass example (or abstract) ``actor`` / ``critic`` states so the explicit
        in/out shardings can be derived; without one, plain jit."""
        import functools

        actor_update = functools.partial(_update, loss_fn=actor_loss, steps=cfg.actor_steps_per_batch, cfg=cfg,
                                         o=cfg.actor, mesh=mesh, what="actor")
        critic_update = functools.partial(_update, loss_fn=critic_loss, steps=max(cfg.critic_steps_per_batch, 1),
                                          cfg=cfg, o=cfg.critic, mesh=mesh, what="critic")
        logprobs = functools.partial(_packed_forward, fn=functools.partial(logprobs_fn, chunk=cfg.logprob_chunk),
                                     micro_rows=cfg.micro_batch_rows, mesh=mesh)
        values = functools.partial(_packed_forward, fn=values_fn, micro_rows=cfg.micro_batch_rows, mesh=mesh)
        prepare = functools.partial(_prepare, cfg=cfg, mesh=mesh)
        if mesh is None:
            return PPOFunctions(actor_step=jax.jit(actor_update, donate_argnums=0),
                                critic_step=jax.jit(critic_update, donate_argnums=0),
                                compute_logprobs=jax.jit(logprobs), compute_values=jax.jit(values),
                                prepare_batch=jax.jit(prepare))
        bsh = batch_shardings(mesh)
        tok = bsh.tokens
        rep = NamedSharding(mesh, PartitionSpec())
        ash = train_state_shardings(mesh, actor) if actor is not None else None
        csh = train_state_shardings(mesh, critic) if critic is not None else None

        def need(sh, who):
            if sh is None:
                raise ValueError(f"PPOFunctions.build: pass an example {who} state to derive shardings on a mesh")
            return sh

        def step_jit(fn, sh):
            return jax.jit(fn, donate_argnums=0, in_shardings=(sh, bsh), out_shardings=(sh, rep))

        return PPOFunctions(
            actor_step=step_jit(actor_update, ash) if ash is not None else _missing("actor"),
            critic_step=step_jit(critic_update, csh) if csh is not None else _missing("critic"),
            compute_logprobs=(jax.jit(logprobs, in_shardings=(ash, bsh), out_shardings=tok)
                              if ash is not None else _missing("actor")),
            compute_values=(jax.jit(values, in_shardings=(csh, bsh), out_shardings=tok)
                            if csh is not None else _missing("critic")),
            prepare_batch=jax.jit(prepare, in_shardings=(need(ash, "actor"), csh, bsh, None, None, None, None),
                                  out_shardings=bsh),
        )


def _missing(who: str) -> Callable:
    def fail(*args, **kwargs):
        raise ValueError(f"PPOFunctions: built without an example {who} state on a mesh")
    return fail

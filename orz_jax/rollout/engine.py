"""A JetStream ``Engine`` for our policy (``CausalLM`` with a KV cache).

Life of a request:

* ``prefill(padded_tokens, true_length)``: a prompt of L tokens is padded to the smallest bucket of
  ``rollout.prefill_buckets`` that holds it (each bucket compiles once) and its first L-1 tokens are run
  into a fresh one-row cache. The last prompt token is kept in the ``Prefix`` as the next *input*: every
  generated token, including the first, then comes out of ``generate``, which is what JetStream 0.2.2's
  orchestrator streams (its prefill returns no token).
* ``insert(prefix, decode_state, slot)``: copies the prefix cache into one row (slot) of the
  preallocated decode cache and arms the slot: next token, a fresh PRNG key, 0 tokens generated.
* ``generate(params, decode_state)``: one decode step for every slot. Sampling happens inside the jitted
  step (``orz_jax.rollout.sampling``); the step records the token and its log-prob in per-slot output
  buffers and marks a slot done on an EOS id or at its token limit. Done / empty slots still flow through
  the step (static shapes) but write nothing that counts (``segment_ids`` 0 keeps their cache length).

Every jitted function that takes the decode state donates it, so the KV cache is updated in place.

RNG: request number r (counted by ``insert`` calls since :meth:`RolloutEngine.reset_requests`) gets the
key ``fold_in(base_key, r)`` and its t-th token is drawn with ``fold_in(that key, t)``. A sample therefore
depends on the seed and its request number only, not on its slot or on the other requests in the batch,
so the batched loop and JetStream's continuous-batching orchestrator (which inserts requests in arrival
order) draw identical samples.

Weight sync: the engine serves its *own copy* of the policy: every floating leaf in the compute dtype
(``model.dtype``, bfloat16 on TPU), placed with the serving layout (``orz_jax.sharding.SERVING_RULES``: heads /
kv_heads / mlp / vocab on ``tensor``, nothing on ``fsdp``), so a decode step reads half the bytes of the float32
training weights and gathers none of them over the mesh. :meth:`RolloutEngine.update_params` refreshes the copy with
one jitted cast-and-reshard from the layout it receives, donating the old copy's buffers (refreshed in place, compiled
once; the engine's first placement runs the same program on a blank copy, so the first refresh compiles nothing).
Layers: stacked ``[layers, ...]`` arrays for the layer scan (TPU), or one array per layer
(``orz_jax.models.layer_layout.PerLayerParams``, CPU / GPU: XLA there copies a layer's slice of a stacked weight
before its matmul, see ``RolloutConfig.serving_layers``). Numbers: the trainer's forward casts every parameter to
``dtype`` before using it (norm scales and biases included; the embedding rows after the lookup, which commutes with
the cast), so casting them ahead of time gives the sampler the very values the trainer computes with. When the
received parameters already have the serving dtype and layout (a float32 model on one device: stacked with
``serving_layers: stacked``, or a CPU run's per-layer train state, ``ppo.train_layers``, with ``per_layer``) the cast
is the identity and the engine *shares* them instead of holding a second copy: the trainer donates its buffers in each
update, which deletes the engine's too, and then any use before the next ``update_params`` fails loudly ("Array has
been deleted"), it cannot read stale weights; the PPO loop calls ``update_params`` after every update.
"""

from __future__ import annotations

import bisect
import logging
import threading
from typing import Any, Optional, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from orz_jax.config import RolloutConfig, resolve_serving_layers
from orz_jax.models.attention import mesh_platform
from orz_jax.models.transformer import KVCache
from orz_jax.models.layer_layout import PerLayerParams, layer_sharding, merge_model, split_layers, stack_layers
from orz_jax.rollout.jetstream_compat import engine_api, tokenizer_api, tokenizer_pb2
from orz_jax.rollout.sampling import SamplingParams, sample_tokens
from orz_jax.sharding import MESH_AXES, SERVING_RULES, named_sharding, state_shardings, use_mesh

log = logging.getLogger(__name__)

# JetStream's ``token_utils.pad_tokens`` prepends ``tokenizer.bos_id`` to token-id requests unless the
# request names a session cache. For models without a BOS (Qwen2.5) our tokenizer adapter reports this
# sentinel as ``bos_id`` and ``prefill`` drops it again.
NO_BOS = -1


@flax.struct.dataclass
class Prefix:
    """The result of ``prefill`` for one prompt of L tokens, bucket length B >= L."""

    cache: KVCache  # k, v: [layers, 1, B, kv_heads * head_dim]; lengths [1] = L - 1
    next_token: jax.Array  # [1] int32: the last prompt token, the first decode input


@flax.struct.dataclass
class DecodeState:
    """Everything a decode step transforms; one row per slot."""

    cache: KVCache  # k, v: [layers, slots, max_len, kv_heads * head_dim]; lengths [slots]
    tokens: jax.Array  # [slots] int32: next input token
    keys: jax.Array  # [slots] PRNG key of the request in the slot
    steps: jax.Array  # [slots] int32: tokens generated so far
    limit: jax.Array  # [slots] int32: max tokens to generate for this request
    done: jax.Array  # [slots] bool: EOS sampled, limit reached, or the slot is empty
    out_tokens: jax.Array  # [slots, max_new_tokens] int32: generated tokens
    out_logprobs: jax.Array  # [slots, max_new_tokens] float32: their sampling log-probs


class TokenizerAdapter(tokenizer_api.Tokenizer):
    """Our ``orz_jax.tokenizer.Tokenizer`` behind JetStream's tokenizer API (used by its orchestrator
    for text requests and streaming detokenisation)."""

    def __init__(self, tokenizer: Any, prefill_buckets: Sequence[int]):
        self.tok = tokenizer
        self.buckets = list(prefill_buckets)

    def encode(self, s: str, **kwargs) -> tuple[np.ndarray, int]:
        """Text -> (ids padded to a prefill bucket [B] int32, true length). A text longer than the largest
        bucket keeps its last tokens (a server must not die on a long request; this is logged)."""
        is_bos = kwargs.get("is_bos", True) and self.tok.bos_id is not None
        ids = self.tok.encode(s, add_bos=is_bos)
        if len(ids) > self.buckets[-1]:
            log.warning("request of %d tokens left-truncated to the largest prefill bucket %d", len(ids),
                        self.buckets[-1])
            ids = ids[-self.buckets[-1]:]
        bucket = self.buckets[bisect.bisect_left(self.buckets, len(ids))]
        out = np.full((bucket,), self.pad_id, np.int32)
        out[:len(ids)] = ids
        return out, len(ids)

    def decode(self, token_ids: list[int], **kwargs) -> str:
        return self.tok.decode(token_ids)

    @property
    def pad_id(self) -> int:
        return self.tok.pad_id

    @property
    def eos_id(self) -> int:
        return self.tok.eos_id

    @property
    def bos_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else NO_BOS

    @property
    def stop_tokens(self) -> set[int]:
        # The ids the device marks a slot done on (JetStream's default also stops on pad).
        return set(getattr(self.tok, "eos_ids", None) or (self.tok.eos_id,))


def _as_state(params: Any) -> nnx.State:
    return nnx.state(params) if isinstance(params, nnx.Module) else params


class RolloutEngine(engine_api.Engine):
    """JetStream engine for a ``CausalLM``.

    Args:
      model: the policy (``CausalLM``); the engine serves a copy of its parameters in ``model.dtype`` with
        the serving layout (shared, not copied, when they already are in that dtype and layout; see the module
        docstring). Abstract parameters (``nnx.eval_shape``) give an engine for ahead-of-time lowering only.
      cfg: ``RolloutConfig``: buckets, slots (``max_concurrent_decodes``), ``max_response_len`` (decode
        buffer length and default token limit) and the default sampling settings.
      tokenizer: ``orz_jax.tokenizer.Tokenizer`` (encode / decode / eos_id / eos_ids / pad_id / bos_id).
      mesh: serving mesh; default: the mesh the parameters live on (or one device).
      seed: base PRNG seed (``reset_requests`` sets another).
    """

    def __init__(self, model: nnx.Module, cfg: RolloutConfig, tokenizer: Any, mesh: Optional[Mesh] = None,
                 seed: int = 0):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.arch = model.arch
        self.buckets = sorted(cfg.prefill_buckets)
        self.slots = cfg.max_concurrent_decodes
        self.max_new_tokens = cfg.max_response_len
        self.max_len = self.buckets[-1] + self.max_new_tokens  # prompt bucket + every generated token
        self.cache_dtype = model.transformer.dtype
        self.eos_ids = tuple(int(i) for i in (getattr(tokenizer, "eos_ids", None) or (tokenizer.eos_id,)))
        self.pad_id = int(tokenizer.pad_id)
        self.sampling = SamplingParams.from_config(cfg)
        self.token_limit = self.max_new_tokens

        graphdef, params = nnx.split(model)
        self._graphdef = graphdef
        if mesh is None:
            leaf = jax.tree.leaves(params)[0]
            mesh = leaf.sharding.mesh if isinstance(getattr(leaf, "sharding", None), NamedSharding) else None
        if mesh is None:
            mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)
        self._mesh = mesh
        # How the copy holds the decoder layers: stacked for the layer scan, or one array per layer where XLA
        # would copy each layer's slice of a stacked weight before using it (see RolloutConfig.serving_layers).
        self.layer_layout = resolve_serving_layers(cfg.serving_layers, mesh_platform(mesh))
        # Serving layout of the parameters: the serving rules (no fsdp) on the serving mesh.
        self._stacked_shardings = state_shardings(mesh, params, SERVING_RULES)  # as the trainer's tree
        self._param_shardings = self._to_layout(self._stacked_shardings, layer_sharding)
        # What update_params must receive: the trainer's shapes and dtypes (the served copy's dtypes differ).
        self._source_avals = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        # cast-and-reshard: the old copy donated, its buffers reused for the new one, so the copy never exists
        # twice. The first placement donates a blank copy, so that the trainer's first sync finds the program
        # compiled. keep_unused: the old copy is not read, and jit would otherwise drop it from the arguments,
        # and so from the donation.
        self._blank_jit = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self.serving_abstract()),
                                  out_shardings=self._param_shardings)
        self._refresh_jit = jax.jit(lambda new, old: self._cast(new), out_shardings=self._param_shardings,
                                    donate_argnums=(1,), keep_unused=True)
        self._owns_copy = False  # True when self.params is the engine's own copy (donatable)
        # Abstract parameters (ShapeDtypeStruct leaves, ``nnx.eval_shape``) build an engine whose jitted
        # functions can only be lowered ahead of time (``orz_jax.compile``): nothing is placed; ``params`` is
        # then the serving copy's ShapeDtypeStructs (serving dtype and sharding).
        abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
        if abstract:
            self.params = self.serving_abstract()
        else:
            self.params = self._source_avals  # placeholder for the first _place (nothing to donate)
            self._place(params)

        kv_axes = ("layers", "slots", "cache_seq", "kv_fold")  # heads folded: see KVCache
        kv_shape = (self.arch.num_layers, self.slots, self.max_len,
                    self.arch.num_kv_heads * self.arch.resolved_head_dim)
        # the folded dim shards by whole kv heads (kv_fold and kv_heads map to the same mesh axis)
        named_sharding(mesh, ("kv_heads",), (self.arch.num_kv_heads,), name="KV cache kv_heads")
        row = named_sharding(mesh, ("slots",), (self.slots,), name="decode slots")
        buf = named_sharding(mesh, ("slots", None), (self.slots, self.max_new_tokens), name="decode buffers")
        kv = named_sharding(mesh, kv_axes, kv_shape, name="KV cache")
        self._state_shardings = DecodeState(cache=KVCache(k=kv, v=kv, lengths=row), tokens=row, keys=row,
                                            steps=row, limit=row, done=row, out_tokens=buf, out_logprobs=buf)
        # A prefix has one row: only the head axes can shard.
        pk = NamedSharding(mesh, PartitionSpec(None, None, None, *kv.spec[3:]))  # [layers, 1, B, kv_fold]
        rep = NamedSharding(mesh, PartitionSpec())
        self._prefix_shardings = Prefix(cache=KVCache(k=pk, v=pk, lengths=rep), next_token=rep)

        self._init_jit = jax.jit(self._init_impl, out_shardings=self._state_shardings)
        self._prefill_jit = jax.jit(self._prefill_impl)
        self._insert_jit = jax.jit(self._insert_impl, donate_argnums=(1,), out_shardings=self._state_shardings)
        # decode programs: one compile per (sampling, window); the window is the KV positions attention reads
        self._generate_jit = jax.jit(self._generate_impl, static_argnums=(2, 3), donate_argnums=(1,))
        self._steps_jit = jax.jit(self._steps_impl, static_argnums=(2, 3, 4), donate_argnums=(1,),
                                  out_shardings=self._state_shardings)
        self.windows = decode_windows(cfg.decode_window_block, self.max_len)
        # Host-side upper bound of each slot's filled cache length (no device sync): the prefix's bucket at
        # insert + one per decode step since, capped at bucket + token limit. 0: empty slot.
        self._bound = np.zeros((self.slots,), np.int64)
        self._cap = np.zeros((self.slots,), np.int64)
        self._release_jit = jax.jit(lambda state, mask: state.replace(done=state.done | mask), donate_argnums=(0,),
                                    out_shardings=self._state_shardings)
        self._lock = threading.Lock()
        self.reset_requests(seed)

    # ------------------------------------------------------------------------------------------
    # Host-side settings
    # ------------------------------------------------------------------------------------------

    def reset_requests(self, seed: Union[int, jax.Array]) -> None:
        """Set the base PRNG key (an int seed or a key) and restart the request count at 0."""
        key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)  # a raw uint32 key such as jax.random.PRNGKey(0)
        self._base_key = key
        self._num_requests = 0

    def set_sampling(self, sampling: SamplingParams, token_limit: Optional[int] = None) -> None:
        """Sampling settings (and per-request token limit) for requests inserted from now on."""
        limit = self.max_new_tokens if token_limit is None else int(token_limit)
        if not 1 <= limit <= self.max_new_tokens:
            raise ValueError(f"token limit {limit} must be in [1, {self.max_new_tokens}] "
                             f"(the engine's rollout.max_response_len)")
        self.sampling, self.token_limit = sampling, limit

    def bucket_for(self, length: int) -> int:
        """Smallest prefill bucket >= length; ValueError if the prompt does not fit any."""
        if length > self.buckets[-1]:
            raise ValueError(f"prompt of {length} tokens is longer than the largest prefill bucket "
                             f"{self.buckets[-1]} (rollout.prefill_buckets)")
        return self.buckets[bisect.bisect_left(self.buckets, length)]

    # ------------------------------------------------------------------------------------------
    # Traced implementations
    # ------------------------------------------------------------------------------------------

    def _model(self, params):
        """-> (policy module, per-layer states or None), for ``module(..., layer_params=that)``."""
        return merge_model(self._graphdef, params)

    def _init_impl(self) -> DecodeState:
        s, n = self.slots, self.max_new_tokens
        zeros = jnp.zeros((s,), jnp.int32)
        return DecodeState(
            cache=KVCache.init(self.arch, s, self.max_len, self.cache_dtype),
            tokens=jnp.full((s,), self.pad_id, jnp.int32), keys=jax.random.split(jax.random.key(0), s),
            steps=zeros, limit=zeros, done=jnp.ones((s,), bool),
            out_tokens=jnp.full((s, n), self.pad_id, jnp.int32), out_logprobs=jnp.zeros((s, n), jnp.float32))

    def _prefill_impl(self, params, tokens: jax.Array, n_ctx: jax.Array) -> Prefix:
        """tokens: [1, B] int32 (prompt right-padded); n_ctx: scalar, L - 1 tokens to run into the cache."""
        b = tokens.shape[1]
        positions = jnp.arange(b, dtype=jnp.int32)[None, :]  # [1, B]
        segment_ids = (positions < n_ctx).astype(jnp.int32)
        cache = KVCache.init(self.arch, 1, b, self.cache_dtype)
        model, layers = self._model(params)
        with use_mesh(self._mesh):
            _, cache = model(tokens, positions, segment_ids, cache=cache, layer_params=layers)  # logits: DCE'd
        next_token = jax.lax.dynamic_slice_in_dim(tokens[0], n_ctx, 1)  # [1]
        return Prefix(cache=cache, next_token=next_token)

    def _insert_impl(self, prefix: Prefix, state: DecodeState, slot, base_key, request, limit) -> DecodeState:
        c = state.cache
        k = jax.lax.dynamic_update_slice(c.k, prefix.cache.k.astype(c.k.dtype), (0, slot, 0, 0))
        v = jax.lax.dynamic_update_slice(c.v, prefix.cache.v.astype(c.v.dtype), (0, slot, 0, 0))
        return state.replace(
            cache=c.replace(k=k, v=v, lengths=c.lengths.at[slot].set(prefix.cache.lengths[0])),
            tokens=state.tokens.at[slot].set(prefix.next_token[0]),
            keys=state.keys.at[slot].set(jax.random.fold_in(base_key, request)),
            steps=state.steps.at[slot].set(0), limit=state.limit.at[slot].set(limit),
            done=state.done.at[slot].set(False))

    def _step(self, params, state: DecodeState, sampling: SamplingParams, window: int = 0):
        """One decode step for every slot -> (state, tokens [slots], logprobs [slots], live [slots]).
        ``window``: attention reads cache positions [0, window) only (0: all); it must exceed every live
        slot's filled length (the host's bound guarantees it, see :meth:`window_for`)."""
        live = ~state.done  # [slots]
        positions = state.cache.lengths[:, None]  # [slots, 1]: the next token's position = filled length
        model, layers = self._model(params)
        with use_mesh(self._mesh):
            logits, cache = model(state.tokens[:, None], positions, live[:, None].astype(jnp.int32),
                                  cache=state.cache.replace(window=window), layer_params=layers)
        cache = cache.replace(window=0)  # the state's structure does not depend on the window
        keys = jax.vmap(jax.random.fold_in)(state.keys, state.steps)  # [slots]
        tokens, logprobs = sample_tokens(logits[:, 0], keys, sampling)  # [slots], [slots]
        tokens = jnp.where(live, tokens, self.pad_id)
        rows = jnp.arange(self.slots)
        at = jnp.where(live, state.steps, self.max_new_tokens)  # done rows write out of bounds: dropped
        steps = state.steps + live.astype(jnp.int32)
        is_eos = jnp.isin(tokens, jnp.asarray(self.eos_ids, jnp.int32))
        state = state.replace(
            cache=cache, tokens=jnp.where(live, tokens, state.tokens), steps=steps,
            done=state.done | (live & (is_eos | (steps >= state.limit))),
            out_tokens=state.out_tokens.at[rows, at].set(tokens, mode="drop"),
            out_logprobs=state.out_logprobs.at[rows, at].set(logprobs, mode="drop"))
        return state, tokens, logprobs, live

    def _generate_impl(self, params, state: DecodeState, sampling: SamplingParams, window: int = 0):
        state, tokens, logprobs, live = self._step(params, state, sampling, window)
        state = jax.lax.with_sharding_constraint(state, self._state_shardings)
        # JetStream's result layout: [slots, 4] int32 = token | valid | tokens generated | logprob bits
        # (column 3 is ours: the rollout collector reads the float32 log-prob back from its bits).
        data = jnp.stack([tokens, live.astype(jnp.int32), state.steps,
                          jax.lax.bitcast_convert_type(logprobs, jnp.int32)], axis=1)
        result = engine_api.ResultTokens(data=data, tokens_idx=(0, 1), valid_idx=(1, 2), length_idx=(2, 3),
                                         samples_per_slot=1)
        return state, result

    def _steps_impl(self, params, state: DecodeState, num_steps: int, sampling: SamplingParams, window: int = 0):
        """Up to ``num_steps`` decode steps in one call; stops early once every slot is done. ``window``
        must hold every live slot's length after ``num_steps`` - 1 steps."""
        def cond(c):
            i, s = c
            return (i < num_steps) & ~jnp.all(s.done)

        def body(c):
            i, s = c
            return i + 1, self._step(params, s, sampling, window)[0]

        return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]

    # ------------------------------------------------------------------------------------------
    # engine_api.Engine
    # ------------------------------------------------------------------------------------------

    def load_params(self, *args, **kwargs) -> nnx.State:
        return self.params

    def init_decode_state(self, *args, **kwargs) -> DecodeState:
        """A fresh decode state (every slot empty). The engine keeps one host-side window bound per slot,
        so it drives one decode state at a time (as JetStream's orchestrator and our drivers do)."""
        with self._lock:
            self._bound[:] = 0
            self._cap[:] = 0
        return self._init_jit()

    def prefill(self, *, params: Any, existing_prefix: Optional[Prefix] = None, padded_tokens: Any,
                true_length: int) -> Prefix:
        """padded_tokens: [T] ids (numpy or jax), the first ``true_length`` real. Re-padded to our bucket."""
        if existing_prefix is not None:
            raise NotImplementedError("prefill on top of an existing prefix is not supported")
        ids = np.asarray(padded_tokens, dtype=np.int64).reshape(-1)[:int(true_length)]
        if ids.size and ids[0] == NO_BOS:
            ids = ids[1:]
        if ids.size == 0:
            raise ValueError("cannot prefill an empty prompt (need at least one token)")
        bucket = self.bucket_for(ids.size)
        tokens = np.full((1, bucket), self.pad_id, np.int32)
        tokens[0, :ids.size] = ids
        return self._prefill_jit(params, tokens, np.int32(ids.size - 1))

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        """Arm ``slot`` with ``prefix`` as the next request (request number = insert count)."""
        bucket = int(prefix.cache.k.shape[2])  # >= the prefix's filled length; a static shape: no sync
        with self._lock:
            request = self._num_requests
            self._num_requests += 1
            self._bound[slot] = bucket
            self._cap[slot] = bucket + self.token_limit
        return self._insert_jit(prefix, decode_state, np.int32(slot), self._base_key, np.int32(request),
                                np.int32(self.token_limit))

    def window_for(self, num_steps: int = 1) -> int:
        """The smallest decode window holding every slot's next ``num_steps`` positions: a slot of filled
        length n writes and reads position n, so the window must exceed bound + num_steps - 1."""
        need = int(np.max(np.minimum(self._bound + num_steps, self._cap), initial=1))
        return self.windows[min(bisect.bisect_left(self.windows, need), len(self.windows) - 1)]

    def _advance(self, num_steps: int) -> None:
        self._bound = np.minimum(self._bound + num_steps, self._cap)

    def generate(self, params: Any, decode_state: DecodeState) -> tuple[DecodeState, engine_api.ResultTokens]:
        with self._lock:
            window = self.window_for(1)
            self._advance(1)
        return self._generate_jit(params, decode_state, self.sampling, window)

    def generate_steps(self, params: Any, decode_state: DecodeState, num_steps: int) -> DecodeState:
        """``num_steps`` decode steps in one dispatch (fewer host round trips for the batched driver)."""
        with self._lock:
            window = self.window_for(int(num_steps))
            self._advance(int(num_steps))
        return self._steps_jit(params, decode_state, int(num_steps), self.sampling, window)

    def forget_slot(self, slot: int) -> None:
        """Host side only: a driver is done with ``slot`` (its request ended on the host: EOS, stop string or
        token limit) and will not read it until the next insert overwrites it. It stops holding the decode
        window open; the device may still step it (after a stop string), but those writes land in the full
        cache (never dropped, never read) and its outputs go unread. Call before the slot is reused."""
        with self._lock:
            self._bound[slot] = 0
            self._cap[slot] = 0

    def release(self, decode_state: DecodeState, mask: np.ndarray) -> DecodeState:
        """Mark the slots in ``mask`` ([slots] bool) done, e.g. after the host saw a stop string there."""
        mask = np.asarray(mask, dtype=bool)
        with self._lock:  # a released slot no longer needs the window
            self._bound[mask] = 0
            self._cap[mask] = 0
        return self._release_jit(decode_state, mask)

    def get_prefix_destination_sharding(self) -> Any:
        return self._prefix_shardings

    def get_tokenizer(self) -> tokenizer_pb2.TokenizerParameters:
        return tokenizer_pb2.TokenizerParameters(path=str(getattr(self.tokenizer, "source", "orz_jax")))

    def build_tokenizer(self, metadata: Any) -> TokenizerAdapter:
        return TokenizerAdapter(self.tokenizer, self.buckets)

    @property
    def max_concurrent_decodes(self) -> int:
        return self.slots

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self.buckets[-1]

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    @property
    def colocated_cpus(self) -> None:
        return None

    # ------------------------------------------------------------------------------------------
    # Weight sync and introspection
    # ------------------------------------------------------------------------------------------

    def update_params(self, new_params: Any) -> None:
        """Serve ``new_params`` (an ``nnx.State`` / module with the policy's structure, in the trainer's
        dtypes and any layout; host numpy copies from ``multihost.to_serving`` too) from now on.

        Refreshes the engine's copy with one jitted cast-and-reshard that donates the old copy (compiled once
        per received layout, so nothing recompiles from one PPO iteration to the next); shares ``new_params``
        when they already are in the serving dtype and layout. Shapes and dtypes must match the policy the
        engine was built from; a mismatch raises ValueError naming the parameter.
        """
        new = _as_state(new_params)
        source = self._source_avals
        if isinstance(new, PerLayerParams):  # a per_layer train state's parameters (ppo.train_layers)
            source = split_layers(source, self.arch.num_layers, lambda a, i: jax.ShapeDtypeStruct(a.shape[1:], a.dtype))
        old_leaves, old_def = jax.tree_util.tree_flatten_with_path(source)
        new_leaves, new_def = jax.tree_util.tree_flatten_with_path(new)
        if old_def != new_def:
            raise ValueError(f"update_params: parameter tree differs from the served policy's "
                             f"({len(new_leaves)} vs {len(old_leaves)} leaves)")
        for (path, a), (_, b) in zip(old_leaves, new_leaves):
            # host copies may arrive already in the serving dtype (multihost.to_serving casts before gathering)
            host_cast = not isinstance(b, jax.Array) and b.dtype == self._serving_dtype(a.dtype)
            if a.shape != b.shape or (a.dtype != b.dtype and not host_cast):
                raise ValueError(f"update_params: {jax.tree_util.keystr(path)} is {b.dtype}{list(b.shape)}, "
                                 f"the served policy has {a.dtype}{list(a.shape)}")
        self._place(new)

    def serving_abstract(self) -> Any:
        """The serving copy as ShapeDtypeStructs (serving dtype, layout and sharding): what the jitted functions
        get."""
        leaves, treedef = jax.tree.flatten(jax.eval_shape(self._cast, self._source_avals))
        return treedef.unflatten([jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                                  for a, s in zip(leaves, jax.tree.leaves(self._param_shardings))])

    def _to_layout(self, tree: Any, take: Any, stack: Any = lambda *xs: jnp.stack(xs)) -> Any:
        """``tree`` (the policy state's structure, stacked or :class:`PerLayerParams`: arrays, host arrays or
        shardings) in the serving layer layout. ``take(leaf, i)``: layer i's part of a stacked leaf; ``stack``:
        a stacked leaf from the layers' leaves."""
        if isinstance(tree, PerLayerParams):
            return tree if self.layer_layout == "per_layer" else stack_layers(tree, stack)
        if self.layer_layout == "stacked":
            return tree
        return split_layers(tree, self.arch.num_layers, take)

    def _serving_dtype(self, dtype) -> np.dtype:
        # floating leaves in the compute dtype; integer leaves (none in CausalLM today) as they are
        return jnp.dtype(self.cache_dtype) if jnp.issubdtype(dtype, jnp.floating) else jnp.dtype(dtype)

    def _cast(self, params: Any) -> Any:
        """Traced: every leaf in its serving dtype (the trainer's forward casts each weight to ``dtype``
        before use, so the sampler computes with the same values), in the serving layer layout."""
        return self._to_layout(jax.tree.map(lambda x: x.astype(self._serving_dtype(x.dtype)), params),
                               lambda x, i: x[i])

    def _is_serving_layout(self, params: Any) -> bool:
        if isinstance(params, PerLayerParams) != (self.layer_layout == "per_layer"):
            return False  # a layout change is always a copy
        leaves, shardings = jax.tree.leaves(params), jax.tree.leaves(self._param_shardings)
        return all(isinstance(x, jax.Array) and x.dtype == self._serving_dtype(x.dtype)
                   and x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, shardings))

    def _place(self, new: Any) -> None:
        """Make ``new`` (checked: the policy's structure, shapes and dtypes) the served parameters."""
        if self._is_serving_layout(new):
            # cast and reshard would be the identity: share (see the module docstring)
            self.params, self._owns_copy = new, False
        elif all(isinstance(x, jax.Array) for x in jax.tree.leaves(new)):
            # on device: one program, input layout = what the trainer holds (jit reads it from the arrays)
            serving_devices = set(self._mesh.devices.flat)
            if any(x.sharding.device_set != serving_devices for x in jax.tree.leaves(new)):
                # other devices than the serving mesh's (a caller's engine on a sub-mesh): one program cannot
                # span both, so move first (in the received dtype), then cast on the serving devices
                shardings = self._stacked_shardings
                if isinstance(new, PerLayerParams):
                    shardings = split_layers(shardings, self.arch.num_layers, layer_sharding)
                new = jax.device_put(new, shardings)
            self.params = self._refresh_jit(new, self.params if self._owns_copy else self._blank_jit())
            self._owns_copy = True
        else:
            # host copies (several processes: multihost.to_serving): cast on the host (numpy's bfloat16 rounds
            # to nearest even, as XLA's convert does) and place the serving dtype only, after freeing the old
            # copy: the device never holds the float32 policy or two copies.
            host = jax.tree.map(lambda x: np.asarray(x).astype(self._serving_dtype(np.asarray(x).dtype)), new)
            host = self._to_layout(host, lambda x, i: x[i], lambda *xs: np.stack(xs))
            if self._owns_copy:
                for x in jax.tree.leaves(self.params):
                    x.delete()
            self.params = jax.device_put(host, self._param_shardings)
            self._owns_copy = True


def decode_windows(block: int, max_len: int) -> list[int]:
    """The decode windows: ``block`` x 1, 2, 4, ... below ``max_len``, then ``max_len`` (block <= 0: only
    max_len). Geometric, so a run compiles at most log2(max_len / block) + 1 decode programs per sampling
    setting and a step reads less than twice the longest live slot's KV (or one block)."""
    out = []
    w = block
    while 0 < w < max_len:
        out.append(w)
        w *= 2
    return out + [max_len]


class CompileCounter:
    """Counts XLA backend compilations (every jitted function, eager ops included) while active.

        with CompileCounter() as cc:
            ...
        assert cc.count == 0
    """

    _EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == self._EVENT:
            self.count += 1

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)

"""FLOPs, bytes accessed and collectives of a compiled XLA program, with every loop body counted as often as it runs.

XLA's ``compiled.cost_analysis()`` counts a ``while`` body ONCE. ORZ's programs nest loops (the decoder layers are
a ``lax.scan`` inside the micro-batch scan, the LM-head loss a chunk scan inside that), so its figures are orders
of magnitude short (0.5B ``actor_step`` on v5p-8: 5.2 TFLOP per device against 232,428 with the trips). :func:`analyze_hlo` reads the compiled (post-optimisation) HLO text, ``compiled.as_text()``, and
multiplies every instruction by the product of the trip counts of the loops around it.

Trip counts. The CPU compiler writes ``backend_config={..."known_trip_count":{"n":"7"}...}`` on a ``while``; the
TPU compiler (libtpu 0.0.42.1) writes none, so the count is also derived from the loop itself: the condition
compares one tuple element (the induction variable) with a constant (``compare(gte(p, index=i), constant(N)),
direction=LT``, possibly through a wrapping fusion), the init tuple sets that element to a constant and the body
adds a constant step to it. A loop whose count cannot be derived (``lax.while_loop`` with a data-dependent stop,
a ``fori_loop`` with a traced bound) is listed in ``unknown_loops``, and its body counted ``unknown_trips`` times
(default 1; a caller that knows an upper bound, e.g. the decode driver's ``check_every``, passes it).

What is counted (per device, the program is SPMD-partitioned):

* ``flops``: 2 x multiply-adds of ``dot`` and ``convolution`` (the TPU compiler writes matmuls as convolutions
  inside fusions, a batched matmul as a convolution over the batch with an lhs-dilated window; ``dim_labels`` /
  ``window`` are read as XLA's ``HloCostAnalysis`` does, padding included), plus the ``cost_estimate`` of Pallas
  kernels (libtpu keeps it in the ``tpu_custom_call``'s backend_config, ``"cost_estimate":{"flops":"12345",
  "transcendentals":"0","bytes_accessed":"678",...}``; its bytes count as the call's bytes). Elementwise
  arithmetic, reductions and transcendentals are NOT counted (XLA counts one flop per elementwise output
  element): on loop-free matmul programs the two agree exactly; on a transformer the gap is the norms / softmax
  / activations, small beside the matmuls. The TPU compiler rewrites very small dots (a few dozen wide) as
  multiply + reduce: those fall out of the count, as they do of any matmul count.
* ``bytes_accessed``: XLA's convention: operands + results of every top-level instruction (a fusion counts its
  operands and outputs, not its internals), skipping no-ops (parameter, tuple, get-tuple-element, bitcast,
  constant, control flow itself, the ``-done`` half of async pairs). A fusion operand read only through a
  ``dynamic-slice`` counts the slice (one layer of a stacked weight per scan step, not the whole stack); a
  ``dynamic-update-slice`` or ``scatter`` in place counts its update written, not the buffer. On CPU these equal XLA's
  ``bytes accessed`` on loop-free programs (tests/test_hlo_cost.py). On TPU XLA's figure runs 2-3x higher on a
  lone matmul: it includes tile padding and models re-reads per output tile of a matmul fusion, where this
  module counts each operand and result once.
* ``collectives``: ``{op: {"count", "bytes"}}``, bytes = the op's result per device (an async ``-start`` counts
  its output buffer once), each multiplied by its loops' trips. The TPU compiler writes a reduce-scatter as a
  fusion calling ``all-reduce-scatter``: counted as ``reduce-scatter`` with the fusion's (scattered) result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Optional

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
               "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
               "c128": 16}
# instructions that move no data of their own (aliases, control flow whose bodies are counted instead)
_NO_BYTES = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "iota", "while", "call",
             "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency",
             "domain", "async-done", "async-update", "copy-done", "send-done", "recv-done"}
_ARRAY_RE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_INSTR_RE = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->\s*.*\{\s*$")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # result shape text, e.g. "(s32[], f32[64,128]{1,0})"
    opcode: str
    operands: list  # operand instruction names
    attrs: str  # everything after the operand list
    operand_text: str  # raw operand list (constants keep their literal here)


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list
    by_name: dict
    root: Optional[Instr]
    is_entry: bool = False


@dataclasses.dataclass
class HloCost:
    """Whole-program figures, loop bodies multiplied by their trip counts (see the module docstring)."""

    flops: float = 0.0
    bytes_accessed: float = 0.0
    collectives: dict = dataclasses.field(default_factory=dict)  # {op: {"count": float, "bytes": float}}
    loops: list = dataclasses.field(default_factory=list)  # [{"name", "trips", "known", "times"}]
    unknown_loops: list = dataclasses.field(default_factory=list)  # names of loops counted with the hint
    by_instr: dict = dataclasses.field(default_factory=dict)  # {(computation, instr, opcode): [flops, bytes]}

    def top(self, key: str = "bytes", n: int = 10) -> list:
        """The ``n`` instructions contributing most ``"bytes"`` or ``"flops"`` (trips applied):
        [(computation, instruction, opcode, flops, bytes)], largest first."""
        i = 1 if key == "bytes" else 0
        rows = sorted(self.by_instr.items(), key=lambda kv: -kv[1][i])[:n]
        return [(*k, v[0], v[1]) for k, v in rows]

    @property
    def collective_bytes(self) -> float:
        return sum(v["bytes"] for v in self.collectives.values())


def shape_bytes(text: str) -> int:
    """Bytes of all arrays in an HLO shape text (a tuple sums its elements); unknown dtypes (token[]) count 0."""
    total = 0
    for dtype, dims in _ARRAY_RE.findall(text):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _array_sizes(text: str) -> list[int]:
    return [DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
            for d, dims in _ARRAY_RE.findall(text) if d in DTYPE_BYTES]


def _dims(text: str) -> list[int]:
    """Dimensions of the (first) array shape in ``text``."""
    m = _ARRAY_RE.search(text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def _match_paren(s: str, i: int) -> int:
    """Index just past the bracket group opening at ``s[i]`` ('(' or '{')."""
    close = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for j in range(i, len(s)):
        c = s[j]
        if c in close:
            stack.append(close[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return j + 1
    return len(s)


def _parse_instr(line: str) -> Optional[Instr]:
    m = _INSTR_RE.match(line)
    if not m:
        return None
    name, rest = m.group(2), m.group(3)
    if rest.startswith("("):  # tuple shape
        end = _match_paren(rest, 0)
    else:
        end = rest.find(" ")
        if end < 0:
            return None
    shape, rest = rest[:end], rest[end:].lstrip()
    p = rest.find("(")
    if p < 0:
        return None
    opcode = rest[:p].strip()
    q = _match_paren(rest, p)
    operand_text = rest[p + 1:q - 1]
    operands = re.findall(r"%([^\s,()]+)", operand_text)
    return Instr(name, shape, opcode, operands, rest[q:], operand_text)


def parse_hlo(text: str) -> dict[str, Computation]:
    """{computation name: Computation} of HLO module text (``compiled.as_text()``)."""
    comps: dict[str, Computation] = {}
    cur: Optional[Computation] = None
    pending = ""  # an instruction whose text spans lines (a tpu_custom_call's kernel_metadata holds newlines)
    for raw in text.splitlines():
        if pending or (cur is not None and _open_braces(raw) > 0):
            pending = f"{pending} {raw}" if pending else raw  # one line: the instruction regex is per line
            if _open_braces(pending) > 0:
                continue
            line, pending = pending, ""
        else:
            line = raw
        if cur is None:
            m = _COMP_RE.match(line)
            if m:
                cur = Computation(m.group(2), [], {}, None, bool(m.group(1)))
            continue
        # a computation ends at "}", or "}, execution_thread=..." for one run on another thread (v5p's SparseCore
        # takes some embedding gathers / scatters)
        if line.strip() == "}" or line.strip().startswith("}, execution_thread="):
            comps[cur.name] = cur
            cur = None
            continue
        ins = _parse_instr(line)
        if ins is None:
            continue
        cur.instrs.append(ins)
        cur.by_name[ins.name] = ins
        if line.lstrip().startswith("ROOT"):
            cur.root = ins
    return comps


def _open_braces(text: str) -> int:
    """Braces ``{`` opened and not closed in ``text``, outside string literals (JSON in backend configs)."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if in_str:
            esc, in_str = (False, in_str) if esc else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
    return depth


def _attr(ins: Instr, key: str) -> Optional[str]:
    m = re.search(r"\b" + key + r"=%?([^\s,{}]+)", ins.attrs)
    return m.group(1) if m else None


def _attr_list(ins: Instr, key: str) -> list[str]:
    m = re.search(r"\b" + key + r"=\{([^}]*)\}", ins.attrs)
    if m:
        return re.findall(r"%?([^\s,]+)", m.group(1))
    one = _attr(ins, key)
    return [one] if one else []


def _int_list(ins: Instr, key: str) -> list[int]:
    m = re.search(r"\b" + key + r"=\{([\d,]*)\}", ins.attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


# ----------------------------------------------------------------------------------------------
# FLOPs of one instruction
# ----------------------------------------------------------------------------------------------


def _operand_shape(comp: Computation, name: str) -> str:
    ins = comp.by_name.get(name)
    return ins.shape if ins is not None else ""


def dot_flops(comp: Computation, ins: Instr) -> float:
    """2 x output elements x contracted size of a ``dot``."""
    lhs = _dims(_operand_shape(comp, ins.operands[0]))
    contract = math.prod(lhs[d] for d in _int_list(ins, "lhs_contracting_dims")) if lhs else 1
    return 2.0 * math.prod(_dims(ins.shape)) * contract


def _valid_positions(in_size: int, k_size: int, out_size: int, stride: int, pad_lo: int, lhs_dil: int,
                     rhs_dil: int) -> int:
    """(output, kernel) position pairs of one spatial dimension that read a real (non-padding) input element:
    HloCostAnalysis::GetConvolutionFlops' count, in closed form per kernel position when there is no lhs dilation."""
    count = 0
    for k in range(k_size):
        off = k * rhs_dil - pad_lo  # input index = o * stride + off (before lhs dilation)
        if lhs_dil == 1:
            lo = -(off // stride) if off < 0 else 0  # ceil(-off / stride)
            hi = min(out_size - 1, (in_size - 1 - off) // stride) if in_size - 1 - off >= 0 else -1
            count += max(0, hi - lo + 1)
        else:
            for o in range(out_size):
                u = o * stride + off
                if u >= 0 and u % lhs_dil == 0 and u // lhs_dil < in_size:
                    count += 1
    return count


def conv_flops(comp: Computation, ins: Instr) -> float:
    """2 x multiply-adds of a ``convolution`` (``dim_labels=b01f_01io->b01f`` style; matmuls on TPU are
    ``bf_io->bf`` convolutions), counting only kernel positions over real input as XLA does."""
    m = re.search(r"dim_labels=([^\s,]+)_([^\s,]+)->([^\s,]+)", ins.attrs)
    lhs = _dims(_operand_shape(comp, ins.operands[0]))
    rhs = _dims(_operand_shape(comp, ins.operands[1]))
    out = _dims(ins.shape)
    if not m or not lhs or not rhs:
        return 0.0
    ll, rl, ol = m.groups()
    fgc = int(_attr(ins, "feature_group_count") or 1)
    bgc = int(_attr(ins, "batch_group_count") or 1)
    win = {}
    wm = re.search(r"window=\{([^}]*)\}", ins.attrs)
    if wm:
        for part in wm.group(1).split():
            k, _, v = part.partition("=")
            win[k] = v.split("x")
    spatial = [c for c in ll if c.isdigit()]
    positions = 1
    for i, s in enumerate(spatial):
        in_size = lhs[ll.index(s)]
        k_size = rhs[rl.index(s)]
        out_size = out[ol.index(s)]
        stride = int(win["stride"][i]) if "stride" in win else 1
        pad_lo = int(win["pad"][i].split("_")[0]) if "pad" in win else 0
        lhs_dil = int(win["lhs_dilate"][i]) if "lhs_dilate" in win else 1
        rhs_dil = int(win["rhs_dilate"][i]) if "rhs_dilate" in win else 1
        positions *= _valid_positions(in_size, k_size, out_size, stride, pad_lo, lhs_dil, rhs_dil)
    in_feat = lhs[ll.index("f")]
    out_feat = out[ol.index("f")]
    batch = lhs[ll.index("b")]
    return 2.0 * (in_feat // fgc) * out_feat * (batch // bgc) * positions


def _cost_estimate(ins: Instr) -> Optional[dict]:
    """A Pallas kernel's ``CostEstimate`` (jax writes it into the tpu_custom_call backend_config); for a splash
    attention kernel (which has none), ``{"flops": ...}`` from the ``splash_flops[...]`` scope in its op_name."""
    m = re.search(r'"cost_estimate"\s*:\s*(\{[^{}]*\})', ins.attrs)
    if m:
        try:
            return json.loads(m.group(1))
        except ValueError:
            return None
    return _splash_estimate(ins)


# from orz_jax.models.attention: splash_flops[fwd=N,dq=N,dkv=N] (kept here as text: no jax import in this module)
_SPLASH_SCOPE_RE = re.compile(r"splash_flops\[fwd=(\d+),dq=(\d+),dkv=(\d+)\]")
# the kernel's own scope (jax's get_kernel_name: splash_{mha|mqa}_{fwd|dq|dkv}[_segmented]_{no_}residuals)
_SPLASH_KERNEL_RE = re.compile(r"/splash_m[hq]a_(fwd|dq|dkv)(?:_segmented)?_(?:no_)?residuals/")


def _splash_estimate(ins: Instr) -> Optional[dict]:
    """``{"flops": ...}`` of a splash tpu_custom_call: the scope ``orz_jax.models.attention.splash_attention``
    wraps its kernels in holds each kernel's exact matmul FLOPs per call (local shapes, so per device); the
    kernel's name in the op_name says which. No bytes: the call counts its operands + results as other ops do."""
    if "tpu_custom_call" not in ins.attrs:
        return None
    op = re.search(r'op_name="([^"]*)"', ins.attrs)
    scope = _SPLASH_SCOPE_RE.search(op.group(1)) if op else None
    kind = _SPLASH_KERNEL_RE.search(op.group(1)) if op else None
    if scope is None or kind is None:
        return None
    flops = dict(zip(("fwd", "dq", "dkv"), scope.groups()))[kind.group(1)]
    return {"flops": flops}


# ----------------------------------------------------------------------------------------------
# Trip counts
# ----------------------------------------------------------------------------------------------


def _through_copies(comp: Computation, name: str) -> Optional[Instr]:
    ins = comp.by_name.get(name)
    while ins is not None and ins.opcode in ("copy", "bitcast", "convert") and ins.operands:
        ins = comp.by_name.get(ins.operands[0])
    return ins


def _const_value(comp: Computation, name: str) -> Optional[int]:
    ins = _through_copies(comp, name)
    if ins is None or ins.opcode != "constant":
        return None
    try:
        return int(ins.operand_text.strip())
    except ValueError:
        return None


def _gte_index(comp: Computation, name: str) -> Optional[int]:
    ins = _through_copies(comp, name)
    if ins is None or ins.opcode != "get-tuple-element":
        return None
    src = comp.by_name.get(ins.operands[0])
    if src is None or src.opcode != "parameter":
        return None
    m = re.search(r"index=(\d+)", ins.attrs)
    return int(m.group(1)) if m else None


def _binary_operands(comps: dict, comp: Computation, ins: Instr, opcodes: tuple) -> Optional[tuple]:
    """(opcode, attrs, lhs name, rhs name) in ``comp``'s terms of ``ins`` or of a fusion wrapping one op."""
    if ins.opcode in opcodes and len(ins.operands) == 2:
        return ins.opcode, ins.attrs, ins.operands[0], ins.operands[1]
    if ins.opcode == "fusion":
        called = comps.get(_attr(ins, "calls") or "")
        if called is None or called.root is None or called.root.opcode not in opcodes:
            return None
        params = {}
        for p in called.instrs:
            if p.opcode == "parameter":
                params[p.name] = int(p.operand_text)
        r = called.root
        names = []
        for op in r.operands:
            if op in params:
                names.append(ins.operands[params[op]])
            else:  # a constant inside the fusion: give it a name in the caller's table
                c = called.by_name.get(op)
                if c is None or c.opcode != "constant":
                    return None
                key = f"{ins.name}/{op}"
                comp.by_name.setdefault(key, c)
                names.append(key)
        if len(names) == 2:
            return r.opcode, r.attrs, names[0], names[1]
    return None


def trip_count(comps: dict, caller: Computation, loop: Instr) -> Optional[int]:
    """Iterations of the ``while`` ``loop``: XLA's ``known_trip_count``, else the induction pattern
    (init constant, ``i < N`` / ``i <= N`` / ``N > i`` against a constant, body adds a constant step)."""
    m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', loop.attrs)
    if m:
        return int(m.group(1))
    cond = comps.get(_attr(loop, "condition") or "")
    body = comps.get(_attr(loop, "body") or "")
    if cond is None or body is None or cond.root is None or body.root is None:
        return None
    cmp = _binary_operands(comps, cond, cond.root, ("compare",))
    if cmp is None:
        return None
    _, attrs, a, b = cmp
    direction = re.search(r"direction=(\w+)", attrs)
    direction = direction.group(1) if direction else ""
    idx, bound = _gte_index(cond, a), _const_value(cond, b)
    if idx is None or bound is None:  # N > i  ==  i < N
        idx, bound = _gte_index(cond, b), _const_value(cond, a)
        direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, "")
    if idx is None or bound is None or direction not in ("LT", "LE"):
        return None
    init_t = caller.by_name.get(loop.operands[0]) if loop.operands else None
    if init_t is None or init_t.opcode != "tuple" or idx >= len(init_t.operands):
        return None
    init = _const_value(caller, init_t.operands[idx])
    if body.root.opcode != "tuple" or idx >= len(body.root.operands):
        return None
    step_ins = _through_copies(body, body.root.operands[idx])
    add = _binary_operands(comps, body, step_ins, ("add",)) if step_ins is not None else None
    if init is None or add is None:
        return None
    _, _, x, y = add
    step = None
    if _gte_index(body, x) == idx:
        step = _const_value(body, y)
    elif _gte_index(body, y) == idx:
        step = _const_value(body, x)
    if not step or step <= 0:
        return None
    span = bound - init + (1 if direction == "LE" else 0)
    return max(0, -(-span // step))


# ----------------------------------------------------------------------------------------------
# The walk
# ----------------------------------------------------------------------------------------------


def _sliced_read_bytes(comps: dict, called: Computation, pname: str, depth: int = 0) -> Optional[float]:
    """Bytes the fused computation ``called`` reads of its parameter ``pname`` when every use is a
    ``dynamic-slice`` of it (through bitcasts and nested fusions) or an in-place ``dynamic-update-slice``
    into it; None when some use reads it whole."""
    users: dict[str, list] = {}
    for x in called.instrs:
        for o in x.operands:
            users.setdefault(o, []).append(x)
    aliases, frontier, total = {pname}, list(users.get(pname, [])), 0.0
    if not frontier or depth > 8 or (called.root is not None and called.root.name == pname):
        return None
    while frontier:
        u = frontier.pop()
        if u.opcode == "bitcast":  # the TPU compiler wraps slices as bitcast -> dynamic-slice
            if u is called.root:  # passed out whole (a bitcast-only fusion): its reader reads it whole
                return None
            aliases.add(u.name)
            frontier += users.get(u.name, [])
        elif u.opcode == "dynamic-slice" and u.operands[0] in aliases and not any(
                o in aliases for o in u.operands[1:]):
            total += shape_bytes(u.shape)
        elif u.opcode in ("dynamic-update-slice", "scatter") and u.operands[0] in aliases and not any(
                o in aliases for o in u.operands[1:]):
            # updated in place (a scatter writes its rows into the aliased buffer: the KV cache's new token):
            # the buffer is not read (the update's write is the fusion's output)
            pass
        elif u.opcode == "fusion":  # the slice sits in a nested fusion (TPU: a kLoop inside a kOutput fusion)
            nested = comps.get(_attr(u, "calls") or "")
            if nested is None:
                return None
            params = {int(x.operand_text): x.name for x in nested.instrs if x.opcode == "parameter"}
            for k, o in enumerate(u.operands):
                if o in aliases:
                    r = _sliced_read_bytes(comps, nested, params.get(k, ""), depth + 1)
                    if r is None:
                        return None
                    total += r
        else:
            return None
    return total


def _fusion_operand_bytes(comps: dict, comp: Computation, ins: Instr) -> float:
    """Bytes a fusion reads: each operand whole, or only the slices its ``dynamic-slice`` users read."""
    called = comps.get(_attr(ins, "calls") or "")
    params = {int(x.operand_text): x.name for x in called.instrs if x.opcode == "parameter"} if called else {}
    total = 0.0
    for i, op in enumerate(ins.operands):
        sliced = _sliced_read_bytes(comps, called, params[i]) if i in params else None
        total += sliced if sliced is not None else shape_bytes(_operand_shape(comp, op))
    return total


def _output_bytes(comps: dict, ins: Instr) -> float:
    if ins.opcode == "fusion":
        called = comps.get(_attr(ins, "calls") or "")
        root = called.root if called is not None else None
        if root is not None and root.opcode == "dynamic-update-slice":  # writes its update in place
            return shape_bytes(_operand_shape(called, root.operands[1]))
        if root is not None and root.opcode == "scatter" and len(root.operands) == 3:  # (operand, indices, updates)
            return shape_bytes(_operand_shape(called, root.operands[2]))  # in place: the updated rows
    if ins.opcode == "dynamic-update-slice" and len(ins.operands) > 1:
        return 0.0  # counted with the operands: in place
    return shape_bytes(ins.shape)


def _collective_result_bytes(ins: Instr, op: str, start: bool) -> float:
    sizes = _array_sizes(ins.shape)
    if not sizes:
        return 0.0
    # async tuples hold (operands..., results..., scratch): all-reduce results = operands, so half;
    # gathers / permutes: the largest buffer is the result
    if start and len(sizes) > 1:
        return sum(sizes) // 2 if op == "all-reduce" else max(sizes)
    return sum(sizes)


def _collective_op(opcode: str) -> tuple[Optional[str], bool]:
    for c in COLLECTIVES:
        if opcode == c:
            return c, False
        if opcode == c + "-start":
            return c, True
    return None, False


class _Walker:
    def __init__(self, comps: dict, unknown_trips: int):
        self.comps = comps
        self.unknown_trips = unknown_trips
        self.cost = HloCost()

    def note(self, comp: Computation, ins: Instr, flops: float, nbytes: float):
        self.cost.flops += flops
        self.cost.bytes_accessed += nbytes
        d = self.cost.by_instr.setdefault((comp.name, ins.name, ins.opcode), [0.0, 0.0])
        d[0] += flops
        d[1] += nbytes

    def coll(self, op: str, nbytes: float, mult: float):
        d = self.cost.collectives.setdefault(op, {"count": 0, "bytes": 0})
        d["count"] += mult
        d["bytes"] += nbytes * mult

    def walk(self, comp: Computation, mult: int, fused: bool, depth: int = 0):
        if depth > 64:
            raise ValueError(f"HLO call depth over 64 at computation {comp.name}")
        for ins in comp.instrs:
            op = ins.opcode
            coll, start = _collective_op(op)
            if coll is not None:
                self.coll(coll, _collective_result_bytes(ins, coll, start), mult)
            if op == "dot":
                self.note(comp, ins, mult * dot_flops(comp, ins), 0.0)
            elif op == "convolution":
                self.note(comp, ins, mult * conv_flops(comp, ins), 0.0)
            elif op == "custom-call":
                est = _cost_estimate(ins)
                if est is not None and "bytes_accessed" not in est:  # splash: flops only; bytes as any op below
                    self.note(comp, ins, mult * float(est.get("flops", 0)), 0.0)
                elif est is not None:
                    self.note(comp, ins, mult * float(est.get("flops", 0)),
                              0.0 if fused else mult * float(est.get("bytes_accessed", 0)))
                    if not fused:
                        continue
            if op == "while":
                n = trip_count(self.comps, comp, ins)
                known = n is not None
                if not known:
                    n = self.unknown_trips
                    self.cost.unknown_loops.append(ins.name)
                self.cost.loops.append({"name": ins.name, "trips": n, "known": known, "times": mult})
                body = self.comps.get(_attr(ins, "body") or "")
                cond = self.comps.get(_attr(ins, "condition") or "")
                if body is not None:
                    self.walk(body, mult * n, fused, depth + 1)
                if cond is not None:
                    self.walk(cond, mult * n, fused, depth + 1)
                continue
            if op == "conditional":
                # one branch runs: count the costliest (an upper bound, as XLA's cost analysis does)
                names = _attr_list(ins, "branch_computations") or [
                    x for x in (_attr(ins, "true_computation"), _attr(ins, "false_computation")) if x]
                best = None
                for nm in names:
                    sub = _Walker(self.comps, self.unknown_trips)
                    if nm in self.comps:
                        sub.walk(self.comps[nm], mult, fused, depth + 1)
                    if best is None or sub.cost.flops + sub.cost.bytes_accessed > (
                            best.cost.flops + best.cost.bytes_accessed):
                        best = sub
                if best is not None:
                    self._merge(best.cost)
                continue
            if op in ("call", "async-start"):
                called = self.comps.get(_attr(ins, "calls") or _attr(ins, "to_apply") or "")
                if called is not None:
                    self.walk(called, mult, fused, depth + 1)
                continue
            if op == "fusion":
                called = self.comps.get(_attr(ins, "calls") or "")
                rs = called is not None and "reduce-scatter" in called.name and any(
                    x.opcode.startswith("all-reduce") for x in called.instrs)
                if rs:  # the TPU compiler's reduce-scatter: an all-reduce + slice fused as "all-reduce-scatter"
                    self.coll("reduce-scatter", shape_bytes(ins.shape), mult)
                if called is not None:
                    sub = _Walker(self.comps, self.unknown_trips)
                    sub.walk(called, mult, True, depth + 1)
                    self.cost.flops += sub.cost.flops
                    for k, v in sub.cost.by_instr.items():
                        d = self.cost.by_instr.setdefault(k, [0.0, 0.0])
                        d[0] += v[0]
                    self.cost.loops += sub.cost.loops
                    self.cost.unknown_loops += sub.cost.unknown_loops
                    if not rs:
                        for k, v in sub.cost.collectives.items():
                            d = self.cost.collectives.setdefault(k, {"count": 0, "bytes": 0})
                            d["count"] += v["count"]
                            d["bytes"] += v["bytes"]
                if not fused:
                    self.note(comp, ins, 0.0, mult * (_fusion_operand_bytes(self.comps, comp, ins)
                                                      + _output_bytes(self.comps, ins)))
                continue
            if fused or op in _NO_BYTES or op.endswith("-done"):
                continue
            if op == "dynamic-slice":
                nbytes = 2 * shape_bytes(ins.shape)  # reads the slice, writes it
            elif op == "dynamic-update-slice" and len(ins.operands) > 1:
                nbytes = 2 * shape_bytes(_operand_shape(comp, ins.operands[1]))  # in place
            elif op == "scatter" and len(ins.operands) == 3:  # in place: indices and updates read, updates written
                nbytes = shape_bytes(_operand_shape(comp, ins.operands[1])) + 2 * shape_bytes(
                    _operand_shape(comp, ins.operands[2]))
            elif start or op.endswith("-start"):
                nbytes = sum(shape_bytes(_operand_shape(comp, o)) for o in ins.operands) + (
                    _collective_result_bytes(ins, coll, True) if coll else 0.0)
            else:
                nbytes = sum(shape_bytes(_operand_shape(comp, o)) for o in ins.operands) + shape_bytes(ins.shape)
            self.note(comp, ins, 0.0, mult * nbytes)

    def _merge(self, c: HloCost):
        self.cost.flops += c.flops
        self.cost.bytes_accessed += c.bytes_accessed
        self.cost.loops += c.loops
        self.cost.unknown_loops += c.unknown_loops
        for k, v in c.by_instr.items():
            d = self.cost.by_instr.setdefault(k, [0.0, 0.0])
            d[0] += v[0]
            d[1] += v[1]
        for k, v in c.collectives.items():
            d = self.cost.collectives.setdefault(k, {"count": 0, "bytes": 0})
            d["count"] += v["count"]
            d["bytes"] += v["bytes"]


def analyze_hlo(text: str, unknown_trips: int = 1) -> HloCost:
    """Whole-program :class:`HloCost` of compiled HLO text, every instruction multiplied by the trip counts of its
    enclosing loops; loops of unknown count run ``unknown_trips`` times (and are listed in ``unknown_loops``)."""
    comps = parse_hlo(text)
    entry = next((c for c in comps.values() if c.is_entry), None)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text (expected compiled.as_text() of an XLA program)")
    w = _Walker(comps, unknown_trips)
    w.walk(entry, 1, False)  # integer multipliers: counts stay exact integers
    return w.cost

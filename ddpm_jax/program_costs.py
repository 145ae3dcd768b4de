"""What XLA says a compiled program of ddpm_jax costs on a chip, without running it.

``report(config, devices)`` lowers and compiles, with abstract inputs (``jax.ShapeDtypeStruct``
over a 1-D ('data',) mesh of ``devices``), exactly the programs that the commands run, built by
the library's own builders:

    train           ``training.make_jitted_training``'s ``multi_step``
                    (``python -m ddpm_jax.train``; K = config.train.steps_per_dispatch steps)
    sample          ``generation.make_generate_fn`` with the config's sampler and steps
                    (``python -m ddpm_jax.sample``, unguided)
    sample_guided   the same with classifier-free guidance (configs whose model has the "no class"
                    label: model.p_uncond > 0), w = config.sample.guidance or 1
    inception       the FID Inception-v3 forward of ``metrics.features.FeatureExtractor``
                    (``python -m ddpm_jax.evaluate``), with zero weights of the right shapes

and reads, per device, ``memory_analysis()`` (argument, output, temporary bytes: on a TPU
topology an out-of-memory there is one on the chip), ``cost_analysis()`` (FLOPs, bytes accessed)
and, from the compiled HLO, the collectives and the bytes each memory space is read and written
(``memory_traffic``): XLA:TPU keeps many buffers in on-chip memory, whose traffic its "bytes
accessed" includes, so the HBM figure of a TPU program is the device-memory share. XLA's cost
analysis counts a loop's body once, whatever its trip count (checked on XLA:CPU and XLA:TPU: a
scan of 2, 10 or 100 matmuls counts the FLOPs of one): the sampler's chain (one ``lax.scan``)
therefore gives the figures of ONE network call, and a K-step dispatch those of one train step;
the loops' known trip counts are read from the HLO to make that exact (``counted_calls``).

From those counts and a chip's published peak bf16 FLOP/s and HBM bandwidth (``CHIPS``) comes a
roofline BOUND on images/s (max of the compute and memory times): an upper bound, never a
measurement. ``unet_forward_flops`` counts the UNet's matmul and convolution FLOPs from its
config, independently of the model code, to compare with the compiled count.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PROGRAMS = ("train", "sample", "sample_guided", "inception")
GiB = 2**30
DEFAULT_SAMPLE_BATCH = 256  # python -m ddpm_jax.sample's --batch_size default
DEFAULT_INCEPTION_BATCH = 200  # python -m ddpm_jax.evaluate's --feature_batch_size default


# ----------------------------------------------------------------------------------------------
# Chips: HBM capacity, peak dense bf16 FLOP/s, HBM bandwidth (vendors' published figures).
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int
    peak_bf16_flops: float  # dense (no sparsity), per chip
    hbm_bytes_per_s: float


CHIPS = {
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1,200 GB/s per chip.
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1200e9),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s per chip.
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2,765 GB/s per chip.
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9),
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 32 GB HBM at 1,640 GB/s per chip.
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9),
    # https://www.nvidia.com/en-us/data-center/h100/ (datasheet, H100 SXM): 989 TFLOP/s dense
    # bf16 (1,979 with sparsity), 80 GB HBM3 at 3.35 TB/s.
    "H100": Chip("NVIDIA H100 SXM", 80 * GiB, 989e12, 3.35e12),
    # https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM): 989 TFLOP/s dense bf16,
    # 141 GB HBM3e at 4.8 TB/s.
    "H200": Chip("NVIDIA H200 SXM", 141 * 10**9, 989e12, 4.8e12),
    # https://www.nvidia.com/en-us/data-center/a100/ (datasheet, A100 80GB SXM): 312 TFLOP/s
    # dense bf16, 80 GB HBM2e at 2,039 GB/s; the 40 GB SXM: 1,555 GB/s.
    "A100": Chip("NVIDIA A100 80GB SXM", 80 * GiB, 312e12, 2039e9),
    "A100-40GB": Chip("NVIDIA A100 40GB SXM", 40 * GiB, 312e12, 1555e9),
}

# device_kind (as JAX reports it, topology devices included) -> CHIPS key; first match wins.
_DEVICE_KINDS = (
    ("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5p", "v5p"),
    ("TPU v5", "v5p"), ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("H100", "H100"),
    ("H200", "H200"), ("A100-SXM4-40GB", "A100-40GB"), ("A100-PCIE-40GB", "A100-40GB"),
    ("A100", "A100"),
)


def chip_of(device: jax.Device) -> Chip | None:
    """The CHIPS entry of a device (by its ``device_kind``), or None (a CPU, an unlisted chip)."""
    kind = device.device_kind
    for pattern, key in _DEVICE_KINDS:
        if pattern in kind:
            return CHIPS[key]
    return None


# ----------------------------------------------------------------------------------------------
# Collectives in compiled HLO text.
# ----------------------------------------------------------------------------------------------
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16}
# An instruction: "[ROOT] %name = <shape> <opcode>(<operands>)<attributes>".
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s*"
                          r"(?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
                     r"=%?([\w.\-]+)")
_CALLED_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_WHILE_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_WHILE_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_INT_CONSTANT = re.compile(r"^s32\[\]\S*$")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def _collective(op: str) -> tuple[str | None, bool]:
    """(kind, whether this instruction carries the result shape) of an opcode: the synchronous
    op counts and carries its shape; an async pair counts at ``-start`` and carries the result
    shape at ``-done``."""
    for kind in COLLECTIVES:
        if op == kind:
            return kind, True
        if op == f"{kind}-start":
            return kind, False
        if op == f"{kind}-done":
            return None, True
    return None, False


_NETWORK_OPS = ("convolution", "dot")  # what a network's layers compile to (and cuDNN/cuBLAS
_NETWORK_CALL_TARGETS = re.compile(r'custom_call_target="[^"]*(?:conv|gemm|matmul)', re.I)  # calls)


@dataclasses.dataclass
class _Computation:
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    network_ops: int = 0
    calls: set[str] = dataclasses.field(default_factory=set)
    loops: list[tuple[str, str | None, int | None]] = dataclasses.field(default_factory=list)
    int_constants: list[int] = dataclasses.field(default_factory=list)
    less_than: bool = False


def _parse_hlo(hlo_text: str) -> tuple[dict[str, _Computation], str | None]:
    """{computation name: its own collectives, network ops, callees, while loops}, and the
    entry's name."""
    computations: dict[str, _Computation] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace() and line.rstrip().endswith("{"):  # a computation's header
            words = line.split()
            is_entry = words[0] == "ENTRY"
            name = words[1 if is_entry else 0].lstrip("%")
            current = computations.setdefault(name, _Computation())
            entry = name if is_entry else entry
            continue
        match = _INSTRUCTION.match(line) if current is not None else None
        if match is None:
            continue
        op, rest = match["op"], match["rest"]
        current.calls.update(_CALLED.findall(rest))
        for group in _CALLED_LISTS.findall(rest):
            current.calls.update(c.strip().lstrip("%") for c in group.split(",") if c.strip())
        if op == "while":
            trip, condition = _TRIP_COUNT.search(rest), _WHILE_CONDITION.search(rest)
            current.loops.append((_WHILE_BODY.search(rest)[1], condition and condition[1],
                                  int(trip[1]) if trip else None))
        if op == "constant" and _INT_CONSTANT.match(match["shape"]):
            current.int_constants.append(int(rest.split(")")[0]))
        current.less_than |= op == "compare" and "direction=LT" in rest
        if op in _NETWORK_OPS or (op == "custom-call" and _NETWORK_CALL_TARGETS.search(rest)):
            current.network_ops += 1
        kind, carries_shape = _collective(op)
        if kind is not None:
            current.counts[kind] = current.counts.get(kind, 0) + 1
        if carries_shape and (kind or op.endswith("-done")):
            kind = kind or op.removesuffix("-done")
            current.bytes[kind] = current.bytes.get(kind, 0) + _shape_bytes(match["shape"])
    return computations, entry


def _reachable(computations: dict[str, _Computation], root: str) -> set[str]:
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        todo.extend(computations[name].calls)
    return seen


def _sum_collectives(computations: dict[str, _Computation], names: set[str]) -> dict[str, Any]:
    counts = {kind: sum(computations[n].counts.get(kind, 0) for n in names) for kind in COLLECTIVES}
    moved = {kind: sum(computations[n].bytes.get(kind, 0) for n in names) for kind in COLLECTIVES}
    return {"counts": counts, "bytes": moved}


def _trip_from_condition(computations: dict[str, _Computation], name: str | None) -> int | None:
    """A loop's trip count when XLA states none (XLA:TPU): a scan's condition is ``i < N`` with
    i counting from 0 by 1, N its one integer constant."""
    condition = computations.get(name) if name else None
    if condition is None or not condition.less_than or len(condition.int_constants) != 1:
        return None
    return condition.int_constants[0]


def collectives(hlo_text: str) -> dict[str, Any]:
    """The collectives of a compiled (optimised) HLO module's text, per device:

    {"counts": {kind: n}, "bytes": {kind: result bytes}} for the whole program (every
    computation reachable from the entry, each counted once: a loop body's once, not per trip),
    and "loops": [{"trip_count": n or None, "network_ops": convolutions and matmuls,
    "counts": ..., "bytes": ...}] for each outermost while loop that holds network ops or
    collectives (its body and all it calls), the one with the most network ops (the sampler's
    chain, a multi-step dispatch's steps) first; small loops of neither kind (e.g. XLA:CPU's
    threefry rounds) are left out. Kinds are ``COLLECTIVES``; an async pair
    (``all-gather-start``/``-done``) counts once."""
    computations, entry = _parse_hlo(hlo_text)
    program = _reachable(computations, entry) if entry else set(computations)
    out = _sum_collectives(computations, program)
    loops = [(body, trip if trip is not None else _trip_from_condition(computations, condition))
             for name in program for body, condition, trip in computations[name].loops]
    inner = {c for body, _ in loops for c in _reachable(computations, body) if c != body}
    found = []
    for body, trip in loops:
        if body in inner:
            continue
        names = _reachable(computations, body)
        loop = {"trip_count": trip,
                "network_ops": sum(computations[n].network_ops for n in names),
                **_sum_collectives(computations, names)}
        if loop["network_ops"] or any(loop["counts"].values()):
            found.append(loop)
    out["loops"] = sorted(found, key=lambda lp: -lp["network_ops"])
    return out


# ----------------------------------------------------------------------------------------------
# Memory traffic per memory space in compiled HLO text.
# ----------------------------------------------------------------------------------------------
# An array in a shape: dtype[dims]{minor-to-major order:tiles and memory space}, e.g. on a TPU
# "bf16[16,32,32,128]{3,0,2,1:T(8,128)(2,1)S(1)}" (tiled by 8x128 with pairs of rows packed, in
# memory space 1). No ":" part (XLA:CPU, XLA:GPU): untiled, memory space 0.
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\](\{[^}]*\})?")
_TILE = re.compile(r"T\(([\d,]+)\)(?:\((\d+),1\))?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
# Instructions that move no data of their own: the loop, call and tuple plumbing, views, and the
# "-done" halves of asynchronous pairs (counted at their "-start").
_NO_TRAFFIC = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
               "conditional", "after-all", "partition-id", "replica-id", "opt-barrier")
_CONTROL_FLOW = re.compile(r"\b(?:body|condition|true_computation|false_computation)=%?([\w.\-]+)")


def _arrays(shape: str) -> list[tuple[int, int]]:
    """(bytes, memory space) of each array of a shape text, its dims padded to its layout's tile
    (a bf16 [16, 8, 8, 32] with 8x128 tiles on its two minor dims takes 4x its element bytes)."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(shape):
        if dtype not in _DTYPE_BYTES:
            continue
        sizes = [int(d) for d in dims.split(",") if d]
        order, _, attributes = layout.strip("{}").partition(":")
        tile = _TILE.search(attributes)
        minor_to_major = [int(i) for i in order.split(",") if i]
        if tile and minor_to_major:
            tile_sizes = [int(t) for t in tile[1].split(",")]
            if tile[2] and len(tile_sizes) > 1:  # (k,1): k rows packed per tile row
                tile_sizes[-2] *= int(tile[2])
            for size, dim in zip(reversed(tile_sizes), minor_to_major):
                sizes[dim] = -(-sizes[dim] // size) * size
        space = _MEMORY_SPACE.search(attributes)
        out.append((_DTYPE_BYTES[dtype] * int(np.prod(sizes)), int(space[1]) if space else 0))
    return out


def _instruction_traffic(op: str, shape: str, operand_shapes: list[str]) -> dict[int, int]:
    """{memory space: bytes} an instruction reads (its operands) and writes (its result)."""
    traffic: dict[int, int] = {}

    def add(arrays: list[tuple[int, int]]) -> None:
        for size, space in arrays:
            traffic[space] = traffic.get(space, 0) + size

    if op in _NO_TRAFFIC or op.endswith("-done"):
        return traffic
    if op == "slice-start":  # ((source), slice, context): reads the slice where the source is
        (_, source_space), (size, space) = _arrays(shape)[:2]
        add([(size, source_space), (size, space)])
        return traffic
    result = _arrays(shape)
    if op.endswith("-start") and shape.startswith("("):  # (destination, source, context)
        result = result[:1]
    add(result)
    for operand in operand_shapes:
        add(_arrays(operand))
    return traffic


def memory_traffic(hlo_text: str) -> dict[int, int]:
    """{memory space: bytes} read and written by the instructions of a compiled HLO module, each
    counted as its operands plus its result (a fusion as one instruction), arrays padded to their
    layout's tiles, over the entry and the computations it runs as loops and branches, each once
    (as XLA's cost analysis counts a loop body). Space 0 is device memory (HBM); on a TPU, XLA's
    memory-space assignment puts buffers in on-chip memory too (space 1), whose traffic XLA's
    "bytes accessed" counts as well. An estimate: a fusion that reads part of an operand (a
    slice of it) counts all of it."""
    computations: dict[str, list[re.Match]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            words = line.split()
            current = words[1 if words[0] == "ENTRY" else 0].lstrip("%")
            entry = current if words[0] == "ENTRY" else entry
            computations[current] = []
        elif current is not None and (match := _INSTRUCTION.match(line)):
            computations[current].append(match)
    traffic: dict[int, int] = {}
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        shapes = {m["name"]: m["shape"] for m in computations[name]}
        for m in computations[name]:
            rest = m["rest"]
            if m["op"] in ("while", "conditional", "call"):
                todo += _CONTROL_FLOW.findall(rest)
                todo += re.findall(r"\bto_apply=%?([\w.\-]+)", rest) if m["op"] == "call" else []
                for group in _CALLED_LISTS.findall(rest):
                    todo += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            operands = re.findall(r"%([\w.\-]+)", _operand_list(rest))
            for space, size in _instruction_traffic(
                    m["op"], m["shape"], [shapes.get(o, "") for o in operands]).items():
                traffic[space] = traffic.get(space, 0) + size
    return traffic


def _operand_list(rest: str) -> str:
    """The operand list of an instruction: ``rest`` up to its closing parenthesis."""
    depth = 1
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return rest[:i]
    return rest


# ----------------------------------------------------------------------------------------------
# The analytic FLOPs of the UNet.
# ----------------------------------------------------------------------------------------------
def unet_forward_flops(model_config: ml_collections.ConfigDict, image_size: int,
                       num_channels: int, *, count_padding: bool = True) -> int:
    """FLOPs (2 per multiply-add) of one UNet forward pass on one image, counting the
    convolutions, dense layers and attention matmuls of the architecture of Ho et al. 2020
    (Appendix B; ``models/unet.py``'s docstring) from its config; norms, activations and adds
    are left out. Written from the architecture, not from the model code, to check XLA's count.

    ``count_padding``: a 3x3 convolution costs 9 taps at every output position (the usual
    count); False leaves out the taps that fall on the zero padding, as XLA's cost analysis does
    (on an n x n map 3n - 2 taps per axis instead of 3n: 4% fewer at 32x32, 16% at 8x8)."""
    ch, temb_ch = model_config.ch, 4 * model_config.ch
    mults, num_blocks = tuple(model_config.ch_mult), model_config.num_res_blocks
    attn, with_conv = tuple(model_config.attn_resolutions), model_config.get(
        "resamp_with_conv", True)

    def conv3x3(c_in: int, c_out: int, res: int, stride: int = 1) -> int:
        """res: the output's height = width. Padding: 1 each side (stride 1); 0 before and 1
        after (stride 2, TF's "SAME"), where only the last output's last tap falls on it."""
        taps = 3 * res if count_padding else 3 * res - (2 if stride == 1 else 1)
        return 2 * c_in * c_out * taps * taps

    def dense(c_in: int, c_out: int, positions: int = 1) -> int:
        return 2 * c_in * c_out * positions

    def resnet(c_in: int, c_out: int, res: int) -> int:
        shortcut = dense(c_in, c_out, res * res) if c_in != c_out else 0
        return conv3x3(c_in, c_out, res) + dense(temb_ch, c_out) + conv3x3(c_out, c_out, res) \
            + shortcut

    def attention(c: int, res: int) -> int:
        n = res * res  # q, k, v, proj_out; q kᵀ and w v
        return 4 * dense(c, c, n) + 2 * (2 * n * n * c)

    flops = dense(ch, temb_ch) + dense(temb_ch, temb_ch)
    res = image_size
    flops += conv3x3(num_channels, ch, res)
    skips = [ch]
    c = ch
    for level, mult in enumerate(mults):
        for _ in range(num_blocks):
            flops += resnet(c, ch * mult, res)
            c = ch * mult
            flops += attention(c, res) if res in attn else 0
            skips.append(c)
        if level != len(mults) - 1:
            res //= 2
            flops += conv3x3(c, c, res, stride=2) if with_conv else 0
            skips.append(c)
    flops += 2 * resnet(c, c, res) + attention(c, res)
    for level, mult in reversed(list(enumerate(mults))):
        for _ in range(num_blocks + 1):
            flops += resnet(c + skips.pop(), ch * mult, res)
            c = ch * mult
            flops += attention(c, res) if res in attn else 0
        if level != 0:
            res *= 2
            flops += conv3x3(c, c, res) if with_conv else 0
    return flops + conv3x3(ch, num_channels, res)


# ----------------------------------------------------------------------------------------------
# One compiled program.
# ----------------------------------------------------------------------------------------------
def roofline(flops: float, hbm_bytes: float, images: float, chip: Chip,
             num_devices: int) -> dict[str, Any]:
    """A BOUND, not a measurement: one call of ``flops`` and ``hbm_bytes`` per chip on
    ``images`` images per chip takes at least max(flops / peak, bytes / bandwidth) seconds, so
    images/s <= images / that x chips. Peak is the chip's dense bf16 rate (float32 matmuls are
    slower, so a float32 program's bound is looser still)."""
    compute_s, memory_s = flops / chip.peak_bf16_flops, hbm_bytes / chip.hbm_bytes_per_s
    seconds = max(compute_s, memory_s)
    return {"compute_s": compute_s, "memory_s": memory_s,
            "bound_by": "memory" if memory_s >= compute_s else "compute",
            "images_per_s_bound": images / seconds * num_devices if seconds > 0 else None}


def analyse(compiled: Any, *, images_per_device: float, counted_calls_of: int = 1,
            chip: Chip | None = None, num_devices: int = 1) -> dict[str, Any]:
    """Per-device figures of a compiled program (``jax.stages.Compiled``).

    ``counted_calls_of`` is the number of network calls (or train steps) the program makes
    per dispatch, in its main loop when it has one: the figures are divided by the number of
    them that XLA's cost analysis counted (``counted_calls`` = counted_calls_of / the main
    loop's trip count, 1 when the body holds one call) to give the cost of ONE call on
    ``images_per_device`` images.

    HBM bytes: XLA's "bytes accessed" where the program uses one memory space (XLA:CPU,
    XLA:GPU); on a TPU, whose compiler also places buffers in on-chip memory and counts that
    traffic in "bytes accessed" (kept as ``bytes_accessed_per_call``), the memory-space-0 share
    of ``memory_traffic``."""
    memory = compiled.memory_analysis()
    # What the device holds: arguments, outputs not aliased to arguments, temporaries and the
    # program itself; XLA's own peak (when it reports one) may count differently: take the larger.
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes
             + memory.generated_code_size_in_bytes)
    peak = max(getattr(memory, "peak_memory_in_bytes", 0), total)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text()
    hlo = collectives(text)
    main_loop = hlo["loops"][0] if hlo["loops"] and hlo["loops"][0]["network_ops"] else None
    trip = main_loop["trip_count"] if main_loop else 1
    counted = counted_calls_of // trip if trip and counted_calls_of % trip == 0 else 1
    flops = float(cost.get("flops", 0.0)) / counted
    accessed = float(cost.get("bytes accessed", 0.0)) / counted
    # XLA's "bytes accessed" counts every memory space; where the HLO places buffers in several
    # (a TPU's on-chip memory is space 1), device memory's share is read from the HLO.
    traffic = {space: size / counted for space, size in memory_traffic(text).items()}
    hbm = traffic.get(0, 0.0) if set(traffic) - {0} else accessed
    out = {
        "memory": {
            "argument_bytes": memory.argument_size_in_bytes,
            "output_bytes": memory.output_size_in_bytes,
            "alias_bytes": memory.alias_size_in_bytes,
            "temp_bytes": memory.temp_size_in_bytes,
            "generated_code_bytes": memory.generated_code_size_in_bytes,
            "total_bytes": total,
            "xla_peak_bytes": getattr(memory, "peak_memory_in_bytes", None),
            "peak_bytes": peak,
        },
        "counted_calls": counted,
        "flops_per_call": flops,
        "hbm_bytes_per_call": hbm,
        "bytes_accessed_per_call": accessed,
        "traffic_by_memory_space_per_call": {str(k): v for k, v in sorted(traffic.items())},
        "transcendentals_per_call": float(cost.get("transcendentals", 0.0)) / counted,
        "images_per_device": images_per_device,
        "flops_per_image": flops / images_per_device,
        "hbm_bytes_per_image": hbm / images_per_device,
        "collectives": hlo,
        "chip": dataclasses.asdict(chip) if chip else None,
    }
    if chip:
        out["memory"]["hbm_headroom"] = 1.0 - peak / chip.hbm_bytes
        out["roofline"] = roofline(flops, hbm, images_per_device, chip, num_devices)
    return out


# ----------------------------------------------------------------------------------------------
# The programs of ddpm_jax, lowered with abstract inputs.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Program:
    """A jitted function, its abstract arguments and what one call does."""

    name: str
    description: str
    jitted: Callable[..., Any]
    args: tuple[Any, ...]
    images_per_call: int  # global
    calls_per_dispatch: int  # network calls (sampler steps) or train steps per dispatch
    analytic_flops_per_image: float | None  # per network call or train step


def _abstract(tree: Any, sharding: NamedSharding) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def data_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """The ('data',) mesh the commands use (``parallel.make_data_mesh``), over ``devices``."""
    return Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def train_program(config: ml_collections.ConfigDict, mesh: Mesh) -> Program:
    """``python -m ddpm_jax.train``'s dispatch: ``multi_step`` on K global batches."""
    from ddpm_jax import config_checks, keys, training

    config_checks.check_batch_size(config.data.batch_size, mesh.size)
    _, _, init, multi_step = training.make_jitted_training(config, mesh)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
    rng = keys.stream(config.seed, keys.TRAIN, keys.train_impl(config))
    state = _abstract(jax.eval_shape(init, rng), replicated)
    acc = _abstract(jax.eval_shape(training.zero_metrics), replicated)
    k, batch = config.train.steps_per_dispatch, config.data.batch_size
    size, channels = config.data.image_size, config.data.num_channels
    batches = {"image": jax.ShapeDtypeStruct((k, batch, size, size, channels), jnp.float32,
                                             sharding=split)}
    if config.model.get("num_classes"):
        batches["label"] = jax.ShapeDtypeStruct((k, batch), jnp.int32, sharding=split)
    forward = unet_forward_flops(config.model, size, channels)
    return Program(
        "train", f"multi_step: {k} train step(s) a dispatch, global batch {batch}",
        multi_step, (state, acc, batches), batch, k, 3 * forward,
    )


def sample_program(config: ml_collections.ConfigDict, mesh: Mesh, *, guided: bool,
                   batch_size: int = DEFAULT_SAMPLE_BATCH) -> Program:
    """``python -m ddpm_jax.sample``'s sampler (``generation.make_generate_fn``) with the config's
    sampler and steps, unguided or with classifier-free guidance (w = config.sample.guidance,
    or 1 when the config sets none, at the config's guidance_interval)."""
    from ddpm_jax import generation, keys, sampler_spec, training
    from ddpm_jax.models import unet_from_config

    if batch_size <= 0 or batch_size % mesh.size:
        raise ValueError(f"The sampling batch {batch_size} must be a positive multiple of the "
                         f"{mesh.size} devices.")
    model = unet_from_config(config.model, config.data.num_channels)
    if guided and not (config.model.get("num_classes") and config.model.get("p_uncond", 0.0) > 0):
        raise ValueError("sample_guided needs a class-conditional config trained with label "
                         "dropout (model.num_classes set, model.p_uncond > 0).")
    guidance = (config.sample.get("guidance") or 1.0) if guided else 0.0
    spec = sampler_spec.from_config(config, {"guidance": guidance})
    generate = generation.make_generate_fn(model, config, mesh, spec, batch_size=batch_size)
    replicated = NamedSharding(mesh, P())
    tx = training.make_optimizer(config.optim)
    state = jax.eval_shape(lambda key: training.create_train_state(config, model, tx, key),
                           keys.stream(config.seed, keys.TRAIN))
    key = keys.stream(0, keys.SAMPLE)
    args = (_abstract(state.ema_params, replicated),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
    forward = unet_forward_flops(config.model, config.data.image_size, config.data.num_channels)
    what = f"{spec.describe()}, batch {batch_size}"
    if guided:
        what += " (one network call on [x_t; x_t])"
    return Program("sample_guided" if guided else "sample", f"make_generate_fn: {what}",
                   generate, args, batch_size, spec.steps, forward * (2 if guided else 1))


def inception_program(config: ml_collections.ConfigDict, mesh: Mesh, *,
                      batch_size: int = DEFAULT_INCEPTION_BATCH,
                      convention: str | None = None) -> Program:
    """The FID Inception forward of ``python -m ddpm_jax.evaluate`` on uint8 samples of the
    config's shape: ``FeatureExtractor``'s jitted call, its weights (zeros of the right shapes)
    an argument, as ``evaluation.inception_extractor`` passes them."""
    from ddpm_jax.metrics import features, inception

    convention = convention or config.eval.get("convention") or "tf"
    variables = jax.eval_shape(lambda: inception.FIDInceptionV3().init(
        jax.random.key(0), jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3))))
    network = inception.make_inception_fn(variables, convention)
    # The extractor's jitted call; built around a network with no arrays, since compile-only
    # devices cannot hold the weights it would place on them.
    extractor = features.FeatureExtractor(jax.tree_util.Partial(lambda x: x), mesh, batch_size)
    size, channels = config.data.image_size, config.data.num_channels
    images = jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.uint8,
                                  sharding=NamedSharding(mesh, P("data")))
    return Program(
        "inception", f"FID Inception-v3 features ({convention} convention), batch {batch_size}, "
        f"{size}x{size}x{channels} uint8 -> 299x299", extractor._fn,
        (_abstract(network, NamedSharding(mesh, P())), images), batch_size, 1, None,
    )


def build_programs(config: ml_collections.ConfigDict, mesh: Mesh, names: Sequence[str], *,
                   sample_batch: int = DEFAULT_SAMPLE_BATCH,
                   inception_batch: int = DEFAULT_INCEPTION_BATCH) -> list[Program]:
    """The programs ``names`` (of ``PROGRAMS``) of ``config`` over ``mesh``; sample_guided is left
    out (with no error) for configs without guidance."""
    unknown = sorted(set(names) - set(PROGRAMS))
    if unknown:
        raise ValueError(f"Unknown programs {unknown}; choose from {', '.join(PROGRAMS)}.")
    guidable = bool(config.model.get("num_classes")) and config.model.get("p_uncond", 0.0) > 0
    out = []
    for name in names:
        if name == "train":
            out.append(train_program(config, mesh))
        elif name in ("sample", "sample_guided") and (name == "sample" or guidable):
            out.append(sample_program(config, mesh, guided=name == "sample_guided",
                                      batch_size=sample_batch))
        elif name == "inception":
            out.append(inception_program(config, mesh, batch_size=inception_batch))
    return out


def compile_and_analyse(program: Program, mesh: Mesh,
                        hlo_dir: str | None = None) -> dict[str, Any]:
    """Lower and compile one program; its figures (``analyse``) with its compile time. With
    ``hlo_dir``, the compiled HLO text goes to <hlo_dir>/<program>.hlo.txt."""
    start = time.perf_counter()
    compiled = program.jitted.lower(*program.args).compile()
    compile_s = time.perf_counter() - start
    if hlo_dir:
        from pathlib import Path

        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        (Path(hlo_dir) / f"{program.name}.hlo.txt").write_text(compiled.as_text())
    devices = list(mesh.devices.flat)
    chip, chips = chip_of(devices[0]), _num_chips(devices)
    if chip and chips < len(devices):  # several devices a chip (TPU v4 cores): a share each
        share = chips / len(devices)
        chip = dataclasses.replace(
            chip, name=f"{chip.name} ({len(devices) // chips} cores a chip: one core's share)",
            hbm_bytes=int(chip.hbm_bytes * share), peak_bf16_flops=chip.peak_bf16_flops * share,
            hbm_bytes_per_s=chip.hbm_bytes_per_s * share)
    out = {"program": program.name, "description": program.description,
           "images_per_call": program.images_per_call,
           "calls_per_dispatch": program.calls_per_dispatch, "compile_s": compile_s}
    out.update(analyse(compiled, images_per_device=program.images_per_call / mesh.size,
                       counted_calls_of=program.calls_per_dispatch, chip=chip,
                       num_devices=len(devices)))
    out["analytic_flops_per_image"] = program.analytic_flops_per_image
    if program.calls_per_dispatch > 1 and "roofline" in out:
        bound = out["roofline"]["images_per_s_bound"]  # of one call, i.e. one step of the chain
        if program.name.startswith("sample") and bound:
            out["roofline"]["chain_images_per_s_bound"] = bound / program.calls_per_dispatch
    return out


def _num_chips(devices: Sequence[jax.Device]) -> int:
    """Chips, not devices: the TPU cores of one chip (same ``coords``) count once."""
    chips = {tuple(getattr(d, "coords", ())) + (getattr(d, "slice_index", 0),) for d in devices}
    return len(chips) if all(hasattr(d, "coords") for d in devices) else len(devices)


def report(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
           names: Sequence[str] = PROGRAMS, *, sample_batch: int = DEFAULT_SAMPLE_BATCH,
           inception_batch: int = DEFAULT_INCEPTION_BATCH, hlo_dir: str | None = None,
           on_program: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Compile ``names`` of ``config`` over ``devices`` one at a time; each one's figures (also
    handed to ``on_program`` as soon as it is compiled); ``hlo_dir`` as in
    ``compile_and_analyse``."""
    mesh = data_mesh(devices)
    results = []
    for program in build_programs(config, mesh, names, sample_batch=sample_batch,
                                  inception_batch=inception_batch):
        results.append(compile_and_analyse(program, mesh, hlo_dir))
        if on_program:
            on_program(results[-1])
    return results


# ----------------------------------------------------------------------------------------------
# Devices: local, or the compile-only devices of a TPU topology.
# ----------------------------------------------------------------------------------------------
def libtpu_version() -> str | None:
    """The installed libtpu's version (XLA's TPU compiler), or None."""
    from importlib import metadata

    for name in ("libtpu", "libtpu-nightly"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return None


def topology_devices(name: str) -> list[jax.Device]:
    """The compile-only devices of TPU topology ``name`` ("v5e:2x4", "v4:2x2x2", "v5p:2x2x1",
    "v6e:2x4"), one per chip (TPU v4 chips as megacore, as JAX runs a v4 VM). Needs libtpu;
    call before anything else touches JAX's backends (the host's own devices stay CPU)."""
    import importlib.util
    import os

    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(
            f"--topology={name} needs libtpu, XLA's TPU compiler (it runs on any CPU host): "
            f'pip install "jax[tpu]=={jax.__version__}" in a separate venv (about 700 MB; keep '
            "it out of the environment you train in) and run this with that venv's python."
        )
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask off a TPU VM
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other libtpu processes may run
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if name.startswith("v4:") else {}
    try:
        return list(topologies.get_topology_desc(name, "tpu", **kwargs).devices)
    except Exception as e:  # libtpu's own message names the problem
        raise ValueError(
            f"--topology={name!r}: {e}. Give a TPU generation and chip grid, e.g. v5e:2x4 "
            "(8 chips), v4:2x2x2, v5p:2x2x1, v6e:2x2."
        ) from None


# ----------------------------------------------------------------------------------------------
# Text, JSON and markdown.
# ----------------------------------------------------------------------------------------------
def run_metadata(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                 topology: str | None) -> dict[str, Any]:
    """What a report was compiled for: the config's salient fields, devices, versions."""
    chip = chip_of(devices[0])
    return {
        "date": time.strftime("%Y-%m-%d"),
        "topology": topology,
        "num_devices": len(devices),
        "num_chips": _num_chips(devices),
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "chip": dataclasses.asdict(chip) if chip else None,
        "jax": jax.__version__,
        "libtpu": libtpu_version() if topology or devices[0].platform == "tpu" else None,
        "batch_size": config.data.batch_size,
        "image_size": config.data.image_size,
        "dtype": config.model.get("dtype", "float32"),
        "remat": config.model.get("remat"),
        "clip_groups": config.optim.get("clip_groups", 1),
        "steps_per_dispatch": config.train.steps_per_dispatch,
    }


def _gib(n: float) -> str:
    return f"{n / GiB:.3g} GiB"


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _collective_text(part: dict[str, Any]) -> str:
    items = [f"{kind} {n} ({_size(part['bytes'][kind])})"
             for kind, n in part["counts"].items() if n]
    return ", ".join(items) or "none"


def main_loop_collectives(result: dict[str, Any]) -> dict[str, Any] | None:
    """The collectives of the program's main loop body (the sampler's step, a step of a
    multi-step dispatch), or None when the program has no such loop."""
    loops = result["collectives"]["loops"]
    return loops[0] if loops and loops[0]["network_ops"] else None


def format_program(result: dict[str, Any]) -> str:
    """One program's figures as indented text lines."""
    is_train = result["program"] == "train"
    call = "step" if is_train else "network call"
    images = result["images_per_device"]
    mem = result["memory"]
    lines = [f"[{result['program']}] {result['description']} ({images:g} images/device)",
             f"  compile       {result['compile_s']:.1f} s"]
    fits = ""
    if "hbm_headroom" in mem:
        fits = (f"; by the larger, {100 * mem['hbm_headroom']:.0f}% headroom in the chip's "
                f"{_gib(result['chip']['hbm_bytes'])} HBM")
    lines.append(
        f"  memory/device arguments {_gib(mem['argument_bytes'])}, outputs "
        f"{_gib(mem['output_bytes'])} ({_gib(mem['alias_bytes'])} aliased to arguments), "
        f"temporaries {_gib(mem['temp_bytes'])}, code {_gib(mem['generated_code_bytes'])}; "
        f"total {_gib(mem['total_bytes'])}, XLA's peak {_gib(mem['xla_peak_bytes'] or 0)}"
        f"{fits}")
    accessed = result.get("bytes_accessed_per_call", result["hbm_bytes_per_call"])
    spaces = ("" if accessed == result["hbm_bytes_per_call"] else
              f" (memory space 0 of the HLO; XLA's bytes accessed, all memory spaces: "
              f"{_size(accessed)})")
    lines.append(
        f"  per {call:<10}{result['flops_per_call'] / 1e9:.4g} GFLOP, "
        f"{_size(result['hbm_bytes_per_call'])} HBM accessed per device{spaces} "
        f"(XLA counted {result['counted_calls']} of {result['calls_per_dispatch']} per dispatch)")
    analytic = result.get("analytic_flops_per_image")
    per_image = f"  per image     {result['flops_per_image'] / 1e9:.4g} GFLOP"
    if analytic:
        what = "3 x forward" if is_train else "forward" + (
            " x 2" if result["program"] == "sample_guided" else "")
        per_image += (f" (analytic {what}: {analytic / 1e9:.4g} GFLOP; compiled/analytic "
                      f"{result['flops_per_image'] / analytic:.3f})")
    lines.append(per_image + f", {_size(result['hbm_bytes_per_image'])} HBM")
    loop = main_loop_collectives(result)
    whole = _collective_text(result["collectives"])
    if loop is None:
        lines.append(f"  collectives   per {call}: {whole}")
    else:
        trips = loop["trip_count"] or "?"
        lines.append(f"  collectives   in the loop body (per {call}, x{trips}): "
                     f"{_collective_text(loop)}; whole program (body once): {whole}")
    roof = result.get("roofline")
    if roof and roof["images_per_s_bound"]:
        rate = (f"{roof['images_per_s_bound']:,.0f} images/s" if is_train or
                result["program"] == "inception" else
                f"{roof['images_per_s_bound']:,.0f} image-steps/s = "
                f"{roof.get('chain_images_per_s_bound', roof['images_per_s_bound']):,.1f} "
                f"images/s for the {result['calls_per_dispatch']}-step chain")
        lines.append(
            f"  roofline      BOUND, not a measurement: <= {rate} ({roof['bound_by']}-bound: "
            f"{1e3 * roof['memory_s']:.3g} ms memory vs {1e3 * roof['compute_s']:.3g} ms compute "
            f"per {call} at peak bf16)")
    return "\n".join(lines)


def format_header(meta: dict[str, Any], config_name: str) -> str:
    where = (f"compile-only TPU topology {meta['topology']}" if meta["topology"]
             else "local devices")
    chip = meta["chip"]
    chip_text = (f"chip {chip['name']}: {_gib(chip['hbm_bytes'])} HBM, "
                 f"{chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
                 f"{chip['hbm_bytes_per_s'] / 1e9:,.0f} GB/s" if chip
                 else "no chip figures for this device kind (no headroom, no roofline)")
    versions = f"jax {meta['jax']}" + (f", libtpu {meta['libtpu']}" if meta["libtpu"] else "")
    return "\n".join([
        f"ddpm_jax compile report: {config_name} (batch {meta['batch_size']}, "
        f"{meta['image_size']}x{meta['image_size']}, {meta['dtype']}, remat {meta['remat']}, "
        f"clip_groups {meta['clip_groups']}, {meta['steps_per_dispatch']} step(s)/dispatch)",
        f"devices: {meta['num_devices']} x {meta['device_kind']} ({meta['platform']}, {where}, "
        f"{meta['num_chips']} chips); {chip_text}",
        f"{versions}; figures are per device; a roofline is a bound, not a measurement",
    ])


MARKDOWN_HEADER = (
    "| date | devices | jax / libtpu | config | dtype, remat | batch (per device) | program | "
    "GFLOP/image compiled (analytic) | HBM MB/image (XLA's bytes accessed) | args / temps / peak GiB per device "
    "(headroom) | collectives per step or call | roofline BOUND images/s | compile s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown_row(report_json: dict[str, Any], result: dict[str, Any]) -> str:
    """One RESULTS.md table row (``MARKDOWN_HEADER``'s columns) of one program of a report."""
    meta = report_json["meta"]
    devices = (f"{meta['topology']} ({meta['num_chips']} x {meta['device_kind']}, compile-only)"
               if meta["topology"] else f"{meta['num_devices']} x {meta['device_kind']}")
    versions = meta["jax"] + (f" / {meta['libtpu']}" if meta["libtpu"] else "")
    mem = result["memory"]
    headroom = f" ({100 * mem['hbm_headroom']:.0f}%)" if "hbm_headroom" in mem else ""
    analytic = result.get("analytic_flops_per_image")
    flops = f"{result['flops_per_image'] / 1e9:.4g}" + (
        f" ({analytic / 1e9:.4g})" if analytic else "")
    loop = main_loop_collectives(result)
    coll = _collective_text(loop if loop is not None else result["collectives"])
    roof = result.get("roofline") or {}
    bound = roof.get("chain_images_per_s_bound", roof.get("images_per_s_bound"))
    bound_text = f"{bound:,.1f} ({roof['bound_by']})" if bound else "-"
    if result["program"].startswith("sample") and bound:
        bound_text += f", {result['calls_per_dispatch']}-step chain"
    images = result["images_per_device"]
    cells = [
        meta["date"], devices, versions, report_json["config"],
        f"{meta['dtype']}, {meta['remat'] or 'no remat'}",
        f"{result['images_per_call']} ({result['images_per_device']:g})",
        result["program"], flops, f"{result['hbm_bytes_per_image'] / 1e6:.4g} ("
        f"{result.get('bytes_accessed_per_call', result['hbm_bytes_per_call']) / images / 1e6:.4g})",
        f"{mem['argument_bytes'] / GiB:.2f} / {mem['temp_bytes'] / GiB:.2f} / "
        f"{mem['peak_bytes'] / GiB:.2f}{headroom}",
        coll, bound_text, f"{result['compile_s']:.0f}",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"

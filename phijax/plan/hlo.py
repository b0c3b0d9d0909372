"""What a compiled program does per step, read from its optimized HLO text: the collectives
(with their bytes and the mesh axes they run over), its custom calls (kernels) and an estimate
of the HBM traffic.

XLA's own `cost_analysis()` counts the body of a loop once; the train step runs its layers
under `lax.scan` (and microbatches under another), so here every computation is weighted by
how often it runs: a while body by its trip count (XLA's `known_trip_count`, else the constant
its condition compares the counter with), times the weight of the computation that runs it.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

ITEMSIZE = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
            "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
            "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1,
            "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1}
ARRAY = re.compile(r"\b(" + "|".join(sorted(ITEMSIZE, key=len, reverse=True)) + r")\[([0-9,]*)\]")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")
# Ops that move no HBM bytes of their own (their cost is in what they call, or nothing).
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
        "call", "after-all", "partition-id", "replica-id", "copy-start", "copy-done",
        "opt-barrier", "add-dependency", "domain"}
CALLS = re.compile(r"\b(condition|body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
CALL_LISTS = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")


@dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    args: str = ""  # the text between the parentheses: a parameter's index, a constant


@dataclass
class Computation:
    name: str
    instrs: list[Instr] = field(default_factory=list)
    root: Instr | None = None

    def get(self, name: str) -> Instr | None:
        if not hasattr(self, "_by_name"):
            self._by_name = {i.name: i for i in self.instrs}
        return self._by_name.get(name)


def array_bytes(shape: str) -> list[float]:
    return [ITEMSIZE[t] * math.prod(int(d) for d in dims.split(",") if d)
            for t, dims in ARRAY.findall(shape)]


def _closing(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return len(text) - 1


def _instruction(line: str) -> tuple[Instr, bool] | None:
    m = re.match(r"\s+(ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end():]
    end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _closing(rest, op.end() - 1)
    operands = re.findall(r"%([\w.\-]+)", rest[op.end():close])
    args = rest[op.end():close]
    return Instr(m.group(2), shape, op.group(1), operands, rest[close + 1:], args), bool(m.group(1))


STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def _lines(text: str):
    """The lines of HLO text, an instruction whose attributes span several lines (a Pallas
    kernel's metadata) joined into one."""
    pending, depth = "", 0
    for line in text.splitlines():
        if not pending and (not line or not line[0].isspace()):
            yield line  # a computation's header or its closing brace
            continue
        pending = f"{pending} {line}" if pending else line
        bare = STRING.sub("", line) if '"' in line else line
        depth += bare.count("{") - bare.count("}")
        if depth <= 0:
            yield pending
            pending, depth = "", 0
    if pending:
        yield pending


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """Computations by name, and the entry computation's name."""
    comps: dict[str, Computation] = {}
    entry, current = "", None
    for line in _lines(text):
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            m = re.match(r"(ENTRY\s+)?%?([\w.\-]+)", line)
            if m and m.group(2) != "HloModule":
                current = comps.setdefault(m.group(2), Computation(m.group(2)))
                entry = m.group(2) if m.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
        elif current is not None:
            parsed = _instruction(line)
            if parsed:
                current.instrs.append(parsed[0])
                if parsed[1]:
                    current.root = parsed[0]
    return comps, entry


def trip_count(while_op: Instr, comps: dict[str, Computation]) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_op.attrs)
    if m:
        return int(m.group(1))
    cond = comps.get((re.search(r"condition=%?([\w.\-]+)", while_op.attrs) or [None, ""])[1])
    root = cond.root if cond else None
    if not root or root.opcode != "compare" or len(root.operands) != 2:
        return None
    direction = (re.search(r"direction=(\w+)", root.attrs) or [None, ""])[1]
    index = {"LT": 1, "GT": 0}.get(direction)
    bound = cond.get(root.operands[index]) if index is not None else None
    if bound is None or bound.opcode != "constant":
        return None
    return int(bound.args) if re.fullmatch(r"-?\d+", bound.args.strip()) else None


def _edges(comp: Computation, comps: dict[str, Computation], once: bool):
    """(callee, factor, kind) for every computation `comp` calls; kind: control, fused, apply.
    `once`: every loop body counted once, as XLA's cost analysis does."""
    for ins in comp.instrs:
        trips = trip_count(ins, comps) if ins.opcode == "while" and not once else 1
        for attr, callee in CALLS.findall(ins.attrs):
            if attr == "to_apply":
                yield callee, 1, "apply"
            elif ins.opcode == "fusion":
                yield callee, 1, "fused"
            else:
                yield callee, (trips or 1) if attr == "body" else 1, "control"
        for _, names in CALL_LISTS.findall(ins.attrs):
            for callee in re.findall(r"%?([\w.\-]+)", names):
                yield callee, 1, "control"


def weights(comps: dict[str, Computation], entry: str,
            once: bool = False) -> tuple[dict[str, float], set[str], int]:
    """How many times each computation runs per step, the computations run as control flow
    (entry, loop bodies, branches: their ops touch HBM), and how many loops had no known trip
    count (counted once)."""
    edges = {name: Counter(_edges(c, comps, once)) for name, c in comps.items()}
    unknown = sum(1 for c in comps.values() for i in c.instrs
                  if i.opcode == "while" and trip_count(i, comps) is None)
    mult: dict[str, float] = defaultdict(float)
    control = {entry}

    def visit(name: str, m: float, depth: int = 0) -> None:
        mult[name] += m
        if depth > 64:
            return
        for (callee, factor, kind), n in edges.get(name, {}).items():
            if callee in comps:
                if kind == "control" and name in control:
                    control.add(callee)
                visit(callee, m * factor * n, depth + 1)

    visit(entry, 1.0)
    return dict(mult), control, unknown


def first_group(attrs: str) -> list[int] | None:
    """Device ids of the first replica group (or the devices of the first permute pairs); []
    for one group of every device, None where the groups could not be read."""
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs):
        sizes = [(a, int(s)) for a, s in re.findall(r"'([^']+)'=(\d+)", m.group(1))]
        varying = set(re.findall(r"'([^']+)'", m.group(2)))
        ids = np.arange(math.prod(s for _, s in sizes)).reshape([s for _, s in sizes])
        return ids[tuple(slice(None) if a in varying else 0 for a, _ in sizes)].ravel().tolist()
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs):
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(p) for p in m.group(4).split(",")])
        return ids.reshape(int(m.group(1)), int(m.group(2)))[0].tolist()
    if m := re.search(r"(?:replica_groups|source_target_pairs)=\{\{([\d,]+)\}", attrs):
        return [int(i) for i in m.group(1).split(",")]
    return [] if re.search(r"replica_groups=\{\}", attrs) else None


def mesh_axes(ids: list[int] | None, mesh_shape: dict[str, int]) -> str:
    """The mesh axes a group of device ids spans: `fsdp`, `data+fsdp`, or `all`/`?`."""
    if not ids:
        return "all" if ids is not None else "?"
    shape = list(mesh_shape.values())
    if max(ids) >= math.prod(shape):
        return "?"
    coords = np.array(np.unravel_index(ids, shape)).T
    names = [a for k, a in enumerate(mesh_shape) if len(set(coords[:, k])) > 1]
    return "+".join(names) or "none"


def _wire_bytes(op: str, result: float, n: int) -> float:
    """Bytes one device sends for a ring implementation of `op` over `n` devices."""
    if n <= 1:
        return 0.0
    return {"all-gather": result * (n - 1) / n, "reduce-scatter": result * (n - 1),
            "all-reduce": 2 * result * (n - 1) / n, "all-to-all": result * (n - 1) / n,
            "ragged-all-to-all": result * (n - 1) / n}.get(op, result)


def collectives(comps, mult, mesh_shape: dict[str, int], devices: int) -> list[dict]:
    """Per (op, mesh axes): executions per step, result bytes and bytes sent per device."""
    rows: dict[tuple, dict] = {}
    for name, comp in comps.items():
        for ins in comp.instrs:
            op = ins.opcode.removesuffix("-start")
            if op not in COLLECTIVES or mult.get(name, 0) == 0:
                continue
            sizes = array_bytes(ins.shape)
            result = sum(sizes) if op == "all-reduce" or not ins.opcode.endswith("-start") \
                else max(sizes, default=0)
            ids = first_group(ins.attrs)
            n = len(set(ids)) if ids else devices
            axes = mesh_axes(ids, mesh_shape)
            row = rows.setdefault((op, axes), {"op": op, "axes": axes, "count": 0,
                                               "result_bytes": 0.0, "wire_bytes": 0.0})
            row["count"] += mult[name]
            row["result_bytes"] += mult[name] * result
            row["wire_bytes"] += mult[name] * _wire_bytes(op, result, n)
    return sorted(rows.values(), key=lambda r: -r["wire_bytes"])


def custom_calls(comps, mult) -> dict[str, float]:
    """Executions per step of each custom-call target (e.g. `tpu_custom_call`: a Pallas
    kernel such as splash attention)."""
    counts: dict[str, float] = defaultdict(float)
    for name, comp in comps.items():
        for ins in comp.instrs:
            target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
            if ins.opcode == "custom-call" and target and mult.get(name, 0):
                counts[target.group(1)] += mult[name]
    return dict(counts)


def _param_reads(fused: Computation) -> dict[int, float | None]:
    """Per fused parameter: the bytes actually read when every use is a dynamic-slice (or the
    in-place buffer of a dynamic-update-slice: 0); None where the whole operand is read."""
    users: dict[str, list[tuple[int, Instr]]] = defaultdict(list)
    for ins in fused.instrs:
        for i, operand in enumerate(ins.operands):
            users[operand].append((i, ins))
    out: dict[int, float | None] = {}
    for ins in fused.instrs:
        if ins.opcode != "parameter" or not ins.args.strip().isdigit():
            continue
        uses = users.get(ins.name, [])
        if uses and all(u.opcode == "dynamic-slice" and i == 0 for i, u in uses):
            out[int(ins.args)] = sum(sum(array_bytes(u.shape)) for _, u in uses)
        elif uses and all(u.opcode == "dynamic-update-slice" and i == 0 for i, u in uses):
            out[int(ins.args)] = 0.0
        else:
            out[int(ins.args)] = None
    return out


def _fused(ins: Instr, comps) -> Computation | None:
    m = re.search(r"calls=%?([\w.\-]+)", ins.attrs) if ins.opcode == "fusion" else None
    return comps.get(m.group(1)) if m else None


def _written(ins: Instr, comp: Computation, fused: Computation | None) -> float:
    """Bytes an instruction writes: the update of an in-place dynamic-update-slice, else its
    whole result."""
    owner, root = (fused, fused.root) if fused and fused.root else (comp, ins)
    parts = [owner.get(o) for o in root.operands] if owner is fused and \
        root.opcode == "tuple" else [root]
    total = 0.0
    for part in filter(None, parts):
        update = owner.get(part.operands[1]) if part.opcode == "dynamic-update-slice" and \
            len(part.operands) > 1 else None
        total += sum(array_bytes((update or part).shape))
    return total


def _instruction_bytes(ins: Instr, comp: Computation, comps) -> float:
    if ins.opcode in FREE or ins.opcode.endswith("-done"):
        return 0.0
    if ins.opcode in ("dynamic-slice", "dynamic-update-slice"):
        return 2 * _written(ins, comp, None)
    fused = _fused(ins, comps)
    reads = _param_reads(fused) if fused else {}
    total = _written(ins, comp, fused)
    for i, name in enumerate(ins.operands):
        operand = comp.get(name)
        if operand is not None:
            read = reads.get(i)
            total += read if read is not None else sum(array_bytes(operand.shape))
    return total


def hbm_bytes(comps, mult, control: set[str]) -> float:
    """HBM bytes per step: every op of a control computation reads its operands and writes its
    result (fusions internally stay on chip), a dynamic slice reading only its slice."""
    return sum(mult.get(name, 0) * sum(_instruction_bytes(i, comps[name], comps)
                                       for i in comps[name].instrs)
               for name in control if name in comps)


def analyze(text: str, mesh_shape: dict[str, int], devices: int) -> dict:
    """Collectives per step, and `loop_factor`: HBM traffic per step over the traffic with every
    loop body counted once (what XLA's `bytes accessed` counts), from the ops' operand and
    result sizes."""
    comps, entry = parse_module(text)
    mult, control, unknown = weights(comps, entry)
    once, _, _ = weights(comps, entry, once=True)
    per_step, per_pass = hbm_bytes(comps, mult, control), hbm_bytes(comps, once, control)
    return {"collectives": collectives(comps, mult, mesh_shape, devices),
            "custom_calls": custom_calls(comps, mult),
            "loop_factor": per_step / per_pass if per_pass else 1.0,
            "loops_of_unknown_length": unknown,
            "loop_trips": sorted({int(mult[n]) for n in control if mult.get(n, 0) > 1})}

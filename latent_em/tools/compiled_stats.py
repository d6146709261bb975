"""What a compiled XLA program needs per device: memory, FLOPs and collectives.

Used by the fit check (`tools/preflight.py`) on programs compiled ahead of time, for real devices
or for a TPU topology without hardware. All numbers are per device (the compiled program is the
SPMD-partitioned one that every device runs).
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "s4": 0.5, "u4": 0.5}


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes of one compiled program (`compiled.memory_analysis()`)."""
  arguments: int       # inputs, resident for the whole call (parameters, optimizer state, batch)
  outputs: int
  aliased: int         # outputs written in place of donated arguments
  temporaries: int     # XLA's one block for every intermediate buffer
  code: int            # the program itself (it lives in device memory too)

  @property
  def total(self) -> int:
    """What the runtime allocates: arguments, non-aliased outputs, temporaries and code."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  @classmethod
  def of(cls, compiled) -> "Memory":
    m = compiled.memory_analysis()
    if m is None:
      raise ValueError("this backend gives no memory analysis of compiled programs")
    return cls(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
               aliased=int(m.alias_size_in_bytes), temporaries=int(m.temp_size_in_bytes),
               code=int(m.generated_code_size_in_bytes))


def flops(compiled) -> float:
  """Per-device FLOPs of one call by XLA's cost model.

  A while loop's body (a scanned layer stack, a decode loop) is counted once, whatever its trip
  count: compare against analytic counts on programs without loops.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
    cost = cost[0]
  return float(cost.get("flops", 0.0)) if cost else 0.0


# ----------------------------------------------------------------------------- HLO collectives

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_OP = re.compile(r"^(\(.*?\)|\S+)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
                    r"=%([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r"known_trip_count\W+n\W+(\d+)")


def _array_bytes(shape: str) -> list[float]:
  out = []
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _DTYPE_BYTES:
      continue
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    out.append(n * _DTYPE_BYTES[dtype])
  return out


@dataclasses.dataclass
class _Computation:
  name: str
  entry: bool
  lines: list[str] = dataclasses.field(default_factory=list)


def _computations(hlo_text: str) -> list[_Computation]:
  comps, current = [], None
  for line in hlo_text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m:
        current = _Computation(m.group(2), bool(m.group(1)))
    elif line.strip() == "}":
      comps.append(current)
      current = None
    else:
      current.lines.append(line)
  return comps


def _trip_count(cond: _Computation | None) -> int | None:
  """Trip count of a counted loop from its condition: `i < constant(N)` (scans, fori_loops, and
  the loops XLA writes itself, e.g. windowed matmuls over a sharded axis with u32 counters)."""
  if cond is None:
    return None
  constants = {}
  for line in cond.lines:
    m = _INSTR.match(line)
    if m:
      c = re.match(r"^[su](?:8|16|32|64)\[\]\S*\s+constant\((-?\d+)\)", m.group(2))
      if c:
        constants[m.group(1)] = int(c.group(1))
  for line in cond.lines:
    if "compare(" in line and "direction=LT" in line:
      args = re.search(r"compare\(%([\w.\-]+),\s*%([\w.\-]+)\)", line)
      if args and args.group(2) in constants:
        return constants[args.group(2)]
  return None


def _executions(comps: list[_Computation]) -> tuple[dict[str, float], list[str]]:
  """How many times each computation runs per call of the entry (loops at their trip count),
  and the names of loops whose trip count could not be read (counted once)."""
  by_name = {c.name: c for c in comps}
  edges: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
  unknown = []
  for c in comps:
    for line in c.lines:
      m = _INSTR.match(line)
      if not m:
        continue
      rest = m.group(2)
      body = re.search(r"\bbody=%([\w.\-]+)", rest)
      if " while(" in rest and body:
        known = _TRIP.search(rest)
        cond = re.search(r"\bcondition=%([\w.\-]+)", rest)
        trips = (int(known.group(1)) if known
                 else _trip_count(by_name.get(cond.group(1)) if cond else None))
        if trips is None:
          unknown.append(m.group(1))
          trips = 1
        edges[c.name].append((body.group(1), trips))
        if cond:
          edges[c.name].append((cond.group(1), trips + 1))
        continue
      for callee in _CALLS.findall(rest):
        edges[c.name].append((callee, 1))
      for group in _CALL_LISTS.findall(rest):
        for callee in re.findall(r"%([\w.\-]+)", group):
          edges[c.name].append((callee, 1))
  runs: dict[str, float] = collections.defaultdict(float)
  for c in comps:
    if c.entry:
      runs[c.name] = 1
  # Callees are printed before their callers: walking backwards visits every caller first.
  for c in reversed(comps):
    for callee, mult in edges.get(c.name, ()):
      runs[callee] += runs[c.name] * mult
  return dict(runs), unknown


@dataclasses.dataclass(frozen=True)
class Collectives:
  """Collectives per call of a program, by kind: count and bytes of their per-device results."""
  count: dict[str, float]
  bytes: dict[str, float]
  unknown_loops: int  # while loops whose trip count was not readable (counted once)

  def to_json(self) -> dict[str, Any]:
    return {"count": self.count, "bytes": self.bytes, "unknown_loops": self.unknown_loops}


def collectives(hlo_text: str) -> Collectives:
  """Counts the collectives of an optimized HLO module per call, loops included.

  One collective of the partitioned program may be split by the backend into several pieces
  that keep its channel id (TPU's asynchronous collective fusions): pieces of one channel count
  once, with their largest result. Results of `-start` ops are (operand, result[, context])
  tuples: the largest array is the result.
  """
  comps = _computations(hlo_text)
  runs, unknown = _executions(comps)
  found: dict[tuple, tuple[str, float, float]] = {}
  for c in comps:
    for line in c.lines:
      m = _INSTR.match(line)
      if not m:
        continue
      op = _OP.match(m.group(2))
      if not op:
        continue
      kind = op.group(2)
      started = kind.endswith("-start")
      kind = kind[:-len("-start")] if started else kind
      if kind not in COLLECTIVES:
        continue
      sizes = _array_bytes(op.group(1))
      size = (max(sizes) if started else sum(sizes)) if sizes else 0.0
      channel = re.search(r"\bchannel_id=(\d+)", op.group(3))
      key = (kind, channel.group(1)) if channel else (kind, c.name, m.group(1))
      n = runs.get(c.name, 0.0)
      _, old_n, old_size = found.get(key, (kind, 0.0, 0.0))
      found[key] = (kind, max(n, old_n), max(size, old_size))
  count: dict[str, float] = collections.defaultdict(float)
  total: dict[str, float] = collections.defaultdict(float)
  for kind, n, size in found.values():
    count[kind] += n
    total[kind] += n * size
  return Collectives(dict(count), dict(total), len(unknown))

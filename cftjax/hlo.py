"""Reading an optimised XLA HLO module (the text of `compiled.as_text()`): its computations, how many
times each runs per execution of the program (while loops weighted by their trip counts), its
collectives (kind, bytes per device, runs per step), the HBM bytes a computation's ops move
(`hbm_bytes`), and the time its ops take in their schedule by the TPU compiler's own per-op cycle
estimates (`scheduled_seconds`, over a whole program `program_seconds`).

Standard library only, so the side-by-side benchmarks can census MaxText's and tunix's programs in
their own virtual environments with the same code (`benchmarks/peers/tpu_aot_common.py`).

Bytes of a collective are per device, of the array it moves as the optimised HLO prints it: the
gathered result of an all-gather, the input of a reduce-scatter, the array of an all-reduce, the
result of an all-to-all or collective-permute. An async pair (`*-start` / `*-done`) counts once. The TPU
compiler's fused reduce-scatter (a kCustom fusion of an all-reduce and a slice) counts as a
reduce-scatter. The TPU compiler's async collective fusions print one collective several times, with
one channel and chain id: in the computation that starts it (root: custom-call AsyncCollectiveStart),
in each compute fusion that carries it while it is in flight (such fusions may sit in a loop), and in
the one that ends it (AsyncCollectiveDone); it counts once, where it starts.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Iterable, Sequence

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all",
                    "collective-permute", "collective-broadcast")

_DTYPE_BYTES = {
    "pred": 1.0, "s4": 0.5, "u4": 0.5, "s8": 1.0, "u8": 1.0, "s16": 2.0, "u16": 2.0, "s32": 4.0,
    "u32": 4.0, "s64": 8.0, "u64": 8.0, "f16": 2.0, "bf16": 2.0, "f32": 4.0, "f64": 8.0, "c64": 8.0,
    "c128": 16.0, "f8e4m3fn": 1.0, "f8e5m2": 1.0, "f8e4m3b11fnuz": 1.0, "f8e4m3fnuz": 1.0,
    "f8e5m2fnuz": 1.0,
}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]"
                    r"(\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_CALLEE_KEYS = ("calls", "to_apply", "true_computation", "false_computation", "branch_computations")


@dataclasses.dataclass(frozen=True)
class Array:
  dtype: str
  shape: tuple[int, ...]
  memory_space: int = 0  # the layout's S(n): 0 = device memory (HBM); on TPU 1 = VMEM, 2 = SMEM

  @property
  def bytes(self) -> int:
    return int(math.prod(self.shape) * _DTYPE_BYTES[self.dtype])


@dataclasses.dataclass(frozen=True)
class Instruction:
  computation: str
  name: str
  opcode: str
  result: tuple[Array, ...]  # the arrays of the result type (a tuple type lists several)
  operands: tuple[Array, ...]  # the arrays written in the operand list (typed operands only)
  text: str  # the rest of the line after the opcode's "("
  operand_names: tuple[str, ...] = ()  # the instructions it reads, in operand order
  is_root: bool = False


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str  # one of COLLECTIVE_KINDS
  name: str
  computation: str
  arrays: tuple[Array, ...]  # the arrays it moves (see the module docstring)
  runs: int  # executions per step (product of the enclosing while loops' trip counts)

  @property
  def bytes(self) -> int:
    return sum(a.bytes for a in self.arrays)

  @property
  def bytes_per_step(self) -> int:
    return self.bytes * self.runs


@dataclasses.dataclass(frozen=True)
class Module:
  entry: str
  computations: dict[str, list[Instruction]]


def arrays_in(text: str) -> tuple[Array, ...]:
  """Every array type written in `text`, e.g. "(bf16[2,3]{1,0}, f32[2]{0:S(1)})" -> two Arrays, the
  second in memory space 1."""
  arrays = []
  for dtype, dims, layout in _ARRAY.findall(text):
    space = _MEMORY_SPACE.search(layout)
    arrays.append(Array(dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1)) if space else 0))
  return tuple(arrays)


def _operand_list(rest: str) -> str:
  """The operand list of an instruction: `rest` (the text after the opcode's "(") up to its ")"."""
  depth = 0
  for i, char in enumerate(rest):
    if char == "(":
      depth += 1
    elif char == ")":
      if depth == 0:
        return rest[:i]
      depth -= 1
  return rest


def parse(hlo_text: str) -> Module:
  """The computations of an HLO module's text, each a list of its instructions."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    line = line.strip()
    if current is None:
      header = _HEADER.match(line)
      if header and not line.startswith("HloModule"):
        current = header.group(2)
        computations[current] = []
        entry = current if header.group(1) else entry
      continue
    if line == "}":
      current = None
      continue
    match = _INSTRUCTION.match(line)
    if match:
      name, result_type, opcode, rest = match.groups()
      operand_text = _operand_list(rest)
      computations[current].append(Instruction(
          current, name, opcode, arrays_in(result_type), arrays_in(operand_text), rest,
          tuple(re.findall(r"%([\w.\-]+)", operand_text)), line.startswith("ROOT")))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text: pass `compiled.as_text()` of a compiled program")
  return Module(entry, computations)


def _known_trip_count(instruction: Instruction) -> int | None:
  match = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', instruction.text)
  return int(match.group(1)) if match else None


def _condition_trip_count(condition: list[Instruction]) -> int | None:
  """N of a loop condition `i < N` (or `N > i`, `i <= N - 1`, ...) on a counter starting at 0."""
  constants = {}
  for instruction in condition:
    match = re.match(r"^(-?\d+)\)", instruction.text)
    if instruction.opcode == "constant" and match and instruction.result and not instruction.result[0].shape:
      constants[instruction.name] = int(match.group(1))
  for instruction in condition:
    if instruction.opcode != "compare":
      continue
    operands = re.findall(r"%([\w.\-]+)", instruction.text.split(")", 1)[0])
    direction = re.search(r"direction=(\w+)", instruction.text)
    direction = direction.group(1) if direction else "LT"
    for position, operand in enumerate(operands):
      if operand in constants:
        bound = constants[operand]
        inclusive = (direction, position) in (("LE", 1), ("GE", 0))
        return bound + 1 if inclusive else bound
  return None


def _callees(instruction: Instruction, key: str) -> list[str]:
  """The computations `instruction` names after `key=` (e.g. "body", "calls", "to_apply"; a
  `branch_computations={%a, %b}` list gives both)."""
  return [name for group in re.findall(key + r"=(\{[^}]*\}|%?[\w.\-]+)", instruction.text)
          for name in re.findall(r"%?([\w.\-]+)", group)]


def runs_per_execution(module: Module) -> dict[str, int]:
  """How many times each computation runs per execution of the entry computation: a while body
  runs trip-count times per run of its caller (from the compiler's known_trip_count, else the loop
  condition's bound; 1 when neither is known), a called computation (fusion, call, conditional
  branch: each branch counted as taken) once per run of its caller."""
  edges: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
  for name, instructions in module.computations.items():
    for instruction in instructions:
      if instruction.opcode == "while":
        conditions = _callees(instruction, "condition")
        trips = _known_trip_count(instruction)
        if trips is None and conditions:
          trips = _condition_trip_count(module.computations.get(conditions[0], []))
        trips = 1 if trips is None else trips
        edges[name] += [(body, trips) for body in _callees(instruction, "body")]
        edges[name] += [(condition, trips + 1) for condition in conditions]
        continue
      edges[name] += [(callee, 1) for key in _CALLEE_KEYS for callee in _callees(instruction, key)
                      if callee in module.computations]
  order, seen = [], set()

  def visit(name: str) -> None:  # post-order over the call graph (a DAG)
    if name in seen:
      return
    seen.add(name)
    for callee, _ in edges.get(name, ()):
      visit(callee)
    order.append(name)

  visit(module.entry)
  runs: dict[str, int] = collections.defaultdict(int)
  runs[module.entry] = 1
  for name in reversed(order):  # callers before callees
    for callee, factor in edges.get(name, ()):
      runs[callee] += runs[name] * factor
  return dict(runs)


def _moved_arrays(kind: str, instruction: Instruction, results: dict[str, tuple[Array, ...]]) -> tuple[Array, ...]:
  if kind == "reduce-scatter" and instruction.opcode == "reduce-scatter":
    # Its input; the optimised TPU HLO names operands without their types.
    return instruction.operands or tuple(a for name in instruction.operand_names for a in results.get(name, ()))
  if instruction.opcode.endswith("-start") and kind != "all-reduce":
    # (operand, result, context...) tuple: the result is the largest array.
    return (max(instruction.result, key=lambda a: a.bytes),) if instruction.result else ()
  return instruction.result


def _all_reduce_scatter_fusions(module: Module) -> set[str]:
  """Computations that the TPU compiler emits as one fused reduce-scatter: a kCustom fusion calling
  `%all-reduce-scatter.N`, whose body all-reduces the whole input and keeps this device's shard."""
  return {callee for instructions in module.computations.values() for i in instructions
          if i.opcode == "fusion" and "kind=kCustom" in i.text
          for callee in _callees(i, "calls") if callee.startswith("all-reduce-scatter")}


_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_CHAIN = re.compile(r'\bchain_id="(\d+)"')


def _async_collective_key(instruction: Instruction) -> tuple[str, str, str] | None:
  """(opcode, channel id, chain id) of a collective the TPU compiler runs as an async collective
  fusion (it names a chain id), else None."""
  channel, chain = _CHANNEL.search(instruction.text), _CHAIN.search(instruction.text)
  return (instruction.opcode, channel.group(1), chain.group(1)) if channel and chain else None


def _async_collective_starts(module: Module) -> dict[str, set[tuple[str, str, str]]]:
  """{computation rooted at an AsyncCollectiveStart custom-call: the `_async_collective_key`s of its
  collectives}: each such collective is counted there and nowhere else."""
  return {name: {key for i in instructions if (key := _async_collective_key(i))}
          for name, instructions in module.computations.items()
          if any(i.is_root and i.opcode == "custom-call" and 'custom_call_target="AsyncCollectiveStart"' in i.text
                 for i in instructions)}


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of an optimised HLO module with its executions per step. The all-reduce inside
  a fused all-reduce-scatter counts as the reduce-scatter it is (its bytes are the input's); a
  collective of an async collective fusion counts once, in the computation that starts it."""
  module = parse(hlo_text)
  runs = runs_per_execution(module)
  reduce_scatter_fusions = _all_reduce_scatter_fusions(module)
  starts = _async_collective_starts(module)
  started = set().union(*starts.values())
  found = []
  for name, instructions in module.computations.items():
    results = {i.name: i.result for i in instructions}
    for instruction in instructions:
      kind = instruction.opcode.removesuffix("-start")
      if kind not in COLLECTIVE_KINDS or instruction.opcode.endswith("-done"):
        continue
      if name not in starts and _async_collective_key(instruction) in started:
        continue  # a carrying fusion's or the done's copy of a collective counted at its start
      moved = _moved_arrays(kind, instruction, results)
      if kind == "all-reduce" and name in reduce_scatter_fusions:
        kind = "reduce-scatter"
      found.append(Collective(kind, instruction.name, name, moved, runs.get(name, 0)))
  return found


@dataclasses.dataclass(frozen=True)
class KindTotal:
  count: int  # executions per step
  bytes: int  # bytes per device per step
  instructions: int  # distinct instructions in the HLO


def totals_by_kind(found: Iterable[Collective]) -> dict[str, KindTotal]:
  """Per collective kind: executions, bytes per device per step, instructions."""
  count, nbytes, instructions = collections.Counter(), collections.Counter(), collections.Counter()
  for c in found:
    count[c.kind] += c.runs
    nbytes[c.kind] += c.bytes_per_step
    instructions[c.kind] += 1
  return {kind: KindTotal(count[kind], nbytes[kind], instructions[kind])
          for kind in COLLECTIVE_KINDS if instructions[kind]}


def _without_unit_dims(shape: Sequence[int]) -> tuple[int, ...]:
  return tuple(d for d in shape if d != 1)


def full_vocab_all_reduces(found: Iterable[Collective], vocab_size: int) -> list[Collective]:
  """All-reduces of an array with a whole-vocabulary dim (e.g. an unsharded LM-head gradient or
  full logits), which a vocab-sharded or reduce-scattered program never needs."""
  return [c for c in found if c.kind == "all-reduce" and c.runs
          and any(vocab_size in a.shape for a in c.arrays)]


def lm_head_gathers(found: Iterable[Collective], hidden_size: int, vocab_size: int,
                    vocab_shards: int = 1, tied: bool = False) -> list[Collective]:
  """All-gathers whose result is the LM head [hidden, vocab / vocab_shards] (unit dims ignored):
  the head gathered from its FSDP shards. A tied head is the embedding [vocab, hidden] too, so then
  either order counts; an untied model's [vocab, hidden] gathers are its embedding's. Sum `runs`
  for the gathers per step."""
  vocab = vocab_size // vocab_shards
  head_shapes = {(hidden_size, vocab)} | ({(vocab, hidden_size)} if tied else set())
  return [c for c in found if c.kind == "all-gather" and c.runs
          and any(_without_unit_dims(a.shape) in head_shapes for a in c.arrays)]


def count_custom_calls(hlo_text: str, target: str) -> int:
  """Custom-call instructions with `custom_call_target=target` (e.g. "tpu_custom_call": Pallas
  kernels on TPU), weighted by executions per step."""
  module = parse(hlo_text)
  runs = runs_per_execution(module)
  return sum(runs.get(name, 0) for name, instructions in module.computations.items()
             for i in instructions if i.opcode == "custom-call" and f'custom_call_target="{target}"' in i.text)


# ------------------------------------------------------------------------------------------------
# HBM traffic of a computation's ops.

# Ops that move no data themselves (a while / call / conditional: their computations count apart).
_NO_TRAFFIC = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
                         "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "domain"})
_SLICING = frozenset({"dynamic-slice", "slice", "gather"})


def _in_hbm(arrays: Iterable[Array]) -> int:
  return sum(a.bytes for a in arrays if a.memory_space == 0)


def _fusion_bytes(module: Module, instruction: Instruction, operands: Sequence[tuple[Array, ...]]) -> int:
  """HBM bytes of one fusion: each operand in HBM read whole, or only the slices taken when every use
  inside is a slice (dynamic-slice, slice, gather); the result written, or only the update when the
  root is a dynamic-update-slice into an operand (in place: that buffer is neither read nor copied)."""
  body = [i for callee in _callees(instruction, "calls") for i in module.computations.get(callee, [])]
  params = {i.name: int(re.match(r"\s*(\d+)", i.text).group(1)) for i in body if i.opcode == "parameter"}
  uses: dict[str, list[tuple[Instruction, int]]] = collections.defaultdict(list)
  for i in body:
    for position, name in enumerate(i.operand_names):
      uses[name].append((i, position))
  root = next((i for i in body if i.is_root), None)
  in_place = root.operand_names[0] if root is not None and root.opcode == "dynamic-update-slice" else None
  read = 0
  for name, index in params.items():
    arrays = operands[index] if index < len(operands) else ()
    if name == in_place or not _in_hbm(arrays):
      continue
    users = uses.get(name, [])
    if users and all(user.opcode in _SLICING and position == 0 for user, position in users):
      read += sum(a.bytes for user, _ in users for a in user.result)
    else:
      read += _in_hbm(arrays)
  if in_place is None:
    return read + _in_hbm(instruction.result)
  update = {i.name: i.result for i in body}.get(root.operand_names[1], ())
  return read + (sum(a.bytes for a in update) if _in_hbm(instruction.result) else 0)


def _instruction_bytes(module: Module, instruction: Instruction, operands: Sequence[tuple[Array, ...]]) -> int:
  """HBM bytes one run of a top-level instruction reads and writes (see `hbm_bytes`)."""
  flat = [a for arrays in operands for a in arrays]
  op, result = instruction.opcode, instruction.result
  if op in _NO_TRAFFIC or op.endswith("-done"):
    return 0
  if op == "fusion":
    return _fusion_bytes(module, instruction, operands)
  if op in ("slice-start", "copy-start"):  # results: (source, destination, context) / (destination, source, context)
    moved = result[1] if op == "slice-start" else result[0]
    return moved.bytes * ((flat[0].memory_space == 0 if flat else 0) + (moved.memory_space == 0))
  if op in ("dynamic-slice", "slice"):
    return result[0].bytes * ((flat[0].memory_space == 0 if flat else 0) + (result[0].memory_space == 0))
  if op == "dynamic-update-slice":  # in place: the update read (where in HBM) and written into the buffer
    update = flat[1] if len(flat) > 1 else None
    return update.bytes * ((update.memory_space == 0) + (result[0].memory_space == 0)) if update else 0
  written = list(result)
  if op.endswith("-start") and len(written) > len(flat):  # the result tuple repeats the operands
    for a in flat:
      if a in written:
        written.remove(a)
  return _in_hbm(flat) + _in_hbm(a for a in written if a.shape)


def hbm_bytes(module: Module, computation: str) -> list[tuple[Instruction, int]]:
  """(instruction, HBM bytes one run of it reads and writes) for the top-level instructions of
  `computation`: each reads its operands and writes its result where they are in HBM (memory space
  0; the TPU compiler's memory-space assignment puts some in VMEM, `S(1)`, which costs no HBM
  traffic), with these exceptions: an async pair counts at its start (a slice or copy moves the
  slice: read from its source, written to its destination), a slice reads only what it takes, a
  dynamic-update-slice is in place (the update read and written into the buffer), a fusion reads
  only the slices it takes of an operand it only slices and writes only the update of an in-place
  dynamic-update-slice root (`_fusion_bytes`), and tuple plumbing, bitcasts and control flow move
  nothing (the computations of a while, call or conditional are not included: census them apart)."""
  instructions = module.computations[computation]
  results = {i.name: i.result for i in instructions}
  return [(i, _instruction_bytes(module, i, [results.get(name, ()) for name in i.operand_names]))
          for i in instructions]


_ESTIMATED_CYCLES = re.compile(r'"estimated_cycles"\s*:\s*"?(\d+)')


def estimated_cycles(instruction: Instruction) -> int | None:
  """The TPU compiler's own cycle estimate of one run of an instruction (`estimated_cycles` in its
  backend config: fusions, copies, reductions), or None where it gives none (collectives, async
  copies and slices, dynamic-update-slices, custom calls)."""
  match = _ESTIMATED_CYCLES.search(instruction.text)
  return int(match.group(1)) if match else None


def scheduled_seconds(moved: Sequence[tuple[Instruction, int]], clock_hz: float, bandwidth: float) -> float:
  """Time of one run of a computation's top-level ops in their scheduled order (the optimised HLO
  prints a scheduled module in execution order), `moved` as `hbm_bytes` gives them, on one core
  and one HBM of `bandwidth` bytes/s:
  - an op the compiler prices runs for its `estimated_cycles` at `clock_hz`, or for its own HBM bytes
    at full bandwidth if that is longer;
  - an async start (a weight slice or copy prefetched into VMEM) issues a transfer of its bytes that
    moves in the HBM bandwidth the priced ops leave unused (bandwidth x their time - their own bytes),
    oldest transfer first; its `-done` waits for what is left at full bandwidth;
  - any other op it does not price (an in-place cache update, a collective in HBM) takes its bytes
    at full bandwidth, overlapping nothing.
  Interconnect time is not in it."""
  seconds, pending = 0.0, {}  # start name -> bytes not yet moved, oldest first
  for instruction, nbytes in moved:
    cycles = estimated_cycles(instruction)
    if cycles is not None:
      duration = max(cycles / clock_hz, nbytes / bandwidth)
      seconds += duration
      spare = bandwidth * duration - nbytes
      for name in list(pending):
        taken = min(spare, pending[name])
        pending[name] -= taken
        spare -= taken
        if spare <= 0:
          break
    elif instruction.opcode.endswith("-start"):
      pending[instruction.name] = float(nbytes)
    elif instruction.opcode.endswith("-done"):
      seconds += sum(pending.pop(name, 0.0) for name in instruction.operand_names) / bandwidth
    else:
      seconds += nbytes / bandwidth
  return seconds + sum(pending.values()) / bandwidth


_CONTROL_FLOW_CALLEES = {"while": ("body", "condition"), "call": ("to_apply",),
                         "conditional": ("true_computation", "false_computation", "branch_computations")}


def control_flow_computations(module: Module) -> set[str]:
  """The computations whose top-level ops run as ops (the entry, while bodies and conditions, call
  targets, conditional branches), not as the inside of a fusion, an async wrapper or a reducer."""
  found, todo = set(), [module.entry]
  while todo:
    name = todo.pop()
    if name in found or name not in module.computations:
      continue
    found.add(name)
    for instruction in module.computations[name]:
      for key in _CONTROL_FLOW_CALLEES.get(instruction.opcode, ()):
        todo.extend(_callees(instruction, key))
  return found


def program_seconds(hlo_text: str, clock_hz: float, bandwidth: float) -> float:
  """One execution of a whole program by `scheduled_seconds`: each control-flow computation's ops
  in their schedule, times its executions (`runs_per_execution`: while loops weighted by their trip
  counts, every branch of a conditional counted as taken)."""
  module = parse(hlo_text)
  runs = runs_per_execution(module)
  return sum(runs.get(name, 0) * scheduled_seconds(hbm_bytes(module, name), clock_hz, bandwidth)
             for name in sorted(control_flow_computations(module)))


def while_body(module: Module, scope: str) -> str | None:
  """The body computation of the while loop whose op_name metadata contains `scope` (a
  `jax.named_scope` around the `lax.while_loop`), or None."""
  for instructions in module.computations.values():
    for instruction in instructions:
      if instruction.opcode == "while" and scope in instruction.text:
        return next(iter(_callees(instruction, "body")), None)
  return None

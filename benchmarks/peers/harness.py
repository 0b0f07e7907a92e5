"""Benchmark plumbing shared by the drivers and every system's worker: the shape spec, step timing,
worker subprocesses with their virtual environments, and the result table. Standard library only,
plus `cftjax.host_memory` (itself standard library only), so it imports in every peer environment."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(BENCH_DIR)
VENVS = os.environ.get("CFTJAX_BENCH_VENVS", os.path.join(BENCH_DIR, ".venv"))
RESULT_PREFIX = "BENCH_RESULT "
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}  # the compute dtypes the workers accept

if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)
from cftjax import host_memory as host_memory_lib  # pylint: disable=wrong-import-position


@dataclasses.dataclass(frozen=True)
class Shapes:
  """A Qwen2-shaped decoder (QKV bias, untied head, SwiGLU, RMSNorm, RoPE) and the workload."""

  vocab: int = 8192
  hidden: int = 512
  intermediate: int = 0  # 0: Qwen2's ratio, 5.5 x hidden rounded up to a multiple of 128
  layers: int = 8
  heads: int = 8
  kv_heads: int = 2
  batch: int = 8
  seq: int = 512  # train: tokens per row; rollout: prompt length
  new_tokens: int = 128  # rollout only
  tie_embeddings: bool = False
  dtype: str = "float32"  # compute dtype; "bfloat16" on GPUs (float32 master weights where training)
  rope_theta: float = 1000000.0
  rms_norm_eps: float = 1e-6
  lr: float = 1e-4
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  warmup: int = 1  # untimed calls after the compiling one
  steps: int = 3  # timed calls
  seed: int = 0

  def __post_init__(self):
    if not self.intermediate:
      object.__setattr__(self, "intermediate", -(-self.hidden * 11 // 2 // 128) * 128)
    if self.hidden % self.heads:
      raise ValueError(f"hidden={self.hidden} is not a multiple of heads={self.heads}")

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads

  @property
  def matmul_params(self) -> int:
    """Parameters that take part in matmuls per token (all but the embedding table)."""
    d, h, k, hd, f = self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate
    layer = d * (h + 2 * k) * hd + h * hd * d + 3 * d * f
    return self.layers * layer + d * self.vocab

  @property
  def train_step_flops(self) -> float:
    """Model FLOPs of one train step over batch x seq tokens: 6 x matmul params per token (forward +
    backward) + the causal attention score and value products (2 x seq x heads x head_dim per token
    per layer forward, x 3 for training). Recomputation (remat) is not counted: MFU, not HFU."""
    attention = 6 * self.layers * self.seq * self.heads * self.head_dim
    return self.batch * self.seq * (6 * self.matmul_params + attention)

  @property
  def params(self) -> int:
    """All parameters, biases and norm scales included."""
    d, h, k, hd = self.hidden, self.heads, self.kv_heads, self.head_dim
    small = self.layers * ((h + 2 * k) * hd + 2 * d) + d
    return self.matmul_params + (0 if self.tie_embeddings else self.vocab * d) + small

  @property
  def dtype_bytes(self) -> int:
    return DTYPE_BYTES[self.dtype]

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))


def shapes_from_argv(argv: Sequence[str] | None = None) -> Shapes:
  """A worker's Shapes from its one argument, the driver's `Shapes.to_json()`."""
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    raise SystemExit(f"usage: {sys.argv[0]} SHAPES_JSON (the driver passes Shapes.to_json())")
  return Shapes(**json.loads(argv[0]))


def time_calls(call: Callable[[], object], warmup: int, steps: int) -> dict[str, object]:
  """Runs call() once (compile), `warmup` more times, then `steps` timed times; call must block
  until its work is done. Returns first-call seconds and the timed seconds of each step."""
  start = time.perf_counter()
  call()
  first = time.perf_counter() - start
  for _ in range(warmup):
    call()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return {"first_call_s": first, "step_s": times}


def emit(result: dict[str, object]) -> None:
  """Prints a worker's result line for the driver."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# Driver side.


@dataclasses.dataclass(frozen=True)
class System:
  name: str
  python: str  # interpreter of the system's own environment
  script: str  # worker script (takes Shapes JSON, prints one RESULT_PREFIX line)


def venv_python(name: str) -> str:
  python = os.path.join(VENVS, name, "bin", "python")
  if not os.path.exists(python):
    raise SystemExit(f"{python} is missing: run `bash benchmarks/setup.sh {name}` first "
                     "(or set CFTJAX_BENCH_VENVS to where the peer environments are)")
  return python


def peer_systems(workload: str) -> dict[str, Callable[[], System]]:
  """The three systems compared, each running its `peers/<system>_<workload>.py` worker."""
  return {
      "cftjax": lambda: System("cftjax", sys.executable, f"peers/cftjax_{workload}.py"),
      "transformers+torch": lambda: System("transformers+torch", venv_python("torch"),
                                           f"peers/hf_{workload}.py"),
      "tunix": lambda: System("tunix", venv_python("tunix"), f"peers/tunix_{workload}.py"),
  }


def run_worker(system: System, shapes: Shapes, timeout_s: float) -> dict[str, object]:
  """Runs one system's worker in a subprocess and returns its result (or an "error" entry)."""
  path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
  env = dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [system.python, os.path.join(BENCH_DIR, system.script), shapes.to_json()]
  try:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout_s:.0f} s"}
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
  return {"error": f"exit {proc.returncode}: " + "\n    ".join(tail)}


def load_average() -> str:
  return " ".join(f"{x:.2f}" for x in os.getloadavg())


PEAK = System("peak", sys.executable, "peers/cftjax_peak.py")  # the driver's own environment


def measure_peak(shapes: Shapes, timeout_s: float, log: Callable[[str], None] = print) -> dict:
  """This machine's dense matmul peak and read bandwidth, measured now (peers/cftjax_peak.py)."""
  peak = run_worker(PEAK, shapes, timeout_s)
  if "error" in peak:
    raise SystemExit(f"peak measurement failed: {peak['error']}")
  log(f"  peak {flops_text(peak['peak_flops'])}, read {peak['read_bandwidth'] / 1e9:.1f} GB/s "
      f"(load {load_average()})")
  return peak


def flops_text(flops: float) -> str:
  return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def run_rounds(systems: Sequence[System], shapes: Shapes, rounds: int, timeout_s: float,
               log: Callable[[str], None] = print, measure_peaks: bool = False
               ) -> tuple[dict[str, list[dict[str, object]]], list[dict]]:
  """Runs every system once per round, back to back, in the same order each round. Returns the
  results per system and, with measure_peaks, the machine's peak measured at each round's start."""
  results: dict[str, list[dict[str, object]]] = {s.name: [] for s in systems}
  peaks = []
  for r in range(rounds):
    if measure_peaks:
      log(f"[round {r + 1}/{rounds}] peak (load {load_average()}) ...")
      peaks.append(measure_peak(shapes, timeout_s, log))
    for system in systems:
      log(f"[round {r + 1}/{rounds}] {system.name} (load {load_average()}) ...")
      result = run_worker(system, shapes, timeout_s)
      result["load_average"] = load_average()
      if "error" in result:
        log(f"  {system.name} failed: {result['error']}")
      else:
        log(f"  step seconds {['%.3f' % t for t in result['step_s']]}, first call "
            f"{result['first_call_s']:.1f} s")
      results[system.name].append(result)
  return results, peaks


def median_step_s(runs: Sequence[dict[str, object]]) -> float | None:
  """Median of all timed steps of all successful rounds."""
  times = [t for run in runs if "error" not in run for t in run["step_s"]]
  return statistics.median(times) if times else None


def print_table(title: str, results: dict[str, list[dict[str, object]]], tokens_per_call: int,
                reference: str, extra: dict[str, str] | None = None, flops_per_call: float | None = None,
                peak_flops: float | None = None) -> dict[str, float | None]:
  """Prints tokens/s (median over all timed calls) per system and the reference's ratio to each;
  with flops_per_call, each system's model FLOP/s, and with peak_flops its fraction of that peak."""
  print(f"\n## {title}")
  for key, value in (extra or {}).items():
    print(f"{key}: {value}")
  speeds = {}
  for name, runs in results.items():
    step = median_step_s(runs)
    speeds[name] = tokens_per_call / step if step else None
  ref = speeds.get(reference)
  columns = ["system", "median s/call", "tokens/s", f"{reference} speed-up", "calls", "rounds ok"]
  if flops_per_call:
    columns += ["model FLOP/s"] + (["of measured peak"] if peak_flops else [])
  print("| " + " | ".join(columns) + " |")
  print("|" + "---|" * len(columns))
  for name, runs in results.items():
    ok = [run for run in runs if "error" not in run]
    speed = speeds[name]
    if speed is None:
      print("| " + " | ".join([name, "failed", "-", "-", "0", f"0/{len(runs)}"]
                              + ["-"] * (len(columns) - 6)) + " |")
      continue
    seconds = tokens_per_call / speed
    cells = [name, f"{seconds:.3f}", f"{speed:,.0f}", f"{ref / speed:.2f}x" if ref else "-",
             str(sum(len(run["step_s"]) for run in ok)), f"{len(ok)}/{len(runs)}"]
    if flops_per_call:
      cells.append(flops_text(flops_per_call / seconds))
      if peak_flops:
        cells.append(f"{flops_per_call / seconds / peak_flops:.0%}")
    print("| " + " | ".join(cells) + " |")
  return speeds


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown CPU"


def gpu_names() -> str | None:
  """The NVIDIA GPUs nvidia-smi lists, or None where there is none."""
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
  return "; ".join(names) if out.returncode == 0 and names else None


def cpu_count() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_shape_args(parser: argparse.ArgumentParser, names: Sequence[str], **defaults) -> None:
  """--name flags for the given Shapes fields (defaults: Shapes' own, overridden by `defaults`)."""
  field_defaults = {f.name: f.default for f in dataclasses.fields(Shapes)}  # intermediate 0: the ratio
  for name in names:
    default = defaults.get(name, field_defaults[name])
    flag = f"--{name.replace('_', '-')}"
    if isinstance(default, bool):
      parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
    elif name == "dtype":
      parser.add_argument(flag, choices=list(DTYPE_BYTES), default=default)
    else:
      parser.add_argument(flag, type=type(default), default=default)


def shapes_from_args(args: argparse.Namespace) -> Shapes:
  fields = {f.name for f in dataclasses.fields(Shapes)}
  return Shapes(**{k: v for k, v in vars(args).items() if k in fields})


def add_host_memory_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--huge-pages", action="store_true",
                      help=f"run every system's worker with GLIBC_TUNABLES="
                           f"{host_memory_lib.HUGETLB_TUNABLE} (malloc asks for transparent huge pages; "
                           "matters where the THP mode is 'madvise')")


def apply_host_memory_arg(args: argparse.Namespace) -> None:
  """Workers inherit os.environ, so every system gets the same allocator setting."""
  if args.huge_pages:
    os.environ["GLIBC_TUNABLES"] = host_memory_lib.HUGETLB_TUNABLE


def host_memory() -> str:
  """The page setting all workers run under: the kernel's THP mode and GLIBC_TUNABLES."""
  mode = host_memory_lib.thp_mode() or "unknown"
  return f"THP mode '{mode}', GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES') or '(unset)'} (all systems)"


def describe(shapes: Shapes, workload: str) -> dict[str, str]:
  """The header lines of a result table: when, where, what model and workload."""
  gpus = gpu_names()
  return {
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "machine": f"{cpu_model()} ({platform.machine()}), {cpu_count()} cores"
                 + (f"; GPU (name, driver): {gpus}" if gpus else ""),
      "model": (f"Qwen2-shaped, hidden {shapes.hidden}, {shapes.layers} layers, {shapes.heads} heads / "
                f"{shapes.kv_heads} kv heads (head_dim {shapes.head_dim}), intermediate "
                f"{shapes.intermediate}, vocab {shapes.vocab}"
                f"{' (tied head)' if shapes.tie_embeddings else ''}, {shapes.params / 1e6:.1f}M params, "
                f"{shapes.dtype} compute"),
      "workload": workload,
      "host memory": host_memory(),
  }


def compare(title: str, workload: str, systems: dict[str, Callable[[], System]],
            shape_fields: Sequence[str], tokens_per_call: Callable[[Shapes], int],
            description: str, flops_per_call: Callable[[Shapes], float] | None = None,
            **shape_defaults) -> None:
  """The command line of a side-by-side benchmark: parse shapes, run the systems in rounds, print
  the table (reference: the first system). With flops_per_call, the machine's matmul peak is
  measured at the start of every round and the table gives each system's model FLOP/s and its
  fraction of the median peak."""
  parser = argparse.ArgumentParser(description=description)
  add_shape_args(parser, list(shape_fields) + ["warmup", "steps"], **shape_defaults)
  parser.add_argument("--rounds", type=int, default=2, help="times each system runs, back to back")
  parser.add_argument("--systems", nargs="+", default=list(systems), choices=list(systems))
  parser.add_argument("--timeout", type=float, default=900.0, help="seconds per worker run")
  add_host_memory_arg(parser)
  args = parser.parse_args()
  apply_host_memory_arg(args)
  shapes = shapes_from_args(args)
  chosen = [systems[name]() for name in args.systems]
  info = describe(shapes, workload.format(s=shapes))
  info["load average (1/5/15 min) at start"] = load_average()
  results, peaks = run_rounds(chosen, shapes, args.rounds, args.timeout,
                              measure_peaks=flops_per_call is not None)
  info["load average at end"] = load_average()
  peak_flops = None
  if peaks:
    peak_flops = statistics.median(p["peak_flops"] for p in peaks)
    info["measured matmul peak"] = (f"{flops_text(peak_flops)} (median of "
                                    f"{', '.join(flops_text(p['peak_flops']) for p in peaks)}: best "
                                    f"{shapes.dtype} jnp.dot of squares, one measurement per round)")
  print_table(title, results, tokens_per_call(shapes), args.systems[0], info,
              flops_per_call(shapes) if flops_per_call else None, peak_flops)

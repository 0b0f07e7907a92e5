"""Device mesh, logical-axis sharding rules, param/optimizer/batch shardings, multi-host start-up
and host-local -> global batch arrays."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
import contextvars
import functools
import logging
import math
import os
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

logger = logging.getLogger(__name__)
_logged_replications: set[tuple[Any, ...]] = set()  # each (array, dim, axis) fallback is logged once

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None
LogicalRules = tuple[tuple[str, MeshAxes], ...]

# Logical axis name -> mesh axes. Params: FSDP shards the "embed" side of every matrix, tensor
# parallelism the heads / MLP / vocab side. Activations: the batch is split over data and fsdp; the
# residual stream ("act_embed") stays replicated over "tensor" (Megatron-style: each block's output
# projection reduces back to full width), only the MLP hidden ("act_mlp") is split over "tensor".
LOGICAL_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("act_mlp", "tensor"),
    ("act_embed", None),
    ("layers", None),
    ("head_dim", None),
    ("norm", None),
    ("seq", None),
    ("lora_rank", None),  # LoRA adapters: A [in..., rank], B [rank, out...] shard like their kernel
)


def mesh_axes(axes: MeshAxes) -> tuple[str, ...]:
  """One entry of a PartitionSpec (an axis name, a tuple of them or None) as a tuple of axis names."""
  return (axes,) if isinstance(axes, str) else tuple(axes or ())



def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
  """Reads `key` from a mapping or an attribute-style config (ml_collections ConfigDict)."""
  if cfg is None:
    return default
  if isinstance(cfg, Mapping):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def logical_rules(overrides: Mapping[str, Any] | Sequence[tuple[str, Any]] = ()) -> LogicalRules:
  """LOGICAL_RULES with `overrides` (config `mesh.rules`: (logical name, mesh axis | axes | None)
  pairs, or a dict of them), e.g. (("mlp", None),) to keep MLP weights whole on every device."""
  rules = dict(LOGICAL_RULES)
  for name, axes in dict(overrides).items():
    if name not in rules:
      raise ValueError(f"mesh.rules.{name}: unknown logical axis; the rules cover {sorted(rules)}")
    if axes is not None and not isinstance(axes, str):
      axes = tuple(axes)
    for axis in mesh_axes(axes):
      if axis not in MESH_AXES:
        raise ValueError(f"mesh.rules.{name}: unknown mesh axis {axis!r}; use one of {MESH_AXES} or None")
    rules[name] = axes
  return tuple(rules.items())


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes from config; one size of -1 takes the remaining devices."""
  sizes = [_cfg_get(mesh_cfg, axis, -1 if axis == "fsdp" else 1) for axis in MESH_AXES]
  described = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
  for axis, size in zip(MESH_AXES, sizes):
    if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ValueError(f"mesh.{axis}={size!r}: a mesh axis size must be a positive int or -1 (fill)")
  fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"{described}: only one of mesh.{'/'.join(fill)} may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"{described}: the fixed sizes (product {known}) do not divide the "
                       f"{num_devices} devices; change mesh.data/fsdp/tensor")
    sizes[MESH_AXES.index(fill[0])] = num_devices // known
  elif known != num_devices:
    raise ValueError(f"{described}: the product {known} does not match the {num_devices} devices; "
                     "change mesh.data/fsdp/tensor (or set one of them to -1 to fill)")
  return tuple(int(s) for s in sizes)


def make_mesh(mesh_cfg: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices of all processes).

  mesh_cfg has fields data, fsdp, tensor (defaults 1, -1, 1). Axes are AxisType.Auto on purpose:
  jax.make_mesh defaults to Explicit axes (sharding in the types), but cftjax shards by logical axis
  rules + GSPMD sharding constraints and lets the compiler propagate the rest, which needs Auto axes.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ------------------------------------------------------------------------------------------------
# Shardings.


def path_name(path: tuple[Any, ...]) -> str:
  """A pytree key path as "layers/attn/q_kernel"."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
  return math.prod(mesh.shape[a] for a in mesh_axes(axes))


def _log_replication_once(name: str, dim: int, size: int, axis: str, axis_size: int) -> None:
  if (name, dim, size, axis, axis_size) in _logged_replications:
    return
  _logged_replications.add((name, dim, size, axis, axis_size))
  logger.warning("%s: dim %d (size %d) is not divisible by mesh axis %r (size %d); replicating that "
                 "dim over %r", name, dim, size, axis, axis_size, axis)


def with_shardings(tree: Any, shardings: Any, dtype: Any = None) -> Any:
  """ShapeDtypeStructs of `tree`'s leaves (arrays or ShapeDtypeStructs) carrying `shardings` (a tree
  of the same structure), in `dtype` when given: a target for `jax.jit` tracing or an Orbax restore."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s), tree,
                      shardings)


def divisible_spec(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, name: str) -> PartitionSpec:
  """`spec` with every mesh axis that does not divide its dim dropped (that dim is then replicated
  over it); each drop is logged once per process, naming `name`, the dim and the axis."""
  dims = []
  for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    kept = []
    for axis in mesh_axes(axes):
      if size % (_axis_size(mesh, tuple(kept)) * mesh.shape[axis]):
        _log_replication_once(name, dim, size, axis, mesh.shape[axis])
      else:
        kept.append(axis)
    dims.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*dims)


# ------------------------------------------------------------------------------------------------
# The current mesh and rules.

_CURRENT: contextvars.ContextVar[tuple[Mesh, LogicalRules] | None] = contextvars.ContextVar(
    "cftjax_mesh_and_rules", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: LogicalRules = LOGICAL_RULES) -> Iterator[Mesh]:
  """`with parallel.use_mesh(mesh, rules):` makes `mesh` and the logical `rules` the ones every
  function below places arrays by, and the ones the steps built inside it compile for. A run enters
  it once, around building its state and steps and running its loop."""
  with _current_set((mesh, tuple(rules))):
    yield mesh


def outside_mesh() -> contextlib.AbstractContextManager[None]:
  """Inside it, code runs as outside every `use_mesh` (`entered()` is None): for tracing that places
  nothing, such as the shapes of the params."""
  return _current_set(None)


@contextlib.contextmanager
def _current_set(value: tuple[Mesh, LogicalRules] | None) -> Iterator[None]:
  token = _CURRENT.set(value)
  try:
    yield
  finally:
    _CURRENT.reset(token)


def entered() -> tuple[Mesh, LogicalRules] | None:
  """The (mesh, rules) of the innermost `use_mesh`, or None outside every `use_mesh`."""
  return _CURRENT.get()


def current() -> tuple[Mesh, LogicalRules]:
  """The (mesh, rules) of the innermost `use_mesh`."""
  entered = _CURRENT.get()
  if entered is None:
    raise RuntimeError("no device mesh: call this inside `with cftjax.parallel.use_mesh(mesh, rules):`")
  return entered


def platform() -> str:
  """The platform ("cpu", "gpu", "tpu") of the devices programs run on: the current mesh's inside
  `use_mesh` (also when compiling ahead of time for another platform's devices), else JAX's default
  backend."""
  entered = _CURRENT.get()
  return jax.default_backend() if entered is None else entered[0].devices.flat[0].platform


def varying_like(x: jax.Array, *others: jax.Array) -> jax.Array:
  """x marked as varying (inside `jax.shard_map`) over every mesh axis any of `others` varies over:
  e.g. the initial carry of a loop that sums terms computed from `others`. Outside shard_map: x."""
  axes = set()
  for other in others:
    axes |= jax.typeof(other).manual_axis_type.varying
  return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def sum_to_match(x: jax.Array, like: jax.Array) -> jax.Array:
  """x summed (inside `jax.shard_map`) over the mesh axes it varies over and `like` does not: the
  cotangent of `like` from per-device partial terms. Outside shard_map: x."""
  axes = jax.typeof(x).manual_axis_type.varying - jax.typeof(like).manual_axis_type.varying
  return jax.lax.psum(x, tuple(sorted(axes))) if axes else x


def bind(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` run under the mesh and rules current now, wherever it is called (or traced by jit) later."""
  mesh, rules = current()

  @functools.wraps(fn)
  def bound(*args, **kwargs):
    with use_mesh(mesh, rules):
      return fn(*args, **kwargs)

  return bound


# ------------------------------------------------------------------------------------------------
# Shardings on the current mesh.


def logical_sharding(shape: Sequence[int], names: Sequence[str | None], name: str = "array") -> NamedSharding:
  """NamedSharding of an array whose dims carry logical `names`, with graceful replication."""
  mesh, rules = current()
  spec = nn.logical_to_mesh_axes(tuple(names), rules)
  return NamedSharding(mesh, divisible_spec(shape, spec, mesh, name))


def without_batch_axes(sharding: NamedSharding) -> NamedSharding:
  """`sharding` with the mesh axes that split the batch (the "batch" rule: data, FSDP) removed, so
  the array is whole over them and stays split over the others ("tensor")."""
  mesh, rules = current()
  batch_axes = set(mesh_axes(dict(rules).get("batch")))
  dims = []
  for axes in sharding.spec:
    kept = tuple(a for a in mesh_axes(axes) if a not in batch_axes)
    dims.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return NamedSharding(sharding.mesh, PartitionSpec(*dims))


def split_axes(shape: Sequence[int], names: Sequence[str | None], name: str = "array") -> tuple[tuple[str, ...], ...]:
  """The mesh axes that split each dim of an array whose dims carry logical `names` (as placed by
  `logical_sharding`): one tuple of axis names per dim."""
  spec = tuple(logical_sharding(shape, names, name).spec)
  return tuple(mesh_axes(axes) for axes in spec + (None,) * (len(shape) - len(spec)))


def param_shardings(boxed_tree: Any) -> Any:
  """Tree of NamedSharding for a tree whose leaves carry logical axis names as `nn.Partitioned` boxes:
  params (`cftjax.models.abstract_params(cfg)`), or a whole train state traced from boxed params,
  where `tx.init` carries the boxes into the optimizer state (Adam's moments get their param's
  names). Names map to mesh axes by the rules; unboxed leaves are replicated. The result has the
  unboxed tree's structure. A dim a mesh axis does not divide is replicated over that axis (logged
  once per leaf, dim and axis).
  """
  def leaf_sharding(path, leaf):
    if not isinstance(leaf, nn.Partitioned):
      return replicated()
    if not hasattr(leaf.value, "shape"):  # a masked-out optimizer slot (optax.MaskedNode)
      return leaf.value
    return logical_sharding(leaf.value.shape, leaf.names, path_name(path))

  return jax.tree_util.tree_map_with_path(
      leaf_sharding, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def replicated() -> NamedSharding:
  """The sharding of an array every device holds whole."""
  return NamedSharding(current()[0], PartitionSpec())


@contextlib.contextmanager
def activation_sharding() -> Iterator[None]:
  """While tracing a jitted function, makes the model's `nn.with_logical_constraint` calls constrain
  activations to the current mesh by the current rules (without it they are no-ops)."""
  mesh, rules = current()
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def batch_sharding(ndim: int = 2) -> NamedSharding:
  """Sharding of batch arrays [batch, seq, ...]: the batch dim over the "batch" rule's mesh axes
  (data and fsdp by default), everything else replicated."""
  mesh, rules = current()
  spec = nn.logical_to_mesh_axes(("batch",), rules)
  return NamedSharding(mesh, PartitionSpec(spec[0], *(None,) * (ndim - 1)))


def batch_shard_count() -> int:
  """Into how many pieces the batch dim is split (a global batch must be a multiple of it)."""
  return _axis_size(current()[0], batch_sharding().spec[0])


def check_batch_divisible(global_batch: int, micro_batches: int, what: str) -> None:
  """Raises unless `global_batch` rows split evenly into micro_batches x the batch shards."""
  shards = batch_shard_count()
  if micro_batches < 1 or global_batch % (micro_batches * shards):
    raise ValueError(f"{what}: global batch {global_batch} must be a multiple of micro_batches "
                     f"({micro_batches}) x batch shards ({shards}: mesh axes "
                     f"{batch_sharding().spec[0]}); change the batch size, the "
                     "micro-batch count or the mesh")


def host_local_to_global(batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Host-local numpy arrays [local_batch, ...] -> global jax.Arrays [local_batch * processes, ...]
  split over the batch mesh axes. Each process passes its own rows (its data-loader shard)."""
  return {key: jax.make_array_from_process_local_data(batch_sharding(np.ndim(value)), np.asarray(value))
          for key, value in batch.items()}


# ------------------------------------------------------------------------------------------------
# Multi-host start-up.

_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


def _multi_host_cluster_detected() -> bool:
  """SLURM with more than one task, or a TPU pod slice listing more than one worker."""
  if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
    if int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_STEP_NUM_TASKS", "1"))) > 1:
      return True
  workers = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
  return len([w for w in workers.split(",") if w]) > 1


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when the environment asks for multi-process JAX.

  Call it first, before anything touches jax devices. Returns whether jax.distributed is initialised.
  Environment, first match wins:
    CFTJAX_DISTRIBUTED=0        never initialise (single process);
    CFTJAX_DISTRIBUTED=1        initialise and let JAX auto-detect the cluster (GCE TPU pod VMs:
                                worker ids come from TPU metadata; also SLURM, Open MPI, k8s);
    JAX_COORDINATOR_ADDRESS=host:port with JAX_NUM_PROCESSES and JAX_PROCESS_ID
                                explicit cluster (e.g. GPU hosts started by hand or by a launcher);
                                JAX_LOCAL_DEVICE_IDS optionally limits this process's devices;
    SLURM (SLURM_JOB_ID, SLURM_PROCID, SLURM_NTASKS > 1) or TPU_WORKER_HOSTNAMES /
    TPU_PROCESS_ADDRESSES listing > 1 worker (GKE TPU)    auto-detected by JAX;
    otherwise                   no-op.
  """
  if jax.distributed.is_initialized():
    return True
  flag = os.environ.get("CFTJAX_DISTRIBUTED", "").strip().lower()
  if flag and flag not in _TRUE + _FALSE:
    raise ValueError(f"CFTJAX_DISTRIBUTED={flag!r}: use 1 (initialise) or 0 (single process)")
  if flag in _FALSE:
    return False
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not os.environ.get(k)]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} is not: set all "
                       "three (address host:port, process count, this process's id 0..count-1)")
    try:
      num_processes, process_id = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    except ValueError:
      raise ValueError(f"JAX_NUM_PROCESSES={os.environ['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                       f"{os.environ['JAX_PROCESS_ID']!r} must be integers") from None
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=num_processes, process_id=process_id)
  elif flag in _TRUE or _multi_host_cluster_detected():
    jax.distributed.initialize()
  else:
    return False
  logger.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
              jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return True

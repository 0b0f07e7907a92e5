"""Tests for cftjax.parallel: mesh construction, logical-rule shardings, graceful replication,
optimizer-state shardings, host-local -> global batches (1 and 2 processes), distributed start-up."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from cftjax import parallel
from cftjax.models import ModelConfig, abstract_params
from cftjax.train.state import train_state_shardings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides) -> ModelConfig:
  fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=8)
  return ModelConfig(**(fields | overrides))


def mesh_of(data, fsdp, tensor):
  return parallel.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor},
                            jax.devices()[:data * fsdp * tensor])


def test_eight_fake_devices():
  assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"


def test_make_mesh_fills_minus_one_with_auto_axes():
  mesh = parallel.make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(parallel.make_mesh({}).shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("mesh_cfg, message", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, r"mesh\.data=3.*product 3 does not match the 8 devices"),
    ({"data": 3, "fsdp": -1, "tensor": 1}, r"mesh\.data=3.*do not divide the 8 devices"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, r"only one of mesh\.data/fsdp may be -1"),
    ({"data": 0, "fsdp": -1, "tensor": 1}, r"mesh\.data=0: a mesh axis size must be"),
])
def test_make_mesh_rejects_sizes_that_do_not_fit(mesh_cfg, message):
  with pytest.raises(ValueError, match=message):
    parallel.make_mesh(mesh_cfg)


def test_logical_rules_overrides_and_validation():
  rules = dict(parallel.logical_rules({"act_embed": "tensor", "vocab": None, "batch": ["data"]}))
  assert rules["act_embed"] == "tensor" and rules["vocab"] is None and rules["batch"] == ("data",)
  assert rules["embed"] == "fsdp"
  with pytest.raises(ValueError, match=r"mesh\.rules\.mlp: unknown mesh axis 'model'"):
    parallel.logical_rules({"mlp": "model"})


def test_param_shardings_follow_rules_and_replicate_what_does_not_divide(monkeypatch, caplog):
  monkeypatch.setattr(parallel, "_logged_replications", set())
  mesh = mesh_of(1, 2, 4)
  with caplog.at_level(logging.WARNING, logger="cftjax.parallel"):
    with parallel.use_mesh(mesh):
      shardings = parallel.param_shardings(abstract_params(tiny_config()))
      parallel.param_shardings(abstract_params(tiny_config()))  # a second call logs nothing new
  attn = shardings["layers"]["attn"]
  assert attn["q_kernel"].spec == P(None, "fsdp", "tensor", None)  # 4 heads on tensor=4
  assert attn["k_kernel"].spec == P(None, "fsdp", None, None)  # 2 kv heads: replicated over tensor
  assert shardings["layers"]["mlp"]["down_kernel"].spec == P(None, "tensor", "fsdp")
  assert shardings["embedding"].spec == P("tensor", "fsdp")
  # (abstract_params traces the model, whose 1-row dummy tokens also log a replication: not a param)
  messages = [r.getMessage() for r in caplog.records if not r.getMessage().startswith("tokens:")]
  assert len(messages) == 2, messages  # k_kernel and v_kernel, once each
  assert "layers/attn/k_kernel: dim 2 (size 2) is not divisible by mesh axis 'tensor' (size 4)" in messages[0]


def test_partially_dividing_batch_axes_keep_the_axes_that_divide(monkeypatch):
  monkeypatch.setattr(parallel, "_logged_replications", set())
  mesh = mesh_of(2, 4, 1)
  with parallel.use_mesh(mesh):
    sharding = parallel.logical_sharding((6, 5), ("batch", "seq"), name="x")
  assert sharding.spec == P("data", None)  # 6 splits over data=2 but not over data*fsdp=8


def test_optimizer_state_mirrors_param_shardings():
  """Adam moments take their param's sharding, also inside masked/chained states; counts replicate."""
  mesh = mesh_of(1, 4, 2)
  cfg = tiny_config()
  only_matrices = lambda p: jax.tree.map(lambda x: x.ndim > 2, p)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.masked(optax.adam(1e-3), only_matrices))
  with parallel.use_mesh(mesh):
    opt_shardings = train_state_shardings(cfg, tx).opt_state
  adam = opt_shardings[1].inner_state[0]
  assert adam.mu["layers"]["mlp"]["gate_kernel"].spec == P(None, "fsdp", "tensor")
  assert adam.nu["layers"]["attn"]["o_kernel"].spec == P(None, "tensor", None, "fsdp")
  assert adam.count.spec == P()
  assert isinstance(adam.mu["lm_head"], optax.MaskedNode)


def test_platform_is_the_current_meshs_else_the_default_backend():
  """Code that picks a kernel per platform (model.attention=auto) asks the mesh it runs on, so a
  program compiled ahead of time for another platform's devices gets that platform's choice."""
  assert parallel.platform() == jax.default_backend()
  with parallel.use_mesh(mesh_of(1, 2, 1)):
    assert parallel.platform() == "cpu"
  with pytest.raises(RuntimeError, match="no device mesh"):
    parallel.current()


def test_host_local_to_global_single_process():
  mesh = mesh_of(2, 2, 2)
  local = {"inputs": np.arange(8 * 3, dtype=np.int32).reshape(8, 3),
           "loss_mask": np.ones((8, 3), np.float32)}
  with parallel.use_mesh(mesh):
    batch = parallel.host_local_to_global(local)
    assert parallel.batch_shard_count() == 4
  assert batch["inputs"].shape == (8, 3) and batch["inputs"].sharding.spec == P(("data", "fsdp"), None)
  assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(batch["inputs"]), local["inputs"])


_TWO_PROCESS_CHILD = textwrap.dedent("""
    import numpy as np
    from cftjax import parallel
    assert parallel.maybe_initialize_distributed()
    import jax
    mesh = parallel.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
    pid = jax.process_index()
    rows = np.arange(4, dtype=np.int32)[:, None] * 10 + pid  # this host's 4 rows: 0/10/20/30 (+pid)
    with parallel.use_mesh(mesh):
        batch = parallel.host_local_to_global({"inputs": np.tile(rows, (1, 3))})["inputs"]
    firsts = sorted(int(s.data[0, 0]) for s in batch.addressable_shards)
    print("RESULT", jax.process_count(), jax.device_count(), batch.shape, firsts)
""")


def test_host_local_to_global_two_processes():
  """Two real JAX processes (4 CPU devices each) joined by maybe_initialize_distributed."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
             PYTHONPATH=REPO_ROOT)
  children = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_CHILD],
                               env=env | {"JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
              for i in range(2)]
  try:
    outputs = [child.communicate(timeout=120)[0] for child in children]
  finally:
    for child in children:
      child.kill()
  for i, out in enumerate(outputs):
    assert children[i].returncode == 0, out
    result = [line for line in out.splitlines() if line.startswith("RESULT")]
    assert result == [f"RESULT 2 8 (8, 3) {[0 + i, 10 + i, 20 + i, 30 + i]}"], out


def test_maybe_initialize_distributed_is_a_noop_without_cluster_env(monkeypatch):
  for key in list(os.environ):
    if key.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_", "TPU_",
                       "CFTJAX_DISTRIBUTED")):
      monkeypatch.delenv(key)
  assert parallel.maybe_initialize_distributed() is False
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID is not"):
    parallel.maybe_initialize_distributed()
  monkeypatch.setenv("CFTJAX_DISTRIBUTED", "0")
  assert parallel.maybe_initialize_distributed() is False

"""`cftjax.hlo` on programs XLA compiled here (the 8 fake CPU devices of conftest): collectives found
with their kinds, bytes and executions per step, while loops weighted by their trip counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from cftjax import hlo


def _mesh() -> Mesh:
  return Mesh(np.array(jax.devices()[:8]), ("x",))


def _nested_loop_program(outer: int, inner: int) -> str:
  """Per device: `outer` iterations each all-gathering a carried f32[4] shard (-> f32[32]), around an
  inner loop of `inner` psums of f32[4]. Both depend on the carry, so neither can be hoisted."""
  mesh = _mesh()

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
  def program(c):  # c: [4] per device
    def inner_body(c, _):
      return c + jax.lax.psum(c, "x") * 0.125, None

    def outer_body(c, _):
      gathered = jax.lax.all_gather(c, "x", tiled=True)  # [32]
      c = gathered[:4] * 0.5 + gathered[4:8]
      return jax.lax.scan(inner_body, c, None, length=inner)[0], None

    return jax.lax.scan(outer_body, c, None, length=outer)[0]

  x = jax.ShapeDtypeStruct((32,), jnp.float32, sharding=jax.NamedSharding(mesh, P("x")))
  return jax.jit(program).lower(x).compile().as_text()


def test_collectives_are_weighted_by_loop_trip_counts():
  text = _nested_loop_program(outer=5, inner=3)
  totals = hlo.totals_by_kind(hlo.collectives(text))
  assert totals["all-gather"].count == 5
  assert totals["all-gather"].bytes == 5 * 32 * 4  # the gathered f32[32] per device
  assert totals["all-reduce"].count == 5 * 3
  assert totals["all-reduce"].bytes == 15 * 4 * 4
  assert set(totals) == {"all-gather", "all-reduce"}


def test_trip_counts_follow_the_loop_length():
  few = hlo.totals_by_kind(hlo.collectives(_nested_loop_program(outer=2, inner=7)))
  assert (few["all-gather"].count, few["all-reduce"].count) == (2, 14)


def test_runs_per_execution_of_a_program_without_loops_is_one():
  mesh = _mesh()
  x = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=jax.NamedSharding(mesh, P("x", None)))
  text = jax.jit(lambda a: a.sum(0), out_shardings=jax.NamedSharding(mesh, P())).lower(x).compile().as_text()
  found = hlo.collectives(text)
  assert found and all(c.runs == 1 for c in found)
  assert hlo.totals_by_kind(found)["all-reduce"].bytes == 16 * 4


def _collective(kind: str, shape: tuple[int, ...], runs: int = 1, dtype: str = "bf16") -> hlo.Collective:
  return hlo.Collective(kind, f"{kind}.1", "body", (hlo.Array(dtype, shape),), runs)


def test_full_vocab_all_reduces_name_arrays_with_a_whole_vocab_dim():
  vocab, hidden = 1000, 64
  found = [_collective("all-reduce", (hidden, vocab), runs=4, dtype="f32"),  # an unsharded head gradient
           _collective("all-reduce", (hidden, vocab // 4)),  # a vocab shard: allowed
           _collective("all-gather", (hidden, vocab)),  # not an all-reduce
           _collective("all-reduce", (8, 16))]
  assert [c.arrays[0].shape for c in hlo.full_vocab_all_reduces(found, vocab)] == [(hidden, vocab)]


def test_lm_head_gathers_count_gathered_heads_per_step():
  vocab, hidden = 1000, 64
  found = [_collective("all-gather", (1, hidden, vocab), runs=8),
           _collective("all-gather", (hidden, vocab // 2), runs=1),
           _collective("all-gather", (hidden, 128), runs=3)]
  assert sum(c.runs for c in hlo.lm_head_gathers(found, hidden, vocab)) == 8
  assert sum(c.runs for c in hlo.lm_head_gathers(found, hidden, vocab, vocab_shards=2)) == 1


def test_arrays_in_reads_tuple_types():
  arrays = hlo.arrays_in("(bf16[2,3]{1,0:T(8,128)}, f32[], s32[7])")
  assert [(a.dtype, a.shape, a.bytes) for a in arrays] == [("bf16", (2, 3), 12), ("f32", (), 4),
                                                          ("s32", (7,), 28)]


def test_arrays_in_reads_memory_spaces():
  arrays = hlo.arrays_in("(bf16[7,128]{1,0:T(8,128)(2,1)S(1)}, f32[4]{0}, u32[]{:S(2)})")
  assert [a.memory_space for a in arrays] == [1, 0, 2]


# A loop body as the TPU compiler prints it: a weight slice prefetched into VMEM (S(1)), a fusion that
# reads it and a cache in HBM, an in-place cache update, and a fusion that only slices its operand.
_BODY = """HloModule m

%fused_attention (param_0: bf16[2,128], param_1: bf16[64,1024]) -> bf16[64,2] {
  %param_0 = bf16[2,128]{1,0:S(1)} parameter(0)
  %param_1 = bf16[64,1024]{1,0} parameter(1)
  ROOT %dot = bf16[64,2]{1,0:S(1)} custom-dot(%param_0, %param_1)
}

%fused_row (param_0: f32[1000,8], param_1: s32[]) -> f32[1,8] {
  %param_0 = f32[1000,8]{1,0} parameter(0)
  %param_1 = s32[]{:S(2)} parameter(1)
  %zero = s32[] constant(0)
  ROOT %row = f32[1,8]{1,0} dynamic-slice(%param_0, %param_1, %zero), dynamic_slice_sizes={1,8}
}

ENTRY %body (p: (bf16[7,128], bf16[64,1024], f32[1000,8], s32[])) -> bf16[64,1024] {
  %p = (bf16[7,128]{1,0}, bf16[64,1024]{1,0}, f32[1000,8]{1,0}, s32[]{:S(2)}) parameter(0)
  %w = bf16[7,128]{1,0} get-tuple-element(%p), index=0
  %cache = bf16[64,1024]{1,0} get-tuple-element(%p), index=1
  %table = f32[1000,8]{1,0} get-tuple-element(%p), index=2
  %i = s32[]{:S(2)} get-tuple-element(%p), index=3
  %start = ((bf16[7,128]{1,0}), bf16[2,128]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[0:2], [0:128]}
  %done = bf16[2,128]{1,0:S(1)} slice-done(%start)
  %scores = bf16[64,2]{1,0:S(1)} fusion(%done, %cache), kind=kOutput, calls=%fused_attention, backend_config={"estimated_cycles":"1500"}
  %row = f32[1,8]{1,0} fusion(%table, %i), kind=kLoop, calls=%fused_row
  %new = bf16[64,1]{1,0:S(1)} slice(%scores), slice={[0:64], [0:1]}
  ROOT %update = bf16[64,1024]{1,0} dynamic-update-slice(%cache, %new, %i, %i)
}
"""


def test_hbm_bytes_count_what_a_loop_body_moves_in_and_out_of_hbm():
  module = hlo.parse(_BODY)
  moved = {i.name: nbytes for i, nbytes in hlo.hbm_bytes(module, module.entry)}
  assert moved["start"] == 2 * 128 * 2  # the slice read from HBM; its VMEM copy costs none
  assert moved["done"] == 0 and moved["p"] == 0 and moved["w"] == 0
  assert moved["scores"] == 64 * 1024 * 2  # the cache; the weight slice and the scores are in VMEM
  assert moved["row"] == 8 * 4 + 8 * 4  # one row of the table read, the row written
  assert moved["new"] == 0  # VMEM to VMEM
  assert moved["update"] == 64 * 2  # in place: the update written into the cache, not the cache
  cycles = {i.name: hlo.estimated_cycles(i) for i, _ in hlo.hbm_bytes(module, module.entry)}
  assert cycles["scores"] == 1500 and cycles["update"] is None

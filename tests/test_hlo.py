"""`cftjax.hlo` on programs XLA compiled here (the 8 fake CPU devices of conftest): collectives found
with their kinds, bytes and executions per step, while loops weighted by their trip counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


# Reduce-scatters as the TPU compiler prints them: operands named without types, and the fused form
# (a kCustom fusion around an all-reduce of the whole input; the slice is the fusion's business).
_REDUCE_SCATTERS = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%all-reduce-scatter.3.clone (input_0: bf16[128,256]) -> bf16[32,256] {
  %input_0 = bf16[128,256]{1,0} parameter(0)
  %all-reduce.1 = bf16[128,256]{1,0} all-reduce(%input_0), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %slice = bf16[32,256]{1,0} slice(%all-reduce.1), slice={[0:32], [0:256]}
}

ENTRY %main (g: f32[64,1000], w: bf16[128,256]) -> (f32[16,1000], bf16[32,256], f32[8]) {
  %g = f32[64,1000]{1,0} parameter(0)
  %w = bf16[128,256]{1,0} parameter(1)
  %rs = f32[16,1000]{1,0:S(1)} reduce-scatter(%g), replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  %fused = bf16[32,256]{1,0} fusion(%w), kind=kCustom, calls=%all-reduce-scatter.3.clone
  %small = f32[8]{0} slice(%g), slice={[0:1], [0:8]}
  %ar = f32[8]{0} all-reduce(%small), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %out = (f32[16,1000]{1,0}, bf16[32,256]{1,0}, f32[8]{0}) tuple(%rs, %fused, %ar)
}
"""


def test_reduce_scatters_count_their_input_untyped_or_fused():
  found = hlo.collectives(_REDUCE_SCATTERS)
  totals = hlo.totals_by_kind(found)
  assert totals["reduce-scatter"].count == 2
  assert totals["reduce-scatter"].bytes == 64 * 1000 * 4 + 128 * 256 * 2  # the inputs, not the shards
  assert (totals["all-reduce"].count, totals["all-reduce"].bytes) == (1, 8 * 4)


# One all-gather (channel 7, chain 0) run as a TPU async collective fusion: started before a loop of 8
# iterations, carried by a compute fusion in the loop body, ended after it; the HLO prints it in all
# three computations. Beside it, an ordinary all-gather of another channel in the loop body.
_ASYNC_COLLECTIVE = """HloModule m

%start (p: bf16[2,64]) -> (bf16[2,64], bf16[8,64], u32[]) {
  %p = bf16[2,64]{1,0} parameter(0)
  %all-gather.1 = bf16[8,64]{1,0} all-gather(%p), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}, frontend_attributes={chain_id="0"}
  ROOT %cc = (bf16[2,64]{1,0}, bf16[8,64]{1,0}, u32[]{:S(2)}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}

%carry (p: bf16[2,64], x: f32[16]) -> (f32[16], bf16[8,64]) {
  %p = bf16[2,64]{1,0} parameter(0)
  %x = f32[16]{0} parameter(1)
  %n = f32[16]{0} negate(%x)
  %all-gather.2 = bf16[8,64]{1,0} all-gather(%p), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}, frontend_attributes={chain_id="0"}
  ROOT %t = (f32[16]{0}, bf16[8,64]{1,0}) tuple(%n, %all-gather.2)
}

%done (p: bf16[2,64], g: bf16[8,64]) -> bf16[8,64] {
  %p = bf16[2,64]{1,0} parameter(0)
  %g = bf16[8,64]{1,0} parameter(1)
  %all-gather.3 = bf16[8,64]{1,0} all-gather(%p), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}, frontend_attributes={chain_id="0"}
  ROOT %cc = bf16[8,64]{1,0} custom-call(%p, %g, %all-gather.3), custom_call_target="AsyncCollectiveDone"
}

%body (s: (s32[], f32[16], bf16[2,64], f32[4])) -> (s32[], f32[16], bf16[2,64], f32[4]) {
  %s = (s32[]{:S(2)}, f32[16]{0}, bf16[2,64]{1,0}, f32[4]{0}) parameter(0)
  %i = s32[]{:S(2)} get-tuple-element(%s), index=0
  %x = f32[16]{0} get-tuple-element(%s), index=1
  %w = bf16[2,64]{1,0} get-tuple-element(%s), index=2
  %v = f32[4]{0} get-tuple-element(%s), index=3
  %f = (f32[16]{0}, bf16[8,64]{1,0}) fusion(%w, %x), kind=kCustom, calls=%carry
  %y = f32[16]{0} get-tuple-element(%f), index=0
  %other = f32[16]{0} all-gather(%v), channel_id=9, replica_groups={{0,1,2,3}}, dimensions={0}
  %one = s32[]{:S(2)} constant(1)
  %j = s32[]{:S(2)} add(%i, %one)
  ROOT %t = (s32[]{:S(2)}, f32[16]{0}, bf16[2,64]{1,0}, f32[4]{0}) tuple(%j, %y, %w, %v)
}

%cond (s: (s32[], f32[16], bf16[2,64], f32[4])) -> pred[] {
  %s = (s32[]{:S(2)}, f32[16]{0}, bf16[2,64]{1,0}, f32[4]{0}) parameter(0)
  %i = s32[]{:S(2)} get-tuple-element(%s), index=0
  %n = s32[]{:S(2)} constant(8)
  ROOT %lt = pred[]{:S(2)} compare(%i, %n), direction=LT
}

ENTRY %main (w: bf16[2,64], x: f32[16], v: f32[4]) -> bf16[8,64] {
  %w = bf16[2,64]{1,0} parameter(0)
  %x = f32[16]{0} parameter(1)
  %v = f32[4]{0} parameter(2)
  %st = (bf16[2,64]{1,0}, bf16[8,64]{1,0}, u32[]{:S(2)}) fusion(%w), kind=kCustom, calls=%start
  %zero = s32[]{:S(2)} constant(0)
  %init = (s32[]{:S(2)}, f32[16]{0}, bf16[2,64]{1,0}, f32[4]{0}) tuple(%zero, %x, %w, %v)
  %loop = (s32[]{:S(2)}, f32[16]{0}, bf16[2,64]{1,0}, f32[4]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"8"}}
  %g = bf16[8,64]{1,0} get-tuple-element(%st), index=1
  ROOT %d = bf16[8,64]{1,0} fusion(%w, %g), kind=kCustom, calls=%done
}
"""


def test_an_async_collective_fusion_counts_once_where_it_starts():
  found = hlo.collectives(_ASYNC_COLLECTIVE)
  gathers = sorted((c.computation, c.runs, c.bytes) for c in found if c.kind == "all-gather")
  assert gathers == [("body", 8, 16 * 4), ("start", 1, 8 * 64 * 2)]
  totals = hlo.totals_by_kind(found)
  assert (totals["all-gather"].count, totals["all-gather"].bytes) == (9, 8 * 64 * 2 + 8 * 16 * 4)


# A scheduled loop body: a 4000-byte weight slice prefetched into VMEM while two priced fusions run,
# each moving 1000 bytes of HBM in 1000 cycles, then an in-place cache update of 64 + 64 bytes.
_SCHEDULED_BODY = """HloModule m

%f (p: bf16[500]) -> bf16[500] {
  %p = bf16[500]{0} parameter(0)
  ROOT %n = bf16[500]{0} negate(%p)
}

ENTRY %body (w: bf16[2000], c: bf16[1000,32], x: bf16[500], u: bf16[32]) -> bf16[1000,32] {
  %w = bf16[2000]{0} parameter(0)
  %c = bf16[1000,32]{1,0} parameter(1)
  %x = bf16[500]{0} parameter(2)
  %u = bf16[32]{0} parameter(3)
  %start = ((bf16[2000]{0}), bf16[2000]{0:S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[0:2000]}
  %a = bf16[500]{0:S(1)} fusion(%x), kind=kLoop, calls=%f, backend_config={"estimated_cycles":"1000"}
  %b = bf16[500]{0:S(1)} fusion(%x), kind=kLoop, calls=%f, backend_config={"estimated_cycles":"1000"}
  %done = bf16[2000]{0:S(1)} slice-done(%start)
  %r = bf16[1,32]{1,0} bitcast(%u)
  %i = s32[]{:S(2)} constant(0)
  ROOT %update = bf16[1000,32]{1,0} dynamic-update-slice(%c, %r, %i, %i)
}
"""


def test_scheduled_seconds_overlaps_prefetches_with_the_priced_ops_that_leave_bandwidth_free():
  """At 1 GHz and 2000 bytes/us: each fusion runs 1 us and leaves 1000 bytes of bandwidth free, so
  the prefetch has 2000 of its 4000 bytes left at its done (1 us more); the update then moves its
  128 bytes (0.064 us). Serially the prefetch alone would take 2 us."""
  moved = hlo.hbm_bytes(hlo.parse(_SCHEDULED_BODY), "body")
  assert [n for _, n in moved if n] == [4000, 1000, 1000, 128]
  assert hlo.scheduled_seconds(moved, 1e9, 2e9) == pytest.approx(1e-6 + 1e-6 + 1e-6 + 0.064e-6)
  # A bandwidth too low for a fusion's own bytes sets its time (1000 bytes at 500 bytes/us: 2 us each),
  # and then it leaves nothing free: the prefetch waits 8 us at its done.
  assert hlo.scheduled_seconds(moved, 1e9, 5e8) == pytest.approx(2e-6 + 2e-6 + 8e-6 + 0.256e-6)


# A program as the TPU compiler prints one: a priced fusion in the entry and a while loop of 5 trips
# whose body runs a priced fusion and a fused reducer computation; the fusion computations, the
# reducer and the loop condition price nothing themselves.
_LOOP_PROGRAM = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused (p: f32[256]) -> f32[256] {
  %p = f32[256]{0:S(1)} parameter(0)
  ROOT %n = f32[256]{0:S(1)} negate(%p)
}

%body (s: (s32[], f32[256])) -> (s32[], f32[256]) {
  %s = (s32[]{:S(2)}, f32[256]{0:S(1)}) parameter(0)
  %i = s32[]{:S(2)} get-tuple-element(%s), index=0
  %x = f32[256]{0:S(1)} get-tuple-element(%s), index=1
  %y = f32[256]{0:S(1)} fusion(%x), kind=kLoop, calls=%fused, backend_config={"estimated_cycles":"3000"}
  %one = s32[]{:S(2)} constant(1)
  %j = s32[]{:S(2)} add(%i, %one)
  ROOT %t = (s32[]{:S(2)}, f32[256]{0:S(1)}) tuple(%j, %y)
}

%cond (s: (s32[], f32[256])) -> pred[] {
  %s = (s32[]{:S(2)}, f32[256]{0:S(1)}) parameter(0)
  %i = s32[]{:S(2)} get-tuple-element(%s), index=0
  %n = s32[]{:S(2)} constant(5)
  ROOT %lt = pred[]{:S(2)} compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[256]) -> f32[] {
  %x = f32[256]{0:S(1)} parameter(0)
  %z = f32[256]{0:S(1)} fusion(%x), kind=kLoop, calls=%fused, backend_config={"estimated_cycles":"2000"}
  %zero = s32[]{:S(2)} constant(0)
  %init = (s32[]{:S(2)}, f32[256]{0:S(1)}) tuple(%zero, %z)
  %loop = (s32[]{:S(2)}, f32[256]{0:S(1)}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %out = f32[256]{0:S(1)} get-tuple-element(%loop), index=1
  %c = f32[]{:S(2)} constant(0)
  ROOT %r = f32[]{:S(2)} reduce(%out, %c), dimensions={0}, to_apply=%add, backend_config={"estimated_cycles":"1000"}
}
"""


def test_program_seconds_weights_each_loop_body_by_its_trip_count():
  module = hlo.parse(_LOOP_PROGRAM)
  assert hlo.control_flow_computations(module) == {"main", "body", "cond"}
  # 1 GHz: the entry's 2000 + 1000 cycles, the body's 3000 five times.
  assert hlo.program_seconds(_LOOP_PROGRAM, 1e9, 1e12) == pytest.approx((2000 + 1000 + 5 * 3000) * 1e-9)

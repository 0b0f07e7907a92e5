"""Side-by-side CFT train-step throughput: cftjax vs transformers+torch vs tunix, same shapes and batch.

Each system runs in its own subprocess and environment (benchmarks/setup.sh), back to back, for
--rounds rounds. Usage: python benchmarks/train_step.py [--hidden 512] [--rounds 2] [--systems ...]
"""

from __future__ import annotations

from peers import harness

SYSTEMS = harness.peer_systems("train")

if __name__ == "__main__":
  harness.compare(
      "CFT train step", "train step (forward + backward + grad clip + AdamW), batch {s.batch} x {s.seq} "
      "tokens, {s.warmup} warm-up + {s.steps} timed steps per round",
      SYSTEMS, ["vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "tie_embeddings",
                "dtype", "batch", "seq"],
      lambda s: s.batch * s.seq, __doc__,
      flops_per_call=lambda s: s.train_step_flops)

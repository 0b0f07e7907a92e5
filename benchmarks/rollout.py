"""Side-by-side rollout throughput: cftjax `generate` vs transformers `generate` vs tunix's vanilla
sampler; greedy, exactly --new-tokens tokens after each prompt (stop ids off), prefill included.

Usage: python benchmarks/rollout.py [--batch 8] [--seq 64] [--new-tokens 128] [--rounds 2]
"""

from __future__ import annotations

from peers import harness

SYSTEMS = harness.peer_systems("rollout")

if __name__ == "__main__":
  harness.compare(
      "Rollout (generated tokens/s)", "greedy rollout, batch {s.batch}, prompt {s.seq}, exactly "
      "{s.new_tokens} new tokens per row, {s.warmup} warm-up + {s.steps} timed calls per round",
      SYSTEMS, ["vocab", "hidden", "intermediate", "layers", "heads", "kv_heads", "tie_embeddings",
                "dtype", "batch", "seq", "new_tokens"],
      lambda s: s.batch * s.new_tokens, __doc__, seq=64)

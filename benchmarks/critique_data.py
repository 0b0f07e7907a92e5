"""`cftjax data critique` throughput in problems/min, on the CPU demo's model shape.

One randomly initialised checkpoint the size of configs/demo_cft.py's model (the demo world's tokenizer)
is both the generator (--samples candidates per problem at T 1.0) and the teacher (greedy critiques
of each distinct candidate); labels by math-verify; problems are the synthetic world's additions. A
warm-up run of 2 problems compiles the generate programs first; the timed run then builds --problems
problems into a fresh directory. A random model writes --new-tokens tokens (it rarely stops early), so
every problem costs about the same: one generate call of --samples rows for the candidates and one
call critiquing all distinct candidates.

Usage: python benchmarks/critique_data.py [--problems 16] [--samples 4] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax

from cftjax.datagen import critique as critique_data
from serve import demo_sized_checkpoint  # benchmarks/serve.py: the demo-shaped random checkpoint


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--problems", type=int, default=16)
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--new-tokens", type=int, default=64)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    ckpt = demo_sized_checkpoint(tmp)
    config = critique_data.base_config()
    config.input = os.path.join(tmp, "world", "rl_math_train.jsonl")
    config.generators.policy = {"ckpt": ckpt}
    config.teachers.teacher = {"ckpt": ckpt}
    config.samples_per_problem, config.max_new_tokens, config.teacher_max_new_tokens = (
        args.samples, args.new_tokens, args.new_tokens)
    config.progress_bar = False
    config.limit = 2
    critique_data.run(config, os.path.join(tmp, "warmup"))
    config.limit = args.problems
    result = critique_data.run(config, os.path.join(tmp, "timed"))
  print(json.dumps({"device": str(jax.devices()[0]), "problems": args.problems, "samples": args.samples,
                    "new_tokens": args.new_tokens, "seconds": round(result["seconds"], 2),
                    "problems_per_min": round(result["problems_per_min"], 2), "counts": result["counts"],
                    "loadavg": open("/proc/loadavg", encoding="utf-8").read().split()[:3]}))


if __name__ == "__main__":
  main()

"""Critique data from the synthetic world's two-digit additions: the actor demo's warm start as the
generator, a rule-based teacher standing in for an LLM teacher.

  cftjax train --config configs/demo_critique_grpo_sft.py       # the generator (runs/demo_critique_grpo/...)
  cftjax data critique --config configs/critique_data_demo.py --out runs/critique_data_demo
  cftjax train --config configs/demo_critic_from_data.py        # a critic trained on the CFT rows

The generator (the actor warm start, which often forgets the carry into the leading column) writes 8
worked answers per problem at T 1.0; math-verify labels them; the teacher {"rule": "synthetic_addition"}
writes the world's exact column-by-column critique of each distinct answer (a stand-in: no model, never
wrong, so the consistency filter keeps every critique). Rows are written as ArrayRecord. Point the
generators / teachers at other checkpoints or at an OpenAI-compatible server ({"endpoint":
"http://127.0.0.1:8000/v1"}, e.g. `cftjax serve`) for real data.
"""

from cftjax.datagen.critique import base_config


def get_config():
  c = base_config()
  c.input = "runs/demo_critique_grpo/world/rl_math_train.jsonl"
  c.limit = 0  # all 600 training problems
  c.generators.actor = {"ckpt": "runs/demo_critique_grpo/actor_warmstart"}
  c.teachers.rule = {"rule": "synthetic_addition"}
  c.samples_per_problem = 8
  c.max_new_tokens = 48  # a worked two-digit answer is ~30 tokens
  c.verdict_style = "cft"
  c.output_format = "array_record"
  return c

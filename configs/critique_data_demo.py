"""Critique data from the synthetic world's addition problems with the CPU demo's critic model.

  cftjax train --config configs/demo_cft.py                   # writes runs/demo_cft (model + world)
  cftjax data critique --config configs/critique_data_demo.py --out runs/critique_data_demo

The trained demo model is both the generator (4 samples per problem at T 1.0) and the teacher (greedy
critiques); math-verify labels the candidates. Point generators / teachers at other checkpoints or at
an OpenAI-compatible server ({"endpoint": "http://127.0.0.1:8000/v1"}, e.g. `cftjax serve`).
"""

from cftjax.datagen.critique import base_config


def get_config():
  c = base_config()
  c.input = "runs/demo_cft/world/rl_math_train.jsonl"
  c.limit = 200
  c.generators.demo = {"ckpt": "runs/demo_cft"}
  c.teachers.demo = {"ckpt": "runs/demo_cft"}
  c.samples_per_problem = 4
  c.max_new_tokens = c.teacher_max_new_tokens = 96
  c.verdict_style = "cft"
  return c

"""Demo: a step-level critic (DeepCritic arXiv 2505.00662, scored as ProcessBench scores) trained by SFT
then RL on the synthetic world's step-labelled solutions, on a laptop CPU.

The critic reads a three-digit addition answered in four steps (column totals from the right, then
the boxed sum) and names the first wrong step, "**Answer**: \\boxed{k}" counted from 1 (-1 = every step
right). It starts from RUN_DIR/sft_warmstart, trained first with configs/demo_step_critic_sft.py on an
exact teacher's step-wise critiques of training solutions whose steps slip independently (so copying
a step's value is often wrong) and on the world's solver rows. GRPO then samples 8 critiques for each
of 16 training solutions per step and rewards those naming exactly the labelled first wrong step (the
`step` reward, DeepCritic's judgement reward). The before/after table is ProcessBench's F1 (harmonic
mean of the accuracy on erroneous and on correct solutions) of greedy critiques of the 300 held-out
solutions (half right, one slip; configs/eval_demo_step_critic.py), before, every 10 steps and after.
Measured in docs/recipes.md.

  cftjax train --config configs/demo_step_critic.py
  cftjax plot runs/demo_step_critic
"""

import recipes
from cftjax.config import base_config
from cftjax.data.synthetic import STEP_CRITIC_TEMPLATE

RUN_DIR = "runs/demo_step_critic"
WORLD_DIR = RUN_DIR + "/world"


def get_config():
  c = base_config()
  c.train.objective = "grpo"
  c.train.run_dir = RUN_DIR
  c.data.synthetic_world = True
  c.data.world_dir = WORLD_DIR
  c.data.world.digits = 3  # as configs/demo_step_critic_sft.py
  c.data.world.num_train = 4000
  c.data.world.num_heldout = 300
  c.data.world.step_solutions = True
  c.data.world.step_slip_rate = 0.3
  c.data.template = STEP_CRITIC_TEMPLATE
  c.data.sources = ({"path": WORLD_DIR + "/rl_step_train.jsonl", "task": "step",
                     "template": STEP_CRITIC_TEMPLATE, "name": "steps"},)
  c.data.eval_path = WORLD_DIR + "/step_heldout.jsonl"
  c.data.batch_size = 16  # prompts per step
  c.data.max_seq_len = 160  # as the warm start
  c.data.packing = False

  c.model.init_from_run = RUN_DIR + "/sft_warmstart"
  c.model.warmstart_config = "demo_step_critic_sft.py"  # beside this file
  c.rl.group_size = 8
  c.rl.prompt_buckets = (80,)
  c.rl.max_new_tokens = 80  # a critique is 26-79 tokens; prompt (65-68) + completion fit 160
  c.rl.max_prompt_len = 80
  c.rl.temperature = 1.0
  c.rl.rewards.by_task = {"step": "step"}
  c.rl.rewards.options = {"step": {"indexing": "deepcritic", "partial_credit": 0.0}}
  c.rl.dynamic_sampling = True
  c.rl.max_draws = 2
  c.rl.eps_low = 0.2
  c.rl.eps_high = 0.28
  c.rl.kl_coef = 0.0

  recipes.cpu_demo_grpo_schedule(c, suite="configs/eval_demo_step_critic.py", best_metric="steps/f1")
  c.train.steps = 20  # the warm start takes most of the 10 CPU-minutes
  return c

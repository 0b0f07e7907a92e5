"""Demo: Critique-GRPO (arXiv 2506.03106) on the synthetic world's actor task, on a laptop CPU.

The actor answers "What is a + b?" with a worked answer ending in \\boxed{sum}, rewarded by math-verify.
It starts from RUN_DIR/actor_warmstart, trained first with configs/demo_critique_grpo_sft.py: its
teacher always forgets the carry into the leading column, so on every problem with such a carry (38%
of the world) it samples few correct answers (2.6%) and plain GRPO has little to learn from: most
groups of 8 answers all fail and have no reward variance. GRPO here trains on exactly those
prompts. With rl.refinement on, each failed answer gets the rule-based critique with the reference
answer ("simple_gt"), the policy refines it from a second prompt (question + previous answer +
critique; the warm start learned to use one), and one refinement, a correct one when there is any,
joins the group as an off-policy answer to the ORIGINAL prompt (shaped ratio p / (p + 0.1)). The
pass rate on held-out problems with a leading carry ("carry/pass@1", sampled at T 1.0) is the
before/after table's measure; the plain-GRPO curve of the same steps comes from

  cftjax train --config configs/demo_critique_grpo.py \\
      --config.rl.refinement.when=off --config.train.run_dir=runs/demo_critique_grpo_plain

Measured in docs/recipes.md.

  cftjax train --config configs/demo_critique_grpo.py
  cftjax plot runs/demo_critique_grpo
"""

import recipes
from cftjax.config import base_config
from cftjax.data.critique import MATH_COT_SYSTEM
from cftjax.data.synthetic import REFINEMENT_USER

RUN_DIR = "runs/demo_critique_grpo"
WORLD_DIR = RUN_DIR + "/world"


def get_config():
  c = base_config()
  c.train.objective = "grpo"
  c.train.run_dir = RUN_DIR
  c.data.synthetic_world = True
  c.data.world_dir = WORLD_DIR
  c.data.world.digits = 2  # two-digit additions: short answers, cheap on a CPU
  c.data.world.num_train = 600
  c.data.world.num_heldout = 200
  c.data.template = "math_cot"
  c.data.sources = ({"path": WORLD_DIR + "/rl_math_train_carry.jsonl", "task": "math",
                     "template": "math_cot", "name": "carry"},)
  c.data.eval_path = WORLD_DIR + "/actor_heldout.jsonl"
  c.data.batch_size = 16  # prompts per step
  c.data.max_seq_len = 128
  c.data.packing = False

  c.model.init_from_run = RUN_DIR + "/actor_warmstart"
  c.model.warmstart_config = "demo_critique_grpo_sft.py"  # beside this file
  c.rl.group_size = 8
  c.rl.max_new_tokens = 32  # an answer is 26 tokens
  c.rl.max_prompt_len = 128  # a refinement prompt is ~100 tokens
  c.rl.prompt_buckets = (64, 128)
  c.rl.temperature = 1.0
  c.rl.rewards.by_task = {"math": "math"}
  c.rl.advantage_scale = "none"  # Critique-GRPO: r - mean over the combined group
  c.rl.aggregation = "token_mean"
  c.rl.eps_low = 0.2
  c.rl.eps_high = 0.28
  c.rl.kl_coef = 0.0
  c.rl.refinement.when = "all_failed"
  c.rl.refinement.critique = "simple_gt"
  c.rl.refinement.template = {"system": MATH_COT_SYSTEM, "user": REFINEMENT_USER}
  c.rl.refinement.num_refinements = 1
  c.rl.refinement.shaping_gamma = 0.1

  recipes.cpu_demo_grpo_schedule(c, suite="configs/eval_demo_critique_grpo.py", best_metric="carry/pass@1")
  return c

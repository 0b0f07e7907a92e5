"""Critique-Coder (arXiv 2509.22824): GRPO on Qwen3-4B with 20% CRL problems mixed into code RL.

Published settings (configs/recipes.py: paper_crl_recipe): 8 samples x 128 prompts per step,
lr 1e-6, clip 0.2 / 0.3, token-mean, no KL, std-normalised advantages, dynamic sampling, T 0.6,
top-p 0.95, top-k 20, 16k response tokens (the paper's second stage: --config.rl.max_new_tokens=32768).
Code rows carry tests (pass rate in [0, 1], sandboxed); CRL rows carry a solution and its label
(correct = passes > 80% of the tests) and are rewarded 1 when \\conclusion{T|F} matches.

  cftjax convert --hf-dir /models/Qwen3-4B --out converted/qwen3-4b
  cftjax train --config configs/critique_coder_qwen3_4b.py

Mesh: FSDP over all devices (8xH100 or a TPU v5p-16 or larger); see docs/recipes.md.
"""

from recipes import paper_crl_recipe


def get_config():
  return paper_crl_recipe(
      init_from="converted/qwen3-4b", rl_path="data/critique_coder/code_rl.jsonl", rl_task="code",
      rl_template="code", crl_path="data/critique_coder/crl.jsonl",
      eval_path="data/critique_coder/crl_heldout.jsonl", max_new_tokens=16384)

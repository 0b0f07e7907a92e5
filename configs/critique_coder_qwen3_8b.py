"""Critique-Coder (arXiv 2509.22824): GRPO on Qwen3-8B with 20% CRL problems mixed into code RL.

The paper's Qwen3-8B numbers (average of 5 code benchmarks): base 48.0, RL 49.8, CRL+RL 51.5.
Same published settings as configs/critique_coder_qwen3_4b.py (paper_crl_recipe).

  cftjax convert --hf-dir /models/Qwen3-8B --out converted/qwen3-8b
  cftjax train --config configs/critique_coder_qwen3_8b.py

Mesh: FSDP over all devices (8xH100 or a TPU v5p-32 or larger); see docs/recipes.md.
"""

from recipes import paper_crl_recipe


def get_config():
  return paper_crl_recipe(
      init_from="converted/qwen3-8b", rl_path="data/critique_coder/code_rl.jsonl", rl_task="code",
      rl_template="code", crl_path="data/critique_coder/crl.jsonl",
      eval_path="data/critique_coder/crl_heldout.jsonl", max_new_tokens=16384)

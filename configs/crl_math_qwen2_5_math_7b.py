"""Critique RL for math on Qwen2.5-Math-7B: 20% CRL problems (math solutions with a correctness label,
verdict reward) mixed into math RL (\\boxed answer checked with math-verify).

No math paper publishes this exact run: it applies Critique-Coder's GRPO settings (paper_crl_recipe)
to math. Qwen2.5-Math-7B has a 4096-token context, so responses are capped at 3072 new tokens
(prompts at 1024).

  cftjax convert --hf-dir /models/Qwen2.5-Math-7B --out converted/qwen2.5-math-7b
  cftjax train --config configs/crl_math_qwen2_5_math_7b.py
"""

from recipes import paper_crl_recipe


def get_config():
  c = paper_crl_recipe(
      init_from="converted/qwen2.5-math-7b", rl_path="data/crl_math/math_rl.jsonl", rl_task="math",
      rl_template="math_cot", crl_path="data/crl_math/crl.jsonl",
      eval_path="data/crl_math/crl_heldout.jsonl", max_new_tokens=3072)
  c.rl.max_prompt_len = 1024
  c.data.max_seq_len = 1024
  c.train.micro_batches = 16
  return c

"""One-shot CFT of Qwen2.5-Math-1.5B (arXiv 2506.03295): the 7B recipe's hyperparameters
(lr 5e-6, cosine, warmup 0.1, weight decay 0.05, global batch 512, 50 epochs, bf16).

  cftjax convert --hf-dir /models/Qwen2.5-Math-1.5B --out converted/qwen2.5-math-1.5b
  cftjax train --config configs/one_shot_cft_qwen2_5_math_1_5b.py \
      --config.data.train_path=data/one_shot_cft/problem.jsonl --config.data.eval_path=data/heldout.jsonl

Mesh: FSDP over all devices; a 1.5B model fits 2 micro-batches of 32 rows per H100 (8 GPUs), or one
TPU v5p-8 / v4-8 host with micro_batches=8. See docs/recipes.md.
"""

from recipes import paper_cft_recipe


def get_config():
  c = paper_cft_recipe(init_from="converted/qwen2.5-math-1.5b",
                       train_path="data/one_shot_cft/qwen2.5-math-1.5b.jsonl",
                       num_epochs=50, weight_decay=0.05, warmup_ratio=0.1)
  c.train.micro_batches = 2
  c.checkpoint.best_metric = "verdict_accuracy"
  return c

"""One-shot CFT of Qwen2.5-Math-7B (arXiv 2506.03295): 600 critiques of solutions to ONE problem,
50 epochs (~59 steps at global batch 512), lr 5e-6, cosine, warmup 0.1, weight decay 0.05, bf16.

  cftjax convert --hf-dir /models/Qwen2.5-Math-7B --out converted/qwen2.5-math-7b
  cftjax train --config configs/one_shot_cft_qwen2_5_math_7b.py \
      --config.data.train_path=data/one_shot_cft/problem.jsonl --config.data.eval_path=data/heldout.jsonl

Mesh: FSDP over all devices (mesh.fsdp=-1). 8xH100 80GB: 8 micro-batches of 8 rows per GPU.
TPU v5p-16 (8 chips, 95 GB HBM each): the same. TPU v4-32 (16 chips, 32 GB): set
--config.train.micro_batches=4. See docs/recipes.md.
"""

from recipes import paper_cft_recipe


def get_config():
  c = paper_cft_recipe(init_from="converted/qwen2.5-math-7b",
                       train_path="data/one_shot_cft/qwen2.5-math-7b.jsonl",
                       num_epochs=50, weight_decay=0.05, warmup_ratio=0.1)
  c.checkpoint.best_metric = "verdict_accuracy"  # the paper picks its best step on MATH validation
  return c

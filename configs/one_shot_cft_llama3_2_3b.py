"""One-shot CFT of Llama-3.2-3B-Instruct (arXiv 2506.03295): lr 5e-6, cosine, warmup 0.1, weight
decay 0.05, global batch 512, 50 epochs, bf16; the Llama 3 chat template comes with the checkpoint.

  cftjax convert --hf-dir /models/Llama-3.2-3B-Instruct --out converted/llama-3.2-3b-instruct
  cftjax train --config configs/one_shot_cft_llama3_2_3b.py \
      --config.data.train_path=data/one_shot_cft/problem.jsonl --config.data.eval_path=data/heldout.jsonl

Mesh: FSDP over all devices; 4 micro-batches of 16 rows per H100 (8 GPUs) or TPU v5p-16.
See docs/recipes.md.
"""

from recipes import paper_cft_recipe


def get_config():
  c = paper_cft_recipe(init_from="converted/llama-3.2-3b-instruct",
                       train_path="data/one_shot_cft/llama-3.2-3b.jsonl",
                       num_epochs=50, weight_decay=0.05, warmup_ratio=0.1)
  c.train.micro_batches = 4
  c.train.chunk_size = 1024  # [1024, 128256] float32 logits per device per chunk
  c.checkpoint.best_metric = "verdict_accuracy"
  return c

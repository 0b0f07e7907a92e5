"""DeepCritic (arXiv 2505.00662), stage 1: SFT of Qwen2.5-7B-Instruct on the ~4.5K deliberate
step-wise critiques (DeepCritic's `messages` rows, each ending "**Answer**: \\boxed{k}", k the first
wrong step counted from 1, -1 when every step is right), with the published settings: lr 1e-5,
3 epochs, max length 16384, global batch 16, cosine decay, warmup 0.1, bf16.

  cftjax convert --hf-dir /models/Qwen2.5-7B-Instruct --out converted/qwen2.5-7b-instruct
  cftjax train --config configs/deepcritic_qwen2_5_7b_sft.py

configs/deepcritic_qwen2_5_7b.py (the RL stage) runs this first when its run is missing. Mesh: FSDP
over all devices (8xH100), 2 micro-batches of 8 rows; docs/recipes.md.
"""

from recipes import paper_cft_recipe

RUN_DIR = "runs/deepcritic_qwen2_5_7b/sft"


def get_config():
  c = paper_cft_recipe(init_from="converted/qwen2.5-7b-instruct",
                       train_path="data/deepcritic/deepcritic_sft.jsonl",
                       num_epochs=3, weight_decay=0.0, warmup_ratio=0.1)
  c.train.run_dir = RUN_DIR
  c.data.format = "deepcritic"  # read only when named: the rows share `messages` with one-shot CFT
  c.data.template = "verbatim"  # the row's own prompt, the critique as the target
  c.data.max_seq_len = 16384
  c.data.batch_size = 16
  c.optim.lr = 1e-5
  c.train.micro_batches = 2
  c.eval.loss_batches = 0  # no held-out critique file by default (set data.eval_path)
  c.eval.verdict_examples = 0  # step critiques have no right/wrong verdict line
  c.checkpoint.every_steps = 100
  c.eval.every_steps = 100
  return c

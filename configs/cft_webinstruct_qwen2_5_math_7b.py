"""Original CFT (arXiv 2501.17703): Qwen2.5-Math-7B on WebInstruct-CFT (50K rows, Alpaca fields),
1 epoch (~98 steps at global batch 512), lr 5e-6, cosine, warmup 0.1, max length 2048, bf16.
The paper reports about 1 h on 8xH100.

  cftjax convert --hf-dir /models/Qwen2.5-Math-7B --out converted/qwen2.5-math-7b
  cftjax train --config configs/cft_webinstruct_qwen2_5_math_7b.py \
      --config.data.train_path=data/WebInstruct-CFT-50K.json

Mesh: FSDP over all devices, 8 micro-batches (8xH100 or TPU v5p-16); see docs/recipes.md. On v5p-16
`cftjax compile --sweep-remat` names --config.model.remat=minimal as the fastest policy that fits
(73.2 of 95 GiB per chip, estimated 15.8 s a step against 18.8 s with full; docs/recipes.md).
"""

from recipes import paper_cft_recipe


def get_config():
  c = paper_cft_recipe(init_from="converted/qwen2.5-math-7b",
                       train_path="data/webinstruct_cft/WebInstruct-CFT-50K.json",
                       num_epochs=1, weight_decay=0.0, warmup_ratio=0.1)
  c.data.format = "webinstruct"  # Alpaca fields: instruction, input, output
  c.checkpoint.every_steps = 25
  c.eval.every_steps = 25
  return c

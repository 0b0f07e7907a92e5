"""The training settings of the TPU side-by-side (benchmarks/tpu_compile.py): bf16 compute over
float32 master weights, full remat, FSDP over every chip, AdamW with global-norm clipping, 8 rows of
4096 tokens, 1024-token CE chunks. The architecture comes from `--model-config
benchmarks/model_configs/*.json`; shapes change with `--config.data.*` as usual.

  cftjax compile --config benchmarks/tpu_compile_config.py --topology v5p:2x2x2 \\
      --model-config benchmarks/model_configs/qwen2_5_7b.json
"""

from cftjax.config import base_config


def get_config():
  c = base_config()
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.batch_size = 8
  c.data.max_seq_len = 4096
  c.train.chunk_size = 1024
  c.optim.grad_clip_norm = 1.0
  c.mesh.fsdp = -1
  return c

"""The published recipes as config builders, for the config files beside this one (`import recipes`:
`cftjax.config.load_config_file` puts a config file's directory on the import path).

Each returns `cftjax.config.base_config()` with a paper's settings (docs/recipes.md has the sources);
a config file then sets its model, data and run directory. `cpu_demo_grpo_schedule` is the schedule
the CPU GRPO demos share.
"""

from ml_collections import config_dict

from cftjax.config import base_config


def paper_cft_recipe(*, init_from: str, train_path: str, num_epochs: int, weight_decay: float,
                     warmup_ratio: float) -> config_dict.ConfigDict:
  """The published CFT full fine-tune settings (arXiv 2501.17703 and 2506.03295; docs/recipes.md).

  lr 5e-6 with cosine decay after linear warmup, global batch 512 examples (no packing, so a step
  sees 512 critiques as in the papers), rows up to 2048 tokens (longer ones dropped and counted),
  bf16 compute over float32 master weights, FSDP over every device, 8 micro-batches.
  """
  c = base_config()
  c.model.init_from = init_from
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.train_path = train_path
  c.data.template = "cft"
  c.data.max_seq_len = 2048
  c.data.length_policy = "drop"
  c.data.batch_size = 512
  c.data.packing = False
  c.data.num_epochs = num_epochs
  c.optim.lr = 5e-6
  c.optim.schedule = "cosine"
  c.optim.warmup_ratio = warmup_ratio
  c.optim.weight_decay = weight_decay
  c.optim.grad_clip_norm = 1.0
  c.train.steps = 0  # = num_epochs passes over the rows, counted before training
  c.train.micro_batches = 8
  c.train.chunk_size = 1024  # [1024, ~152k] float32 logits per device per cross-entropy chunk
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.checkpoint.every_steps = 20
  c.checkpoint.max_to_keep = 2
  c.eval.every_steps = 10
  c.eval.loss_batches = 2
  c.eval.verdict_examples = 256
  c.eval.batch_size = 64
  c.eval.max_new_tokens = 1024
  c.eval.verdict_style = "cft"
  c.logging.every_steps = 1
  return c


def paper_crl_recipe(*, init_from: str, rl_path: str, rl_task: str, rl_template: str, crl_path: str,
                     eval_path: str, max_new_tokens: int, crl_weight: float = 0.2,
                     steps: int = 200) -> config_dict.ConfigDict:
  r"""Critique-Coder's published GRPO settings (arXiv 2509.22824; docs/recipes.md) for a CRL + RL mix.

  8 samples per prompt, 128 prompts per step, lr 1e-6 (constant), clip 0.2 / 0.3, token-mean loss
  over the global batch, no KL (no reference model), std-normalised group advantages, DAPO dynamic
  sampling, T 0.6 / top-p 0.95 / top-k 20. crl_weight of the prompts are CRL rows (verdict reward,
  \conclusion{T|F}); the rest are `rl_task` rows with their verifiable reward. Each prompt's group
  is its own baseline. bf16 compute over float32 master weights, FSDP over every device.
  """
  c = base_config()
  c.train.objective = "grpo"
  c.eval.loss_batches = 0  # RL rows carry no critique to score
  c.model.init_from = init_from
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.data.sources = (
      {"path": rl_path, "task": rl_task, "template": rl_template, "name": rl_task,
       "weight": 1.0 - crl_weight},
      {"path": crl_path, "task": "crl", "template": "crl", "name": "crl", "weight": crl_weight})
  c.data.template = "crl"  # held-out verdict accuracy prompts
  c.data.eval_path = eval_path
  c.data.batch_size = 128
  c.data.max_seq_len = 4096
  c.rl.group_size = 8
  c.rl.max_new_tokens = max_new_tokens
  c.rl.max_prompt_len = 4096
  c.rl.temperature = 0.6
  c.rl.top_p = 0.95
  c.rl.top_k = 20
  c.rl.generation_batch_size = 256
  c.rl.cache_dtype = "bfloat16"
  c.rl.rewards.options.verdict.style = "crl"
  c.rl.eps_low = 0.2
  c.rl.eps_high = 0.3
  c.rl.aggregation = "token_mean"
  c.rl.advantage_scale = "group_std"
  c.rl.kl_coef = 0.0
  c.rl.dynamic_sampling = True
  c.rl.max_draws = 3
  c.optim.lr = 1e-6
  c.optim.schedule = "constant"
  c.optim.warmup_ratio = 0.0
  c.optim.grad_clip_norm = 1.0
  c.train.steps = steps
  c.train.micro_batches = 64  # 1024 rows -> 16 rows per micro-batch
  c.train.chunk_size = 1024  # [1024, ~152k] float32 logits per device per log-prob chunk
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.checkpoint.every_steps = 10
  c.checkpoint.best_metric = "verdict_accuracy"
  c.eval.every_steps = 20
  c.eval.verdict_examples = 256
  c.eval.batch_size = 64
  c.eval.max_new_tokens = max_new_tokens
  c.eval.verdict_style = "crl"
  c.logging.every_steps = 1
  return c


def cpu_demo_grpo_schedule(c: config_dict.ConfigDict, *, suite: str, best_metric: str) -> None:
  """The GRPO schedule of the CPU demos (configs/demo_critique_grpo.py, demo_step_critic.py): 30 steps
  at a constant lr 1e-4 on one CPU device, the eval suite (every held-out row) and a checkpoint every
  10 steps, the best by `best_metric` (higher is better)."""
  c.optim.lr = 1e-4
  c.optim.schedule = "constant"
  c.optim.warmup_ratio = 0.0
  c.optim.b2 = 0.98
  c.train.steps = 30
  c.train.chunk_size = 2048
  c.mesh.fsdp = 1
  c.checkpoint.every_steps = 10
  c.checkpoint.best_metric = best_metric
  c.checkpoint.best_mode = "max"
  c.eval.every_steps = 10
  c.eval.loss_batches = 0
  c.eval.verdict_examples = 0
  c.eval.suite = suite
  c.eval.suite_limit = 0
  c.logging.every_steps = 1

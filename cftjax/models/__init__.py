"""Decoder models: the config, the one Flax decoder (training, prefill and decode) and its attention
dispatch. Hugging Face import/export: `cftjax.models.hf_io`; cftjax checkpoints and run directories:
`cftjax.models.checkpoint_io`."""

from cftjax.models import attention
from cftjax.models.config import ModelConfig
from cftjax.models.decoder import (Decoder, abstract_params, init_cache, init_params, lm_head_kernel,
                                   param_logical_axes)

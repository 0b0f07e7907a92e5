"""Decoder models: config, Flax decoder with KV cache, Hugging Face import/export."""

from cftjax.models.config import ConfigError, ModelConfig
from cftjax.models.decoder import (Decoder, abstract_params, init_cache, init_params, lm_head_kernel,
                                   param_logical_axes)
from cftjax.models.hf_io import CheckpointError, load_hf, mapping_table, save_hf

"""Loads a checkpoint and serves it with uvicorn until interrupted."""

from __future__ import annotations

import logging
import os

import uvicorn

from cftjax.models import checkpoint_io
from cftjax.serve import openai_api
from cftjax.serve.engine import Engine

logger = logging.getLogger(__name__)


def served_model_name(ckpt: str) -> str:
  """The model id clients send by default: the checkpoint (or run) directory's name."""
  return os.path.basename(os.path.normpath(ckpt))


def serve(ckpt: str, *, host: str = "127.0.0.1", port: int = 8000, served_name: str | None = None,
          max_batch_rows: int = 32, batch_window_s: float = 0.005) -> None:
  """Serves `ckpt` (a model checkpoint or a training run dir) on http://host:port until SIGINT/SIGTERM."""
  cfg, params, tokenizer = checkpoint_io.load_model(ckpt)
  name = served_name or served_model_name(ckpt)
  engine = Engine(params, cfg, tokenizer, max_batch_rows=max_batch_rows, batch_window_s=batch_window_s)
  logger.info("serving %s as model %r on http://%s:%d/v1", ckpt, name, host, port)
  try:
    uvicorn.run(openai_api.create_app(engine, name), host=host, port=port,
                log_level=logging.getLevelName(logging.getLogger().level).lower())
  finally:
    engine.close()

"""Tiny language model on the built-in math corpus: the CPU smoke-test of the training stack.

  python -m latent_em.main --config=configs/tiny.py --workdir=/tmp/tiny
  python -m latent_em.main --config=configs/tiny.py:steps=50 --workdir=/tmp/tiny --config.optim.lr=3e-3
"""
from latent_em import config_defaults


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, steps=300)
  config = config_defaults.base()
  config.job = "train"

  config.model.vocab_size = 0          # sized from the tokenizer
  config.model.dim = 128
  config.model.n_layers = 4
  config.model.n_heads = 4
  config.model.n_kv_heads = 2
  config.model.mlp_dim = 384

  config.tokenizer.vocab_size = 512
  config.data.train_files = ("builtin:mathcorpus/bootstrap",)
  config.data.validation_files = ("builtin:mathcorpus/validation",)
  config.data.seq_len = 256
  config.data.batch_size = 16

  config.optim.lr = 3e-3
  config.optim.warmup_steps = 30
  config.optim.weight_decay = 0.01
  config.train.steps = arg.steps
  config.train.log_every = 20
  config.train.eval_every = 100
  config.train.eval_batches = 10
  config.checkpoint.every_steps = 100
  return config

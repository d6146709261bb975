r"""BoLT with TinyLlama-1.1B on math web text, with the paper's hyperparameters (DESIGN.md §5).

Prepare once (any machine with the files):
  # the HF checkpoint dir (config.json + *.safetensors + tokenizer.model) and the tokenizer
  # with the four latent tokens appended:
  python -m latent_em.tools.train_tokenizer --base_model=$TL/tokenizer.model --output=$TOK
  # teacher thoughts for the warm-start split (any OpenAI-compatible endpoint):
  python -m latent_em.main --config=configs/bolt_tinyllama.py:teacher --workdir=$W/teacher \
      --config.tokenizer.path=$TOK --config.synthesis.model=gpt-4o-mini \
      --config.synthesis.input_files=$DATA/warmstart.jsonl

Run the whole loop (warm start, 3 EM iterations, raw baselines) on a TPU VM or GPU node:
  python -m latent_em.main --config=configs/bolt_tinyllama.py --workdir=$W/em \
      --config.em.base=$TL --config.tokenizer.path=$TOK \
      --config.em.teacher_records="('$W/teacher/synthesis/shard-*.tfrecord',)" \
      --config.em.bootstrap_files="('$DATA/bootstrap.jsonl',)" \
      --config.em.validation_files="('$DATA/validation.jsonl',)"

Variants (after the colon):
  teacher      job=synthesize: teacher thoughts through config.synthesis (API backend)
  warmstart    job=train on the teacher records only (the warm-start model)
  estep        job=estep with config.estep.init_from (one E-step)
  mstep        job=train from the base on config.mstep_data.record_files (one M-step)
  raw          job=train from the base on raw text (config.data.train_files)
  wrap / wrap_cot   job=train as pure text on paraphrase records (config.mstep_data.record_files)
  eval         job=eval of config.eval.init_from (MATH 4-shot, GSM8K 8-shot, NLL, ELBO)
  k=N          E-step samples per chunk (default 4)
  smoke        a 2-layer model of the same family for a dry run of the commands on CPU
The default (no variant) is job=em: all of the above in one resumable job.
"""
import os

from latent_em import config_defaults


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, teacher=False, warmstart=False, estep=False, mstep=False,
                                  raw=False, wrap=False, wrap_cot=False, eval=False, k=4,
                                  smoke=False)
  config = config_defaults.base()
  config.job = "em"

  # TinyLlama-1.1B (+ 4 latent rows); weights fp32, compute bf16.
  config.model.vocab_size = 32004
  config.model.dim = 2048
  config.model.n_layers = 22
  config.model.n_heads = 32
  config.model.n_kv_heads = 4
  config.model.mlp_dim = 5632
  config.model.rope_theta = 10000.0
  config.model.norm_eps = 1e-5
  config.model.tie_embeddings = False
  config.model.dtype = "bfloat16"
  config.model.remat = "full"

  # Paper: AdamW (0.9, 0.95), wd 0.01, clip 1.0, lr 1e-4 cosine, 1000 warm-up steps.
  config.optim.lr = 1e-4
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = 1000
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.weight_decay = 0.01
  config.optim.clip_norm = 1.0

  # Sequence 2048; batch 96 sequences (warm start) / 192 (bootstrap M-steps).
  config.data.seq_len = 2048
  config.data.batch_size = 192
  config.mesh.shape = (1, -1, 1)        # FSDP over every device (data, fsdp, tensor)
  # Sized for a v5e-8 by the fit check (docs/benchmarks.md, "Fit check"): the warm start's 96
  # sequences in one step (12 per chip, 10.8 of 15.75 GiB); 192 in two micro-batches (12.0 GiB).
  # One step of 192 fits a v5e-16 (9.4 GiB) or a v5p-8 (--config.train.grad_accum=1).
  config.train.grad_accum = 2
  config.checkpoint.every_steps = 500
  config.train.log_every = 50

  config.synthesis.backend = "api"
  config.synthesis.temperature = 0.7
  config.synthesis.max_tokens = 1024
  config.synthesis.chunking.prefix_chunks = 1

  # E-step: temperature 1.0, up to 1024 thought tokens, K = 4, resampling.
  config.estep.num_samples = arg.k
  config.estep.selection = "resample"
  config.estep.sampling.temperature = 1.0
  config.estep.sampling.max_gen_len = 1024
  config.estep.max_seq_len = 2048
  config.estep.batch_chunks = 64
  config.estep.prompt_bucket = 128
  config.estep.docs_per_shard = 256
  config.estep.chunking.prefix_chunks = 3

  config.em.iterations = 3
  config.em.warmstart_files = ()        # config.em.teacher_records instead (made by :teacher)
  config.em.bootstrap_files = ()
  config.em.validation_files = ()
  config.em.warmstart_epochs = 1.0
  config.em.mstep_epochs = 1.0
  config.em.baselines = ("raw_token_matched", "raw_compute_matched")
  config.em.eval_elbo_docs = 500

  config.eval.fewshot.tasks = ("math", "gsm8k")
  # MATH and GSM8K through latent_em.data.tfds (downloaded on first use), or give
  # --config.eval.fewshot.math_dir / gsm8k_dir with local JSONL files.
  config.eval.fewshot.tfds_data_dir = os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
  config.eval.fewshot.math_shots = 4
  config.eval.fewshot.gsm8k_shots = 8
  config.eval.fewshot.max_gen_len = 512
  config.eval.fewshot.batch_size = 64
  config.eval.fewshot.max_seq_len = 4096
  config.eval.elbo_ks = (1, 2, 4)

  if arg.teacher:
    config.job = "synthesize"
  elif arg.warmstart or arg.mstep or arg.raw or arg.wrap or arg.wrap_cot:
    config.job = "train"
    config.mstep_data.format = "pure" if (arg.wrap or arg.wrap_cot) else "random"
    if arg.warmstart:
      config.data.batch_size = 96
      config.train.grad_accum = 1
  elif arg.estep:
    config.job = "estep"
  elif arg.eval:
    config.job = "eval"
  if config.job != "em":
    # One stage alone: config.em is unused; its defaults validate without the EM job's files.
    config.em = config_defaults.base().em

  if arg.smoke:  # the same code path at toy size
    config.model.vocab_size = 0
    config.model.dim = 64
    config.model.n_layers = 2
    config.model.n_heads = 4
    config.model.n_kv_heads = 2
    config.model.mlp_dim = 128
    config.model.dtype = "float32"
    config.model.remat = "none"
    config.data.seq_len = 256
    config.data.batch_size = 8
    config.train.grad_accum = 1
    config.optim.warmup_steps = 2
    config.estep.sampling.max_gen_len = 16
    config.estep.max_seq_len = 256
    config.estep.prompt_bucket = 32
    config.eval.fewshot.max_gen_len = 16
    config.eval.fewshot.max_seq_len = 1024
    config.eval.fewshot.max_examples = 4
    config.eval.fewshot.batch_size = 4
    config.em.eval_elbo_docs = 4
  return config

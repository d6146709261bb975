"""BoLT on the built-in corpus' stories: texts that state derived quantities without the working.

  python -m latent_em.main --config=configs/stories.py --workdir=/tmp/bolt_stories
  python -m latent_em.main --config=configs/stories.py:data_constrained --workdir=/tmp/bolt_dc

Each story states quantities ("Mia has 7 marbles. Mia buys 5 more marbles.") and then derived
ones without their working ("Now Mia has 12 marbles."); chunks hold about 2 sentences, and the
oracle teacher's thought for a chunk is the working of the numbers it derives. Every run starts
from one random initialisation. The measure is NLL per validation token against the ELBO_k
bound (docs/results.md, "Stories").

Variants (after the colon, comma-separated):
  data_constrained
             a third of the raw stories (100 warm-start + 100 bootstrap), each seen 30 times in
             the warm start and 20 times in every M-step and in raw_token_matched: the
             repeated-data regime, where raw training overfits
  ablate_k   K = 1 in the E-step
  k=N        K = N samples per chunk
  seed=N     the seed of initialisation, data order and sampling (the corpus is fixed)
  smoke      a much smaller run for tests (a minute or two; not a result)
"""
from latent_em import config_defaults


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, data_constrained=False, ablate_k=False, k=4, seed=0,
                                  smoke=False)
  config = config_defaults.base()
  config.job = "em"
  config.seed = arg.seed

  config.corpus.seed = 0
  config.corpus.n_warmstart = 300
  config.corpus.n_bootstrap = 320
  config.corpus.n_validation = 200
  config.corpus.n_eval = 200
  config.corpus.n_fewshot = 8
  config.corpus.max_steps = 2          # equations per derived quantity
  config.corpus.max_operand = 10       # given numbers
  config.corpus.max_value = 20         # every value
  config.corpus.n_names = 4            # names per gender
  config.corpus.n_objects = 4
  config.corpus.plain = True           # one wording per kind of sentence

  config.model.vocab_size = 0          # sized from the tokenizer
  config.model.dim = 128
  config.model.n_layers = 4
  config.model.n_heads = 4
  config.model.n_kv_heads = 2
  config.model.mlp_dim = 384
  config.tokenizer.vocab_size = 512
  config.tokenizer.split_digits = False  # a number is one token

  config.data.seq_len = 256
  config.data.batch_size = 2           # many updates per token for a tiny model
  config.data.seed = arg.seed

  config.optim.lr = 3e-3
  config.optim.warmup_steps = 20
  config.optim.weight_decay = 0.01
  config.optim.schedule = "cosine"
  config.train.log_every = 20
  config.train.eval_every = 0
  config.train.eval_batches = 4
  config.train.progress_bar = True
  config.checkpoint.every_steps = 200

  # Chunks of ~2 sentences: most state one derived quantity, whose working is the thought.
  for section in (config.synthesis, config.estep):
    section.chunking.unit = "sentence"
    section.chunking.min_units, section.chunking.avg_units = 1, 2
    section.chunking.max_units = 4
  config.synthesis.backend = "oracle"
  config.synthesis.chunking.prefix_chunks = 1
  config.estep.chunking.prefix_chunks = 2
  config.estep.num_samples = 1 if arg.ablate_k else arg.k
  config.estep.selection = "resample"
  config.estep.max_seq_len = 256
  config.estep.sampling.max_gen_len = 40
  # A sharper proposal than the model itself; log q is the tempered proposal's, so the
  # importance weights and ELBO_k stay exact.
  config.estep.sampling.temperature = 0.5
  config.estep.batch_chunks = 32
  config.estep.score_rows = 32
  config.estep.prompt_bucket = 32
  config.estep.docs_per_shard = 200
  config.estep.elbo_ks = (1, 2, 4)
  config.estep.seed = arg.seed
  config.mstep_data.seed = arg.seed

  config.em.iterations = 2
  config.em.warmstart_epochs = 7.0
  config.em.mstep_epochs = 2.0
  config.em.baselines = ("raw_token_matched", "raw_compute_matched")
  config.em.eval_elbo_docs = 25

  config.eval.fewshot.tasks = ("mathcorpus",)
  config.eval.fewshot.mathcorpus_shots = 2
  config.eval.fewshot.max_gen_len = 48
  config.eval.fewshot.batch_size = 50
  config.eval.fewshot.max_seq_len = 256
  config.eval.nll_batch_size = 16
  config.eval.seed = arg.seed

  if arg.data_constrained:
    config.corpus.n_warmstart = 100
    config.corpus.n_bootstrap = 100
    config.em.warmstart_epochs = 30.0
    config.em.mstep_epochs = 20.0
  if arg.smoke:
    config.corpus.n_warmstart = 40
    config.corpus.n_bootstrap = 40
    config.corpus.n_validation = 12
    config.corpus.n_eval = 12
    config.data.batch_size = 8
    config.em.warmstart_epochs = 1.0
    config.em.mstep_epochs = 1.0
    config.em.eval_elbo_docs = 4
    config.eval.fewshot.max_gen_len = 24
    config.eval.fewshot.batch_size = 12
    config.estep.sampling.max_gen_len = 24
    config.estep.docs_per_shard = 20
  return config

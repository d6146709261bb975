"""BoLT end to end on the built-in math corpus, sized for a 2-core laptop CPU.

  python -m latent_em.main --config=configs/quickstart.py --workdir=/tmp/bolt_quickstart
  python -m latent_em.main --config=configs/quickstart.py:ablate_k --workdir=/tmp/bolt_k1 \
      --config.em.reuse_from=/tmp/bolt_quickstart
  python -m latent_em.main --config=configs/quickstart.py:seed=1 --workdir=/tmp/bolt_s1 \
      --config.em.reuse_from=/tmp/bolt_quickstart
  python -m latent_em.main --config=configs/quickstart.py:smoke --workdir=/tmp/bolt_smoke

The raw corpus is an answer key: word problems of 2 or 3 steps whose answers are given bare
("Question: Mia has 7 apples. Mia buys 5 more apples. Mia gives 3 apples to her friend. How
many apples does Mia have now?\nAnswer: The answer is 9."). Stages (latent_em/em/job.py):
  base         a 0.9M-parameter Llama pretrained on one-step problems written with their
               working (every step the exercises take) and on multi-step question text: it
               knows the primitives, not their composition
  teacher      the oracle writes the working of each warm-start answer as its thought
  warmstart    300 worked multi-step answers, trained from the base
  baselines    raw_token_matched and raw_compute_matched (the same raw exercises, no
               thoughts), teacher_all (the oracle's thoughts on every exercise)
  EM           3 iterations: the E-step samples K = 16 thoughts per answer from the last
               model's posterior and keeps one by importance resampling; the M-step retrains
               the base on the warm-start and E-step records
  evaluation   held-out questions answered directly and after thinking, validation NLL, ELBO_k

Variants (after the colon, comma-separated):
  ablate_k   K = 1 in the E-step (one sample, no importance resampling); with
             --config.em.reuse_from=<the default run's workdir> it reuses every stage before
             the first E-step
  k=N        K = N samples per answer (default 16; with K = 8 EM stops gaining after the
             first iteration, docs/probes.md)
  seed=N     the seed of the fine-tuning runs' data order and of sampling (the corpus and
             the base, config.em.base_seed, are the same for every seed)
  smoke      a much smaller run for tests and notebooks (a minute or two; not a result)
"""
from latent_em import config_defaults
from latent_em.data import mathcorpus


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, ablate_k=False, k=16, seed=0, smoke=False)
  config = config_defaults.base()
  config.job = "em"
  config.seed = arg.seed

  # The same corpus for every seed: seeds differ in initialisation, data order and sampling.
  c = config.corpus
  c.seed = 0
  c.exercises = True
  c.min_steps = 2                      # every raw exercise needs 2 or 3 operations
  c.max_steps = 3
  c.n_warmstart = 300                  # worked by the teacher
  c.n_bootstrap = 1200                 # 4x as many, worked only by the E-step
  c.n_validation = 200                 # NLL and ELBO documents
  c.n_dev = 500                        # questions for choices and probes
  c.n_eval = 1000                      # held-out questions for the reported table
  c.n_fewshot = 0
  c.n_pretrain = 3000                  # the base's one-step worked problems ...
  c.pretrain_steps = 1
  c.n_pretrain_questions = 1500        # ... and multi-step questions without answers
  # Given numbers up to 10, every value up to 20: a small table of one-step facts.
  c.max_operand = 10
  c.max_value = 20
  c.n_names = 4                        # names per gender
  c.n_objects = 4
  c.plain = True                       # one wording per kind of sentence

  config.model.vocab_size = 0          # sized from the tokenizer
  config.model.dim = 128
  config.model.n_layers = 4
  config.model.n_heads = 4
  config.model.n_kv_heads = 2
  config.model.mlp_dim = 384
  config.tokenizer.vocab_size = 512    # whole words and whole numbers
  # "13" is one piece, not "1" "3": a copied or computed number is one prediction.
  config.tokenizer.split_digits = False

  config.data.seq_len = 256
  config.data.batch_size = 2
  config.data.seed = arg.seed

  config.optim.lr = 3e-3               # the base, from random initialisation
  config.optim.warmup_steps = 20
  config.optim.weight_decay = 0.01
  config.optim.schedule = "cosine"
  config.train.log_every = 50
  config.train.eval_every = 0
  config.train.eval_batches = 4
  config.train.progress_bar = True
  config.checkpoint.every_steps = 500

  # An exercise is two chunks: the question, which is context (no thought; trained as raw
  # text, so the evaluation's and the E-step's question prompts are contexts training shows),
  # and the answer, whose thought is its working, written after "Answer:".
  for section in (config.synthesis, config.estep):
    ch = section.chunking
    ch.unit = "sentence"
    ch.min_units = ch.avg_units = ch.max_units = 12
    ch.break_after = mathcorpus.ANSWER_BREAK
    ch.context_until = mathcorpus.ANSWER_BREAK
    ch.prefix_chunks = 1
  config.synthesis.backend = "oracle"
  config.mstep_data.empty_thoughts = False
  config.mstep_data.prior_rate = 0.5

  config.estep.num_samples = 1 if arg.ablate_k else arg.k
  config.estep.selection = "resample"
  config.estep.max_seq_len = 256
  config.estep.sampling.max_gen_len = 80
  config.estep.sampling.temperature = 1.0
  config.estep.batch_chunks = 32
  config.estep.score_rows = 32
  config.estep.prompt_bucket = 32
  config.estep.docs_per_shard = 400
  config.estep.elbo_ks = (1, 2, 4)
  config.estep.seed = arg.seed
  config.mstep_data.seed = arg.seed

  config.em.iterations = 3
  config.em.base_files = ("builtin:mathcorpus/pretrain_cot",
                          "builtin:mathcorpus/pretrain_questions")
  config.em.base_epochs = 3.0
  # One base for every seed=N (a pretrained model is not re-drawn per fine-tuning seed); a run
  # with another seed links it with --config.em.reuse_from=<a finished run's workdir>.
  config.em.base_seed = 0
  config.em.finetune_lr = 1e-3         # every run that starts from the base
  # Half of every such run's examples are the base's own documents: a few hundred exercises
  # then teach the composition without erasing the one-step problems it is made of.
  config.em.replay = 0.5
  config.em.warmstart_epochs = 10.0
  # M-steps: these passes over the warm-start and bootstrap exercises at the warm start's
  # rows per exercise; raw_compute_matched and teacher_all train as many steps.
  config.em.mstep_epochs = 3.0
  config.em.baselines = ("raw_token_matched", "raw_compute_matched", "teacher_all")
  config.em.eval_elbo_docs = 50

  config.eval.fewshot.tasks = ("mathcorpus",)
  config.eval.fewshot.mathcorpus_shots = 0   # the exercise is itself the question format
  config.eval.fewshot.mathcorpus_split = "eval"
  config.eval.fewshot.max_gen_len = 88
  config.eval.fewshot.batch_size = 100
  config.eval.fewshot.max_seq_len = 256
  config.eval.nll_batch_size = 16
  config.eval.seed = arg.seed

  if arg.smoke:
    c.n_pretrain, c.n_pretrain_questions = 60, 20
    c.n_warmstart, c.n_bootstrap = 40, 40
    c.n_validation, c.n_dev, c.n_eval = 12, 12, 12
    config.em.iterations = 2
    config.em.base_epochs = 1.0
    config.data.batch_size = 8
    config.em.warmstart_epochs = 1.0
    config.em.mstep_epochs = 1.0
    config.em.eval_elbo_docs = 4
    config.estep.num_samples = 1 if arg.ablate_k else min(arg.k, 4)
    config.eval.fewshot.max_gen_len = 24
    config.eval.fewshot.batch_size = 12
    config.estep.sampling.max_gen_len = 24
    config.estep.docs_per_shard = 20
  return config

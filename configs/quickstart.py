"""BoLT end to end on the built-in math corpus, sized for a 2-core laptop CPU (about 6.5 minutes).

  python -m latent_em.main --config=configs/quickstart.py --workdir=/tmp/bolt_quickstart
  python -m latent_em.main --config=configs/quickstart.py:ablate_k --workdir=/tmp/bolt_k1
  python -m latent_em.main --config=configs/quickstart.py:smoke --workdir=/tmp/bolt_smoke

The corpus is an answer key: word problems whose answers are given bare, without the working
("Question: Mia has 7 apples. Mia buys 5 more apples. Mia gives 3 apples to her friend. How
many apples does Mia have now?\nAnswer: The answer is 9.", 1 to 3 equations of working per
answer). Stages (see latent_em/em/job.py): a 1M-parameter Llama is pretrained on 3,000 other
exercises written with their working (the base every run starts from, as the paper starts from
a pretrained model that has read worked solutions); the oracle teacher writes the working of
each warm-start answer as its thought, written after "Answer:"; the warm start trains on them;
raw baselines train on the same raw exercises; two EM iterations infer thoughts for the
bootstrap exercises with K = 4 samples per chunk and retrain from the base; every run is
evaluated (held-out exercises answered directly and after thinking, zero-shot; validation NLL
and ELBO_1,2,4).

Variants (after the colon, comma-separated):
  ablate_k   K = 1 in the E-step (one sample, no importance resampling): the K ablation
  k=N        any K
  seed=N     the seed of the initialisation, data order and sampling (the corpus is fixed)
  smoke      a much smaller run for tests and notebooks (about a minute or two; not a result)
  stories    the earlier corpus: stories that state derived quantities without their working
             ("Now she has 47 marbles."), ~2 sentences per chunk, from random initialisation,
             2-shot questions in another wording (README § Measured, "Stories")
Story variants (each implies `stories`; README § Measured):
  large_warmstart
             4x the warm-start stories (1,200) for 8 epochs: a warm start that reads its
             thoughts, whose E-step writes right working
  data_constrained
             a third of the raw stories (100 warm-start + 100 bootstrap), each seen 30 times
             in the warm start and 20 times in every M-step and in raw_token_matched (about 3x
             that in raw_compute_matched): the repeated-data regime, where raw training overfits
             (measured when thought-augmented runs got about two thirds of their nominal passes)
  tally      tally stories (per person a start, 3-4 changes of 2-4, then the total: every
             derived number a 3-4 step sum) cut into one chunk per story, so one thought holds
             the whole story's working and the E-step's prompt is the whole story
  pretrained_base
             every run starts from a base this job first pretrains on 1,500 other stories
             written with their working (`builtin:mathcorpus/pretrain_cot`)
"""
from latent_em import config_defaults
from latent_em.data import mathcorpus


def get_config(arg=None):
  arg = config_defaults.parse_arg(arg, ablate_k=False, k=4, seed=0, smoke=False,
                                  large_warmstart=False, data_constrained=False, tally=False,
                                  pretrained_base=False, stories=False)
  config = config_defaults.base()
  config.job = "em"
  config.seed = arg.seed
  k = 1 if arg.ablate_k else arg.k
  stories = (arg.stories or arg.large_warmstart or arg.data_constrained or arg.tally
             or arg.pretrained_base)

  # The same corpus for every seed: seeds differ in initialisation, data order and sampling.
  config.corpus.seed = 0
  config.corpus.n_warmstart = 300
  config.corpus.n_bootstrap = 320
  config.corpus.n_validation = 200
  config.corpus.n_eval = 200
  config.corpus.n_fewshot = 8
  # Small numbers (given <= 10, every value <= 20): few enough arithmetic facts for a 1M-parameter
  # model to learn from a few hundred thousand tokens.
  config.corpus.max_steps = 2
  config.corpus.max_operand = 10
  config.corpus.max_value = 20
  # Four names per gender and four objects: fewer entities to learn to copy (validation NLL of
  # the warm start 1.46 vs 1.86 nats/token with all 56 names and 24 objects, same budget).
  config.corpus.n_names = 4
  config.corpus.n_objects = 4
  # One wording per kind of sentence: less text that no thought explains (README § Measured).
  config.corpus.plain = True

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
  # Small batches: more updates per token for a tiny model (batch 2 vs 8 at the same tokens and
  # time: raw_token_matched NLL 1.006 vs 1.280 nats/token).
  config.data.batch_size = 2
  config.data.seed = arg.seed

  config.optim.lr = 3e-3
  config.optim.warmup_steps = 20
  config.optim.weight_decay = 0.01
  config.optim.schedule = "cosine"
  config.train.log_every = 20
  config.train.eval_every = 0
  config.train.eval_batches = 4
  config.train.progress_bar = True
  config.checkpoint.every_steps = 200   # ~40 s of training between saves

  # Chunks of ~2 sentences: most chunks state one derived quantity, whose working is the thought.
  chunks = dict(unit="sentence", min_units=1, avg_units=2, max_units=4)
  for key, value in chunks.items():
    config.synthesis.chunking[key] = value
    config.estep.chunking[key] = value
  config.synthesis.backend = "oracle"
  config.synthesis.chunking.prefix_chunks = 1
  config.estep.chunking.prefix_chunks = 2
  config.estep.num_samples = k
  config.estep.selection = "resample"
  config.estep.max_seq_len = 256
  config.estep.sampling.max_gen_len = 40
  # A sharper proposal than the model itself: the warm start's thoughts get 34% of their equations
  # right at temperature 0.5 (K = 1, 3 seeds) and 14% at 1.0 (K = 4, one seed, 6-epoch warm start).
  # log q is the tempered proposal's, so the importance weights and ELBO_k stay exact.
  config.estep.sampling.temperature = 0.5
  config.estep.batch_chunks = 32
  config.estep.score_rows = 32
  config.estep.prompt_bucket = 32
  config.estep.docs_per_shard = 200
  config.estep.elbo_ks = (1, 2, 4)
  config.estep.seed = arg.seed
  config.mstep_data.seed = arg.seed

  config.em.iterations = 2
  # Real passes (em/job.py): about the passes thought-augmented runs got before budgets counted
  # the rows packing leaves partly empty (10 and 3 nominal passes then).
  config.em.warmstart_epochs = 7.0
  config.em.mstep_epochs = 2.0
  config.em.baselines = ("raw_token_matched", "raw_compute_matched")
  config.em.eval_elbo_docs = 25

  config.eval.fewshot.tasks = ("mathcorpus",)
  config.eval.fewshot.mathcorpus_shots = 2   # prompt + answer within the trained 256 positions
  config.eval.fewshot.max_gen_len = 48
  config.eval.fewshot.batch_size = 50
  config.eval.fewshot.max_seq_len = 256
  config.eval.nll_batch_size = 16
  config.eval.seed = arg.seed

  if arg.tally:
    config.corpus.tally = True
    config.corpus.max_steps = 4
    config.corpus.max_change = 4
    # One chunk per story (at most 12 sentences): the thought is the whole working, written
    # before the story in prior form; the E-step needs no prefix and writes ~67 tokens.
    for section in (config.synthesis, config.estep):
      section.chunking.min_units = section.chunking.avg_units = section.chunking.max_units = 12
    config.estep.chunking.prefix_chunks = 0
    config.estep.sampling.max_gen_len = 80
  if not stories:
    config.corpus.exercises = True
    config.corpus.max_steps = 3
    # Exercises are about half a story's length: twice the documents, the same E-step chunks.
    config.corpus.n_warmstart = 600
    config.corpus.n_bootstrap = 640
    # Two chunks per exercise, cut after "Answer:": the question, and the answer, whose
    # thought (its working) comes where the latent evaluation prompt asks the model to think.
    for section in (config.synthesis, config.estep):
      section.chunking.min_units = section.chunking.avg_units = section.chunking.max_units = 12
      section.chunking.break_after = mathcorpus.ANSWER_BREAK
      section.chunking.prefix_chunks = 1
    # The question chunk states only given numbers: it is trained with the empty thought
    # (`SoL PRIOR EoL x`), so the model learns to think nothing there and the E-step, once it
    # has, samples empty thoughts for it at next to no cost to the bound.
    config.mstep_data.empty_thoughts = True
    # Four chunks in five in the prior form (think, then write): the form the latent answer
    # prompt asks for (seed 0: warm start 66.5% against 50.5% at 1/2; ELBO_4 -0.745 / -0.797).
    config.mstep_data.prior_rate = 0.8
    config.estep.sampling.max_gen_len = 48
    config.eval.fewshot.max_gen_len = 64
    # Every run starts from a base pretrained on 3,000 other exercises with their working
    # written out (`pretrain_cot`): it answers 88% of the held-out questions (seed 0) by
    # writing the working first. The question is what training on answers alone does to it.
    config.corpus.n_pretrain = 3000
    config.em.base_files = ("builtin:mathcorpus/pretrain_cot",)
    config.em.base_epochs = 6.0
    # Zero-shot: the exercise is itself the question format, and a 1M-parameter model trained
    # on one document per context does not learn from exemplars (the base: 88% zero-shot,
    # 8% 2-shot; README § Measured).
    config.eval.fewshot.mathcorpus_shots = 0
  if arg.large_warmstart:
    config.corpus.n_warmstart = 1200
    config.em.warmstart_epochs = 8.0
  if arg.data_constrained:
    config.corpus.n_warmstart = 100
    config.corpus.n_bootstrap = 100
    config.em.warmstart_epochs = 30.0
    config.em.mstep_epochs = 20.0
  if arg.pretrained_base:
    config.corpus.n_pretrain = 1500
    config.em.base_files = ("builtin:mathcorpus/pretrain_cot",)
    config.em.base_epochs = 3.0
  if arg.smoke:
    if not stories:
      config.corpus.n_pretrain = 60
      config.em.base_epochs = 1.0
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

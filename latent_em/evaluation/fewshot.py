"""Few-shot chain-of-thought evaluation, greedy (DESIGN.md §5).

Tasks and prompt formats (exemplars joined, then the question; the model continues the text):
  mathcorpus  the built-in corpus' own format: `Question: ...\\nAnswer: <working> The answer is N.`
  gsm8k       `Question: q\\nAnswer: <solution>\\n\\n`; the solution's calculator annotations
              `<<a*b=c>>` are removed and its `#### N` line becomes `The answer is N.`
  math        Minerva style: `Problem:\\nq\\n\\nSolution:\\n<solution>\\n\\n`; solutions end in a
              `\\boxed{}` answer, compared for mathematical equivalence.
The generation is cut at the first exemplar separator (`\\n\\n` or `Question:`; `Problem:` for
MATH, whose solutions contain blank lines). Stop strings are handled by generating up to
`max_gen_len` tokens and cutting the decoded text; tokens whose text contains a whole separator
also stop a row early (exact: everything after them would be cut anyway).

Two variants:
  raw     the four latent tokens are banned (`SamplingConfig.banned_ids`), so a model trained on
          raw text answers directly.
  latent  the prompt ends with `SoL PRIOR` (formats.latent_answer_prompt): the model writes its
          thought, EoL, then the answer. Only the text after the first EoL is the answer (cut at
          the separator, latent tokens stripped); a generation without EoL has no answer and is
          counted in `no_eol`.

Prompts longer than the context (`max_seq_len - max_gen_len` tokens) drop their oldest exemplars
one at a time; a question that does not fit even alone keeps its last tokens. Both are counted.

Samplers are cached by (model, settings, stop ids, mesh), so tasks and variants that share them
share compiled code; prompts are padded to power-of-two buckets (one compile per bucket).
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import random
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latent_em import config_lib, formats, model as model_lib, sharding
from latent_em.evaluation import answers
from latent_em.sampling import sampler as sampler_lib

TASKS = ("mathcorpus", "gsm8k", "math")
LATENT_MODES = ("auto", "on", "off", "both")
# Cut the generation at the first of these (the start of the next exemplar).
SEPARATORS = {"mathcorpus": ("\n\n", "Question:"), "gsm8k": ("\n\n", "Question:"),
              "math": ("Problem:",)}
_SMALLEST_BUCKET = 64


def _latent_mode(value: Any) -> str:
  if isinstance(value, bool):
    return "on" if value else "off"
  v = str(value).strip().lower()
  return {"true": "on", "false": "off", "1": "on", "0": "off"}.get(v, v)


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
  """config.eval.fewshot"""
  tasks: tuple[str, ...] = ("mathcorpus",)   # any of TASKS
  mathcorpus_shots: int = 4
  gsm8k_shots: int = 8
  math_shots: int = 4
  max_examples: int = 0          # per task; 0 = the whole split
  max_gen_len: int = 256
  batch_size: int = 16
  max_seq_len: int = 0           # prompt + generation budget; 0 = config.data.seq_len
  # auto: the latent variant iff the checkpoint was thought-trained, else raw; on / off (also
  # True / False) / both.
  latent: bool | str = "auto"
  exemplar_seed: int = 0         # 0: the first n_shots training records; s > 0: a seeded sample
  mathcorpus_dir: str = ""       # fewshot.jsonl + {mathcorpus_split}.jsonl; "" = built-in
  # The built-in corpus' question split: "eval" (held out, for reported results) or "dev"
  # (held out too, for choices and probes).
  mathcorpus_split: str = "eval"
  gsm8k_dir: str = ""            # train.jsonl + {gsm8k_split}.jsonl (upstream GSM8K format)
  gsm8k_split: str = "test"
  math_dir: str = ""             # train.jsonl + {math_split}.jsonl (PRM800K schema)
  math_split: str = "test"       # test | math500
  tfds_data_dir: str = ""        # read gsm8k / math through latent_em.data.tfds when no dir
  keep_samples: int = 3          # generations kept per task and variant for inspection

  def __post_init__(self):
    key = "config.eval.fewshot"
    object.__setattr__(self, "latent", _latent_mode(self.latent))
    config_lib.check(self.latent in LATENT_MODES, f"{key}.latent",
                     f"{self.latent!r} is not one of {list(LATENT_MODES)} (or True / False)")
    for task in self.tasks:
      config_lib.check(task in TASKS, f"{key}.tasks", f"{task!r} is not one of {list(TASKS)}")
    for task in TASKS:
      config_lib.check(getattr(self, f"{task}_shots") >= 0, f"{key}.{task}_shots", "must be >= 0")
    config_lib.check(self.max_examples >= 0, f"{key}.max_examples", "must be >= 0 (0 = all)")
    config_lib.check(self.max_gen_len > 0, f"{key}.max_gen_len", "must be positive")
    config_lib.check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
    config_lib.check(self.max_seq_len >= 0, f"{key}.max_seq_len", "must be >= 0")
    config_lib.check(self.keep_samples >= 0, f"{key}.keep_samples", "must be >= 0")
    for task in ("gsm8k", "math"):
      config_lib.check(task not in self.tasks or getattr(self, f"{task}_dir")
                       or self.tfds_data_dir, f"{key}.{task}_dir",
                       f"task {task!r} needs its data: set {key}.{task}_dir to a folder of "
                       f"JSONL files or {key}.tfds_data_dir to a TFDS data dir")

  def n_shots(self, task: str) -> int:
    return getattr(self, f"{task}_shots")


@dataclasses.dataclass(frozen=True)
class Example:
  """One problem: `question` as stored in the dataset, the exemplar-format `solution`, the gold
  final `answer`, and MATH's subject / level."""
  id: str
  question: str
  solution: str
  answer: str
  subject: str = ""
  level: int | None = None
  steps: int | None = None       # built-in corpus: equations in the working


# ----------------------------------------------------------------------------- records


def gsm8k_solution(answer: str) -> str:
  """A GSM8K `answer` field in exemplar form: no `<<...>>` annotations, `#### N` -> `The answer
  is N.`, no blank lines (the exemplar separator)."""
  body, _, final = answer.rpartition("####")
  body = re.sub(r"<<[^<>]*>>", "", body).strip()
  body = re.sub(r"\n\s*\n", "\n", body)
  return f"{body}\nThe answer is {final.strip()}."


def _level(value: Any) -> int | None:
  if isinstance(value, int) and not isinstance(value, bool):
    return value if value >= 0 else None
  m = re.fullmatch(r"\s*Level\s+(\d+)\s*", str(value or ""))
  return int(m.group(1)) if m else None


def to_example(task: str, record: dict[str, Any], index: int) -> Example:
  """A dataset record (GSM8K / MATH / built-in corpus schema) as an Example."""
  if task == "gsm8k":
    gold = answers.extract_gsm8k_answer(record["answer"].rpartition("####")[2])
    return Example(id=str(record.get("id", index)), question=record["question"],
                   solution=gsm8k_solution(record["answer"]), answer=gold or "")
  if task == "math":
    gold = record.get("answer") or answers.extract_math_answer(record["solution"]) or ""
    return Example(id=str(record.get("unique_id", index)), question=record["problem"],
                   solution=record["solution"], answer=gold,
                   subject=record.get("subject") or record.get("type", ""),
                   level=_level(record.get("level")))
  if task == "mathcorpus":
    return Example(id=str(record.get("id", index)), question=record["question"],
                   solution=record["solution"], answer=str(record["answer"]),
                   steps=record.get("steps"))
  raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"evaluation data file {path!r} does not exist")
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, start=1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
  return rows


def _read_tfds(task: str, split: str, data_dir: str) -> list[dict[str, Any]]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy)
  from latent_em.data import tfds as builders  # pylint: disable=g-import-not-at-top
  name = {"gsm8k": builders.gsm8k.NAME, "math": builders.math_dataset.NAME}[task]
  rows = []
  for ex in tfds.as_numpy(builders.load_split(name, split, data_dir)):
    rows.append({k: v.decode("utf-8") if isinstance(v, bytes) else v.item()
                 for k, v in ex.items()})
  return rows


def load_task(task: str, cfg: FewShotConfig, mathcorpus_dir: str = ""
              ) -> tuple[list[Example], list[Example]]:
  """(exemplars [n_shots], evaluation examples [<= max_examples]) for one task."""
  if task == "mathcorpus":
    directory = cfg.mathcorpus_dir or mathcorpus_dir
    if not directory:
      raise FileNotFoundError("config.eval.fewshot.mathcorpus_dir is empty and no built-in "
                              "corpus was generated")
    pool, evals = (_read_jsonl(os.path.join(directory, f"{s}.jsonl"))
                   for s in ("fewshot", cfg.mathcorpus_split))
  else:
    directory = getattr(cfg, f"{task}_dir")
    split = getattr(cfg, f"{task}_split")
    if directory:
      pool = _read_jsonl(os.path.join(directory, "train.jsonl"))
      evals = _read_jsonl(os.path.join(directory, f"{split}.jsonl"))
    else:
      pool = _read_tfds(task, "train", cfg.tfds_data_dir)
      evals = _read_tfds(task, split, cfg.tfds_data_dir)
  n = cfg.n_shots(task)
  if n > len(pool):
    raise config_lib.ConfigError(f"config.eval.fewshot.{task}_shots={n} but the exemplar pool "
                                 f"has only {len(pool)} records")
  chosen = pool[:n] if cfg.exemplar_seed == 0 else random.Random(cfg.exemplar_seed).sample(pool, n)
  if cfg.max_examples:
    evals = evals[:cfg.max_examples]
  return ([to_example(task, r, i) for i, r in enumerate(chosen)],
          [to_example(task, r, i) for i, r in enumerate(evals)])


# ----------------------------------------------------------------------------- prompts


def _question_text(question: str, task: str) -> str:
  if task == "gsm8k":
    return f"Question: {question}\nAnswer:"
  if task == "math":
    return f"Problem:\n{question}\n\nSolution:"
  return question  # the built-in corpus stores "Question: ...\nAnswer:"


def _exemplar_text(ex: Example, task: str) -> str:
  joiner = "\n" if task == "math" else " "
  return f"{_question_text(ex.question, task)}{joiner}{ex.solution}\n\n"


def build_prompt(exemplars: Sequence[Example], question: str, task: str) -> str:
  """Few-shot prompt: every exemplar (question + solution + blank line), then the question."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
  return "".join(_exemplar_text(ex, task) for ex in exemplars) + _question_text(question, task)


@dataclasses.dataclass(frozen=True)
class Prompt:
  ids: list[int]           # BOS + prompt tokens
  shots: int               # exemplars kept
  question_cut: bool       # the question alone was too long and lost its first tokens


def fit_prompt(tokenizer, exemplars: Sequence[Example], question: str, task: str, latent: bool,
               budget: int) -> Prompt:
  """Token ids of the prompt within `budget` tokens: oldest exemplars dropped first."""
  for shots in range(len(exemplars), -1, -1):
    text = build_prompt(exemplars[len(exemplars) - shots:], question, task)
    if latent:
      text = formats.latent_answer_prompt(text)
    ids = tokenizer.encode(text, bos=True)
    if len(ids) <= budget:
      return Prompt(ids, shots, False)
  return Prompt([ids[0]] + ids[len(ids) - budget + 1:], 0, True)


# ----------------------------------------------------------------------------- generation


def stop_ids_for(tokenizer, separators: Sequence[str]) -> tuple[int, ...]:
  """EOS and every token whose text contains a whole separator."""
  out = {tokenizer.eos_id}
  if separators:
    for i in range(tokenizer.vocab_size):
      piece = tokenizer.decode([i])
      if any(s in piece for s in separators):
        out.add(i)
  return tuple(sorted(out))


def banned_ids_for(tokenizer, model_cfg: model_lib.ModelConfig, latent: bool) -> tuple[int, ...]:
  """Ids never generated: padded embedding rows, BOS and pad; the latent tokens too when raw."""
  banned = set(range(tokenizer.vocab_size, model_cfg.vocab_size))
  banned |= {tokenizer.bos_id, tokenizer.pad_id}
  if not latent:
    banned |= set(tokenizer.latent_ids.values())
  return tuple(sorted(banned))


# Samplers by (model, settings, mesh): tasks and variants that share them share compiled code.
_SAMPLERS: dict[tuple, sampler_lib.Sampler] = {}
_MAX_SAMPLERS = 8


def _greedy_sampler(model_cfg, max_gen_len, banned_ids, stop_ids, mesh, rules
                    ) -> sampler_lib.Sampler:
  cfg = sampler_lib.SamplingConfig(temperature=0.0, max_gen_len=max_gen_len,
                                   banned_ids=banned_ids)
  key = (repr(model_cfg), cfg, stop_ids, mesh, repr(rules) if mesh is not None else None,
         model_lib.decode, model_lib.prefill)
  if key not in _SAMPLERS:
    if len(_SAMPLERS) >= _MAX_SAMPLERS:
      _SAMPLERS.pop(next(iter(_SAMPLERS)))
    _SAMPLERS[key] = sampler_lib.Sampler(sampler_lib.DecodeModel.for_model(model_cfg), cfg,
                                         stop_ids=stop_ids, mesh=mesh, rules=rules)
  return _SAMPLERS[key]


def generate(model_cfg: model_lib.ModelConfig, params: Any, prompts: Sequence[Sequence[int]], *,
             max_gen_len: int, batch_size: int, max_seq_len: int, pad_id: int,
             banned_ids: tuple[int, ...] = (), stop_ids: tuple[int, ...] = (), mesh=None,
             rules=None, progress: Callable[[int], None] | None = None
             ) -> list[tuple[list[int], bool]]:
  """Greedy continuations of `prompts` (each [P_i] ids, BOS included, P_i + max_gen_len <=
  max_seq_len) -> per prompt (generated ids without the stop token, stopped by a stop id).

  Prompts are grouped by length bucket (powers of two from 64 up to max_seq_len - max_gen_len)
  and run in fixed-size batches, so there is one compile per bucket. With a mesh, `params` must
  already be placed on it; batch_size is rounded up to a multiple of its data-parallel size.
  """
  budget = max_seq_len - max_gen_len
  if mesh is not None:
    dp = sharding.data_parallel_size(mesh)
    batch_size = -(-batch_size // dp) * dp
  buckets = sampler_lib.default_buckets(budget, smallest=min(_SMALLEST_BUCKET, budget))
  sampler = _greedy_sampler(model_cfg, max_gen_len, tuple(banned_ids), tuple(stop_ids), mesh,
                            rules)
  # One compute-dtype, per-layer copy for every batch (the sampler would otherwise make it per
  # call).
  params = sampler_lib.place_params(sampler.model, params, mesh, rules)
  by_bucket: dict[int, list[int]] = collections.defaultdict(list)
  for i, p in enumerate(prompts):
    if not 0 < len(p) <= budget:
      raise ValueError(f"prompt {i} has {len(p)} tokens; it must have 1..{budget} "
                       f"(max_seq_len {max_seq_len} - max_gen_len {max_gen_len})")
    by_bucket[sampler_lib.bucket_length(len(p), buckets)].append(i)
  out: list[tuple[list[int], bool] | None] = [None] * len(prompts)
  rng = jax.random.key(0)  # greedy: unused
  for bucket in sorted(by_bucket):
    rows = by_bucket[bucket]
    for start in range(0, len(rows), batch_size):
      batch = rows[start:start + batch_size]
      tokens = np.full((batch_size, bucket), pad_id, np.int32)
      lens = np.ones((batch_size,), np.int32)
      # Filler rows repeat the first prompt, so they stop with it instead of running the decode
      # loop to max_gen_len.
      for r in range(batch_size):
        p = prompts[batch[r] if r < len(batch) else batch[0]]
        tokens[r, :len(p)] = p
        lens[r] = len(p)
      if mesh is None:
        arrays = {"tokens": jnp.asarray(tokens), "lens": jnp.asarray(lens)}
      else:
        arrays = sharding.host_to_global({"tokens": tokens, "lens": lens}, mesh)
      res = jax.device_get(sampler(params, arrays["tokens"], arrays["lens"], rng))
      for r, i in enumerate(batch):
        n, stopped = int(res.lengths[r]), bool(res.finished[r])
        out[i] = (res.tokens[r, :n - 1 if stopped else n].tolist(), stopped)
      if progress is not None:
        progress(len(batch))
  return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- scoring


def cut_at_separator(text: str, task: str) -> str:
  """The text before the first exemplar separator, trailing whitespace removed."""
  end = len(text)
  for sep in SEPARATORS[task]:
    i = text.find(sep)
    if i >= 0:
      end = min(end, i)
  return text[:end].rstrip()


def answer_text(generation: str, task: str, latent: bool) -> tuple[str, bool, bool]:
  """(the answer part of a generation, it closed a thought with EoL, it reached a separator).

  Raw variant: the text up to the separator. Latent variant: the text after the first EoL, up
  to the separator, latent tokens stripped; "" when there is no EoL.
  """
  if latent:
    if formats.EOL not in generation:
      return "", False, False
    generation = generation.split(formats.EOL, 1)[1]
  reached = any(sep in generation for sep in SEPARATORS[task])
  ans = cut_at_separator(generation, task)
  return (formats.strip_latents(ans) if latent else ans), latent, reached


def score_answer(task: str, text: str, gold: str) -> tuple[str | None, bool]:
  """(predicted final answer, correct). GSM8K / built-in corpus: the number after `####` else the
  last number, compared canonically; MATH: the last `\\boxed{}` (or "The answer is ..."),
  compared for mathematical equivalence."""
  if task == "math":
    pred = answers.extract_math_answer(text)
    return pred, answers.is_equivalent(pred, gold)
  pred = answers.extract_gsm8k_answer(text)
  return pred, pred is not None and pred == answers.extract_gsm8k_answer(gold)


def _breakdown(keys: list[Any], correct: list[bool]) -> dict[str, dict[str, float]]:
  groups: dict[str, list[bool]] = collections.defaultdict(list)
  for k, c in zip(keys, correct):
    groups[str(k)].append(c)
  return {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in sorted(groups.items())}


def questions_digest(ids: Sequence[str]) -> str:
  """A short hash of the question ids in order: per-question results of two evaluations pair
  up only when it matches."""
  return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def evaluate_fewshot(model_cfg: model_lib.ModelConfig, params: Any, tokenizer,
                     examples: Sequence[Example], task: str, *, exemplars: Sequence[Example],
                     latent: bool, max_gen_len: int, batch_size: int, max_seq_len: int,
                     keep_samples: int = 3, mesh=None, rules=None,
                     progress: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Greedy few-shot accuracy of one task in one variant.

  Returns {"task", "latent", "accuracy", "n", "correct", "n_shots", "mean_shots_used",
  "truncated" (prompts that lost exemplars), "question_truncated", "no_answer" (no extractable
  answer), "no_eol" (latent variant: thought never closed), "hit_max_gen_len" (stopped by the
  length limit before any separator: the answer may be cut short), "mean_gen_tokens",
  "distinct_preds" (different answers given: 1 means the same answer to every question),
  "constant_answer_accuracy" (the accuracy of always giving the most common gold answer: the
  level below which accuracy says nothing), "per_subject" / "per_level" (MATH: {key:
  {"accuracy", "n"}}), "per_steps" (built-in corpus: by equations in the working), "samples",
  "per_question" (a "0"/"1" string, one character per example in order: whether it was answered
  right; two runs' strings pair up when their "questions_digest"s, of the example ids, match)}.
  """
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
  if max_seq_len <= max_gen_len + 1:
    raise config_lib.ConfigError(f"max_seq_len={max_seq_len} leaves no room for a prompt after "
                                 f"max_gen_len={max_gen_len}")
  budget = max_seq_len - max_gen_len
  prompts = [fit_prompt(tokenizer, exemplars, ex.question, task, latent, budget)
             for ex in examples]
  stop = stop_ids_for(tokenizer, () if latent else SEPARATORS[task])
  gens = generate(model_cfg, params, [p.ids for p in prompts], max_gen_len=max_gen_len,
                  batch_size=batch_size, max_seq_len=max_seq_len, pad_id=tokenizer.pad_id,
                  banned_ids=banned_ids_for(tokenizer, model_cfg, latent), stop_ids=stop,
                  mesh=mesh, rules=rules, progress=progress) if examples else []
  correct, samples, preds = [], [], set()
  no_answer = no_eol = hit_max = gen_tokens = 0
  for ex, prompt, (ids, stopped) in zip(examples, prompts, gens):
    text = tokenizer.decode(ids)
    ans, has_eol, reached = answer_text(text, task, latent)
    pred, ok = score_answer(task, ans, ex.answer)
    correct.append(ok)
    preds.add(pred)
    no_answer += pred is None
    no_eol += latent and not has_eol
    hit_max += not stopped and not reached
    gen_tokens += len(ids)
    if len(samples) < keep_samples:
      samples.append({"task": task, "latent": latent, "id": ex.id, "question": ex.question,
                      "generation": text, "answer_text": ans, "pred": pred, "gold": ex.answer,
                      "correct": ok, "shots": prompt.shots})
  n = len(examples)
  out = {
      "task": task, "latent": latent, "n": n, "correct": int(sum(correct)),
      "accuracy": float(np.mean(correct)) if n else float("nan"),
      "n_shots": len(exemplars),
      "mean_shots_used": float(np.mean([p.shots for p in prompts])) if n else float("nan"),
      "truncated": sum(p.shots < len(exemplars) for p in prompts),
      "question_truncated": sum(p.question_cut for p in prompts),
      "no_answer": no_answer, "no_eol": no_eol, "hit_max_gen_len": hit_max,
      "mean_gen_tokens": gen_tokens / n if n else float("nan"),
      "distinct_preds": len(preds - {None}),
      "constant_answer_accuracy": (
          max(collections.Counter(ex.answer for ex in examples).values()) / n
          if n else float("nan")),
      "samples": samples,
      "per_question": "".join("1" if ok else "0" for ok in correct),
      "questions_digest": questions_digest([ex.id for ex in examples]),
  }
  if task == "math":
    out["per_subject"] = _breakdown([ex.subject for ex in examples], correct)
    out["per_level"] = _breakdown([ex.level for ex in examples], correct)
  if any(ex.steps is not None for ex in examples):
    out["per_steps"] = _breakdown([ex.steps for ex in examples], correct)
  return out

"""results.json, the results table and the plots of an EM experiment (and of many: `aggregate`).

results.json: {"runs": {NAME: {...}}, "details": {...}}; per run:
- accuracy: held-out accuracy answering directly (the question prompt; latent tokens banned),
  on the first evaluation task; latent_accuracy: after thinking (the prompt ends with
  `SoL PRIOR`; thought-trained runs only, else null); best_accuracy: the higher of the two
  (each run's best protocol); questions: how many questions each was measured on;
  accuracy_by_steps / latent_accuracy_by_steps: by equations in the working (built-in corpus);
  *_by_task: every task; per_question: {"direct" / "latent": {"correct": a "0"/"1" string, one
  character per question in order, "digest": of the question ids}} for paired comparisons.
- nll_per_token: validation NLL (nats per raw token); elbo_per_token: ELBO_k per raw token
  (a lower bound on log p(x) per token; thought-trained runs only).
- train_tokens: tokens trained on (steps x batch x seq_len); raw_tokens: tokens of the distinct
  raw documents in the run's training data; epochs: passes over the run's training data (steps x
  batch / rows one packed pass fills); fill: the share of those rows' tokens that carry loss.
- `base` (config.em.base_files) is the model every other run started from; it is in the table,
  the plots and the comparison lines, but it never trained on the experiment's raw documents.
- constant_answer_accuracy: the accuracy of always giving the most common gold answer of the
  first task (the same for every run): accuracies near it carry no evidence.
- thought_right, thought_arithmetic (built-in corpus, thought-trained runs): the share of
  answer chunks whose thought (the teacher's for warmstart and teacher_all, the E-step's for
  em_iter_t, which also trains on the teacher's) is their right working
  (mathcorpus.thought_explains), and of right equations in those thoughts.
- estep (em_iter_t): the E-step that wrote its thoughts: num_samples (K), mean_ess,
  identical_share (chunks whose K samples were one thought), mean_distinct_samples.
"""
from __future__ import annotations

import math
import os
import re
from typing import Any, Sequence

from latent_em import io_utils

RESULTS = "results.json"
# The run a job pretrains every other run's base as (config.em.base_files): it never trained on
# the experiment's raw documents.
BASE_RUN = "base"
TABLE = "results.md"
# Runs trained without thoughts on the experiment's raw documents.
RAW_BASELINES = ("raw_token_matched", "raw_compute_matched", "raw_fresh", "wrap_cot", "wrap")
# The order of the table's rows: the base, the runs without EM, then warm start and iterations.
_ORDER = (BASE_RUN,) + RAW_BASELINES + ("teacher_all",)
# Thought quality on the built-in corpus (em/job.py), as column headers.
THOUGHT_QUALITY = {"thought_right": "thoughts right %", "thought_arithmetic": "right equations %"}


def _first(d: dict[str, Any] | None) -> Any:
  if not d:
    return None
  return next(iter(d.values()))


def _best_protocol(direct: float | None, latent: float | None) -> str | None:
  """The protocol of a run's best accuracy: after thinking ("latent") on a tie."""
  if latent is not None and (direct is None or latent >= direct):
    return "latent"
  return "direct" if direct is not None else None


def _best(direct: float | None, latent: float | None) -> float | None:
  return {"direct": direct, "latent": latent}.get(_best_protocol(direct, latent))


def collect(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The results.json dict from the runs' train and eval stage outputs."""
  out: dict[str, Any] = {}
  for name in ordered(runs):
    run = runs[name]
    train, ev = run["train"], run.get("eval") or {}
    direct, latent = _first(ev.get("accuracy")), _first(ev.get("latent_accuracy"))
    steps = ev.get("per_steps") or {}
    out[name] = {
        "accuracy": direct,
        "latent_accuracy": latent,
        "best_accuracy": _best(direct, latent),
        "questions": _first(ev.get("questions")),
        "accuracy_by_steps": {k: v["accuracy"] for k, v in
                              (steps.get(_first_key(ev.get("accuracy"))) or {}).items()},
        "latent_accuracy_by_steps": {k: v["accuracy"] for k, v in (steps.get(
            f"{_first_key(ev.get('latent_accuracy'))}:latent") or {}).items()},
        "nll_per_token": ev.get("nll_per_token"),
        "elbo_per_token": ev.get("elbo_per_token") or {},
        "train_tokens": train["train_tokens"],
        "raw_tokens": train["raw_tokens"],
        "epochs": train.get("epochs"),
        "fill": train.get("fill"),
        "accuracy_by_task": ev.get("accuracy") or {},
        "latent_accuracy_by_task": ev.get("latent_accuracy") or {},
        "steps": train["steps"],
        "thought_trained": train["thought_trained"],
        "samples": ev.get("samples", []),
        "constant_answer_accuracy": _first(ev.get("constant_answer_accuracy")),
    }
    task, per_question = _first_key(ev.get("accuracy")), ev.get("per_question") or {}
    protocols = {"direct": per_question.get(task), "latent": per_question.get(f"{task}:latent")}
    if any(protocols.values()):
      out[name]["per_question"] = {k: v for k, v in protocols.items() if v}
    for key in THOUGHT_QUALITY:
      if run.get(key) is not None:
        out[name][key] = run[key]["fraction"]
    if run.get("estep"):
      e = run["estep"]
      out[name]["estep"] = {k: e.get(k) for k in ("num_samples", "mean_ess", "identical_share",
                                                  "mean_distinct_samples", "chunks")}
  return {"runs": out}


def _first_key(d: dict[str, Any] | None) -> str | None:
  return next(iter(d)) if d else None


def ordered(names) -> list[str]:
  """The base, the runs without EM (raw baselines, teacher_all), the warm start, the EM
  iterations in order, then anything else."""
  names = list(names)
  head = [n for n in _ORDER if n in names]
  iters = sorted((i, n) for n in names if (i := _iteration(n)) is not None)
  rest = [n for n in names if n not in head and _iteration(n) is None]
  return head + [n for _, n in iters] + rest


def _fmt(x: float | None, pct: bool = False) -> str:
  if x is None:
    return "-"
  return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def table(results: dict[str, Any]) -> str:
  """A markdown table of one experiment's runs, then the comparison lines."""
  runs = results["runs"]
  ks = sorted({k for r in runs.values() for k in r["elbo_per_token"]}, key=int)
  quality = [k for k in THOUGHT_QUALITY if any(k in r for r in runs.values())]
  head = (["run", "direct acc. %", "latent acc. %", "NLL/token"]
          + [f"ELBO_{k}/token" for k in ks]
          + ["train tokens", "raw tokens", "passes"] + [THOUGHT_QUALITY[k] for k in quality]
          + ["E-step K / ESS / identical %"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name in ordered(runs):
    r = runs[name]
    row = [name, _fmt(r["accuracy"], True), _fmt(r["latent_accuracy"], True),
           _fmt(r["nll_per_token"])]
    row += [_fmt(r["elbo_per_token"].get(k)) for k in ks]
    row += [f"{r['train_tokens']:,}", f"{r['raw_tokens']:,}",
            "-" if r.get("epochs") is None else f"{r['epochs']:.1f}"]
    row += [_fmt(r.get(k), True) for k in quality]
    e = r.get("estep")
    row.append(f"{e['num_samples']} / {e['mean_ess']:.2f} / {100 * e['identical_share']:.1f}"
               if e and e.get("mean_ess") is not None else "-")
    lines.append("| " + " | ".join(row) + " |")
  constant = {r.get("constant_answer_accuracy") for r in runs.values()} - {None}
  questions = {r.get("questions") for r in runs.values()} - {None}
  notes = []
  if len(questions) == 1:
    n = questions.pop()
    notes.append(f"{n} held-out questions: one run's accuracy has a binomial standard error of "
                 f"at most {100 * standard_error(0.5, n):.1f} points.")
  if len(constant) == 1:
    notes.append(f"Always giving the most common gold answer scores "
                 f"{_fmt(constant.pop(), True)}%.")
  if notes:
    lines.append("\n" + " ".join(notes))
  lines += comparison_lines([results])
  return "\n".join(lines)


def standard_error(p: float, n: int) -> float:
  """The binomial standard error of an accuracy p measured on n questions."""
  return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def best_bound(run: dict[str, Any]) -> float | None:
  """A thought-trained run's nats per token: the least of its NLL and every -ELBO_k."""
  values = [-v for v in (run.get("elbo_per_token") or {}).values() if v is not None]
  if run.get("nll_per_token") is not None:
    values.append(run["nll_per_token"])
  return min(values) if values else None


def _iteration(name: str) -> int | None:
  if name == "warmstart":
    return 0
  m = re.fullmatch(r"em_iter_(\d+)", name)
  return int(m.group(1)) if m else None


def _thought_runs(runs: dict[str, Any]) -> list[str]:
  """The warm start and every EM iteration, in order."""
  iters = sorted((i, n) for n in runs if (i := _iteration(n)) is not None)
  return [n for _, n in iters]


# The comparisons the method is about, each a list of (run, other run) pairs and a metric.
ACCURACY_DIRECT = ("direct", "accuracy")
ACCURACY_BEST = ("best", "best_accuracy")


def _value(run: dict[str, Any], key: str) -> float | None:
  return best_bound(run) if key == "nats" else run.get(key)


def _pairs(runs: dict[str, Any], kind: str) -> list[tuple[str, str]]:
  thought = _thought_runs(runs)
  raw = [n for n in RAW_BASELINES if n in runs]
  if kind == "base":
    return [(n, BASE_RUN) for n in ordered(runs) if n != BASE_RUN and BASE_RUN in runs]
  if kind == "raw":
    return [(n, b) for n in thought for b in raw]
  if kind == "em":
    iters = [n for n in thought if n != "warmstart"]
    out = [(iters[0], "warmstart")] if iters and "warmstart" in runs else []
    if len(iters) > 1:
      out.append((iters[-1], iters[0]))
    return out
  raise ValueError(kind)


def _protocol(run: dict[str, Any], key: str) -> str | None:
  """The protocol whose accuracy `key` is: direct, or the better of the two for best_accuracy."""
  if key == "accuracy":
    return "direct"
  if key == "best_accuracy":
    return _best_protocol(run.get("accuracy"), run.get("latent_accuracy"))
  return None


def paired_noise(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]], key: str
                 ) -> float | None:
  """Twice the standard error of the mean accuracy difference of (run, other run) pairs, one
  pair per workdir, from their per-question results: each workdir's difference is the mean of
  per-question differences (1, 0 or -1) over the same questions, so what both runs answer alike
  adds no noise. None unless every pair recorded per-question results on the same questions."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  var = 0.0
  for a, b in pairs:
    pa = (a.get("per_question") or {}).get(_protocol(a, key) or "")
    pb = (b.get("per_question") or {}).get(_protocol(b, key) or "")
    if not pa or not pb or pa["digest"] != pb["digest"] or not pa["correct"]:
      return None
    d = np.array(list(pa["correct"]), int) - np.array(list(pb["correct"]), int)
    var += float(d.var()) / d.size
  return 2 * math.sqrt(var) / len(pairs) if pairs else None


def _line(results: Sequence[dict[str, Any]], ours: str, theirs: str, key: str,
          lower_better: bool = False) -> str | None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  pairs = [(r["runs"][ours], r["runs"][theirs]) for r in results
           if ours in r["runs"] and theirs in r["runs"]]
  pairs = [(a, b) for a, b in pairs if _value(a, key) is not None and _value(b, key) is not None]
  if not pairs:
    return None
  a = float(np.mean([_value(x, key) for x, _ in pairs]))
  b = float(np.mean([_value(y, key) for _, y in pairs]))
  wins = sum((_value(x, key) < _value(y, key)) if lower_better else
             (_value(x, key) > _value(y, key)) for x, y in pairs)
  ahead = a < b if lower_better else a > b
  where = "level with" if abs(a - b) < 1e-9 else "ahead of" if ahead else "behind"
  if key == "nats":
    text = f"{ours} {a:.3f} {where} {theirs} {b:.3f} by {abs(a - b):.3f}"
  else:
    text = (f"{ours} {100 * a:.1f}% {where} {theirs} {100 * b:.1f}% by "
            f"{100 * abs(a - b):.1f} points")
    n = pairs[0][0].get("questions")
    paired = paired_noise(pairs, key)
    if paired is not None:
      text += f" (paired noise: {100 * paired:.1f})"
    elif n:
      se = math.sqrt((a * (1 - a) + b * (1 - b)) / (n * len(pairs)))
      text += f" (noise: {100 * 2 * se:.1f})"
  if len(pairs) > 1:
    text += f", ahead in {wins} of {len(pairs)}"
  return text


COMPARISONS = (
    ("base", ACCURACY_DIRECT,
     "Against the base, answering directly (every run, the same question prompt):"),
    ("base", ACCURACY_BEST,
     "Against the base, each run's best protocol (the higher of direct and after thinking):"),
    ("raw", ACCURACY_DIRECT,
     "Thoughts against raw training on the same exercises, answering directly:"),
    ("raw", ACCURACY_BEST,
     "Thoughts against raw training on the same exercises, each run's best protocol:"),
    ("em", ACCURACY_BEST,
     "EM: the first iteration against the warm start, the last against the first (best "
     "protocol):"),
    ("raw", ("nats", "nats"),
     "Nats per validation token against raw training (lower is better; a thought-trained run "
     "counts the least of its NLL and -ELBO_k, each an upper bound on -log p(x)):"),
)
NOISE_NOTE = ("(paired noise: twice the standard error of the mean per-question difference "
              "between the two runs, which answered the same questions; noise, where "
              "per-question results are missing: twice the binomial standard error of the "
              "difference of two independent accuracies; both over the questions and "
              "workdirs; over several workdirs, means and how many of them are ahead)")


def comparison_lines(results: Sequence[dict[str, Any]]) -> list[str]:
  """Every comparison of COMPARISONS, under its head, for one or more experiments."""
  runs: dict[str, Any] = {}
  for r in results:
    runs.update(r["runs"])
  lines = []
  for kind, (_, key), head in COMPARISONS:
    found = [_line(results, a, b, key, lower_better=key == "nats")
             for a, b in _pairs(runs, kind)]
    found = [f for f in found if f]
    if found:
      lines += ["", head] + [f"- {v}" for v in found]
  if lines:
    lines += ["", NOISE_NOTE]
  return lines


def plot(results: dict[str, Any] | Sequence[dict[str, Any]], out_dir: str) -> list[str]:
  """accuracy.png (every run, both protocols) and iterations.png (accuracy and ELBO against EM
  iteration, the base and every baseline as lines); over several experiments, means with
  [min, max] bars."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  many = [results] if isinstance(results, dict) else list(results)
  agg = aggregate(many)
  os.makedirs(out_dir, exist_ok=True)
  names = ordered(agg)
  paths = []

  def stat(name, key):
    m = agg.get(name, {}).get(key)
    return (m["mean"], m["min"], m["max"]) if m else None

  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
  width = 0.4
  for off, key, label in ((-width / 2, "accuracy", "answer directly"),
                          (width / 2, "latent_accuracy", "think first (latent)")):
    xs, ys, lo, hi = [], [], [], []
    for x, n in enumerate(names):
      s = stat(n, key)
      if s:
        xs.append(x + off)
        ys.append(100 * s[0])
        lo.append(100 * (s[0] - s[1]))
        hi.append(100 * (s[2] - s[0]))
    ax.bar(xs, ys, width, yerr=[lo, hi] if len(many) > 1 else None, label=label, capsize=3)
  ax.set_xticks(list(range(len(names))), names, rotation=30, ha="right")
  ax.set_ylabel("held-out accuracy (%)")
  ax.legend()
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "accuracy.png"))
  _save(fig, paths[-1])
  plt.close(fig)

  iters = sorted((i, n) for n in names if (i := _iteration(n)) is not None)
  if iters:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [i for i, _ in iters]
    for key, style, label in (("latent_accuracy", "o-", "EM, think first"),
                              ("accuracy", "s--", "EM, answer directly")):
      vals = [stat(n, key) for _, n in iters]
      if any(v is not None for v in vals):
        _errorline(a1, x, vals, style, label, "tab:blue" if key == "latent_accuracy"
                   else "tab:cyan", scale=100, bars=len(many) > 1)
    for n in names:
      if _iteration(n) is not None:
        continue
      s = stat(n, "best_accuracy")
      if s:
        a1.axhline(100 * s[0], ls=":" if n == "teacher_all" else "--", lw=1.2,
                   color=_color(n), label=f"{n} ({'best' if n == 'teacher_all' else 'direct'})"
                   if n in ("teacher_all",) else f"{n} (best protocol)")
    a1.set_xlabel("EM iteration (0 = warm start)")
    a1.set_ylabel("held-out accuracy (%)")
    a1.set_xticks(x)
    a1.legend(fontsize=7)
    ks = sorted({k.split("_")[1] for n in names for k in agg.get(n, {}) if k.startswith("elbo_")},
                key=int)
    for i, k in enumerate(ks):
      _errorline(a2, x, [stat(n, f"elbo_{k}") for _, n in iters], "o-", f"EM ELBO_{k}",
                 f"C{i}", bars=len(many) > 1)
    for n in names:
      if _iteration(n) is None and stat(n, "nll_per_token"):
        a2.axhline(-stat(n, "nll_per_token")[0], ls="--", lw=1, label=f"{n} log p(x)",
                   color=_color(n))
    a2.set_xlabel("EM iteration (0 = warm start)")
    a2.set_ylabel("nats per raw validation token (higher is better)")
    a2.set_xticks(x)
    a2.legend(fontsize=7)
    if len(many) > 1:
      fig.suptitle(f"mean and [min, max] over {len(many)} workdirs", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "iterations.png"))
    _save(fig, paths[-1])
    plt.close(fig)
  return paths


def _errorline(ax, x, vals, style, label, color, scale=1.0, bars=False):
  pts = [(xi, v) for xi, v in zip(x, vals) if v is not None]
  if not pts:
    return
  xs = [p[0] for p in pts]
  mean = [scale * p[1][0] for p in pts]
  err = [[scale * (p[1][0] - p[1][1]) for p in pts], [scale * (p[1][2] - p[1][0]) for p in pts]]
  ax.errorbar(xs, mean, yerr=err if bars else None, fmt=style, color=color, label=label,
              capsize=3)


def _color(name: str) -> str:
  palette = {BASE_RUN: "black", "raw_token_matched": "tab:red",
             "raw_compute_matched": "tab:purple", "teacher_all": "tab:green",
             "raw_fresh": "tab:brown", "wrap_cot": "tab:olive", "wrap": "tab:gray"}
  return palette.get(name, "gray")


def _save(fig, path: str) -> None:
  with io_utils.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110)


def write(results: dict[str, Any], workdir: str, plots: bool = True) -> None:
  """results.json + results.md (+ plots/) into workdir; prints the table."""
  io_utils.write_json(os.path.join(workdir, RESULTS), results)
  text = table(results)
  io_utils.write_text(os.path.join(workdir, TABLE), text + "\n")
  print(text, flush=True)
  if plots:
    for p in plot(results, os.path.join(workdir, "plots")):
      print(f"plot: {p}", flush=True)


# ------------------------------------------------------------------------------ many workdirs

_SCALARS = ("accuracy", "latent_accuracy", "best_accuracy", "nll_per_token", *THOUGHT_QUALITY)


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
  """Mean, min, max and n of each run's scalar metrics over several experiments (seeds)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  metrics: dict[str, dict[str, list[float]]] = {}
  for res in results:
    for name, r in res["runs"].items():
      m = metrics.setdefault(name, {})
      for key in _SCALARS:
        if r.get(key) is not None:
          m.setdefault(key, []).append(r[key])
      for k, v in (r.get("elbo_per_token") or {}).items():
        m.setdefault(f"elbo_{k}", []).append(v)
      e = r.get("estep") or {}
      for key in ("mean_ess", "identical_share"):
        if e.get(key) is not None:
          m.setdefault(f"estep_{key}", []).append(e[key])
  # The mean of equal values can round past them (3 x 0.045 -> 0.045000000000000005): clipped,
  # so that mean - min and max - mean, the plots' error bars, are never negative.
  return {name: {key: {"mean": float(np.clip(np.mean(v), np.min(v), np.max(v))),
                       "std": float(np.std(v)),
                       "min": float(np.min(v)), "max": float(np.max(v)), "n": len(v)}
                 for key, v in m.items()}
          for name, m in metrics.items()}


def aggregate_table(agg: dict[str, dict[str, dict[str, float]]]) -> str:
  """Markdown: mean [min, max] per run and metric."""
  keys = ["accuracy", "latent_accuracy", "nll_per_token"]
  keys += sorted({k for m in agg.values() for k in m if k.startswith("elbo_")},
                 key=lambda k: int(k.split("_")[1]))
  keys += [k for k in THOUGHT_QUALITY if any(k in m for m in agg.values())]
  keys += [k for k in ("estep_mean_ess", "estep_identical_share")
           if any(k in m for m in agg.values())]
  heads = {"accuracy": "direct acc. %", "latent_accuracy": "latent acc. %",
           "nll_per_token": "NLL/token", "estep_mean_ess": "E-step ESS",
           "estep_identical_share": "identical samples %", **THOUGHT_QUALITY}
  lines = ["| run | n | " + " | ".join(heads.get(k, k) for k in keys) + " |",
           "|" + "---|" * (len(keys) + 2)]
  for name in ordered(agg):
    m = agg[name]
    n = max((v["n"] for v in m.values()), default=0)
    cells = []
    for k in keys:
      if k not in m:
        cells.append("-")
      elif "accuracy" in k or k in THOUGHT_QUALITY or k == "estep_identical_share":
        cells.append(f"{100 * m[k]['mean']:.1f} [{100 * m[k]['min']:.1f}, "
                     f"{100 * m[k]['max']:.1f}]")
      else:
        cells.append(f"{m[k]['mean']:.3f} [{m[k]['min']:.3f}, {m[k]['max']:.3f}]")
    lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  """`python -m latent_em.em.report WORKDIR... [--out=DIR]`: mean [min, max] of every run over
  the workdirs and the comparison lines; with --out, also DIR/results.md and DIR/*.png."""
  out = [a.split("=", 1)[1] for a in argv if a.startswith("--out=")]
  dirs = [a for a in argv if not a.startswith("--")]
  if not dirs:
    print("usage: python -m latent_em.em.report WORKDIR [WORKDIR ...] [--out=DIR]")
    return 2
  import json  # pylint: disable=g-import-not-at-top
  results = []
  for d in dirs:
    path = os.path.join(d, RESULTS)
    if not os.path.exists(path):
      print(f"{path} does not exist (is the experiment finished?)")
      return 1
    with open(path) as f:
      results.append(json.load(f))
  text = "\n".join([aggregate_table(aggregate(results))] + comparison_lines(results))
  print(text)
  if out:
    io_utils.write_text(os.path.join(out[0], TABLE), text + "\n")
    for p in plot(results, out[0]):
      print(f"plot: {p}")
  return 0


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  sys.exit(main(sys.argv[1:]))

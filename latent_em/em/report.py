"""results.json, the results table and the plots of an EM experiment (and of many: `aggregate`).

results.json: {"runs": {NAME: {"accuracy", "latent_accuracy", "nll_per_token",
"elbo_per_token": {"1", "2", "4"}, "train_tokens", "raw_tokens", ...}}, "details": {...}}
- accuracy: few-shot accuracy of the raw answer variant (latent tokens banned) on the first
  evaluation task; latent_accuracy: the latent variant (thought-trained runs only, else null);
  *_by_task hold every task.
- nll_per_token: validation NLL (nats per raw token); elbo_per_token: ELBO_k per raw token
  (a lower bound on log p(x) per token; thought-trained runs only).
- train_tokens: tokens trained on (steps x batch x seq_len); raw_tokens: tokens of the distinct
  raw documents in the run's training data; epochs: passes over the run's training data (steps x
  batch / rows one packed pass fills); fill: the share of those rows' tokens that carry loss.
- A run named `base` (config.em.base_files) is the model every other run started from; it is
  listed but is not one of the baselines in the comparison lines.
- constant_answer_accuracy: the accuracy of always giving the most common gold answer of the
  first task (the same for every run): accuracies near it carry no evidence.
- thought_arithmetic, thought_explains (built-in corpus, thought-trained runs): the share of
  right equations in the thoughts the run's own stage wrote (the teacher's for warmstart, the
  E-step's for em_iter_t, which may also train on the teacher's), and of chunks whose thought
  ends in the derived numbers the chunk states (data/mathcorpus.py).
"""
from __future__ import annotations

import os
import re
from typing import Any, Sequence

from latent_em import io_utils

RESULTS = "results.json"
# The run a job pretrains every other run's base as (config.em.base_files): reported, but no
# baseline, since it never trained on the experiment's raw documents.
BASE_RUN = "base"
TABLE = "results.md"
# Thought quality on the built-in corpus (em/job.py), as column headers.
THOUGHT_QUALITY = {"thought_arithmetic": "thought arith. %",
                   "thought_explains": "thought explains %"}


def _first(d: dict[str, float] | None) -> float | None:
  if not d:
    return None
  return next(iter(d.values()))


def collect(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The results.json dict from the runs' train and eval stage outputs."""
  out: dict[str, Any] = {}
  for name, run in runs.items():
    train, ev = run["train"], run.get("eval") or {}
    out[name] = {
        "accuracy": _first(ev.get("accuracy")),
        "latent_accuracy": _first(ev.get("latent_accuracy")),
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
    for key in THOUGHT_QUALITY:
      if run.get(key) is not None:
        out[name][key] = run[key]["fraction"]
  return {"runs": out}


def _fmt(x: float | None, pct: bool = False) -> str:
  if x is None:
    return "-"
  return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def table(results: dict[str, Any]) -> str:
  """A markdown table of one experiment's runs."""
  ks = sorted({k for r in results["runs"].values() for k in r["elbo_per_token"]}, key=int)
  quality = [k for k in THOUGHT_QUALITY if any(k in r for r in results["runs"].values())]
  head = (["run", "accuracy %", "latent acc. %", "NLL/token"] + [f"ELBO_{k}/token" for k in ks]
          + ["train tokens", "raw tokens", "passes"] + [THOUGHT_QUALITY[k] for k in quality])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in results["runs"].items():
    row = [name, _fmt(r["accuracy"], True), _fmt(r["latent_accuracy"], True),
           _fmt(r["nll_per_token"])]
    row += [_fmt(r["elbo_per_token"].get(k)) for k in ks]
    row += [f"{r['train_tokens']:,}", f"{r['raw_tokens']:,}",
            "-" if r.get("epochs") is None else f"{r['epochs']:.1f}"]
    row += [_fmt(r.get(k), True) for k in quality]
    lines.append("| " + " | ".join(row) + " |")
  constant = {r.get("constant_answer_accuracy") for r in results["runs"].values()} - {None}
  if len(constant) == 1:
    lines.append(f"\nAlways giving the most common gold answer scores "
                 f"{_fmt(constant.pop(), True)}% accuracy.")
  lines += comparison_lines([results])
  return "\n".join(lines)


def best_bound(run: dict[str, Any]) -> float | None:
  """A thought-trained run's nats per token: the least of its NLL and every -ELBO_k."""
  values = [-v for v in (run.get("elbo_per_token") or {}).values() if v is not None]
  if run.get("nll_per_token") is not None:
    values.append(run["nll_per_token"])
  return min(values) if values else None


def _chosen(runs: dict[str, Any]) -> list[str]:
  """The thought-trained runs compared: the warm start and the last EM iteration."""
  iters = sorted((i, n) for n in runs if (i := _iteration(n)) is not None)
  return [n for i, n in iters if i == 0] + [n for i, n in iters[-1:] if i > 0]


# How each metric reads a thought-trained run and a run trained without thoughts.
METRICS = ("nats", "accuracy")


def margins(results: dict[str, Any], metric: str = "nats"
            ) -> dict[str, tuple[float, dict[str, float]]]:
  """{thought-trained run (warm start, last EM iteration): (its value, {run trained without
  thoughts: that run's value})}.

  metric "nats": a thought-trained run's `best_bound` against the others' NLL per token (lower
  is better); "accuracy": its latent-variant accuracy (it thinks, then answers) against the
  others' accuracy (they answer directly; higher is better).
  """
  if metric not in METRICS:
    raise ValueError(f"metric {metric!r} is not one of {list(METRICS)}")
  runs = results["runs"]
  theirs_key, ours_fn = (("nll_per_token", best_bound) if metric == "nats" else
                         ("accuracy", lambda r: r.get("latent_accuracy")))
  raw = {n: r[theirs_key] for n, r in runs.items()
         if not r.get("thought_trained") and r.get(theirs_key) is not None and n != BASE_RUN}
  out = {}
  for name in _chosen(runs):
    ours = ours_fn(runs[name])
    if ours is not None and raw:
      out[name] = (ours, raw)
  return out


COMPARISON_HEAD = ("Nats per validation token against the runs trained without thoughts (lower "
                   "is better; a thought-trained run counts the least of its NLL and -ELBO_k, "
                   "each an upper bound on its -log p(x); ELBO_k is measured on the first "
                   "config.em.eval_elbo_docs validation documents; over several workdirs, means):")
ACCURACY_HEAD = ("Accuracy on the held-out questions against the runs trained without thoughts "
                 "(higher is better; a thought-trained run thinks, then answers (the latent "
                 "variant), the others answer directly; over several workdirs, means):")


def aggregate_comparisons(results: Sequence[dict[str, Any]], metric: str = "nats") -> list[str]:
  """One line per entry of `margins` over one or more experiments (seeds): the run's mean
  value, ahead of or behind each baseline trained without thoughts, by how much, and (for
  several experiments) in how many of them it is ahead."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  per: dict[str, list[tuple[float, dict[str, float]]]] = {}
  for res in results:
    for name, m in margins(res, metric).items():
      per.setdefault(name, []).append(m)
  if metric == "nats":
    ahead, fmt, gap = (lambda a, b: a < b), (lambda x: f"{x:.3f}"), (lambda x: f"{x:.3f}")
  else:
    ahead, fmt = (lambda a, b: a > b), (lambda x: f"{100 * x:.1f}%")
    gap = lambda x: f"{100 * x:.1f} points"
  out = []
  for name, ms in per.items():
    ours = float(np.mean([o for o, _ in ms]))
    others = sorted(set.intersection(*(set(r) for _, r in ms)))
    parts = []
    for other in others:
      theirs = float(np.mean([r[other] for _, r in ms]))
      part = (f"{'ahead of' if ahead(ours, theirs) else 'behind'} {other} ({fmt(theirs)}) "
              f"by {gap(abs(theirs - ours))}")
      if len(ms) > 1:
        part += f" (ahead in {sum(ahead(o, r[other]) for o, r in ms)} of {len(ms)})"
      parts.append(part)
    out.append(f"{name} {fmt(ours)}: " + "; ".join(parts))
  return out


def comparison_lines(results: Sequence[dict[str, Any]]) -> list[str]:
  """Both comparisons (accuracy, then nats) under their heads, for one or more experiments."""
  lines = []
  for metric, head in (("accuracy", ACCURACY_HEAD), ("nats", COMPARISON_HEAD)):
    found = aggregate_comparisons(results, metric)
    if found:
      lines += ["", head] + [f"- {v}" for v in found]
  return lines


def comparisons(results: dict[str, Any], metric: str = "nats") -> list[str]:
  """`aggregate_comparisons` of one experiment."""
  return aggregate_comparisons([results], metric)


def _iteration(name: str) -> int | None:
  if name == "warmstart":
    return 0
  m = re.fullmatch(r"em_iter_(\d+)", name)
  return int(m.group(1)) if m else None


def plot(results: dict[str, Any], out_dir: str) -> list[str]:
  """accuracy.png (every run) and iterations.png (accuracy and ELBO against EM iteration)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  runs = results["runs"]
  names = list(runs)
  paths = []

  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
  width = 0.4
  xs = range(len(names))
  raw = [100 * (runs[n]["accuracy"] or 0) for n in names]
  lat = [100 * (runs[n]["latent_accuracy"] or 0) for n in names]
  ax.bar([x - width / 2 for x in xs], raw, width, label="answer directly")
  ax.bar([x + width / 2 for x in xs], lat, width, label="think first (latent)")
  ax.set_xticks(list(xs), names, rotation=30, ha="right")
  ax.set_ylabel("few-shot accuracy (%)")
  ax.legend()
  fig.tight_layout()
  paths.append(os.path.join(out_dir, "accuracy.png"))
  _save(fig, paths[-1])
  plt.close(fig)

  iters = sorted((i, n) for n in names if (i := _iteration(n)) is not None)
  if iters:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    x = [i for i, _ in iters]
    a1.plot(x, [100 * (runs[n]["latent_accuracy"] or 0) for _, n in iters], "o-",
            label="EM (latent)")
    for n in names:
      if _iteration(n) is None and runs[n]["accuracy"] is not None:
        a1.axhline(100 * runs[n]["accuracy"], ls="--", lw=1, label=n, color=_color(n))
    a1.set_xlabel("EM iteration (0 = warm start)")
    a1.set_ylabel("few-shot accuracy (%)")
    a1.legend(fontsize=8)
    ks = sorted({k for _, n in iters for k in runs[n]["elbo_per_token"]}, key=int)
    for k in ks:
      a2.plot(x, [runs[n]["elbo_per_token"].get(k, float("nan")) for _, n in iters], "o-",
              label=f"ELBO_{k}")
    for n in names:
      if _iteration(n) is None and runs[n]["nll_per_token"] is not None:
        a2.axhline(-runs[n]["nll_per_token"], ls="--", lw=1, label=f"{n} log p(x)",
                   color=_color(n))
    a2.set_xlabel("EM iteration (0 = warm start)")
    a2.set_ylabel("nats per raw token (higher is better)")
    a2.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "iterations.png"))
    _save(fig, paths[-1])
    plt.close(fig)
  return paths


def _color(name: str) -> str:
  palette = {"raw_token_matched": "tab:red", "raw_compute_matched": "tab:purple",
             "raw_fresh": "tab:brown", "wrap_cot": "tab:olive", "wrap": "tab:gray"}
  return palette.get(name, "black")


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


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
  """Mean, min, max and n of each run's scalar metrics over several experiments (seeds)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  metrics: dict[str, dict[str, list[float]]] = {}
  for res in results:
    for name, r in res["runs"].items():
      m = metrics.setdefault(name, {})
      for key in ("accuracy", "latent_accuracy", "nll_per_token", *THOUGHT_QUALITY):
        if r.get(key) is not None:
          m.setdefault(key, []).append(r[key])
      for k, v in (r.get("elbo_per_token") or {}).items():
        m.setdefault(f"elbo_{k}", []).append(v)
  return {name: {key: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                       "min": float(np.min(v)), "max": float(np.max(v)), "n": len(v)}
                 for key, v in m.items()}
          for name, m in metrics.items()}


def aggregate_table(agg: dict[str, dict[str, dict[str, float]]]) -> str:
  """Markdown: mean [min, max] per run and metric."""
  keys = ["accuracy", "latent_accuracy", "nll_per_token"]
  keys += sorted({k for m in agg.values() for k in m if k.startswith("elbo_")},
                 key=lambda k: int(k.split("_")[1]))
  keys += [k for k in THOUGHT_QUALITY if any(k in m for m in agg.values())]
  lines = ["| run | n | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
  for name, m in agg.items():
    n = max((v["n"] for v in m.values()), default=0)
    cells = []
    for k in keys:
      if k not in m:
        cells.append("-")
      elif "accuracy" in k or k in THOUGHT_QUALITY:
        cells.append(f"{100 * m[k]['mean']:.1f} [{100 * m[k]['min']:.1f}, "
                     f"{100 * m[k]['max']:.1f}]")
      else:
        cells.append(f"{m[k]['mean']:.3f} [{m[k]['min']:.3f}, {m[k]['max']:.3f}]")
    lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  """`python -m latent_em.em.report WORKDIR...`: mean [min, max] of every run over workdirs."""
  if not argv:
    print("usage: python -m latent_em.em.report WORKDIR [WORKDIR ...]")
    return 2
  import json  # pylint: disable=g-import-not-at-top
  results = []
  for d in argv:
    path = os.path.join(d, RESULTS)
    if not os.path.exists(path):
      print(f"{path} does not exist (is the experiment finished?)")
      return 1
    with open(path) as f:
      results.append(json.load(f))
  print("\n".join([aggregate_table(aggregate(results))] + comparison_lines(results)))
  return 0


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  sys.exit(main(sys.argv[1:]))

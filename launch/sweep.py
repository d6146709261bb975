"""Grid sweeps over a latent_em config: expand, print or run, then aggregate the results.

  python launch/sweep.py --config=configs/tiny.py:steps=100 --base_workdir=/tmp/sweep \
      --grid=optim.lr=1e-3,3e-3 --grid=model.remat=none,full --seeds=0,1,2 --mode=local

Each run of the cartesian product gets its own workdir, named from its overrides
(`/tmp/sweep/lr=3e-3,remat=full,seed=1`), and the command

  python -m latent_em.main --config=CONFIG --workdir=RUN_DIR --config.optim.lr=3e-3 ... \
      --config.seed=1

Grid syntax: `--grid=KEY=V1,V2,...` (the `config.` prefix of KEY is optional). Values reach
ml_collections verbatim, so write them as you would write `--config.KEY=V` yourself: plain text
for str fields (`--grid=estep.selection=argmax,resample`; quotes would become part of the
string), Python literals for tuples (`--grid=mesh.shape=(-1,1,1),(-1,2,1)`: commas inside
brackets or quotes do not split values).

Modes:
  print   one shell command per run, for a cluster queue (nothing is written)
  local   runs them here (up to --max_parallel at once), each logging to RUN_DIR/log.txt; runs
          whose workdir already holds results are skipped, so rerunning resumes the sweep
  check   parses every run's flags with the real config and validates it (needs latent_em)
After `local` (or alone with --aggregate_only) every results.json / train_summary.json under
--base_workdir is gathered into BASE/sweep_results.{md,json}: one row per set of non-seed
overrides and result source, with the mean and sample standard deviation over seeds.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Sequence

DEFAULT_ENTRY = "python -m latent_em.main"
# A run is finished once one of these exists in its workdir (train / estep / eval jobs).
DONE_FILES = ("results.json", "train_summary.json", os.path.join("eval", "results.json"))
RESULT_FILES = ("train_summary.json", "results.json")
SEED_KEY = "config.seed"
# Result fields that are not one number per run (generations, per-subject tables, ...).
SKIP_FIELDS = frozenset({"samples", "details", "per_subject"})
MAX_NAME_LEN = 200  # path components are limited to 255 bytes on most filesystems
_KEY_RE = re.compile(r"^config(\.[A-Za-z_][A-Za-z0-9_]*)+$")


class SweepError(ValueError):
  """A mistake in the sweep's flags; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Axis:
  """One swept config field: `key` is the full flag path ("config.optim.lr")."""
  key: str
  values: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the grid."""
  name: str                               # workdir basename, "lr=3e-3,seed=1"
  workdir: str
  overrides: tuple[tuple[str, str], ...]  # (flag path, value) in grid order, seed last

  def command(self, entry: Sequence[str], config: str, extra: Sequence[str]) -> list[str]:
    return [*entry, f"--config={config}", f"--workdir={self.workdir}",
            *(f"--{key}={value}" for key, value in self.overrides), *extra]


# ----------------------------------------------------------------------------- expansion


def split_values(text: str) -> list[str]:
  """Splits at commas outside brackets and quotes: "(1,2),(3,4)" -> ["(1,2)", "(3,4)"]."""
  values, current, depth, quote = [], [], 0, ""
  for ch in text:
    if quote:
      quote = "" if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      values.append("".join(current))
      current = []
      continue
    current.append(ch)
  values.append("".join(current))
  return values


def parse_grid(spec: str) -> Axis:
  """"optim.lr=1e-3,3e-3" -> Axis("config.optim.lr", ("1e-3", "3e-3"))."""
  key, eq, rest = spec.partition("=")
  key = key.strip()
  if not key.startswith("config."):
    key = "config." + key
  if not eq or not _KEY_RE.match(key):
    raise SweepError(f"--grid={spec!r}: expected KEY=V1,V2,... with KEY like optim.lr")
  values = split_values(rest)
  if any(not v for v in values):
    raise SweepError(f"--grid={spec!r} has an empty value; drop the stray comma")
  for v in values:
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
      print(f"sweep: warning: {key}={v}: ml_collections keeps the quotes of a str override as "
            "part of the string; write the value unquoted", file=sys.stderr)
  return Axis(key, tuple(values))


def short_names(keys: Sequence[str]) -> dict[str, str]:
  """Last path component ("lr"), or the path without "config." where two would collide."""
  last = [k.rsplit(".", 1)[1] for k in keys]
  return {k: (s if last.count(s) == 1 else k[len("config."):]) for k, s in zip(keys, last)}


def sanitize(value: str) -> str:
  """A value as a path-safe name: "(-1,2,1)" -> "-1_2_1", "data/x.txt" -> "data_x.txt"."""
  return re.sub(r"[^A-Za-z0-9._+-]", "_", re.sub(r"[\s()\[\]{}'\"]", "", value)) or "_"


def run_name(overrides: Sequence[tuple[str, str]], names: dict[str, str]) -> str:
  name = ",".join(f"{names[k]}={sanitize(v)}" for k, v in overrides) or "base"
  if len(name) > MAX_NAME_LEN:
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    name = f"{name[:MAX_NAME_LEN - 13]}-{digest}"
  return name


def expand(axes: Sequence[Axis], seeds: Sequence[int], base_workdir: str) -> list[Run]:
  """The cartesian product of `axes` (first axis slowest), then seeds (fastest)."""
  keys = [a.key for a in axes]
  if len(set(keys)) != len(keys):
    raise SweepError(f"a key is swept twice in --grid: {keys}; give each key one --grid")
  if seeds and SEED_KEY in keys:
    raise SweepError("--seeds and --grid=seed=... both set config.seed; use one of them")
  all_axes = list(axes) + ([Axis(SEED_KEY, tuple(str(s) for s in seeds))] if seeds else [])
  names = short_names([a.key for a in all_axes])
  runs, seen = [], {}
  for combo in itertools.product(*(a.values for a in all_axes)):
    overrides = tuple(zip((a.key for a in all_axes), combo))
    name = run_name(overrides, names)
    if name in seen:
      raise SweepError(f"runs {dict(seen[name])} and {dict(overrides)} both map to workdir "
                       f"{name!r} after sanitising; make the values differ in [A-Za-z0-9._+-]")
    seen[name] = overrides
    runs.append(Run(name, os.path.join(base_workdir, name), overrides))
  return runs


def check_extra(extra: Sequence[str], axes: Sequence[Axis], seeds: Sequence[int]) -> None:
  """--extra may add fixed overrides, not re-set what the sweep sets per run."""
  swept = {a.key for a in axes} | ({SEED_KEY} if seeds else set())
  for arg in extra:
    flag = arg.split("=", 1)[0].lstrip("-")
    if flag in ("config", "workdir"):
      raise SweepError(f"--extra={arg!r}: the sweep sets --{flag} per run; use the sweep's "
                       "--config / --base_workdir instead")
    if flag in swept:
      raise SweepError(f"--extra={arg!r} overrides swept key {flag}; drop it or remove the --grid")


# ----------------------------------------------------------------------------- running


def is_finished(workdir: str) -> bool:
  return any(os.path.exists(os.path.join(workdir, f)) for f in DONE_FILES)


def _local_entry(entry: Sequence[str]) -> list[str]:
  # "python" means the interpreter running the sweep (its virtualenv, its packages).
  if entry and entry[0] in ("python", "python3"):
    return [sys.executable, *entry[1:]]
  return list(entry)


def _run_one(run: Run, cmd: list[str]) -> tuple[int, float]:
  os.makedirs(run.workdir, exist_ok=True)
  start = time.perf_counter()
  with open(os.path.join(run.workdir, "log.txt"), "a", encoding="utf-8") as log:
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL).returncode
  return rc, time.perf_counter() - start


def run_local(runs: Sequence[Run], entry: Sequence[str], config: str, extra: Sequence[str],
              max_parallel: int = 1) -> list[str]:
  """Runs the unfinished runs; returns the names of those that failed."""
  todo = []
  for run in runs:
    if is_finished(run.workdir):
      print(f"skip {run.name}: already finished", flush=True)
    else:
      todo.append(run)
  entry = _local_entry(entry)
  failed = []
  with concurrent.futures.ThreadPoolExecutor(max(1, max_parallel)) as pool:
    futures = {pool.submit(_run_one, run, run.command(entry, config, extra)): run for run in todo}
    try:
      for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
        run = futures[future]
        rc, seconds = future.result()
        log = os.path.join(run.workdir, "log.txt")
        status = "ok" if rc == 0 else f"FAILED (exit {rc}; see {log})"
        print(f"[{i}/{len(todo)}] {run.name}: {status} in {seconds:.1f} s", flush=True)
        if rc != 0:
          failed.append(run.name)
    except KeyboardInterrupt:
      # Ctrl-C reaches the running children too; queued runs must not start after it.
      for future in futures:
        future.cancel()
      raise
  return failed


def check_runs(runs: Sequence[Run], config: str, extra: Sequence[str]) -> list[str]:
  """Parses each run's flags as latent_em.main does and validates the config; returns failures."""
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())  # as `python -m latent_em.main` run from here would see it
  from absl import flags
  from ml_collections import config_flags
  from latent_em import runtime
  failed = []
  for run in runs:
    argv = run.command(["main"], config, extra)
    flag_values = flags.FlagValues()
    # config_flags reads the overrides from the argv it is given (sys.argv by default).
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                             sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=flag_values)
    try:
      flag_values(argv)
      runtime.validate(holder.value)
    except Exception as e:  # every failure is reported per run, then the sweep exits non-zero
      failed.append(run.name)
      message = str(e)
      if isinstance(e, (KeyError, AttributeError)):  # how config_flags reports a missing field
        message = f"no such config field {e} in {config}"
      print(f"{run.name}: {message}", flush=True)
    else:
      print(f"{run.name}: ok", flush=True)
  return failed


# ----------------------------------------------------------------------------- aggregation


def flatten_metrics(obj: dict[str, Any], prefix: str = "") -> dict[str, float]:
  """Numeric leaves as {"elbo_per_token.1": x, ...}; strings, lists, None and bools dropped."""
  out = {}
  for key, value in obj.items():
    if key in SKIP_FIELDS or isinstance(value, bool):
      continue
    if isinstance(value, (int, float)):
      out[prefix + str(key)] = float(value)
    elif isinstance(value, dict):
      out.update(flatten_metrics(value, f"{prefix}{key}."))
  return out


def parse_run_name(name: str) -> dict[str, str]:
  """"lr=3e-3,seed=1" -> {"lr": "3e-3", "seed": "1"}; {} for a name not made by the sweep."""
  parts = [p.partition("=") for p in name.split(",")]
  if not all(eq and k for k, eq, _ in parts):
    return {}
  return {k: v for k, _, v in parts}


def _rows_from_file(path: str, sub: str) -> list[tuple[str, dict[str, float]]]:
  """(source, metrics) rows of one results file; `sub` is its folder inside the run dir."""
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  if not isinstance(data, dict):
    raise ValueError("top level is not a JSON object")
  prefix = f"{sub}/" if sub else ""
  if os.path.basename(path) == "train_summary.json":
    return [(prefix + "train", flatten_metrics(data))]
  if isinstance(data.get("runs"), dict):  # EM driver: one entry per iteration / baseline
    return [(prefix + str(name), flatten_metrics(m)) for name, m in data["runs"].items()
            if isinstance(m, dict)]
  return [(sub or "results", flatten_metrics(data))]


def collect(base_workdir: str) -> list[dict[str, Any]]:
  """One row per (run dir, source): {"run", "source", "overrides", "metrics"}."""
  rows = []
  for run_dir in sorted(os.listdir(base_workdir), key=_natural_key):
    root = os.path.join(base_workdir, run_dir)
    if not os.path.isdir(root):
      continue
    for dirpath, dirnames, filenames in os.walk(root):
      sub = os.path.relpath(dirpath, root)
      sub = "" if sub == "." else sub.replace(os.sep, "/")
      dirnames[:] = sorted(dirnames) if not sub else []  # the run dir and one level below
      for fname in RESULT_FILES:
        if fname not in filenames:
          continue
        path = os.path.join(dirpath, fname)
        try:
          file_rows = _rows_from_file(path, sub)
        except (OSError, ValueError) as e:
          print(f"sweep: warning: skipping {path}: {e}", file=sys.stderr)
          continue
        for source, metrics in file_rows:
          rows.append({"run": run_dir, "source": source, "overrides": parse_run_name(run_dir),
                       "metrics": metrics})
  return rows


def aggregate(rows: Sequence[dict[str, Any]], seed_name: str = "seed") -> list[dict[str, Any]]:
  """Groups rows by (overrides without the seed, source); mean and sample std per metric."""
  groups: dict[tuple, dict[str, Any]] = {}
  for row in rows:
    overrides = row["overrides"]
    fixed = tuple((k, v) for k, v in overrides.items() if k != seed_name) if overrides else (
        ("run", row["run"]),)
    group = groups.setdefault((fixed, row["source"]), {
        "overrides": dict(fixed), "source": row["source"], "seeds": [], "run_dirs": [],
        "values": {}})
    group["run_dirs"].append(row["run"])
    if seed_name in overrides:
      group["seeds"].append(overrides[seed_name])
    for metric, value in row["metrics"].items():
      group["values"].setdefault(metric, []).append(value)
  out = []
  for group in groups.values():
    values = group.pop("values")
    group["n"] = len(group["run_dirs"])
    group["mean"] = {m: statistics.fmean(v) for m, v in values.items()}
    group["std"] = {m: (statistics.stdev(v) if len(v) > 1 else None) for m, v in values.items()}
    group["count"] = {m: len(v) for m, v in values.items()}
    out.append(group)
  return out


def _fmt(x: float | None) -> str:
  if x is None:
    return ""
  return f"{x:.4g}" if math.isfinite(x) else str(x)


def markdown_table(groups: Sequence[dict[str, Any]], metrics: Sequence[str] | None = None) -> str:
  """Override columns, source, n, then "mean ± std" per metric, sorted (std only when n > 1)."""
  keys = _ordered(k for g in groups for k in g["overrides"])
  all_metrics = sorted({m for g in groups for m in g["mean"]})
  if metrics:
    all_metrics = [m for m in all_metrics if any(m == p or m.startswith(p + ".") for p in metrics)]
  header = [*keys, "source", "n", *all_metrics]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for g in groups:
    cells = [g["overrides"].get(k, "") for k in keys] + [g["source"], str(g["n"])]
    for m in all_metrics:
      mean, std = g["mean"].get(m), g["std"].get(m)
      cells.append(_fmt(mean) + (f" ± {_fmt(std)}" if std is not None else ""))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_reports(base_workdir: str, metrics: Sequence[str] | None = None) -> str:
  """Aggregates `base_workdir`, writes sweep_results.{md,json} there; returns the table."""
  rows = collect(base_workdir)
  groups = aggregate(rows)
  table = markdown_table(groups, metrics)
  _write_atomic(os.path.join(base_workdir, "sweep_results.md"), table)
  _write_atomic(os.path.join(base_workdir, "sweep_results.json"),
                json.dumps({"groups": groups, "runs": rows}, indent=2) + "\n")
  return table


def _ordered(items: Iterable[str]) -> list[str]:
  return list(dict.fromkeys(items))


def _natural_key(name: str) -> list:
  return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _write_atomic(path: str, text: str) -> None:
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path) or ".")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", help="configs/X.py[:variant], as for latent_em.main")
  p.add_argument("--base_workdir", required=True, help="one subfolder per run goes here")
  p.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... (repeatable)")
  p.add_argument("--seeds", default="", help="comma-separated values of config.seed")
  p.add_argument("--mode", choices=("print", "local", "check"), default="print")
  p.add_argument("--max_parallel", type=int, default=1, help="concurrent local runs")
  p.add_argument("--aggregate_only", action="store_true", help="only rebuild the results table")
  p.add_argument("--extra", action="append", default=[],
                 help="one fixed flag for every run, verbatim, e.g. "
                 "--extra=--config.train.steps=10 (repeatable)")
  p.add_argument("--entry", default=DEFAULT_ENTRY, help="command that takes the flags")
  p.add_argument("--metrics", default="", help="comma-separated metric names/prefixes to show")
  return p.parse_args(argv)


def _parse_seeds(text: str) -> list[int]:
  try:
    return [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise SweepError(f"--seeds={text!r}: expected comma-separated integers, e.g. --seeds=0,1,2")


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  metrics = [m for m in args.metrics.split(",") if m] or None
  if args.aggregate_only:
    if not os.path.isdir(args.base_workdir):
      print(f"sweep: --base_workdir={args.base_workdir} does not exist", file=sys.stderr)
      return 2
    print(write_reports(args.base_workdir, metrics), end="")
    return 0
  try:
    if not args.config:
      raise SweepError("--config is required (configs/X.py[:variant])")
    seeds = _parse_seeds(args.seeds)
    axes = [parse_grid(g) for g in args.grid]
    extra = list(args.extra)
    check_extra(extra, axes, seeds)
    runs = expand(axes, seeds, args.base_workdir)
  except SweepError as e:
    print(f"sweep: {e}", file=sys.stderr)
    return 2
  entry = shlex.split(args.entry)
  if args.mode == "print":
    for run in runs:
      print(shlex.join(run.command(entry, args.config, extra)))
    return 0
  if args.mode == "check":
    failed = check_runs(runs, args.config, extra)
  else:
    os.makedirs(args.base_workdir, exist_ok=True)
    failed = run_local(runs, entry, args.config, extra, args.max_parallel)
    print(write_reports(args.base_workdir, metrics), end="")
  if failed:
    print(f"sweep: {len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())

r"""The paper configuration's fit on TPU slices: the fit check (`latent_em.tools.preflight`) over
a fixed set of (config variant, topology, overrides), in one process, as a table.

  python benchmarks/fit_check.py                  # every case below; markdown table
  python benchmarks/fit_check.py --cases=warmstart_v5e8 --flops --json

Needs libtpu (`pip install -e '.[tpu]'`); no TPU. Each case is what
`python -m latent_em.tools.preflight --config=configs/bolt_tinyllama.py:VARIANT --topology=T
[--config.KEY=VALUE ...]` reports. Results are recorded in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "bolt_tinyllama.py")

# name -> (variant, topology, overrides). warmstart: batch 96; mstep: the bootstrap batch 192.
CASES: dict[str, tuple[str, str, dict]] = {
    "warmstart_v5e8": ("warmstart", "v5e:2x4", {"train.grad_accum": 1}),
    "bootstrap_v5e16": ("mstep", "v5e:4x4", {"train.grad_accum": 1}),
    "bootstrap_v5e8": ("mstep", "v5e:2x4", {"train.grad_accum": 1}),
    "bootstrap_v5e8_accum2": ("mstep", "v5e:2x4", {"train.grad_accum": 2}),
    "warmstart_v5p8": ("warmstart", "v5p:2x2x1", {"train.grad_accum": 1}),
    "bootstrap_v5p8": ("mstep", "v5p:2x2x1", {"train.grad_accum": 1}),
    "estep_v5e8": ("estep", "v5e:2x4", {}),
    "estep_v5p8": ("estep", "v5p:2x2x1", {}),
}


def load_config(variant: str, overrides: dict):
  spec = importlib.util.spec_from_file_location("bolt_tinyllama", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def row(name: str, r: dict) -> str:
  gib = 1024 ** 3
  variant, topology, overrides = CASES[name]
  accum = overrides.get("train.grad_accum", "")
  progs = "; ".join(f"{p} {v['peak_bytes'] / gib:.2f}" for p, v in r["programs"].items())
  flops = f"{r['flops']['ratio']:.3f}" if "ratio" in r.get("flops", {}) else ""
  headroom = f"{100 * r['headroom']:.0f}%" if r["fits"] else "-"
  return (f"| {name} | :{variant} | {topology} | {accum} | {progs} | "
          f"{r['hbm_bytes_per_device'] / gib:.2f} | {'yes' if r['fits'] else 'no'} | {headroom} | "
          f"{flops} | {r['wall_s']:.0f} |")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--cases", default=",".join(CASES), help="comma-separated names of CASES")
  p.add_argument("--flops", action="store_true", help="also compare the train step's FLOPs")
  p.add_argument("--json", action="store_true", help="one JSON line per case")
  args = p.parse_args(argv)
  import jax
  jax.config.update("jax_platforms", "cpu")
  sys.path.insert(0, REPO)
  from latent_em.tools import preflight
  names = args.cases.split(",")
  unknown = [n for n in names if n not in CASES]
  if unknown:
    p.error(f"unknown cases {unknown}; known: {list(CASES)}")
  if not args.json:
    print("| case | variant | topology | grad_accum | GiB per device (program: peak) | HBM GiB "
          "| fits | headroom | FLOPs / analytic | check s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
  for name in names:
    variant, topology, overrides = CASES[name]
    start = time.perf_counter()
    report = preflight.check(load_config(variant, overrides), preflight.get_target(topology),
                             f"configs/bolt_tinyllama.py:{variant}", with_flops=args.flops)
    report["wall_s"] = time.perf_counter() - start
    report["case"] = name
    print(json.dumps(report) if args.json else row(name, report), flush=True)


if __name__ == "__main__":
  main()

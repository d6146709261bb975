"""Job dispatch: `config.job` names the function that runs the experiment."""
from __future__ import annotations

import os
from typing import Any, Callable

from latent_em import config_lib, runtime


def _train(config, workdir):
  from latent_em import train
  return train.run(config, workdir)


def _estep(config, workdir):
  from latent_em.estep import job
  return job.run(config, workdir)


def _synthesize(config, workdir):
  from latent_em.synthesis import job
  return job.run(config, workdir)


def _eval(config, workdir):
  from latent_em.evaluation import job
  return job.run(config, workdir)


def _em(config, workdir):
  from latent_em.em import job
  return job.run(config, workdir)


JOBS: dict[str, Callable[[Any, str], Any]] = {"train": _train, "estep": _estep,
                                              "synthesize": _synthesize, "eval": _eval,
                                              "em": _em}


def run(config, workdir: str) -> Any:
  """Runs `config.job` in `workdir` (created if missing)."""
  job = config.get("job", "train")
  if job not in JOBS:
    raise config_lib.ConfigError(f"config.job={job!r} is not one of {sorted(JOBS)}")
  os.makedirs(workdir, exist_ok=True)
  return JOBS[job](config, workdir)

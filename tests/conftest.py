"""Shared test helpers. Multi-device tests run in subprocesses with 8 fake CPU devices."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

# The suite runs on the CPU. With libtpu installed (the test extra brings it for the fit check),
# jax would otherwise first try, and fail, to open a TPU in every test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO, "..", "shared", "data")


def shared_data(*parts: str) -> str:
  path = os.path.join(SHARED_DATA, *parts)
  if not os.path.exists(path):
    pytest.skip(f"shared data not found at {path} (expected ../shared/data beside the repo)")
  return path


def run_python(code: str, devices: int = 1, timeout: int = 600, env: dict | None = None) -> str:
  """Runs `code` in a fresh interpreter with `devices` fake CPU devices; returns stdout."""
  full_env = dict(os.environ)
  full_env.update({
      "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
      "JAX_PLATFORMS": "cpu",
      "TF_CPP_MIN_LOG_LEVEL": "3",
      "PYTHONPATH": REPO + os.pathsep + full_env.get("PYTHONPATH", ""),
  })
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=timeout, env=full_env, cwd=REPO)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc.stdout


def run_main(args: list[str], timeout: int = 900, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
  """Runs `python -m latent_em.main ARGS` from the repo root."""
  full_env = dict(os.environ)
  full_env.update({"JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"})
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, "-m", "latent_em.main", *args], capture_output=True,
                        text=True, timeout=timeout, env=full_env, cwd=REPO)
  if check and proc.returncode != 0:
    raise AssertionError(f"main failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-5000:]}")
  return proc


@pytest.fixture(scope="session")
def em_smoke(tmp_path_factory):
  """One run of `configs/quickstart.py:smoke` through the CLI, shared by the EM and notebook
  tests: (workdir, combined output)."""
  workdir = str(tmp_path_factory.mktemp("em_smoke") / "em")
  proc = run_main(["--config=configs/quickstart.py:smoke", f"--workdir={workdir}"], timeout=1500)
  return workdir, proc.stdout + proc.stderr


@contextlib.contextmanager
def tpu_interpret():
  """Runs the Pallas TPU kernels traced inside on CPU, through Pallas' HLO interpreter: each
  kernel becomes a jitted loop over its grid running the same kernel body.

  (`pltpu.force_tpu_interpret_mode` simulates the TPU's memories too, but through callbacks
  that jax.checkpoint cannot rematerialise and that miss the grid dimension vmap adds.)
  """
  from jax._src import config  # the switch force_tpu_interpret_mode sets, with True
  prev = config.pallas_tpu_interpret_mode_context_manager.swap_local(True)
  try:
    yield
  finally:
    config.pallas_tpu_interpret_mode_context_manager.set_local(prev)

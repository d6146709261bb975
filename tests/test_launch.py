"""Launch scripts (dry runs and a fake gcloud) and the sweep tool (with a fake trainer)."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
GPU_XLA = "--xla_gpu_enable_latency_hiding_scheduler=true"
# Environment knobs of the scripts: cleared so that the caller's shell cannot change the output.
KNOBS = ("RUNTIME_VERSION", "PROJECT", "SPOT", "GCS_WORKDIR", "REPO_URL", "REPO_REF", "LOG_DIR",
         "KEEP", "PYTHON_VERSION", "XLA_FLAGS", "PYTHON", "SBATCH_ARGS", "JOB_NAME", "DRY_RUN",
         "GPUS_PER_NODE", "JAX_COORDINATOR_PORT")


def _load_sweep():
  spec = importlib.util.spec_from_file_location("sweep", os.path.join(LAUNCH, "sweep.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules["sweep"] = module  # dataclasses resolve string annotations through sys.modules
  spec.loader.exec_module(module)
  return module


sweep = _load_sweep()


def _env(**extra) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith("SLURM_")}
  env.update(extra)
  return env


def _bash(script: str, *args: str, cwd: str = REPO, **env) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                        text=True, env=_env(**env), cwd=cwd, timeout=60)


def _commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def _remote_main(command_flag: str) -> list[str]:
  """The argv of `python -m latent_em.main ...` inside tpu_vm.sh's remote run command."""
  prefix = "--command=set -o pipefail; cd latent_em && PYTHONUNBUFFERED=1 "
  suffix = " 2>&1 | tee ../latent_em.log"
  assert command_flag.startswith(prefix) and command_flag.endswith(suffix), command_flag
  return shlex.split(command_flag[len(prefix):-len(suffix)])


# ----------------------------------------------------------------------------- TPU VM


def test_tpu_vm_dry_run_prints_every_step(tmp_path):
  args = ["--config=configs/tiny.py", "--workdir=runs/w", "--config.mesh.shape=(-1,1,1)",
          "--config.synthesis.prompt=it's a $HOME"]
  proc = _bash("tpu_vm.sh", "t1", "us-central2-b", "v4-8", "--dry-run", "--", *args)
  assert proc.returncode == 0, proc.stderr
  cmds = _commands(proc.stdout)
  where = ["--zone=us-central2-b"]
  setup = ("--command=(python3 -m pip install -q --user uv || python3 -m pip install -q --user uv "
           "--break-system-packages) && python3 -m uv venv -q --python 3.11 ~/latent_em_venv && "
           "cd latent_em && python3 -m uv pip install -q --python ~/latent_em_venv/bin/python "
           "-e . 'jax[tpu]'")
  # The fit check runs here first, with the job's arguments, for the slice's accelerator type.
  assert cmds[0] == ["python", "-m", "latent_em.tools.preflight", "--topology=v4-8", *args]
  cmds = cmds[1:]
  assert cmds[:4] == [
      [*TPU, "create", "t1", *where, "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"],
      [*TPU, "ssh", "t1", *where, "--worker=all", "--command=mkdir -p latent_em"],
      [*TPU, "scp", "--recurse", f"{REPO}/latent_em", f"{REPO}/configs", f"{REPO}/setup.py",
       "t1:latent_em/", "--worker=all", *where],
      [*TPU, "ssh", "t1", *where, "--worker=all", setup],
  ]
  assert cmds[4][:-1] == [*TPU, "ssh", "t1", *where, "--worker=all"]
  # distributed=on right after --config= (config_flags rejects overrides before it); the
  # arguments reach the workers' shell intact, quotes and $ included.
  assert _remote_main(cmds[4][-1]) == [
      "~/latent_em_venv/bin/python", "-m", "latent_em.main", args[0], "--config.distributed=on",
      *args[1:]]
  assert cmds[5:] == [
      ["mkdir", "-p", "launch_logs/t1"],
      [*TPU, "scp", "t1:latent_em.log", "launch_logs/t1/", "--worker=0", *where],
      [*TPU, "scp", "--recurse", "t1:latent_em/runs/w", "launch_logs/t1/", "--worker=0", *where],
      [*TPU, "delete", "t1", *where, "--quiet"],
  ]


def test_tpu_vm_env_overrides():
  proc = _bash("tpu_vm.sh", "t2", "us-west4-a", "v5litepod-16", "--dry-run", "--skip-preflight",
               "--", "--config=configs/tiny.py:steps=5", "--config.distributed=auto",
               SPOT="1", PROJECT="proj", GCS_WORKDIR="gs://bucket/runs/",
               REPO_URL="https://x/y.git", REPO_REF="v1", KEEP="1", LOG_DIR="/tmp/logs",
               PYTHON_VERSION="3.12")
  assert proc.returncode == 0, proc.stderr
  cmds = _commands(proc.stdout)
  where = ["--zone=us-west4-a", "--project=proj"]
  assert cmds[0] == [*TPU, "create", "t2", *where, "--accelerator-type=v5litepod-16",
                     "--version=v2-alpha-tpuv5-lite", "--spot"]
  assert cmds[1] == [*TPU, "ssh", "t2", *where, "--worker=all",
                     "--command=git clone --depth=1 --branch v1 https://x/y.git latent_em "]
  assert "--python 3.12 ~/latent_em_venv" in cmds[2][-1]
  # The user's later --config.distributed=auto wins over the launcher's default.
  assert _remote_main(cmds[3][-1])[3:] == [
      "--config=configs/tiny.py:steps=5", "--config.distributed=on", "--config.distributed=auto",
      "--workdir=gs://bucket/runs/t2"]
  # gs:// workdir: only the log comes back; KEEP=1: no delete.
  assert cmds[4:] == [["mkdir", "-p", "/tmp/logs"],
                      [*TPU, "scp", "t2:latent_em.log", "/tmp/logs/", "--worker=0", *where]]
  assert "kept t2" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--", "--config=configs/tiny.py"], "--workdir"),
    (["--", "--workdir=/tmp/w"], "--config"),
    (["--bogus", "--", "--config=c.py", "--workdir=w"], "unknown option '--bogus'"),
])
def test_tpu_vm_rejects_bad_arguments_before_creating_anything(args, message):
  proc = _bash("tpu_vm.sh", "t3", "zone", "v4-8", "--dry-run", *args)
  assert proc.returncode == 2
  assert proc.stdout == ""
  assert message in proc.stderr


def _fakes(tmp_path, preflight_exit: int = 0) -> dict[str, str]:
  """A gcloud that records its calls and fails the job step, and a python (for the fit check)
  that records its arguments and exits with `preflight_exit`."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  gcloud = bin_dir / "gcloud"
  gcloud.write_text('#!/usr/bin/env bash\necho "$*" >> "$CALLS"\n'
                    'case "$*" in *latent_em.main*) exit 3 ;; esac\n')
  python = bin_dir / "fake_python"
  python.write_text(f'#!/usr/bin/env bash\necho "$*" >> "$PREFLIGHT_CALLS"\n'
                    f'echo "report"\nexit {preflight_exit}\n')
  for f in (gcloud, python):
    f.chmod(0o755)
  return dict(CALLS=str(tmp_path / "calls.txt"), PREFLIGHT_CALLS=str(tmp_path / "preflight.txt"),
              PYTHON=str(python), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_tpu_vm_failure_still_fetches_log_and_deletes(tmp_path):
  """A real (not dry) run against a fake gcloud whose job step fails."""
  fakes = _fakes(tmp_path)
  proc = _bash("tpu_vm.sh", "t4", "zone", "v4-8", "--", "--config=configs/tiny.py",
               "--workdir=gs://b/w", cwd=str(tmp_path), **fakes)
  assert proc.returncode == 3, proc.stderr
  assert (tmp_path / "preflight.txt").read_text().split() == [
      "-m", "latent_em.tools.preflight", "--topology=v4-8", "--config=configs/tiny.py",
      "--workdir=gs://b/w"]
  steps = [line.split()[3] for line in (tmp_path / "calls.txt").read_text().splitlines()]
  assert steps == ["create", "ssh", "scp", "ssh", "ssh", "scp", "delete"]
  assert (tmp_path / "launch_logs" / "t4").is_dir()


@pytest.mark.parametrize("preflight_exit, message", [
    (1, "does not fit v5litepod-8"), (2, "the fit check could not run"),
    (3, "the fit check could not run")])
def test_tpu_vm_stops_before_creating_when_the_fit_check_fails(tmp_path, preflight_exit,
                                                                message):
  fakes = _fakes(tmp_path, preflight_exit)
  proc = _bash("tpu_vm.sh", "t5", "zone", "v5litepod-8", "--", "--config=configs/tiny.py",
               "--workdir=gs://b/w", cwd=str(tmp_path), **fakes)
  assert proc.returncode == preflight_exit
  assert message in proc.stderr and "--skip-preflight" in proc.stderr
  assert proc.stdout == "report\n"  # the check's report reaches the user
  assert not os.path.exists(fakes["CALLS"])  # gcloud never ran: nothing created or deleted
  # --skip-preflight launches without it.
  proc = _bash("tpu_vm.sh", "t5", "zone", "v5litepod-8", "--skip-preflight", "--",
               "--config=configs/tiny.py", "--workdir=gs://b/w", cwd=str(tmp_path), **fakes)
  assert proc.returncode == 3  # the fake job step
  assert (tmp_path / "preflight.txt").read_text().count("preflight") == 1


# ----------------------------------------------------------------------------- GPU / SLURM


def test_gpu_single_node():
  args = ["--config=configs/tiny.py", "--workdir=/tmp/w", "--config.optim.lr=1e-3"]
  proc = _bash("gpu.sh", "--dry-run", "--", *args)
  assert proc.returncode == 0, proc.stderr
  assert _commands(proc.stdout) == [
      ["env", f"XLA_FLAGS={GPU_XLA}", "python", "-m", "latent_em.main", *args]]
  proc = _bash("gpu.sh", "--dry-run", "--", *args, XLA_FLAGS="--xla_dump_to=/tmp/d",
               PYTHON="python3.11")
  assert _commands(proc.stdout) == [
      ["env", f"XLA_FLAGS={GPU_XLA} --xla_dump_to=/tmp/d", "python3.11", "-m", "latent_em.main",
       *args]]


def test_gpu_preflight_runs_the_local_fit_check_first(tmp_path):
  args = ["--config=configs/tiny.py", "--workdir=/tmp/w"]
  proc = _bash("gpu.sh", "--dry-run", "--preflight", "--", *args)
  assert proc.returncode == 0, proc.stderr
  env = ["env", f"XLA_FLAGS={GPU_XLA}", "python"]
  assert _commands(proc.stdout) == [
      [*env, "-m", "latent_em.tools.preflight", "--topology=local", *args],
      [*env, "-m", "latent_em.main", *args]]
  # A job that does not fit does not start.
  fakes = _fakes(tmp_path, preflight_exit=1)
  proc = _bash("gpu.sh", "--preflight", "--", *args, **fakes)
  assert proc.returncode == 1 and proc.stdout == "report\n"
  assert (tmp_path / "preflight.txt").read_text().split()[:3] == [
      "-m", "latent_em.tools.preflight", "--topology=local"]
  proc = _bash("gpu.sh", "--slurm", "2", "8", "--preflight", "--dry-run", "--", *args)
  assert proc.returncode == 2 and "without --slurm" in proc.stderr and proc.stdout == ""


def test_gpu_slurm_submit():
  args = ["--config=configs/tiny.py", "--workdir=/shared/w"]
  proc = _bash("gpu.sh", "--slurm", "4", "8", "--dry-run", "--", *args,
               SBATCH_ARGS="--partition=gpu --time=2:00:00", JOB_NAME="lr_sweep")
  assert proc.returncode == 0, proc.stderr
  assert _commands(proc.stdout) == [
      ["sbatch", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--job-name=lr_sweep",
       "--export=ALL,GPUS_PER_NODE=8", "--partition=gpu", "--time=2:00:00",
       os.path.join(LAUNCH, "slurm.sbatch"), *args]]


def _fake_scontrol(tmp_path) -> str:
  """scontrol that expands the node list "gpu[003-004]" as the real one would."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  fake = bin_dir / "scontrol"
  fake.write_text('#!/usr/bin/env bash\n[ "$1 $2 $3" = "show hostnames gpu[003-004]" ] || exit 1\n'
                  'printf "gpu003\\ngpu004\\n"\n')
  fake.chmod(0o755)
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_slurm_sbatch_sets_up_jax_distributed(tmp_path):
  args = ["--config=configs/tiny.py", "--workdir=/shared/w"]
  slurm = dict(SLURM_JOB_NODELIST="gpu[003-004]", SLURM_JOB_ID="1234", SLURM_JOB_NUM_NODES="2",
               SLURM_CPUS_ON_NODE="64", PATH=_fake_scontrol(tmp_path), DRY_RUN="1")
  proc = _bash("slurm.sbatch", *args, GPUS_PER_NODE="8", **slurm)
  assert proc.returncode == 0, proc.stderr
  port = 1234 % 4096 + 61440  # jax's own rule for SLURM jobs
  assert _commands(proc.stdout) == [
      ["env", f"JAX_COORDINATOR_ADDRESS=gpu003:{port}", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
       f"XLA_FLAGS={GPU_XLA}", "srun", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=64",
       "--kill-on-bad-exit=1", "python", "-m", "latent_em.main", *args]]
  # GPU count from SLURM when not given; explicit port.
  proc = _bash("slurm.sbatch", *args, SLURM_GPUS_ON_NODE="2", JAX_COORDINATOR_PORT="5000", **slurm)
  assert _commands(proc.stdout)[0][1:3] == ["JAX_COORDINATOR_ADDRESS=gpu003:5000",
                                            "JAX_LOCAL_DEVICE_IDS=0,1"]
  proc = _bash("slurm.sbatch", *args, **slurm)
  assert proc.returncode != 0 and "--gpus-per-node" in proc.stderr


def test_gpu_xla_flags_are_known_to_the_installed_xla():
  """XLA aborts on an unknown flag in XLA_FLAGS; this jaxlib parses the same flag table."""
  env = _env(XLA_FLAGS=GPU_XLA, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  code = "import jax, jax.numpy as jnp; print(int(jax.jit(lambda x: x + 1)(jnp.int32(1))))"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "2", proc.stderr[-2000:]
  bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**env, "XLA_FLAGS": "--xla_gpu_no_such_flag=true"})
  assert bad.returncode != 0  # so the check above can fail


# ----------------------------------------------------------------------------- sweep: expansion


def test_grid_parsing():
  assert sweep.split_values("(-1,1,1),(-1,2,1)") == ["(-1,1,1)", "(-1,2,1)"]
  assert sweep.split_values("('a,b','c'),x") == ["('a,b','c')", "x"]
  assert sweep.parse_grid("optim.lr=1e-3,3e-3") == sweep.Axis("config.optim.lr", ("1e-3", "3e-3"))
  assert sweep.parse_grid("config.estep.selection=argmax") == sweep.Axis(
      "config.estep.selection", ("argmax",))
  for bad in ("optim.lr", "optim.lr=1,,2", "optim lr=1", "=1"):
    with pytest.raises(sweep.SweepError):
      sweep.parse_grid(bad)


def test_expand_names_and_order():
  axes = [sweep.parse_grid("optim.lr=1e-3,3e-3"), sweep.parse_grid("mesh.shape=(-1,1,1),(-1,2,1)")]
  runs = sweep.expand(axes, [0, 1], "/b")
  assert [r.name for r in runs] == [
      f"lr={lr},shape={s},seed={seed}" for lr in ("1e-3", "3e-3") for s in ("-1_1_1", "-1_2_1")
      for seed in (0, 1)]
  assert runs[3].overrides == (("config.optim.lr", "1e-3"), ("config.mesh.shape", "(-1,2,1)"),
                               ("config.seed", "1"))
  assert runs[3].workdir == "/b/lr=1e-3,shape=-1_2_1,seed=1"
  # Same last component: the full path disambiguates.
  runs = sweep.expand([sweep.parse_grid("a.lr=1"), sweep.parse_grid("b.lr=2")], [], "/b")
  assert [r.name for r in runs] == ["a.lr=1,b.lr=2"]
  assert sweep.expand([], [], "/b")[0].name == "base"
  # Values that sanitise to the same folder are refused rather than sharing it.
  with pytest.raises(sweep.SweepError, match="both map to workdir"):
    sweep.expand([sweep.parse_grid("data.train_files=a/b,a_b")], [], "/b")
  long = sweep.expand([sweep.parse_grid("data.train_files=" + "x" * 300)], [], "/b")[0].name
  assert len(long) == sweep.MAX_NAME_LEN


def _sweep(*args, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join(LAUNCH, "sweep.py"), *args],
                        capture_output=True, text=True, cwd=cwd, timeout=timeout,
                        env=_env(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3"))


def test_sweep_print_mode(tmp_path):
  base = str(tmp_path / "sw")
  proc = _sweep("--config=configs/tiny.py:steps=5", f"--base_workdir={base}",
                "--grid=optim.lr=1e-3,3e-3", "--grid=config.estep.num_samples=1,4", "--seeds=0,1",
                "--extra=--config.train.steps=7",
                "--extra=--config.data.train_files=('a b.jsonl',)")
  assert proc.returncode == 0, proc.stderr
  expected = []
  for lr in ("1e-3", "3e-3"):
    for k in ("1", "4"):
      for seed in ("0", "1"):
        expected.append([
            "python", "-m", "latent_em.main", "--config=configs/tiny.py:steps=5",
            f"--workdir={base}/lr={lr},num_samples={k},seed={seed}", f"--config.optim.lr={lr}",
            f"--config.estep.num_samples={k}", f"--config.seed={seed}", "--config.train.steps=7",
            "--config.data.train_files=('a b.jsonl',)"])
  assert _commands(proc.stdout) == expected
  assert not os.path.exists(base)  # print mode writes nothing


@pytest.mark.parametrize("args, message", [
    (["--grid=optim.lr=1", "--grid=config.optim.lr=2"], "swept twice"),
    (["--grid=seed=1,2", "--seeds=0"], "both set config.seed"),
    (["--grid=optim.lr=1,2", "--extra=--config.optim.lr=3"], "overrides swept key config.optim.lr"),
    (["--extra=--workdir=/x"], "--base_workdir"),
    (["--seeds=0,a"], "--seeds='0,a'"),
])
def test_sweep_rejects_bad_flags(tmp_path, args, message):
  proc = _sweep("--config=configs/tiny.py", f"--base_workdir={tmp_path}", *args)
  assert proc.returncode == 2
  assert message in proc.stderr and proc.stdout == ""


# ----------------------------------------------------------------------------- sweep: local runs

FAKE_MAIN = '''
import json, os, sys
flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
workdir = flags["workdir"]
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "calls.txt"), "a") as f:
  f.write(os.path.basename(workdir) + "\\n")
lr, k = float(flags["config.optim.lr"]), int(flags["config.estep.num_samples"])
seed = int(flags.get("config.seed", 0))
print("fake training in", workdir)
if lr > 0.05:
  sys.exit("diverged")
metrics = {"accuracy": {"gsm8k": 1000 * lr + seed}, "nll_per_token": k + 0.5 * seed ** 2,
           "elbo_per_token": {"1": -k - seed, "4": None}, "samples": {"gsm8k": [1.0]}}
with open(os.path.join(workdir, "results.json"), "w") as f:
  json.dump({"runs": {"em_1": metrics, "raw": {"nll_per_token": 9.0 + seed}}}, f)
'''


def test_sweep_local_runs_skips_and_aggregates(tmp_path):
  fake = tmp_path / "fake_main.py"
  fake.write_text(FAKE_MAIN)
  base = tmp_path / "sw"
  args = ["--config=configs/fake.py", f"--base_workdir={base}", "--grid=optim.lr=1e-3,3e-3",
          "--grid=estep.num_samples=1,4", "--seeds=0,1,2", "--mode=local", "--max_parallel=2",
          f"--entry=python {fake}"]
  proc = _sweep(*args)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  names = [f"lr={lr},num_samples={k},seed={s}" for lr in ("1e-3", "3e-3") for k in (1, 4)
           for s in (0, 1, 2)]
  assert sorted((tmp_path / "calls.txt").read_text().split()) == sorted(names)
  for name in names:
    log = (base / name / "log.txt").read_text()
    assert log.startswith(
        f"$ {sys.executable} {fake} --config=configs/fake.py --workdir={base / name} ")
    assert "fake training in" in log

  summary = json.loads((base / "sweep_results.json").read_text())
  assert len(summary["runs"]) == 24  # 12 runs x 2 sources
  groups = {(g["overrides"]["lr"], g["overrides"]["num_samples"], g["source"]): g
            for g in summary["groups"]}
  assert len(groups) == 8
  seeds = np.array([0, 1, 2])
  for lr in ("1e-3", "3e-3"):
    for k in ("1", "4"):
      g = groups[(lr, k, "em_1")]
      assert g["n"] == 3 and g["seeds"] == ["0", "1", "2"]
      expected = {"accuracy.gsm8k": 1000 * float(lr) + seeds,
                  "nll_per_token": int(k) + 0.5 * seeds ** 2, "elbo_per_token.1": -int(k) - seeds}
      assert set(g["mean"]) == set(expected)  # None and the samples are left out
      for metric, values in expected.items():
        assert g["mean"][metric] == pytest.approx(values.mean())
        assert g["std"][metric] == pytest.approx(values.std(ddof=1))
      assert groups[(lr, k, "raw")]["mean"] == {"nll_per_token": pytest.approx(10.0)}
  table = (base / "sweep_results.md").read_text()
  assert proc.stdout.endswith(table)
  lines = table.splitlines()
  assert lines[0] == ("| lr | num_samples | source | n | accuracy.gsm8k | elbo_per_token.1 | "
                      "nll_per_token |")
  # accuracy 3 + {0,1,2}: mean 4, std 1; elbo -4 - {0,1,2}: -5 ± 1; nll 4 + {0,.5,2}.
  nll = f"{4 + 2.5 / 3:.4g} ± {np.std([0, .5, 2], ddof=1):.4g}"
  assert f"| 3e-3 | 4 | em_1 | 3 | 4 ± 1 | -5 ± 1 | {nll} |" in lines

  # Rerun: everything is finished, nothing runs.
  proc = _sweep(*args)
  assert proc.returncode == 0
  assert proc.stdout.count("already finished") == 12
  assert len((tmp_path / "calls.txt").read_text().split()) == 12
  # A run that lost its results runs again, alone.
  os.remove(base / names[4] / "results.json")
  proc = _sweep(*args)
  assert (tmp_path / "calls.txt").read_text().split()[12:] == [names[4]]
  assert "[1/1] " + names[4] + ": ok" in proc.stdout


def test_sweep_local_failure_is_reported(tmp_path):
  fake = tmp_path / "fake_main.py"
  fake.write_text(FAKE_MAIN)
  base = tmp_path / "sw"
  proc = _sweep("--config=c.py", f"--base_workdir={base}", "--grid=optim.lr=0.1,0.01",
                "--extra=--config.estep.num_samples=2", "--mode=local", f"--entry=python {fake}")
  assert proc.returncode == 1
  assert "1 of 2 runs failed: lr=0.1" in proc.stderr
  assert "diverged" in (base / "lr=0.1" / "log.txt").read_text()
  assert (base / "lr=0.01" / "results.json").exists()
  groups = json.loads((base / "sweep_results.json").read_text())["groups"]
  assert {(g["overrides"]["lr"], g["source"]) for g in groups} == {("0.01", "em_1"),
                                                                     ("0.01", "raw")}


def test_sweep_aggregate_only(tmp_path):
  def write(rel, obj):
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))

  write("lr=1,seed=0/train_summary.json",
        {"steps": 10, "final_loss": 2.0, "mfu": None, "params_dir": "/x", "tokens_per_s": 100})
  write("lr=1,seed=1/train_summary.json", {"steps": 10, "final_loss": 3.0, "tokens_per_s": 300})
  write("lr=1,seed=1/eval/results.json",
        {"accuracy": {"gsm8k": 0.5}, "nll_per_token": 1.5, "elbo_per_token": {},
         "samples": {"gsm8k": [{"x": 1}]}, "details": {"gsm8k": {"n": 3}},
         "per_subject": {"math": {"algebra": {"accuracy": 1.0}}}})
  write("lr=2,seed=0/results.json", "{not json")
  write("lr=2,seed=0/ckpt/deep/results.json", {"runs": {"x": {"accuracy": 1.0}}})  # too deep
  write("handmade/train_summary.json", {"final_loss": 7.0})
  write("notes.txt", "not a run")
  proc = _sweep(f"--base_workdir={tmp_path}", "--aggregate_only")
  assert proc.returncode == 0, proc.stderr
  assert "skipping" in proc.stderr and "lr=2,seed=0/results.json" in proc.stderr
  groups = json.loads((tmp_path / "sweep_results.json").read_text())["groups"]
  by_key = {(tuple(sorted(g["overrides"].items())), g["source"]): g for g in groups}
  assert set(by_key) == {((("lr", "1"),), "train"), ((("lr", "1"),), "eval"),
                         ((("run", "handmade"),), "train")}
  train = by_key[((("lr", "1"),), "train")]
  assert train["n"] == 2 and train["seeds"] == ["0", "1"]
  assert train["mean"] == {"steps": 10.0, "final_loss": 2.5, "tokens_per_s": 200.0}
  assert train["std"]["final_loss"] == pytest.approx(np.std([2.0, 3.0], ddof=1))
  assert train["std"]["steps"] == 0.0
  evaluation = by_key[((("lr", "1"),), "eval")]
  assert evaluation["mean"] == {"accuracy.gsm8k": 0.5, "nll_per_token": 1.5}
  assert evaluation["std"] == {"accuracy.gsm8k": None, "nll_per_token": None}

  proc = _sweep(f"--base_workdir={tmp_path}", "--aggregate_only", "--metrics=final_loss,accuracy")
  header = proc.stdout.splitlines()[0]
  assert header == "| run | lr | source | n | accuracy.gsm8k | final_loss |"  # dirs sorted
  assert "|  | 1 | train | 2 |  | 2.5 ± 0.7071 |" in proc.stdout.splitlines()


@pytest.mark.slow  # imports the whole latent_em stack: 7 s idle, 20-30 s on a busy 2-core box
def test_sweep_check_mode_validates_against_the_real_config(tmp_path):
  """The flags a sweep prints are parsed exactly as latent_em.main parses them."""
  proc = _sweep("--config=configs/tiny.py:steps=5", f"--base_workdir={tmp_path}",
                "--grid=optim.lr=1e-3,abc", "--grid=estep.selection=argmax,bogus",
                "--grid=mesh.shape=(-1,1,1)", "--mode=check", timeout=300)
  out = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
  assert proc.returncode == 1
  assert out["lr=1e-3,selection=argmax,shape=-1_1_1"] == "ok"
  assert "could not convert string to float: 'abc'" in out["lr=abc,selection=argmax,shape=-1_1_1"]
  assert "config.estep.selection" in out["lr=1e-3,selection=bogus,shape=-1_1_1"]
  assert "3 of 4 runs failed" in proc.stderr

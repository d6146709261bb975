"""Both notebooks execute top to bottom (nbclient) on the smoke-sized quickstart."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO


def _execute(name: str, env: dict[str, str], cwd: str) -> nbformat.NotebookNode:
  nb = nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process' environment
  try:
    NotebookClient(nb, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": cwd}}).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return nb


def _outputs(nb) -> str:
  text = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      text.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
  return "\n".join(text)


def test_quickstart_notebook_resumes_the_smoke_experiment(em_smoke):
  workdir, _ = em_smoke
  env = {"LATENT_EM_WORKDIR": workdir, "LATENT_EM_SIZE": "smoke", "LATENT_EM_REPO": REPO,
         "JAX_PLATFORMS": "cpu"}
  nb = _execute("quickstart.ipynb", env, os.path.join(REPO, "notebooks"))
  out = _outputs(nb)
  assert "THOUGHT:" in out and "weights:" in out
  assert "| em_iter_2 |" in out
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2


def test_analysis_notebook_aggregates_workdirs(em_smoke):
  workdir, _ = em_smoke
  nb = _execute("analysis.ipynb", {"LATENT_EM_WORKDIRS": f"{workdir},{workdir}"},
                os.path.join(REPO, "notebooks"))
  out = _outputs(nb)
  assert "K = 4" in out and "| em_iter_1 |" in out

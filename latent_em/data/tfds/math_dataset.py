"""TFDS builder `latent_em_math`: the MATH competition problems (Hendrycks et al. 2021).

Features: `problem`, `solution` (worked solution), `answer` (contents of the last `\\boxed{...}`
of the solution, balanced braces, not normalized; "" when the solution boxes nothing),
`subject` (e.g. "Counting & Probability"), `level` (1-5, -1 when unknown: two train problems
are "Level ?" upstream) and `unique_id` ("SPLIT/SUBJECT_DIR/N.json", the file of the original
release; it is also the example key). Splits: train (7,500), test (5,000) and math500 (the
500-problem test subset of Lightman et al. 2023, "Let's Verify Step by Step").

Build from the official sources:

  import latent_em.data.tfds  # registers the builders
  import tensorflow_datasets as tfds
  builder = tfds.builder("latent_em_math", data_dir="/data/tfds")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))

  tfds build latent_em_math --imports=latent_em.data.tfds --data_dir=/data/tfds

(for what the `tfds` command needs installed, see the docstring of latent_em.data.tfds).
train/test come from the MATH tarball (`LatentEmMath.MATH_TAR_URL`, one JSON file per problem).
MATH-500 comes from PRM800K (`LatentEmMath.MATH500_URL`); on GitHub that file is a Git-LFS
pointer, which raw.githubusercontent.com serves instead of the data. If that happens the build
stops and says so; set the URL to a mirror that serves the content before building, e.g.

  from latent_em.data.tfds import math_dataset
  math_dataset.LatentEmMath.MATH500_URL = (
      "https://huggingface.co/datasets/HuggingFaceH4/MATH-500/resolve/main/test.jsonl")

(https://media.githubusercontent.com/media/openai/prm800k/main/prm800k/math_splits/test.jsonl
is GitHub's own LFS media URL for the same file). Both URLs are class attributes for this reason;
the tarball URL too, as the MATH release has moved before.

Build from local files without network access: a directory with train.jsonl, test.jsonl and
math500.jsonl, one object per line with `problem`, `solution`, `subject` (or `type`), `level`
(an int, null, or "Level N") and `unique_id` (the PRM800K schema):

  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir="/path/to/math", try_download_gcs=False))

  tfds build latent_em_math --imports=latent_em.data.tfds --manual_dir=/path/to/math \
      --data_dir=/data/tfds
"""
from __future__ import annotations

import json
import os
import re
import tarfile
from typing import Any, BinaryIO, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from latent_em.data.tfds import common
from latent_em.evaluation import answers

NAME = "latent_em_math"
FILES = {"train": "train.jsonl", "test": "test.jsonl", "math500": "math500.jsonl"}
_LFS_POINTER = "version https://git-lfs.github.com/spec/"


def boxed_answer(solution: str) -> str:
  """Contents of the last `\\boxed{...}` / `\\fbox{...}` of a solution, or "" if none."""
  answer = answers.extract_math_answer(solution) or ""
  # With an empty box (two broken upstream solutions) the extractor falls back to the
  # "the answer is ..." sentence, which then holds the empty box itself: that is no answer.
  if "\\boxed" in answer or "\\fbox" in answer:
    return ""
  return answer


def parse_level(level: Any, where: str) -> int:
  """1..5 from an int or a "Level N" string; -1 for null or "Level ?"."""
  if level is None:
    return -1
  if isinstance(level, bool):
    raise ValueError(f"{where}: level {level!r} is not an int or 'Level N'")
  if isinstance(level, int):
    return level
  if isinstance(level, str):
    m = re.fullmatch(r"\s*(?:Level\s*)?(\d+|\?)\s*", level)
    if m:
      return -1 if m.group(1) == "?" else int(m.group(1))
  raise ValueError(f"{where}: level {level!r} is not an int, null or 'Level N'")


def make_example(obj: dict[str, Any], unique_id: str, where: str) -> dict[str, Any]:
  """One example from a MATH record (raw release or PRM800K schema)."""
  solution = common.require_str(obj, "solution", where)
  subject = obj.get("subject", obj.get("type"))
  if not isinstance(subject, str):
    raise ValueError(f"{where}: no string 'subject' (or 'type') field (fields: {sorted(obj)})")
  return {
      "problem": common.require_str(obj, "problem", where),
      "solution": solution,
      "answer": boxed_answer(solution),
      "subject": subject,
      "level": parse_level(obj.get("level"), where),
      "unique_id": unique_id,
  }


class LatentEmMath(tfds.core.GeneratorBasedBuilder):
  """MATH train/test and MATH-500."""

  name = NAME
  # TFDS would derive this from the package through `importlib_resources`, which is not
  # always installed; the module file is the answer either way.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: problem, solution, answer, subject, level, unique_id; "
               "train/test/math500.",
  }
  MATH_TAR_URL = "https://people.eecs.berkeley.edu/~hendrycks/MATH.tar"
  MATH500_URL = ("https://raw.githubusercontent.com/openai/prm800k/main/prm800k/math_splits/"
                 "test.jsonl")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional. To build without network access, put train.jsonl, test.jsonl and "
      "math500.jsonl (PRM800K schema: problem, solution, subject, level, unique_id) in the "
      "manual dir. Without them the data is downloaded.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="MATH: 12.5k competition math problems with step-by-step solutions, "
                    "and the MATH-500 test subset.",
        features=tfds.features.FeaturesDict({
            "problem": tfds.features.Text(),
            "solution": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "subject": tfds.features.Text(),
            "level": tfds.features.Scalar(dtype=np.int32),
            "unique_id": tfds.features.Text(),
        }),
        supervised_keys=("problem", "solution"),
        homepage="https://github.com/hendrycks/math",
        citation=_CITATION,
        license="MIT",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    local = common.local_dir(dl_manager, list(FILES.values()), NAME)
    if local is not None:
      return {split: self._generate_examples(os.path.join(local, f))
              for split, f in FILES.items()}
    paths = dl_manager.download({"tar": self.MATH_TAR_URL, "math500": self.MATH500_URL})
    math500 = os.fspath(paths["math500"])
    _check_not_lfs_pointer(math500, self.MATH500_URL)
    return {
        "train": self._generate_examples(os.fspath(paths["tar"]), tar_split="train"),
        "test": self._generate_examples(os.fspath(paths["tar"]), tar_split="test"),
        "math500": self._generate_examples(math500),
    }

  def _generate_examples(self, path: str, tar_split: str | None = None):
    """Examples of a JSONL file, or (tar_split set) of one split of the MATH tarball."""
    if tar_split is None:
      for line_no, obj in common.read_jsonl(path):
        where = f"{path}:{line_no}"
        unique_id = common.require_str(obj, "unique_id", where)
        yield unique_id, make_example(obj, unique_id, where)
      return
    for member, unique_id, fobj in _tar_problems(path, tar_split):
      where = f"{path}:{member}"
      try:
        obj = json.load(fobj)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e}); re-download the tarball") from None
      yield unique_id, make_example(obj, unique_id, where)


def _tar_problems(tar_path: str, split: str) -> Iterator[tuple[str, str, BinaryIO]]:
  """(member path, unique_id, file) for each MATH/SPLIT/SUBJECT/N.json of the tarball.

  The archive is streamed member by member (mode "r|*"), so it is never extracted to disk.
  """
  found = False
  with tarfile.open(tar_path, mode="r|*") as tar:
    for info in tar:
      if not info.isfile():
        continue
      member = info.name
      parts = member.replace("\\", "/").split("/")
      # MATH/train/algebra/1.json; the leading folder name is not relied upon. "._N.json"
      # are macOS resource forks that some tar tools add next to each file.
      name = parts[-1]
      if (len(parts) >= 3 and parts[-3] == split and name.endswith(".json")
          and not name.startswith("._")):
        found = True
        yield member, "/".join(parts[-3:]), tar.extractfile(info)
  if not found:
    raise ValueError(f"{tar_path}: no {split}/<subject>/<n>.json files in the archive; is "
                     "LatentEmMath.MATH_TAR_URL the MATH release tarball?")


def _check_not_lfs_pointer(path: str, url: str) -> None:
  with open(path, encoding="utf-8", errors="replace") as f:
    head = f.read(len(_LFS_POINTER))
  if head == _LFS_POINTER:
    raise ValueError(
        f"{url} returned a Git-LFS pointer, not MATH-500. Set LatentEmMath.MATH500_URL to a URL "
        "that serves the file (e.g. https://huggingface.co/datasets/HuggingFaceH4/MATH-500/"
        "resolve/main/test.jsonl), or build from local files with manual_dir (see the module "
        "docstring of latent_em.data.tfds.math_dataset).")


_CITATION = """\
@article{hendrycksmath2021,
  title={Measuring Mathematical Problem Solving With the MATH Dataset},
  author={Hendrycks, Dan and Burns, Collin and Kadavath, Saurav and Arora, Akul and Basart,
          Steven and Tang, Eric and Song, Dawn and Steinhardt, Jacob},
  journal={NeurIPS},
  year={2021}
}
@article{lightman2023lets,
  title={Let's Verify Step by Step},
  author={Lightman, Hunter and Kosaraju, Vineet and Burda, Yura and Edwards, Harri and Baker,
          Bowen and Lee, Teddy and Leike, Jan and Schulman, John and Sutskever, Ilya and
          Cobbe, Karl},
  journal={arXiv preprint arXiv:2305.20050},
  year={2023}
}"""

"""TFDS builder `latent_em_gsm8k`: GSM8K grade-school math word problems (Cobbe et al. 2021).

Features: `question` (the problem), `answer` (the full worked solution, calculator annotations
`<<a*b=c>>` included, ending in `#### N`) and `final_answer` (the text after the last `####`,
stripped and otherwise as written, so thousands separators such as "1,080" stay; the evaluator
normalizes numbers). Splits: train (7,473) and test (1,319).

Build from the official files (openai/grade-school-math on GitHub, MIT license):

  import latent_em.data.tfds  # registers the builders
  import tensorflow_datasets as tfds
  builder = tfds.builder("latent_em_gsm8k", data_dir="/data/tfds")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))

  tfds build latent_em_gsm8k --imports=latent_em.data.tfds --data_dir=/data/tfds

(for what the `tfds` command needs installed, see the docstring of latent_em.data.tfds).

Build from local copies without network access: put train.jsonl and test.jsonl (the upstream
format, one {"question", "answer"} object per line) in a directory and pass it as manual dir:

  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir="/path/to/gsm8k", try_download_gcs=False))

  tfds build latent_em_gsm8k --imports=latent_em.data.tfds --manual_dir=/path/to/gsm8k \
      --data_dir=/data/tfds

or simply `latent_em.data.tfds.load_split("latent_em_gsm8k", "test", data_dir,
manual_dir="/path/to/gsm8k")`. The example key of line n of SPLIT.jsonl is "SPLIT:n".
"""
from __future__ import annotations

import os

import tensorflow_datasets as tfds
from etils import epath

from latent_em.data.tfds import common

NAME = "latent_em_gsm8k"
FILES = {"train": "train.jsonl", "test": "test.jsonl"}


def final_answer(solution: str, where: str) -> str:
  """The text after the last "####" of a GSM8K solution, stripped."""
  if "####" not in solution:
    raise ValueError(f"{where}: the answer has no '#### <final answer>' line; is this a GSM8K "
                     "file (e.g. not the socratic or a model-output variant)?")
  return solution.rsplit("####", 1)[1].strip()


class LatentEmGsm8k(tfds.core.GeneratorBasedBuilder):
  """GSM8K with the final answer split out."""

  name = NAME
  # TFDS would derive this from the package through `importlib_resources`, which is not
  # always installed; the module file is the answer either way.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: question, answer (worked solution), final_answer; train/test.",
  }
  # Class attributes so that a mirror can be used: subclass, or set before building.
  URLS = {
      "train": "https://raw.githubusercontent.com/openai/grade-school-math/master/"
               "grade_school_math/data/train.jsonl",
      "test": "https://raw.githubusercontent.com/openai/grade-school-math/master/"
              "grade_school_math/data/test.jsonl",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional. To build without network access, put train.jsonl and test.jsonl from "
      "https://github.com/openai/grade-school-math/tree/master/grade_school_math/data in the "
      "manual dir. Without them the files are downloaded.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="GSM8K: 8.5k grade-school math word problems with worked solutions.",
        features=tfds.features.FeaturesDict({
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "final_answer": tfds.features.Text(),
        }),
        supervised_keys=("question", "answer"),
        homepage="https://github.com/openai/grade-school-math",
        citation=_CITATION,
        license="MIT",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    local = common.local_dir(dl_manager, list(FILES.values()), NAME)
    if local is not None:
      paths = {split: os.path.join(local, f) for split, f in FILES.items()}
    else:
      paths = {split: os.fspath(p) for split, p in dl_manager.download(dict(self.URLS)).items()}
    return {split: self._generate_examples(split, path) for split, path in paths.items()}

  def _generate_examples(self, split: str, path: str):
    for line_no, obj in common.read_jsonl(path):
      where = f"{path}:{line_no}"
      answer = common.require_str(obj, "answer", where)
      yield f"{split}:{line_no}", {
          "question": common.require_str(obj, "question", where),
          "answer": answer,
          "final_answer": final_answer(answer, where),
      }


_CITATION = """\
@article{cobbe2021gsm8k,
  title={Training Verifiers to Solve Math Word Problems},
  author={Cobbe, Karl and Kosaraju, Vineet and Bavarian, Mohammad and Chen, Mark and Jun, Heewoo
          and Kaiser, Lukasz and Plappert, Matthias and Tworek, Jerry and Hilton, Jacob and
          Nakano, Reiichiro and Hesse, Christopher and Schulman, John},
  journal={arXiv preprint arXiv:2110.14168},
  year={2021}
}"""

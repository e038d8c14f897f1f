"""Random-access image sources: scikit-learn digits, TFDS (array_record) and image folders.

Every source has `len()` and `[i] -> record`, and pickles (grain copies it to worker
processes). A record is `{'image': uint8 (H, W, C) array}` or `{'path': str}` (decoded
later, in `preprocess.load`), plus `'label'` (int) when the data has labels. A TFDS
record that cannot be read becomes `{'bad': name, 'error': message}` when bad files are
skipped.
"""

from __future__ import annotations

import os
import shlex

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not prepared in array_record format; the message says how to prepare it."""


class ArraySource:
  """In-memory images: uint8 (N, H, W, C) and int labels (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict:
    return {"image": self.images[i], "label": int(self.labels[i])}

  def __repr__(self) -> str:
    return f"ArraySource(n={len(self)}, shape={self.images.shape[1:]})"


def digits_source() -> ArraySource:
  """scikit-learn's 1797 8x8 digits (values 0..16) as uint8 (N, 8, 8, 1) in 0..255."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return ArraySource(images, d.target.astype(np.int32))


def prepare_command(name: str, data_dir: str) -> str:
  """The shell command that prepares TFDS dataset `name` as array_record (needs tensorflow)."""
  code = (
      f"import tensorflow_datasets as tfds; "
      f"tfds.builder({name!r}, data_dir={data_dir or None!r})"
      ".download_and_prepare(file_format='array_record')"
  )
  return f'python -c "{code}"'


class TfdsSource:
  """A TFDS split read through `tfds.data_source` (array_record, random access, no TF)."""

  def __init__(self, name: str, split: str, data_dir: str, image_key: str, skip_bad: bool):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

    self.desc = f"tfds:{name}/{split}"
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # tfds raises several types for a dataset that is not there
      raise _not_prepared_error(tfds, name, split, data_dir, e) from e
    features = self.source.dataset_info.features
    if image_key not in features:
      raise ValueError(
          f"data.image_key={image_key!r} is not a feature of {name}; valid values: "
          f"{', '.join(sorted(features.keys()))}"
      )
    self.image_key, self.skip_bad = image_key, skip_bad
    self.has_label = "label" in features and not features["label"].shape

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    try:
      ex = self.source[i]
    except Exception as e:  # a damaged record: tfds/PIL raise many types
      name = f"{self.desc}[{i}]"
      if self.skip_bad:
        return {"bad": name, "error": f"{type(e).__name__}: {e}"}
      raise OSError(f"cannot read image record {name}: {type(e).__name__}: {e}") from e
    out = {"image": np.asarray(ex[self.image_key])}
    if self.has_label:
      out["label"] = int(ex["label"])
    return out

  def __repr__(self) -> str:
    return f"TfdsSource({self.desc}, n={len(self)})"


def _not_prepared_error(tfds, name, split, data_dir, cause) -> Exception:
  """Turns tfds's failure to open a split into an error saying what is wrong and how to fix it."""
  if isinstance(cause, tfds.core.registered.DatasetNotFoundError):
    return ValueError(
        f"data.name={name!r} is not a TFDS dataset; valid values: names listed by "
        "tfds.list_builders(), e.g. 'cifar10', 'lsun/church_outdoor'"
    )
  first_line = (str(cause).splitlines() or [""])[0]
  where = data_dir or "the default TFDS data dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  try:
    prepared = tfds.builder(name, data_dir=data_dir or None).is_prepared()
  except Exception:  # pylint: disable=broad-except
    prepared = False
  if prepared and not isinstance(cause, NotImplementedError):  # e.g. an unknown split
    return ValueError(
        f"cannot open TFDS {name!r} split {split!r} in {where}: "
        f"{type(cause).__name__}: {first_line}"
    )
  state = (
      "was prepared in another file format (random access needs array_record; use a new "
      "data_dir or delete the old copy)"
      if prepared
      else "is not prepared"
  )
  cli = f"tfds build {name} --file_format=array_record"
  if data_dir:
    cli += f" --data_dir={shlex.quote(data_dir)}"
  return DatasetNotPreparedError(
      f"TFDS dataset {name!r} (split {split!r}) {state} in {where}. Prepare it once, in an "
      f"environment with tensorflow installed: {cli}   or   {prepare_command(name, data_dir)}"
  )


class FolderSource:
  """Image files under a folder, sorted by relative path; label = class subfolder index or 0."""

  def __init__(self, paths: list[str], labels: list[int], classes: list[str], root: str):
    self.paths, self.labels, self.classes, self.root = paths, labels, classes, root

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    return {"path": self.paths[i], "label": self.labels[i]}

  def __repr__(self) -> str:
    return f"FolderSource({self.root}, n={len(self)}, classes={len(self.classes)})"


def folder_source(data_dir: str, split: str) -> FolderSource:
  """Lists PNG/JPEG/WebP/BMP files under `data_dir/split` (if a folder) or `data_dir`.

  Files directly under the root get label 0; files under a first-level subfolder get that
  folder's index among the sorted subfolders holding images (ImageFolder convention), so
  `train/<class>/NNNN.jpg` trees give class labels.
  """
  root = (
      os.path.join(data_dir, split)
      if split and os.path.isdir(os.path.join(data_dir, split))
      else data_dir
  )
  if not os.path.isdir(root):
    raise FileNotFoundError(f"image folder {root} does not exist (data.data_dir)")
  rel_paths = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames.sort()
    rel_paths += [
        os.path.relpath(os.path.join(dirpath, f), root)
        for f in filenames
        if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
    ]
  if not rel_paths:
    raise FileNotFoundError(f"image folder {root} holds no {'/'.join(IMAGE_EXTENSIONS)} files")
  rel_paths.sort()
  parts = [p.split(os.sep) for p in rel_paths]
  classes = sorted({p[0] for p in parts if len(p) > 1})
  index = {c: k for k, c in enumerate(classes)}
  labels = [index[p[0]] if len(p) > 1 else 0 for p in parts]
  return FolderSource([os.path.join(root, p) for p in rel_paths], labels, classes, root)


def build_source(data):
  """The random-access source a validated `data` config names."""
  if data.source == "digits":
    return digits_source()
  if data.source == "tfds":
    return TfdsSource(
        data.name, data.split, data.data_dir, data.image_key, skip_bad=data.on_bad_file == "skip"
    )
  return folder_source(data.data_dir, data.split)

"""The `data` ConfigDict: which images to read and how to present them to the model."""

from __future__ import annotations

import ml_collections

SOURCES = ("digits", "tfds", "folder")
BAD_FILE_POLICIES = ("fail", "skip")
CACHE_POLICIES = ("auto", "always", "never")
CHANNELS = (1, 3)
LATENT_DTYPES = ("float32", "float16")


def default_data_config(source: str = "digits") -> ml_collections.ConfigDict:
  """Returns the `data` config with defaults suited to `source`.

  Fields:
    source: 'digits' (scikit-learn's 8x8 digits, no download), 'tfds' or 'folder'.
    name: TFDS dataset name, e.g. 'cifar10', 'lsun/church_outdoor' (source='tfds').
    split: TFDS split; for 'folder', `<data_dir>/<split>` is read when it is a folder.
    data_dir: TFDS data dir ('' = TFDS default; gs:// works) or the image folder.
    image_key: TFDS feature holding the image.
    image_size: output height = width; shorter side resized, then center crop.
    channels: 3 (RGB) or 1 (grayscale); digits default to 1.
    random_flip: random horizontal flips in training (off for digits, whose mirror
      images are not digits). With a first stage, each image and its mirror are encoded
      (twice the latents) and a flip picks the mirror's latent.
    on_bad_file: 'fail' raises naming an undecodable file; 'skip' drops and counts it.
    num_workers: grain worker processes decoding images (0 = in the main process).
    cache_in_memory: 'auto' decodes this host's shard of the split once into host memory
      (uint8) when it fits `cache_budget_mb`, else streams from the source; 'always' /
      'never' force either. Training batches are the same either way.
    cache_budget_mb: the host-memory budget of 'auto', in MiB of decoded uint8 pixels.
    latent_cache: with a first stage, '' encodes this host's shard into latents in host
      memory at every start; a local directory keeps them there as .npy files, encoded by the
      first run and memory-mapped by later ones (`latent_cache`; LSUN-sized data).
    latent_dtype: how latents are stored, 'float32' or 'float16' (half the memory or disk;
      batches are float32 either way).
  """
  if source not in SOURCES:
    raise ValueError(f"data.source={source!r} is invalid; valid values: {', '.join(SOURCES)}")
  return ml_collections.ConfigDict(
      dict(
          source=source,
          name="cifar10",
          split="train",
          data_dir="",
          image_key="image",
          image_size=32,
          channels=1 if source == "digits" else 3,
          random_flip=source != "digits",
          on_bad_file="fail",
          num_workers=0,
          cache_in_memory="auto",
          cache_budget_mb=4096.0,
          latent_cache="",
          latent_dtype="float32",
      )
  )


def validate(data) -> None:
  """Raises ValueError naming the first bad field of a `data` config and its valid values."""
  if data.source not in SOURCES:
    raise ValueError(f"data.source={data.source!r} is invalid; valid values: {', '.join(SOURCES)}")
  size = data.image_size
  if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
    raise ValueError(f"data.image_size={data.image_size!r} is invalid; valid values: an int > 0")
  if data.channels not in CHANNELS:
    raise ValueError(f"data.channels={data.channels!r} is invalid; valid values: 1, 3")
  if data.on_bad_file not in BAD_FILE_POLICIES:
    raise ValueError(
        f"data.on_bad_file={data.on_bad_file!r} is invalid; valid values: "
        f"{', '.join(BAD_FILE_POLICIES)}"
    )
  if not isinstance(data.num_workers, int) or data.num_workers < 0:
    raise ValueError(f"data.num_workers={data.num_workers!r} is invalid; valid values: an int >= 0")
  if data.cache_in_memory not in CACHE_POLICIES:
    raise ValueError(
        f"data.cache_in_memory={data.cache_in_memory!r} is invalid; valid values: "
        f"{', '.join(CACHE_POLICIES)}"
    )
  if not data.cache_budget_mb >= 0:
    raise ValueError(
        f"data.cache_budget_mb={data.cache_budget_mb!r} is invalid; valid values: a number >= 0"
    )
  if not isinstance(data.latent_cache, str) or "://" in data.latent_cache:
    raise ValueError(
        f"data.latent_cache={data.latent_cache!r} is invalid; valid values: '' or a local "
        "directory (the latents are memory-mapped)"
    )
  if data.latent_dtype not in LATENT_DTYPES:
    raise ValueError(
        f"data.latent_dtype={data.latent_dtype!r} is invalid; valid values: "
        f"{', '.join(LATENT_DTYPES)}"
    )
  if data.source == "tfds" and not data.name:
    raise ValueError(
        "data.name='' is invalid for source='tfds'; valid values: a TFDS dataset "
        "name such as 'cifar10' or 'lsun/church_outdoor'"
    )
  if data.source == "folder" and not data.data_dir:
    raise ValueError(
        "data.data_dir='' is invalid for source='folder'; valid values: the path "
        "of an image folder"
    )

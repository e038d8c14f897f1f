"""The DDPM U-Net: shapes, the CIFAR-10 parameter count, features, FP/binary tree sharing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TINY_SHAPE, TINY_UNET, path_str, tiny_inputs

from bidm_jax.binarize.methods import get_method
from bidm_jax.models import ldm_unet
from bidm_jax.models.unet import UNet, UNetOutput

CIFAR_SHAPE = (1, 32, 32, 3)


def param_shapes(model, x_shape):
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  t = jax.ShapeDtypeStruct(x_shape[:1], jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]


def flat_shapes(tree):
  return {path_str(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def expected_feature_shapes(cfg, x_shape):
  """Encoder units, downsamples, middle, decoder units (ddim repo order)."""
  b, res, _, _ = x_shape
  ch, mult, nrb = cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"]
  shapes = []
  for i, m in enumerate(mult):
    shapes += [(b, res, res, ch * m)] * nrb
    if i != len(mult) - 1:
      res //= 2
      shapes.append((b, res, res, ch * m))
  shapes.append((b, res, res, ch * mult[-1]))
  for i in reversed(range(len(mult))):
    for j in range(nrb + 1):
      if j == nrb and i != 0:
        shapes.append((b, res * 2, res * 2, ch * mult[i]))
        res *= 2
      else:
        shapes.append((b, res, res, ch * mult[i]))
  return shapes


def test_cifar10_parameter_count():
  """Paper section 4: ~35.7M parameters (the ddim repo's CIFAR-10 model has 35,746,307)."""
  n = sum(
      int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(param_shapes(UNet(), CIFAR_SHAPE))
  )
  assert abs(n - 35.7e6) <= 0.01 * 35.7e6, n
  assert n == 35_746_307


def test_cifar10_features_and_output_shapes():
  model = UNet(method=get_method("bidm"), tbs_connections=2)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t)
  out = jax.eval_shape(model.apply, params, x, t)
  assert out.eps.shape == (2, 32, 32, 3)
  cfg = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2)
  # 8 encoder units + 3 downsamples + 1 middle + 12 decoder units
  assert len(out.features) == 8 + 3 + 1 + 12
  assert [f.shape for f in out.features] == expected_feature_shapes(cfg, (2, 32, 32, 3))


def test_tiny_output_and_feature_shapes(tiny_fp, tiny_bidm):
  x, t = tiny_inputs()
  expected = expected_feature_shapes(TINY_UNET, TINY_SHAPE)
  assert expected == [
      (2, 16, 16, 32),
      (2, 8, 8, 32),
      (2, 8, 8, 64),
      (2, 8, 8, 64),
      (2, 8, 8, 64),
      (2, 16, 16, 64),
      (2, 16, 16, 32),
      (2, 16, 16, 32),
  ]
  for bundle in (tiny_fp, tiny_bidm):
    out = bundle.apply(bundle.params, x, t)
    assert isinstance(out, UNetOutput)
    assert out.eps.shape == TINY_SHAPE and out.eps.dtype == jnp.float32
    assert [f.shape for f in out.features] == expected
    assert np.all(np.isfinite(np.asarray(out.eps)))
    assert bundle.model.num_decoder_blocks == 4


def test_binary_tree_contains_fp_tree_cifar():
  fp = flat_shapes(param_shapes(UNet(), CIFAR_SHAPE))
  for method in ("xnor", "bidm"):
    binary = flat_shapes(
        param_shapes(UNet(method=get_method(method), tbs_connections=2), CIFAR_SHAPE)
    )
    missing = [k for k in fp if k not in binary]
    assert not missing, missing[:5]
    assert all(binary[k] == fp[k] for k in fp)
    extra = set(binary) - set(fp)
    assert extra and all(
        k.rsplit("/", 1)[-1]
        in {"threshold", "scale_kernel", "shortcut_scale", "shortcut_kernel", "tbs_table"}
        for k in extra
    ), sorted(extra)[:10]
    assert ("tbs_table" in binary) == (method == "bidm")
    if method == "bidm":
      assert binary["tbs_table"] == (100, 2)


def test_full_precision_layers_stay_full_precision():
  """Paper section 3.1: first/last conv, time MLP, nin shortcuts are FP; q/k/v/proj_out binary."""
  params = param_shapes(UNet(**TINY_UNET, method=get_method("bidm"), tbs_connections=2), TINY_SHAPE)
  leaves = flat_shapes(params)
  modules = {}
  for path in leaves:
    if "/" not in path:  # tbs_table
      continue
    mod, name = path.rsplit("/", 1)
    modules.setdefault(mod, set()).add(name)
  fp_modules = [
      m
      for m in modules
      if m.split("/")[-1] in ("conv_in", "conv_out", "temb_dense0", "temb_dense1", "nin_shortcut")
  ]
  # 4 FP layers + the nin shortcuts of the 5 res blocks whose channel count changes
  assert len(fp_modules) == 4 + 5
  for m in fp_modules:
    assert modules[m] == {"kernel", "bias"}, m
  binary = [
      m
      for m in modules
      if m.split("/")[-1] in ("q", "k", "v", "proj_out", "conv1", "conv2", "temb_proj")
      or m.endswith("sample")
  ]
  assert len(binary) == 4 * 4 + 8 * 3 + 2  # 4 attn blocks, 8 res blocks, down + upsample
  for m in binary:
    assert "threshold" in modules[m], m
    if not m.endswith("temb_proj"):
      assert "scale_kernel" in modules[m], m  # learnable k under BiDM


SHORTCUT_LEAVES = {"shortcut_kernel", "shortcut_scale"}


def _modules(model, x_shape):
  """{module path: its parameter names} of `model` on inputs of `x_shape` (traced only)."""
  modules = {}
  for path in flat_shapes(param_shapes(model, x_shape)):
    module, _, leaf = path.rpartition("/")
    modules.setdefault(module, set()).add(leaf)
  return modules


@pytest.mark.parametrize("family", ["ddpm", "ldm"])
def test_table4_layout_changes_exactly_the_skip_convs_and_width_shortcuts(family):
  """width_shortcut='none' drops exactly the real 1x1 shortcut and s of each binary conv that
  changes width; binary_skip_conv gives exactly the skip convs the parameters of such a binary
  conv (so they follow width_shortcut). The FP teacher's tree is the same under both."""

  def build(method):
    if family == "ddpm":
      return _modules(UNet(**TINY_UNET, method=method), TINY_SHAPE)
    return _modules(ldm_unet.LDMUNet(ldm_unet.TINY_LDM4, method=method), (2, 8, 8, 3))

  default = build(get_method("bidm"))
  widening = sorted(m for m, leaves in default.items() if "shortcut_kernel" in leaves)
  skips = {m for m in default if m.endswith("/nin_shortcut")}
  assert widening and skips and all(default[m] == {"kernel", "bias"} for m in skips)
  for width_shortcut in ("conv", "none"):
    for binary_skip_conv in (False, True):
      expected = {
          m: default[widening[0]] if binary_skip_conv and m in skips else leaves
          for m, leaves in default.items()
      }
      if width_shortcut == "none":
        expected = {
            m: leaves - SHORTCUT_LEAVES if "shortcut_kernel" in leaves else leaves
            for m, leaves in expected.items()
        }
      method = get_method("bidm", width_shortcut=width_shortcut, binary_skip_conv=binary_skip_conv)
      assert build(method) == expected, (width_shortcut, binary_skip_conv)
  table4_fp = get_method("fp", width_shortcut="none", binary_skip_conv=True)
  assert build(table4_fp) == build(get_method("fp"))


def test_fp_model_runs_on_binary_tree(tiny_fp, tiny_bidm):
  """A binary student's tree is a superset of the FP tree: the FP teacher applies to it."""
  x, t = tiny_inputs(seed=5)
  fp_paths = set(flat_shapes(tiny_fp.params))
  binary = tiny_bidm.params

  def prune(tree, prefix=()):
    out = {}
    for k, v in tree.items():
      path = prefix + (k,)
      if isinstance(v, dict):
        sub = prune(v, path)
        if sub:
          out[k] = sub
      elif "/".join(path) in fp_paths:
        out[k] = v
    return out

  subtree = prune(binary)
  assert set(flat_shapes(subtree)) == fp_paths
  on_binary = tiny_fp.apply(binary, x, t)
  on_subtree = tiny_fp.apply(subtree, x, t)
  np.testing.assert_allclose(
      np.asarray(on_binary.eps), np.asarray(on_subtree.eps), rtol=0, atol=1e-6
  )
  for a, b in zip(on_binary.features, on_subtree.features):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  # and the binary model computes something else from the same tree
  student = tiny_bidm.apply(binary, x, t)
  assert not np.allclose(np.asarray(student.eps), np.asarray(on_binary.eps), atol=1e-3)


def test_timestep_changes_output(tiny_fp):
  x, t = tiny_inputs(seed=6)
  a = tiny_fp.apply(tiny_fp.params, x, t).eps
  b = tiny_fp.apply(tiny_fp.params, x, (t + 300) % 1000).eps
  assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_invalid_configurations_raise():
  x = jax.ShapeDtypeStruct(TINY_SHAPE, jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  too_many = UNet(**TINY_UNET, method=get_method("bidm"), tbs_connections=5)
  with pytest.raises(ValueError):
    jax.eval_shape(too_many.init, jax.random.key(0), x, t)
  with pytest.raises(ValueError):
    jax.eval_shape(
        UNet(**TINY_UNET).init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((2, 16, 8, 3), jnp.float32),
        t,
    )


def test_release_points_cifar10():
  """The authors' 8 SPD points: three downsample convs, the last encoder block's and the middle
  block's conv2, three upsamples."""
  model = UNet(method=get_method("bidm"), tbs_connections=2)
  assert model.release_points == (
      "down_0_downsample",
      "down_1_downsample",
      "down_2_downsample",
      "down_3_block_1/conv2",
      "mid_block_2/conv2",
      "up_3_upsample",
      "up_2_upsample",
      "up_1_upsample",
  )
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.int32)
  out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0), x, t), x, t)
  assert set(out.points) == set(model.release_points)  # (jax returns dicts key-sorted)
  assert [out.points[k].shape[1:] for k in model.release_points] == [
      (16, 16, 128),
      (8, 8, 256),
      (4, 4, 256),
      (4, 4, 256),
      (4, 4, 256),
      (8, 8, 256),
      (16, 16, 256),
      (32, 32, 256),
  ]
  assert len(out.connections) == 2
  assert model.connection_points == ("up_0_block_1", "up_0_block_2")
  assert [d.shape for d in out.distill] == [f.shape for f in out.features]
  release = model.clone(distill_points="release")
  out = jax.eval_shape(release.apply, jax.eval_shape(release.init, jax.random.key(0), x, t), x, t)
  assert [d.shape for d in out.distill] == [out.points[k].shape for k in model.release_points]


def test_points_are_the_named_layer_outputs(tiny_bidm):
  """points[name] is the output of that layer (Flax's captured intermediates): conv2 before
  the res block's skip addition; connections are the last n features (the 'blocks' TBS)."""
  model, params = tiny_bidm.model, tiny_bidm.params
  x, t = tiny_inputs()
  assert model.release_points == (
      "down_0_downsample",
      "down_1_block_0/conv2",
      "mid_block_2/conv2",
      "up_1_upsample",
  )
  out, inter = jax.jit(
      lambda p: model.apply(p, x, t, capture_intermediates=True, mutable=["intermediates"])
  )(params)
  inter = inter["intermediates"]
  for name in model.release_points:
    node = inter
    for key in name.split("/"):
      node = node[key]
    np.testing.assert_array_equal(np.asarray(out.points[name]), np.asarray(node["__call__"][0]))
  mid = inter["mid_block_2"]["__call__"][0]
  assert not np.allclose(np.asarray(mid[1]), np.asarray(mid[0]))  # conv2 != block output
  assert len(out.connections) == 2
  for c, f in zip(out.connections, out.features[-2:]):
    np.testing.assert_array_equal(np.asarray(c), np.asarray(f))

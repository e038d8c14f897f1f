"""The efficiency counter (evaluation.efficiency) against hand counts.

Conventions (paper appendix A/B, and what `layers.binary` records):
* BOPs of a binary conv = Hout * Wout * Cin * Cout * k^2 * b_w * b_a with b_w = b_a = 1 (one
  XNOR-popcount multiply-accumulate per weight use); of a binary dense layer Cin * Cout.
* FLOPs count a real multiply-add as TWO operations: an FP conv is 2 * Hout * Wout * Cin *
  Cout * k^2, an FP dense layer 2 * Cin * Cout. (The paper's Table 4 counts one FLOP per
  multiply-add: its FP LDM-4 has 96.0 GFLOPs against 92.1 G BOPs for the same convolutions.)
* A binary conv also costs FLOPs for its real-valued parts: the XNOR activation scale
  K = conv(mean_c |x|, k) and the two multiplies (K, alpha), counted 2 * Hout * Wout *
  (k^2 + Cin + Cout); and its ReActNet shortcut, a real 1x1 conv when the channels change
  (2 * Hout * Wout * Cin * Cout; avg-pooled to Hout x Wout when strided). Bias and shortcut
  additions, thresholds and pooling are not counted. A binary dense layer costs no FLOPs (its
  per-output scales fold into the bias).
* OPs = BOPs / 64 + FLOPs (paper appendix A, from ReActNet / Bi-Real Net).
* size_mb: binary weights at 1 bit, every other parameter of the tree (biases, thresholds, k
  filters, shortcut kernels and scales, norms, the TBS table) at 32 bits; MB = 2^20 bytes.
  Scales computed from the weights at inference (XNOR's alpha) are not in the tree and not
  counted.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bidm_jax.binarize.methods import FP, BinarizationMethod, QuantContext, get_method
from bidm_jax.evaluation.efficiency import count_costs, efficiency_report
from bidm_jax.layers.binary import BinaryConv, BinaryDense
from bidm_jax.models.unet import UNet
from helpers import TINY_UNET, path_str

H = W = 8  # input height and width
CIN = 4  # input channels
C1 = 8  # binary conv output channels (!= CIN: the shortcut is a real 1x1 conv)
C2 = 6  # FP conv output channels
D = 5  # binary dense output features
K = 3  # kernel size of both convs
STRIDE = 2  # stride of the binary conv ('SAME' padding)
HO = WO = -(-H // STRIDE)  # 4: output size of the binary conv; the FP conv keeps it


class Toy(nn.Module):
  """x (1, H, W, CIN) -> binary 3x3/2 conv (C1) -> FP 3x3 conv (C2); and the binary conv's
  spatial mean -> binary dense (D)."""

  method: BinarizationMethod

  @nn.compact
  def __call__(self, x, t):
    ctx = QuantContext.create(t)
    h = BinaryConv(C1, (K, K), strides=STRIDE, method=self.method, name="binary_conv")(x, ctx)
    y = BinaryConv(C2, (K, K), name="fp_conv")(h)  # always full precision
    d = BinaryDense(D, method=self.method, name="binary_dense")(h.mean(axis=(1, 2)), ctx)
    return y, d


def _mb(bits: float) -> float:
  return bits / 8 / 2**20


def _binary_hand_count(method):
  """bops, flops, binary and real parameters of Toy(method), a binary method, by hand."""
  bops = HO * WO * CIN * C1 * K**2 + C1 * D  # binary conv + binary dense
  flops = (
      2 * HO * WO * C1 * C2 * K**2  # FP conv
      + 2 * HO * WO * (K**2 + CIN + C1)  # XNOR scale K = conv(mean|x|, k)
      + 2 * HO * WO * CIN * C1
  )  # real 1x1 shortcut (CIN -> C1)
  binary_params = K * K * CIN * C1 + C1 * D
  real_params = (
      C1
      + CIN
      + 1
      + CIN * C1  # conv bias, threshold, s, shortcut
      + (K * K if method.learnable_k else 0)  # BiDM's learnable k filter
      + K * K * C1 * C2
      + C2  # FP conv
      + D
      + C1
  )  # dense bias, threshold
  return bops, flops, binary_params, real_params


def _fp_hand_count():
  """flops and parameters of Toy(FP) by hand."""
  flops = 2 * HO * WO * CIN * C1 * K**2 + 2 * HO * WO * C1 * C2 * K**2 + 2 * C1 * D
  params = K * K * CIN * C1 + C1 + K * K * C1 * C2 + C2 + C1 * D + D
  return flops, params


@pytest.mark.parametrize("name", ["xnor", "bidm"])
def test_binary_toy_matches_hand_count(name):
  method = get_method(name)
  costs = count_costs(Toy(method), (H, W, CIN))
  bops, flops, binary_params, real_params = _binary_hand_count(method)
  assert costs["bops"] == bops == 4 * 4 * 4 * 8 * 9 + 8 * 5
  assert costs["flops"] == flops
  assert costs["ops"] == pytest.approx(bops / 64 + flops)
  assert costs["binary_params"] == binary_params
  assert costs["params"] == binary_params + real_params
  assert costs["size_mb"] == pytest.approx(_mb(binary_params + 32 * real_params))


def test_fp_toy_matches_hand_count():
  costs = count_costs(Toy(FP), (H, W, CIN))
  flops, params = _fp_hand_count()
  assert costs["bops"] == 0 and costs["binary_params"] == 0
  assert costs["flops"] == flops and costs["ops"] == flops
  assert costs["params"] == params
  assert costs["size_mb"] == pytest.approx(_mb(32 * params))


def test_report_ratios_on_toy():
  """The report's ratios are FP over binary storage and OPs of the two models, by hand."""
  method = get_method("bidm")
  report = efficiency_report(Toy(FP), Toy(method), (H, W, CIN))
  fp_flops, fp_params = _fp_hand_count()
  bops, flops, binary_params, real_params = _binary_hand_count(method)
  assert report["fp"]["params"] == fp_params and report["binary"]["bops"] == bops
  size_ratio = 32 * fp_params / (binary_params + 32 * real_params)
  ops_ratio = fp_flops / (bops / 64 + flops)
  assert report["size_ratio"] == pytest.approx(size_ratio, rel=1e-12)
  assert report["ops_ratio"] == pytest.approx(ops_ratio, rel=1e-12)
  assert 1 < report["size_ratio"] and 1 < report["ops_ratio"]


# Layers of the U-Net that stay full precision (paper section 3.1): first and last conv, the
# time-embedding MLP, the 1x1 nin shortcuts of res blocks (and the attention products).
FP_LAYERS = ("conv_in", "conv_out", "temb_dense0", "temb_dense1", "nin_shortcut")


@pytest.fixture(scope="module")
def tiny_report():
  """The report of the tiny BiDM U-Net (TBS, 2 connections) on 16x16 images, and its model."""
  binary_model = UNet(**TINY_UNET, method=get_method("bidm"), tbs_connections=2)
  return efficiency_report(UNet(**TINY_UNET), binary_model, (16, 16, 3)), binary_model


def test_unet_binary_params_are_the_binarized_kernels(tiny_report):
  shape = (16, 16, 3)
  report, binary_model = tiny_report
  fp, binary = report["fp"], report["binary"]

  x = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  tree = jax.eval_shape(binary_model.init, jax.random.key(0), x, t)["params"]
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  size = lambda s: int(np.prod(s.shape))
  binarized = sum(
      size(s)
      for p, s in leaves
      if path_str(p).endswith("/kernel")
      and not any(f"{name}/" in path_str(p) for name in FP_LAYERS)
  )
  assert binary["binary_params"] == binarized
  assert binary["params"] == sum(size(s) for _, s in leaves)
  assert binary["size_mb"] == pytest.approx(_mb(binarized + 32 * (binary["params"] - binarized)))
  assert fp["bops"] == 0 and fp["binary_params"] == 0
  assert binary["bops"] > 0 and 0 < binary["flops"] < fp["flops"]
  for costs in (fp, binary):
    assert costs["ops"] == pytest.approx(costs["bops"] / 64 + costs["flops"])
  assert report["size_ratio"] > 1 and report["ops_ratio"] > 1


def test_costs_by_kind_on_the_unet(tiny_report):
  """The per-kind costs add up to the totals: 'attention_products' is 4 (HW)^2 C per
  attention block (all at 8x8 with 64 channels here), 'shortcut' holds exactly the binary
  convs' real 1x1 shortcut kernels, and flops_as_table4 is half the FLOPs without the
  attention products."""
  shape = (16, 16, 3)
  report, binary_model = tiny_report
  x = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  tree = jax.eval_shape(binary_model.init, jax.random.key(0), x, t)["params"]
  paths = [
      (path_str(p), int(np.prod(s.shape))) for p, s in jax.tree_util.tree_leaves_with_path(tree)
  ]
  attention_blocks = {p.rsplit("/q/", 1)[0] for p, _ in paths if "/q/kernel" in p}
  shortcut = sum(n for p, n in paths if p.endswith("shortcut_kernel"))
  assert attention_blocks and shortcut
  for side in ("fp", "binary"):
    costs = report[side]
    kinds = costs["by_kind"]
    assert set(kinds) == {"layer", "shortcut", "attention_products"}
    for key in ("bops", "flops", "binary_params"):
      assert sum(k[key] for k in kinds.values()) == pytest.approx(costs[key], rel=1e-6)
    assert kinds["attention_products"]["flops"] == len(attention_blocks) * 4 * 64**2 * 64
    assert kinds["attention_products"]["bops"] == 0
    assert costs["flops_as_table4"] == pytest.approx(
        (costs["flops"] - kinds["attention_products"]["flops"]) / 2
    )
  assert report["fp"]["by_kind"]["shortcut"]["real_params"] == 0
  assert report["binary"]["by_kind"]["shortcut"]["real_params"] == shortcut
  assert report["binary"]["by_kind"]["shortcut"]["flops"] > 0


def test_table4_layout_moves_the_report_as_expected(tiny_report):
  """width_shortcut='none' takes out exactly the 'shortcut' costs; binary_skip_conv moves the
  skip convs' multiply-accumulates from FLOPs to BOPs and their kernels to 1 bit (with the
  'conv' width shortcut they also get real 1x1 shortcuts of the same MACs). With both, the W1A1
  size, FLOPs and OPs fall and every ratio rises; the FP side does not change."""
  shape = (16, 16, 3)
  model = lambda **layout: UNet(**TINY_UNET, method=get_method("bidm", **layout), tbs_connections=2)
  default, default_model = tiny_report
  table4 = efficiency_report(
      UNet(**TINY_UNET), model(width_shortcut="none", binary_skip_conv=True), shape
  )
  d, both = default["binary"], table4["binary"]
  none = count_costs(model(width_shortcut="none"), shape)
  skip = count_costs(model(binary_skip_conv=True), shape)
  x = jax.ShapeDtypeStruct((1,) + shape, jnp.float32)
  tree = jax.eval_shape(default_model.init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32))
  skip_kernels = [
      (path_str(p), s.shape)
      for p, s in jax.tree_util.tree_leaves_with_path(tree)
      if path_str(p).endswith("nin_shortcut/kernel")
  ]
  # a skip conv of level i works at 16 / 2^i (params/up_1_block_0/nin_shortcut/kernel: 8x8)
  skip_macs = sum((16 >> int(p.split("_")[1])) ** 2 * np.prod(k) for p, k in skip_kernels)
  skip_weights = sum(int(np.prod(k)) for _, k in skip_kernels)
  assert skip_macs > 0 and d["by_kind"]["shortcut"]["flops"] > 0

  assert none["bops"] == d["bops"] and none["binary_params"] == d["binary_params"]
  assert none["flops"] == pytest.approx(d["flops"] - d["by_kind"]["shortcut"]["flops"], rel=1e-6)
  assert none["by_kind"]["shortcut"] == dict(bops=0, flops=0, binary_params=0, real_params=0)
  assert none["size_mb"] < d["size_mb"]

  assert skip["bops"] == pytest.approx(d["bops"] + skip_macs, rel=1e-6)
  assert skip["binary_params"] == d["binary_params"] + skip_weights
  assert skip["by_kind"]["shortcut"]["flops"] == pytest.approx(
      d["by_kind"]["shortcut"]["flops"] + 2 * skip_macs, rel=1e-6
  )
  assert skip["by_kind"]["layer"]["flops"] < d["by_kind"]["layer"]["flops"]

  assert (both["bops"], both["binary_params"]) == (skip["bops"], skip["binary_params"])
  assert both["by_kind"]["shortcut"] == none["by_kind"]["shortcut"]
  assert both["size_mb"] < none["size_mb"] and both["flops"] < none["flops"]
  assert both["ops"] < d["ops"] and both["ops_as_table4"] < d["ops_as_table4"]
  for ratio in ("size_ratio", "ops_ratio", "ops_ratio_as_table4"):
    assert table4[ratio] > default[ratio], ratio
  assert table4["fp"] == default["fp"]

"""Binarization methods: one small frozen object decides how every binary layer behaves.

A method bundles the layer-level choices (weight and activation binarizer, gradient estimator,
activation scaling, shortcut) and the model/training-level ones that define the paper's
methods (cross-timestep connections, distillation). Models take a method and never look at
its name, so adding a method means adding an entry to `METHODS`.

The methods (BiDM Tables 1-2, paper section 4.1; `METHOD_DOCS[name]` / `method.doc` give each
one's forward and gradient formulas, paper, and where our reading of the paper is a choice):
fp, xnor (XNOR-Net), xnorpp (XNOR-Net++), dorefa (DoReFa-Net), reactnet (ReActNet), reste
(ReSTE), bbcu (BBCU), efficientdm (EfficientDM), bidm (BiDM). The ablations of BiDM are
overrides: Table 3 `get_method('xnor')`, "+TBS" `get_method('xnor', learnable_k=True,
cross_timestep=True)`, "+SPD" `get_method('xnor', distillation='spd')`, `get_method('bidm')`;
Table 5 `get_method('xnor', learnable_k=True)`; Table 7 `get_method('bidm',
distillation='l2')` and `distillation='none'`. The layout Table 4 counts (no real shortcut
where a binary conv changes width, binary skip convs) is `get_method('bidm',
width_shortcut='none', binary_skip_conv=True)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from bidm_jax.binarize import binarizers as binarizers_lib
from bidm_jax.binarize import estimators

ACTIVATION_SCALES = ("none", "xnor")
DISTILLATIONS = ("none", "spd", "l2")
RPRELUS = ("none", "before_shortcut", "after_shortcut")
WIDTH_SHORTCUTS = ("conv", "none")

ACTIVATION_MEAN_ABS = 1.0 / math.sqrt(2.0 * math.pi)
"""Data-independent estimate of mean_c |x| at a binary layer's input: E|swish(z)| for
z ~ N(0, 1), which is exactly E|z| / 2 = 1 / sqrt(2 pi) ~ 0.399 (swish(z) + swish(-z) = z).
Most binary convs of the U-Net (conv1 and conv2 of every res block) see swish(GroupNorm(h))."""


def _no_fp_init(method: "BinarizationMethod", params):
  del method
  return params


def _xnor_output_scales(method: "BinarizationMethod", params):
  """Sets every learned output scale Gamma (XNOR++) to the analytic XNOR scale it replaces.

  For each layer (a dict holding 'kernel' and 'output_scale'), Gamma[o] gets the factors of
  XNOR's forward `conv(sign x, alpha sign W) * K` that the method's own forward lacks:
  alpha[o] = mean |W[..., o]| of the layer's (FP teacher) kernel when the weight binarizer
  carries no scale (plain sign), times E[K] ~ ACTIVATION_MEAN_ABS when the layer has no XNOR
  activation scale (k sums to 1, so E[K] = E mean_c |x|). XNOR++ thus starts with
  Gamma[o] = alpha[o] / sqrt(2 pi), its output about the FP teacher's at init, instead of
  Gamma = 1 (some 40x too large on CIFAR's kernels). Dense layers take the same
  alpha[o] / sqrt(2 pi). A factorised Gamma's spatial factors stay at 1.
  """

  def visit(node):
    if not isinstance(node, Mapping):
      return node
    node = {k: visit(v) for k, v in node.items()}
    if "kernel" in node and "output_scale" in node:
      kernel = jnp.asarray(node["kernel"], jnp.float32)
      scale = jnp.ones(kernel.shape[-1], jnp.float32)
      if not method.binarizers.weight.scaled:
        scale = scale * jnp.mean(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)))
      if method.activation_scale == "none" or kernel.ndim == 2:
        scale = scale * ACTIVATION_MEAN_ABS
      gamma = node["output_scale"]
      node["output_scale"] = scale.reshape(gamma.shape).astype(gamma.dtype)
    return node

  return visit(params)


FP_INITS: dict[str, Callable[["BinarizationMethod", Any], Any]] = {
    "none": _no_fp_init,
    "xnor_scales": _xnor_output_scales,
}
"""How a method sets its own parameters from the FP ones once the student holds the teacher's
(`BinarizationMethod.init_from_fp`): fn(method, params) -> params. New inits register here."""


class QuantContext(NamedTuple):
  """Per-call values a binarizer may depend on, passed explicitly through the model.

  t: (B,) int timesteps of the batch (timestep-aware quantizers).
  progress: () float in [0, 1], fraction of training done (estimator schedules); 1 at inference.
  """

  t: jax.Array
  progress: jax.Array

  @classmethod
  def create(cls, t: jax.Array, progress: float | jax.Array = 1.0) -> "QuantContext":
    return cls(jnp.asarray(t, jnp.int32), jnp.asarray(progress, jnp.float32))


@dataclasses.dataclass(frozen=True)
class BinarizationMethod:
  """How layers binarize, and which BiDM parts a model and the QAT loss use.

  The named methods and their formulas are in `METHODS` / `METHOD_DOCS` (`method.doc`).
  Every field has a default that keeps `fp`, `xnor` and `bidm` as they were before the
  baseline fields existed.

  Attributes:
    name: the method's name in `METHODS`.
    binary: False for the full-precision model (every other field is then ignored).
    weight_estimator: gradient estimator of the weight sign ('ste' = clipped identity,
      'approx', 'identity', 'reste' = ReSTE with the `reste_o_end` schedule).
    activation_estimator: gradient estimator of the activation sign (same choices;
      'approx' = ApproxSign). Not used by the 'dorefa' activation binarizer.
    learnable_threshold: activations are binarized as sign(x + tau) with a learnable tau per
      input channel (ReActNet's RSign), else sign(x).
    activation_scale: 'xnor' multiplies the binary conv by K = conv(mean_c |x|, k) (Eq. 9),
      'none' leaves it unscaled.
    learnable_k: the k filter of the XNOR scale is trained (BiDM's TBS, Eq. 10), else fixed to
      1/(kh*kw).
    shortcut: add s * shortcut(x), a real-valued ReActNet-style shortcut.
    shortcut_scale_init: initial s.
    cross_timestep: blend the last decoder block outputs with the previous step's (TBS, Eq. 12).
    distillation: 'spd' (Eq. 13-15), 'l2' (plain feature MSE) or 'none'.
    weight_binarizer, activation_binarizer, output_scale: names in the registries
      `binarizers.WEIGHT_BINARIZERS`, `ACTIVATION_BINARIZERS` and `OUTPUT_SCALES` of the
      objects the binary layers use (`binarizers`; each object's docstring has its formula).
    output_scale_init: initial value of Gamma (of its channel factor when factorised).
    rprelu: ReActNet's RPReLU `PReLU_beta(y - gamma) + zeta` (per output channel) on the
      binary conv's output, 'before_shortcut' (BBCU) or 'after_shortcut' (ReActNet), or 'none'.
      Conv layers only.
    learnable_shortcut_scale: s is a trained parameter; else the constant shortcut_scale_init
      (BBCU's plain residual: 1).
    reste_o_end: ReSTE's final rectification parameter o (o goes 1 -> o_end over training).
    lora_rank: rank r of the LoRA factors ('lora_lsq').
    timestep_buckets, num_timesteps: the step-size table of 'lsq_timestep' has
      `timestep_buckets` rows; timestep t reads row t * timestep_buckets // num_timesteps.
      num_timesteps is the diffusion's T (`config.method_from_config` sets it from
      config.diffusion.num_timesteps; 1000, DDPM's T, by default).
    fp_init: the `FP_INITS` entry that `init_from_fp` applies after the student is
      initialised from the FP teacher: 'none', or 'xnor_scales' (XNOR++: Gamma from alpha
      and the activation mean, `_xnor_output_scales`).
    binary_bias: binary convs and dense layers add their real bias b (ours); False drops it
      from the forward, as the authors' release does (the 'bias' parameter stays in the tree,
      so the student still contains the FP tree, but is unused and not counted as stored).
    width_shortcut: the shortcut of a binary conv that changes width (Cin != Cout): 'conv', a
      real 1x1 conv of x (ours, ReActNet's), or 'none', no shortcut term there (the layout the
      paper's Table 4 counts). A conv that keeps its width has the identity either way.
    binary_skip_conv: the res blocks' 1x1 skip convs (`nin_shortcut`) are binary convs of this
      method (the layout the paper's Table 4 counts; they change width, so `width_shortcut`
      applies to them); False keeps them full precision (ours).
  """

  name: str = "fp"
  binary: bool = False
  weight_estimator: str = "ste"
  activation_estimator: str = "approx"
  learnable_threshold: bool = True
  activation_scale: str = "xnor"
  learnable_k: bool = False
  shortcut: bool = True
  shortcut_scale_init: float = 0.0
  cross_timestep: bool = False
  distillation: str = "none"
  weight_binarizer: str = "xnor"
  activation_binarizer: str = "sign"
  output_scale: str = "none"
  output_scale_init: float = 1.0
  rprelu: str = "none"
  learnable_shortcut_scale: bool = True
  reste_o_end: float = 3.0
  lora_rank: int = 32
  timestep_buckets: int = 100
  num_timesteps: int = 1000
  fp_init: str = "none"
  binary_bias: bool = True
  width_shortcut: str = "conv"
  binary_skip_conv: bool = False

  def __post_init__(self):
    choices = dict(
        activation_scale=ACTIVATION_SCALES,
        distillation=DISTILLATIONS,
        rprelu=RPRELUS,
        weight_estimator=estimators.SIGN_ESTIMATORS,
        activation_estimator=estimators.SIGN_ESTIMATORS,
        fp_init=tuple(FP_INITS),
        width_shortcut=WIDTH_SHORTCUTS,
    )
    for field, valid in choices.items():
      if getattr(self, field) not in valid:
        raise ValueError(f"{field} must be one of {valid}, got {getattr(self, field)!r}")
    self.binarizers  # pylint: disable=pointless-statement  (an unknown name raises)
    if self.reste_o_end < 1:
      raise ValueError(f"reste_o_end must be >= 1, got {self.reste_o_end}")
    for field in ("lora_rank", "timestep_buckets", "num_timesteps"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")

  def init_from_fp(self, params):
    """The student's parameters after the method's own FP-dependent init (`fp_init`).

    Call it once on a student tree that already holds the FP teacher's parameters
    (`train.overlay_params`), before training starts; 'none' returns `params` unchanged.
    """
    return FP_INITS[self.fp_init](self, params)

  def has_shortcut(self, cin: int, cout: int) -> bool:
    """Whether a binary conv from cin to cout channels adds s * shortcut(x)."""
    return self.shortcut and (cin == cout or self.width_shortcut == "conv")

  @property
  def skip_conv_method(self) -> "BinarizationMethod":
    """The method of the res blocks' 1x1 skip convs: this one under `binary_skip_conv`, else FP."""
    return self if self.binary and self.binary_skip_conv else FP

  @property
  def binarizers(self) -> binarizers_lib.Binarizers:
    """The weight binarizer, activation binarizer and output scale objects this method names."""
    return binarizers_lib.Binarizers(
        binarizers_lib.WEIGHT_BINARIZERS[self.weight_binarizer],
        binarizers_lib.ACTIVATION_BINARIZERS[self.activation_binarizer],
        binarizers_lib.OUTPUT_SCALES[self.output_scale],
    )

  @property
  def doc(self) -> str:
    """The formulas and paper of this method (METHOD_DOCS[name]); '' for unknown names."""
    return METHOD_DOCS.get(self.name, "")


METHOD_DOCS: dict[str, str] = {}

FP = BinarizationMethod()
METHOD_DOCS["fp"] = (
    """Full precision: y = conv(x, W) + b. The teacher and the QAT starting point."""
)

XNOR = BinarizationMethod(name="xnor", binary=True)
METHOD_DOCS[
    "xnor"
] = """XNOR-Net (Rastegari et al., ECCV 2016), the vanilla baseline of BiDM Table 3.

Forward: y = conv(sign(x + tau), alpha * sign(W)) * K + b + s * shortcut(x), with
alpha[o] = mean|W[..., o]| (stop-gradient), K = conv(mean_c |x|, k), k fixed at 1/(kh kw)
(Eq. 9), tau a learnable per-channel threshold (init 0) and s a learnable scalar (init 0) on the
real-valued ReActNet-style shortcut that BiDM gives every method (paper section 4).
Gradients: weights alpha * g * 1[|W| <= 1] (clipped STE through sign, alpha stop-gradient);
activations ApproxSign, g * (2 - 2|x + tau|) on |x + tau| < 1.
Ablations (all through get_method overrides): Table 5 `learnable_k=True`; Table 3 "+TBS"
`learnable_k=True, cross_timestep=True`, "+SPD" `distillation='spd'`."""

XNORPP = BinarizationMethod(
    name="xnorpp",
    binary=True,
    weight_binarizer="sign",
    weight_estimator="ste",
    activation_estimator="ste",
    learnable_threshold=False,
    activation_scale="none",
    output_scale="channel",
    fp_init="xnor_scales",
)
METHOD_DOCS[
    "xnorpp"
] = """XNOR-Net++ (Bulat & Tzimiropoulos, BMVC 2019).

Forward: y = conv(sign(x), sign(W)) * Gamma + b + s * shortcut(x). Gamma is learned by
backpropagation and fixed at inference; it replaces both XNOR's analytic weight scale alpha and
its activation scale K (no mean|x| is computed). output_scale='channel': Gamma[o] per output
channel (the paper's case 1); output_scale='factorised': Gamma = alpha[o] (x) beta[h_out] (x)
gamma[w_out] (the paper's case 3, its spatial factors sized by the first call's output).
Gradients: clipped STE for weights and activations, g * 1[|.| <= 1]; dGamma = sum of
g * conv(sign x, sign W) over the axes Gamma is shared on.
Init: XNOR++ learns Gamma in place of XNOR's analytic alpha[o] * K, so QAT from the FP teacher
starts Gamma at those analytic scales (fp_init='xnor_scales', applied by `init_from_fp` after
the teacher's weights are loaded): Gamma[o] = alpha[o] * E[K], alpha[o] = mean|W[..., o]| of the
teacher's kernel and E[K] = E mean_c|x| estimated data-independently as E|swish(z)| =
1/sqrt(2 pi) for z ~ N(0, 1) (`ACTIVATION_MEAN_ABS`); dense layers alike. A factorised Gamma's
spatial factors start at 1. Without the FP init (fp_init='none'), Gamma starts at
`output_scale_init` = 1, as a public XNOR++ baseline port does, which left the eps loss at
0.10 after 2k CIFAR steps (others: 0.04). No activation threshold (XNOR++ binarizes with plain
sign)."""

DOREFA = BinarizationMethod(
    name="dorefa",
    binary=True,
    weight_binarizer="dorefa",
    weight_estimator="identity",
    activation_binarizer="dorefa",
    learnable_threshold=False,
    activation_scale="none",
)
METHOD_DOCS[
    "dorefa"
] = """DoReFa-Net (Zhou et al., arXiv:1606.06160, 2016) at W1A1.

Weights: Wb = E * sign(W), E = mean|W| over the WHOLE tensor (one scalar, stop-gradient), with
the identity STE dL/dW = dL/dWb (DoReFa's 1-bit `_sign`, no factor E).
Activations: the k-bit quantizer quantize_k(clip(x, 0, 1)) at k = 1, a = round(clip(x, 0, 1))
in {0, 1} (a = 1 iff x >= 0.5); backward straight through the rounding and through the clip,
dL/dx = g * 1[0 <= x <= 1].
Forward: y = conv(a, Wb) + b + s * shortcut(x).
Choice: we keep DoReFa's {0, 1} activation literally rather than re-centring it to +-1. The
layer is still binary arithmetic: with s_a = 2a - 1, conv(a, Wb) = (conv(s_a, Wb) +
conv(1, Wb)) / 2, an XNOR-popcount conv plus a per-position constant (precomputable, only the
zero-padded border differs from sum(Wb)). No activation threshold and no XNOR activation
scale (DoReFa has neither). Ties: exactly 0.5 rounds up (TensorFlow's round-half-to-even would
give 0; measure zero)."""

REACTNET = BinarizationMethod(
    name="reactnet",
    binary=True,
    weight_binarizer="xnor",
    weight_estimator="ste",
    activation_estimator="approx",
    learnable_threshold=True,
    activation_scale="none",
    rprelu="after_shortcut",
)
METHOD_DOCS[
    "reactnet"
] = """ReActNet (Liu et al., ECCV 2020).

Forward: y = RPReLU(conv(RSign(x), alpha * sign(W)) + b + s * shortcut(x)), with
RSign(x) = sign(x + tau) (learnable per-input-channel threshold, init 0),
alpha[o] = mean|W[..., o]| stop-gradient, RPReLU(y) = PReLU_beta(y - gamma) + zeta per output
channel (gamma = zeta = 0, beta = 0.25 at init, PyTorch's PReLU default), applied after the
shortcut addition as in ReActNet's block (out = RPReLU(BN(conv) + x)).
Gradients: ApproxSign for activations, g * (2 - 2|x + tau|) on |x + tau| < 1; clipped STE
for weights; RPReLU, tau and s by autodiff.
Deviations: ReActNet's BatchNorm after each binary conv is not added (the DDPM U-Net has none;
the conv bias plays BN's shift). The shortcut is the learnable-s shortcut BiDM gives every
method (s init 0) instead of ReActNet's fixed identity. ReActNet's code passes the weight
gradient as g * 1[|W| <= 1], ours as alpha * g * 1[|W| <= 1] (the XNOR binarizer; a per-
channel constant factor that Adam normalises away). No XNOR activation scale (ReActNet has
none). Distillation from a real-valued network (ReActNet's distributional loss) is not used."""

RESTE = BinarizationMethod(
    name="reste",
    binary=True,
    weight_binarizer="reste",
    weight_estimator="reste",
    activation_estimator="reste",
    learnable_threshold=False,
    activation_scale="none",
    reste_o_end=3.0,
)
METHOD_DOCS[
    "reste"
] = """ReSTE, rectified straight-through estimator (Wu et al., ICCV 2023).

Forward: y = conv(sign(x), m * sign(W)) + b + s * shortcut(x), m = mean|W| one scalar over
the tensor (as the authors' BinarizeConv2d; not stop-gradient, so m passes gradient too).
Gradient of both signs (estimators.sign_reste, the authors' Binary_ReSTE):
d/dx = (1/o)|x|^(1/o - 1) on 0.1 < |x| <= 1.5, the secant slope 0.1^(1/o - 1) on |x| <= 0.1,
0 beyond 1.5.
Schedule: o = 1 + (o_end - 1)(1 - cos(pi/2 * p)), p = QuantContext.progress (step / total
steps; 1 at inference), o_end = `reste_o_end` = 3 as in the paper's experiments. The authors
update o once per epoch (p = epoch / epochs); ours changes every step. Weights and activations
share o (the authors' o and o_a follow the same schedule). No threshold, no activation
scale (ReSTE uses plain sign)."""

BBCU = BinarizationMethod(
    name="bbcu",
    binary=True,
    weight_binarizer="xnor",
    weight_estimator="ste",
    activation_estimator="approx",
    learnable_threshold=True,
    activation_scale="none",
    rprelu="before_shortcut",
    shortcut_scale_init=1.0,
    learnable_shortcut_scale=False,
)
METHOD_DOCS[
    "bbcu"
] = """BBCU, basic binary convolution unit (Xia et al., ICLR 2023, arXiv:2210.00405).

The paper's final unit (its code's BinaryConv2d): no BatchNorm, a residual connection around
every binary conv, RPReLU on the binary conv output before the residual is added:
y = RPReLU(conv(sign(x + tau), alpha * sign(W)) + b) + shortcut(x), with tau a learnable
per-input-channel threshold (init 0), alpha[o] = mean|W[..., o]| stop-gradient,
RPReLU(z) = PReLU_beta(z - gamma) + zeta per output channel (beta = 0.25), and the residual
added with the fixed coefficient 1 (learnable_shortcut_scale=False, shortcut_scale_init=1).
Gradients: ApproxSign for activations, clipped STE for weights.
Deviations: where the channel count changes, BBCU repeats input channels (a parameter-free
expansion by an integer factor); the U-Net also reduces channels (e.g. 96 -> 64 after a skip
concatenation), so we use the shared full-precision 1x1 projection there. BBCU's residual
alignment (multiplying the network's input image by a constant k) is not applied: it changes
the diffusion model's input interface, and our first conv is full precision."""

EFFICIENTDM = BinarizationMethod(
    name="efficientdm",
    binary=True,
    weight_binarizer="lora_lsq",
    weight_estimator="ste",
    activation_binarizer="lsq_timestep",
    activation_estimator="ste",
    learnable_threshold=False,
    activation_scale="none",
    lora_rank=32,
    timestep_buckets=100,
    distillation="l2",
)
METHOD_DOCS[
    "efficientdm"
] = """EfficientDM (He et al., ICLR 2024, arXiv:2310.03270) at W1A1.

Weights (QALoRA): W = sg(W0) + A B with W0 the FP kernel (stop-gradient: never trained),
LoRA factors A (kh, kw, Cin, r) (Kaiming-uniform, bound 1/sqrt(fan_in)) and B (r, Cout)
(zeros), r = `lora_rank` = 32 as in the authors' code; Wq = s_w[o] sign(W / s_w[o]) with the
LSQ step s_w[o] = w_gain[o] * mean|W0[..., o]| (w_gain learnable, init 1).
Activations (TALSQ): xq = s_x[b] sign(x / s_x[b]), b = t * 100 // 1000 (one step size per
timestep bucket = per step of a 100-step DDIM sampler), s_x learnable, init 1.
Forward: y = conv(xq, Wq) + b + s * shortcut(x) = s_x[b] s_w[o] conv(sign x, sign W) + ...
Gradients (LSQ at one bit, Q_N = Q_P = 1): dL/dW = g 1[|W| <= s_w]; dL/ds = sum
g (sign(v) - v/s 1[|v| <= s]) over the elements sharing s (v = W or x); a bucket's s_x only
receives gradient from the examples whose t falls in it.
Distillation: 'l2'. EfficientDM fine-tunes data-free by minimising ||eps_FP - eps_Q||^2, the MSE
between the FP and quantized noise estimates; our 'l2' is the nearest existing option (MSE on
the timestep blocks' features from the FP teacher, added to L_DM). An output-only distillation
would be a training-loop option.
Choices and deviations: (1) one bit: EfficientDM's uniform affine quantizer (delta, zero
point) has no 1-bit form (its code asserts n_bits >= 2; with a trained fractional zero point it
would have three levels), so we use the symmetric binary LSQ form. (2) W0 stays fixed because
it gets no gradient and the CIFAR optimizer is Adam without weight decay; with AdamW and
weight_decay > 0 decoupled decay would still shrink W0 and the training loop must mask it. The
conv bias is also stop-gradient (EfficientDM trains only LoRA and quantizer parameters); the
other FP parts of the U-Net (norms, first/last conv, time MLP) and the shared shortcut are
still trained by our loop. (3) s_w is initialised at mean|W0| (the L1-optimal binary scale),
written as gain * mean|W0| so the initial value follows the FP kernels loaded after init;
since W0 is frozen this is an exact reparametrisation. EfficientDM initialises both steps by
PTQ calibration; s_x starts at 1 (about LSQ's 2 mean|x| for the group-normalised inputs most
binary convs see). (4) Scale-aware LoRA optimization (per-layer LoRA learning rate
mean(delta_w) / 2500 in the authors' code) is an optimizer setting and is not reproduced by the
shared single-learning-rate Adam. (5) The LSQ gradient scale 1/sqrt(N Q_P) is not applied
(EfficientDM's code has none). At inference the LoRA factors merge into the 1-bit weight."""

BIDM = BinarizationMethod(
    name="bidm", binary=True, learnable_k=True, cross_timestep=True, distillation="spd"
)
METHOD_DOCS[
    "bidm"
] = """BiDM (Zheng et al., NeurIPS 2024): XNOR with TBS and SPD.

Forward as `xnor`, with the k filter of K = conv(mean_c |x|, k) learnable (Eq. 10, the first
half of TBS), cross-timestep connections on the last decoder blocks (Eq. 12) and Space Patched
Distillation from the FP teacher (Eq. 13-16). Ablation Table 7: `distillation='l2'` or
`'none'`."""

METHODS: dict[str, BinarizationMethod] = {
    m.name: m for m in (FP, XNOR, XNORPP, DOREFA, REACTNET, RESTE, BBCU, EFFICIENTDM, BIDM)
}


def recorded_fields(record: Mapping[str, Any]) -> dict[str, Any]:
  """A method as a checkpoint or an export recorded it (`dataclasses.asdict`), with the fields
  the record predates filled in from the named method: the behaviour before they existed."""
  known = METHODS.get(record.get("name"), BinarizationMethod())
  return {**dataclasses.asdict(known), **record}


def method_differences(
    record: Mapping[str, Any], method: BinarizationMethod
) -> list[tuple[str, Any, Any]]:
  """(field, recorded value, `method`'s value) of every field where a recorded method
  (`recorded_fields`) differs from `method`, in field-name order."""
  found, want = recorded_fields(record), dataclasses.asdict(method)
  return [
      (k, found.get(k), want.get(k))
      for k in sorted(set(found) | set(want))
      if found.get(k) != want.get(k)
  ]


def get_method(name: str, **overrides) -> BinarizationMethod:
  """The named method, with fields replaced by the non-None `overrides` (ablations).

  >>> get_method('xnor', learnable_k=True).learnable_k
  True
  """
  if name not in METHODS:
    raise ValueError(f"unknown binarization method {name!r}; valid: {', '.join(METHODS)}")
  fields = {f.name for f in dataclasses.fields(BinarizationMethod)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"unknown method fields {sorted(unknown)}; valid: {sorted(fields)}")
  return dataclasses.replace(METHODS[name], **{k: v for k, v in overrides.items() if v is not None})

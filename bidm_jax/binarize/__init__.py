"""Sign binarizers with straight-through estimators, and the binarization methods."""

from bidm_jax.binarize.estimators import (binarize_activation, binarize_weight, hard_sign,
                                          sign_approx, sign_identity, sign_reste, sign_ste)
from bidm_jax.binarize.methods import (METHODS, BinarizationMethod, QuantContext, get_method)

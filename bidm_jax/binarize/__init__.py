"""Sign functions with straight-through estimators, the registered binarizers and the methods."""

from bidm_jax.binarize.estimators import (
    binarize_activation,
    binarize_weight,
    binarize_weight_dorefa,
    binarize_weight_mean,
    dorefa_activation,
    hard_sign,
    lsq_binarize,
    reste_schedule,
    sign_approx,
    sign_identity,
    sign_reste,
    sign_ste,
    sign_with_estimator,
    timestep_bucket,
)
from bidm_jax.binarize.binarizers import ACTIVATION_BINARIZERS, OUTPUT_SCALES, WEIGHT_BINARIZERS
from bidm_jax.binarize.methods import (
    METHOD_DOCS,
    METHODS,
    BinarizationMethod,
    QuantContext,
    get_method,
)

"""BiDM's two contributions: TBS (`tbs`) and SPD (`spd`)."""

from bidm_jax.bidm.spd import l2_distillation_loss, spd_loss
from bidm_jax.bidm.tbs import TBSCache, blend, paired_timestep_forward

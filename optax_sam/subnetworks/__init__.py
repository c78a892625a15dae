"""Gradient masks that choose which subnetwork is trained (DPS, Child-Tuning)."""

from optax_sam.subnetworks.child_tuning import ChildTuningDState
from optax_sam.subnetworks.child_tuning import ChildTuningFState
from optax_sam.subnetworks.child_tuning import bernoulli_masks
from optax_sam.subnetworks.child_tuning import child_tuning_d
from optax_sam.subnetworks.child_tuning import child_tuning_d_mask
from optax_sam.subnetworks.child_tuning import child_tuning_f
from optax_sam.subnetworks.dps import DPSFrozenState
from optax_sam.subnetworks.dps import DPSState
from optax_sam.subnetworks.dps import dps
from optax_sam.subnetworks.dps import dps_frozen
from optax_sam.subnetworks.dps import per_matrix_topk_mask
from optax_sam.subnetworks.scope import all_matrices
from optax_sam.subnetworks.scope import encoder_dense_kernels

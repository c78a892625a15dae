"""Gradient masks that choose which subnetwork is trained (DPS, Child-Tuning), and
parameter transforms applied inside the loss (Mixout, DPS-Mix)."""

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
from optax_sam.subnetworks.dps_mix import DPSMixState
from optax_sam.subnetworks.dps_mix import dps_mix
from optax_sam.subnetworks.dps_mix import selection_scores
from optax_sam.subnetworks.mixout import MixoutState
from optax_sam.subnetworks.mixout import input_neuron_masks
from optax_sam.subnetworks.mixout import input_neuron_shape
from optax_sam.subnetworks.mixout import mixout
from optax_sam.subnetworks.mixout import mixout_params
from optax_sam.subnetworks.scope import all_matrices
from optax_sam.subnetworks.scope import encoder_dense_kernels

"""optax-sam: sharpness-aware and subnetwork fine-tuning optimizers as Optax transforms."""

from optax_sam import fisher
from optax_sam import flatness
from optax_sam import perturbations
from optax_sam import subnetworks
from optax_sam.core.loss import PerExampleLoss
from optax_sam.core.loss import batch_mean
from optax_sam.core.loss import microbatched_loss
from optax_sam.core.sharpness import SharpnessAwareState
from optax_sam.core.sharpness import sharpness_aware
from optax_sam.methods.asam import asam
from optax_sam.methods.delta_sam import delta_sam
from optax_sam.methods.fsam import fsam
from optax_sam.methods.gasam import gasam
from optax_sam.methods.per_instance_sam import per_instance_sam
from optax_sam.methods.sam import sam
from optax_sam.subnetworks.child_tuning import child_tuning_d
from optax_sam.subnetworks.child_tuning import child_tuning_d_mask
from optax_sam.subnetworks.child_tuning import child_tuning_f
from optax_sam.subnetworks.dps import dps
from optax_sam.subnetworks.dps import dps_frozen
from optax_sam.subnetworks.dps_mix import dps_mix
from optax_sam.subnetworks.mixout import mixout
from optax_sam.subnetworks.mixout import mixout_params

__version__ = "0.1.0"

__all__ = (
    "PerExampleLoss",
    "SharpnessAwareState",
    "asam",
    "batch_mean",
    "child_tuning_d",
    "child_tuning_d_mask",
    "child_tuning_f",
    "delta_sam",
    "dps",
    "dps_frozen",
    "dps_mix",
    "fisher",
    "flatness",
    "fsam",
    "gasam",
    "microbatched_loss",
    "mixout",
    "mixout_params",
    "per_instance_sam",
    "perturbations",
    "sam",
    "sharpness_aware",
    "subnetworks",
)

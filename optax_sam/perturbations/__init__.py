"""Small ε-builders: each maps the clean gradient (or the previous piece's output) onward.

Chain them and hand the result to ``optax_sam.sharpness_aware``.
"""

from optax_sam.perturbations.fisher_mask import FisherMaskState
from optax_sam.perturbations.fisher_mask import fisher_mask
from optax_sam.perturbations.gradient_strength import GradientStrengthState
from optax_sam.perturbations.gradient_strength import gradient_strength_ellipsoid
from optax_sam.perturbations.gradient_strength import relative_strength
from optax_sam.perturbations.gradient_strength import update_strength
from optax_sam.perturbations.parameter_scaling import parameter_magnitude_ellipsoid
from optax_sam.perturbations.parameter_scaling import scale_by_parameter_magnitude
from optax_sam.perturbations.radius import ScaleToRadiusState
from optax_sam.perturbations.radius import scale_to_radius
from optax_sam.perturbations.reweighting import ReweightedAscentState
from optax_sam.perturbations.reweighting import reweighted_ascent

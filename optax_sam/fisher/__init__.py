"""Fisher information: per-example gradients in chunks, diagonal estimates, global top-k."""

from optax_sam.fisher.estimators import empirical_fisher
from optax_sam.fisher.estimators import squared_gradient_fisher
from optax_sam.fisher.per_example import sum_over_examples
from optax_sam.fisher.topk import global_topk_mask
from optax_sam.fisher.topk import kth_largest

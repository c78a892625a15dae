"""The fine-tuning methods the command offers: command-line name -> optimizer builder.

Every method is placed before the base optimizer (gradient clipping and AdamW), as the
papers do: ``optax.chain(method, clip_by_global_norm, adamw)``. A method is offered only
when the installed ``optax_sam`` has its constructor, so methods added to the library
appear here by adding one row to ``_ALL_METHODS``. Hyperparameter flags left unset keep
the library's defaults, except one: the subnetwork methods (DPS, DPS-Mix, Mixout,
Child-Tuning) get the papers' BERT scope, the encoder's dense kernels (``PAPER_SCOPE``),
where the library's default scope is every matrix.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional

import optax
import tqdm

import optax_sam
from examples.glue import flags

# DPS's, Mixout's and Child-Tuning's scope in their papers: the weight matrices of the
# encoder's dense layers (embeddings, LayerNorms, biases and the classifier update
# densely).
PAPER_SCOPE = optax_sam.subnetworks.encoder_dense_kernels


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
  """A command-line flag that sets one keyword argument of a method's constructor.

  Attributes:
    flag: the flag, e.g. ``"--keep-ratio"``; its dest is the argparse spelling.
    type: converts the flag's text.
    help: what it sets.
    choices: the allowed values, if restricted.
  """

  flag: str
  type: Callable[[str], Any]
  help: str
  choices: Optional[tuple[str, ...]] = None

  @property
  def dest(self) -> str:
    return self.flag.lstrip("-").replace("-", "_")


HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter("--rho", flags.finite_float, "perturbation radius (SAM family)"),
    Hyperparameter("--eta", flags.finite_float,
                   "ASAM's eta in T = |w| + eta; delta-SAM's weight floor"),
    Hyperparameter("--keep-ratio", flags.finite_float,
                   "FSAM: fraction of the pool perturbed; Child-Tuning_D: fraction kept"),
    Hyperparameter("--mask-every", int, "FSAM: steps between Fisher mask refreshes"),
    Hyperparameter("--fisher", str, "FSAM: Fisher estimator",
                   choices=("per_example", "squared_gradient")),
    Hyperparameter("--fisher-samples", int, "FSAM: examples in the per-example Fisher"),
    Hyperparameter("--fisher-chunk-size", int, "FSAM: examples per vmap chunk"),
    Hyperparameter("--beta", flags.finite_float,
                   "GA-SAM: EMA decay of the squared gradient"),
    Hyperparameter("--max-scale", flags.finite_float,
                   "GA-SAM: cap on the relative strength"),
    Hyperparameter("--ascent-steps", int, "GA-SAM: ascent steps"),
    Hyperparameter("--chunk-size", int, "per-instance SAM: examples per vmap chunk"),
    Hyperparameter("--perturb-every", int,
                   "SAM family: perturb every k-th step only (amortised steps; 1: every "
                   "step)"),
    Hyperparameter("--reuse-alpha", flags.finite_float,
                   "SAM family with --perturb-every > 1: LookSAM's alpha, reusing the "
                   "last perturbed gradient's orthogonal part between perturbing steps "
                   "(unset: the plain gradient there); about ||g_v||/||g||, a few "
                   "hundredths at rho 0.01: the paper's 0.7 stopped STS-B from learning"),
    Hyperparameter("--update-ratio", flags.finite_float,
                   "DPS: stage length as a fraction of all steps"),
    Hyperparameter("--exclude-ratio", flags.finite_float,
                   "DPS: fraction of each matrix left out"),
    Hyperparameter("--p-keep", flags.finite_float,
                   "Child-Tuning_F: probability of keeping an entry"),
    Hyperparameter("--mixout-p", flags.finite_float,
                   "Mixout, DPS-Mix: probability of mixing a neuron back to its target"),
)


@dataclasses.dataclass(frozen=True)
class MethodContext:
  """What some methods need beyond their hyperparameters.

  Attributes:
    total_steps: optimizer steps of the whole run (DPS's stage length).
    seed: the run's seed (random directions and masks).
    params: the pre-trained parameters (Child-Tuning_D's mask).
    loss_fn_for: ``batch -> loss_fn`` giving the masked mean loss of a batch without
      dropout (Child-Tuning_D's gradient pass).
    train_batches: ``() -> iterable`` of one epoch of training batches.
    num_train_batches: the length of that iterable.
  """

  total_steps: int
  seed: int
  params: Any
  loss_fn_for: Callable[[Any], Callable[[Any], Any]]
  train_batches: Callable[[], Iterable[Any]]
  num_train_batches: int


# (hyperparameters, context, base optimizer) -> the whole optimizer.
Builder = Callable[[Mapping[str, Any], MethodContext, optax.GradientTransformation],
                   optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Method:
  """One selectable method.

  Attributes:
    name: the ``--method`` value.
    constructor: the ``optax_sam`` function whose keywords the flags set (the method is
      offered when it exists); ``None`` for plain AdamW.
    flags: dests of the ``HYPERPARAMETERS`` it accepts, mapped to constructor keywords.
    build: makes the optimizer from the given hyperparameters, context and base.
    params_transform: ``(params, opt_state) -> params`` the training loss sees instead
      of the parameters (Mixout's mixed weights), or ``None``; evaluation and the
      exported model use the parameters themselves.
  """

  name: str
  constructor: Optional[str]
  flags: Mapping[str, str]
  build: Builder
  params_transform: Optional[Callable[[Any, Any], Any]] = None


def _before_base(constructor: str, *context_keywords: str, **fixed: Any) -> Builder:
  """A builder for ``optax.chain(optax_sam.<constructor>(...), base)``.

  ``context_keywords`` name ``MethodContext`` fields passed on; ``fixed`` are passed as
  they are.
  """

  def build(hyperparameters, context, base):
    extra = {keyword: getattr(context, keyword) for keyword in context_keywords}
    return optax.chain(
        getattr(optax_sam, constructor)(**hyperparameters, **extra, **fixed), base)

  return build


def _child_tuning_d(hyperparameters, context, base):
  batches = tqdm.tqdm(context.train_batches(), total=context.num_train_batches,
                      desc="child_tuning_d_mask", unit="batch", disable=None)
  mask = optax_sam.child_tuning_d_mask(context.loss_fn_for, context.params, batches,
                                       **hyperparameters, scope=PAPER_SCOPE)
  return optax.chain(optax_sam.child_tuning_d(mask), base)


def _dps_frozen(hyperparameters, context, base):
  return optax_sam.dps_frozen(base, total_steps=context.total_steps, **hyperparameters,
                              scope=PAPER_SCOPE)


def _mixout_params(params: Any, opt_state: Any) -> Any:
  # Looked up when called, so that this module imports with an optax_sam that lacks it.
  return optax_sam.mixout_params(params, opt_state)


# The SAM family's radius and amortisation (perturb every k-th step, LookSAM's reuse).
_SHARPNESS = {"rho": "rho", "perturb_every": "perturb_every", "reuse_alpha": "reuse_alpha"}
_DPS = {"update_ratio": "update_ratio", "exclude_ratio": "exclude_ratio"}
_ALL_METHODS = (
    Method("adamw", None, {}, lambda hyperparameters, context, base: base),
    Method("sam", "sam", _SHARPNESS, _before_base("sam")),
    Method("asam", "asam", {**_SHARPNESS, "eta": "eta"}, _before_base("asam")),
    Method("fsam", "fsam",
           {**_SHARPNESS, "keep_ratio": "keep_ratio", "mask_every": "mask_every",
            "fisher": "fisher", "fisher_samples": "fisher_samples",
            "fisher_chunk_size": "fisher_chunk_size"},
           _before_base("fsam")),
    Method("gasam", "gasam",
           {**_SHARPNESS, "beta": "beta", "max_scale": "max_scale",
            "ascent_steps": "ascent_steps"},
           _before_base("gasam")),
    Method("delta-sam", "delta_sam", {**_SHARPNESS, "eta": "eta"},
           _before_base("delta_sam", "seed")),
    Method("per-instance-sam", "per_instance_sam", {**_SHARPNESS, "chunk_size": "chunk_size"},
           _before_base("per_instance_sam")),
    Method("dps", "dps", _DPS, _before_base("dps", "total_steps", scope=PAPER_SCOPE)),
    Method("dps-frozen", "dps_frozen", _DPS, _dps_frozen),
    Method("dps-mix", "dps_mix", {**_DPS, "mixout_p": "mixout_p"},
           _before_base("dps_mix", "total_steps", "seed", scope=PAPER_SCOPE),
           params_transform=_mixout_params),
    Method("mixout", "mixout", {"mixout_p": "p"},
           _before_base("mixout", "seed", scope=PAPER_SCOPE),
           params_transform=_mixout_params),
    Method("child-tuning-f", "child_tuning_f", {"p_keep": "p_keep"},
           _before_base("child_tuning_f", "seed", scope=PAPER_SCOPE)),
    Method("child-tuning-d", "child_tuning_d_mask", {"keep_ratio": "keep_ratio"},
           _child_tuning_d),
)

METHODS: dict[str, Method] = {
    method.name: method for method in _ALL_METHODS
    if method.constructor is None or hasattr(optax_sam, method.constructor)}


def add_flags(parser: argparse.ArgumentParser) -> None:
  """Adds every method hyperparameter flag (default: unset, the library's default)."""
  group = parser.add_argument_group(
      "method hyperparameters (unset: the library's default for the chosen method)")
  for hyperparameter in HYPERPARAMETERS:
    group.add_argument(hyperparameter.flag, type=hyperparameter.type,
                       choices=hyperparameter.choices, help=hyperparameter.help)


def hyperparameters_from_args(method: Method, args: argparse.Namespace) -> dict[str, Any]:
  """The constructor keywords set on the command line for ``method``.

  Raises:
    ValueError: if a flag is set that ``method`` does not take.
  """
  given = {h.dest: getattr(args, h.dest) for h in HYPERPARAMETERS
           if getattr(args, h.dest) is not None}
  unused = sorted(set(given) - set(method.flags))
  if unused:
    flags = ", ".join("--" + dest.replace("_", "-") for dest in unused)
    raise ValueError(f"{flags} does not apply to --method {method.name}")
  return {method.flags[dest]: value for dest, value in given.items()}


def build_optimizer(method: Method, hyperparameters: Mapping[str, Any],
                    context: MethodContext, learning_rate: optax.Schedule,
                    weight_decay: float, weight_decay_mask: Any,
                    max_grad_norm: Optional[float], adam_beta2: float = 0.999
                    ) -> optax.GradientTransformation:
  """``method`` before optional global-norm clipping and AdamW.

  Args:
    method: the method.
    hyperparameters: its constructor keywords.
    context: run facts some methods need.
    learning_rate: AdamW's schedule.
    weight_decay: AdamW's decoupled weight decay.
    weight_decay_mask: pytree of bools, True where weight decay applies.
    max_grad_norm: clip the (method's) gradient to this global norm; ``None`` to not clip.
    adam_beta2: AdamW's second-moment decay (FSAM's recipe uses 0.98).

  Returns:
    The optimizer; its ``update`` takes ``loss_fn`` and ``example_mask`` keywords.
  """
  adamw = optax.adamw(learning_rate, b1=0.9, b2=adam_beta2, eps=1e-6,
                      weight_decay=weight_decay, mask=weight_decay_mask)
  base = adamw if max_grad_norm is None else optax.chain(
      optax.clip_by_global_norm(max_grad_norm), adamw)
  return method.build(hyperparameters, context, base)

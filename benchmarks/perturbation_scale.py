r"""How large are the perturbations' hyperparameters on the real model, next to SAM's ρ?

  python -m benchmarks.perturbation_scale --rho 0.01 0.05 --steps 0 10 40

Scales that the papers set for other models, measured on one fixed batch of STS-B
training examples (the flatness benchmark's 32, dropout off) with the embedded
checkpoint, after AdamW steps (lr 1e-4) on that batch. JSON lines.

- LookSAM reuses ``g + α (‖g‖/‖g_v‖) g_v`` between perturbing steps: the reused part has
  norm ``α ‖g‖`` whatever ρ is, while in SAM's own gradient it is ``‖g_v‖``.
  ``orthogonal_ratio`` is ``‖g_v‖ / ‖g‖``, the α at which the reuse adds what SAM adds.
- ASAM perturbs by ``ρ T²g / ‖T g‖`` with ``T = |w| + η``: its norm is ρ times
  ``asam_norm_ratio = ‖T²g‖ / ‖T g‖``, so ASAM at ``ρ / asam_norm_ratio`` moves the
  parameters as far as SAM at ρ.
- GA-SAM (the reconstruction) perturbs by ``ρ ŝ²g / ‖ŝ g‖`` with ``ŝ = min(s / rms(s),
  max_scale)``: ``gasam_norm_ratio`` is ``‖ŝ²g‖ / ‖ŝ g‖`` with the strength ``s = |g|`` of
  the current gradient (GA-SAM's first step), at most ``max_scale``.

Both norm ratios are measured on the library's own perturbation pieces built at ρ = 1.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax

from optax_sam.core import sharpness
from optax_sam import perturbations
from benchmarks import flatness
from benchmarks import glue_quality
from examples.glue import data
from examples.glue import model as model_lib
from examples.glue import pretrained as pretrained_lib


def orthogonal_ratio(gradient, params, clean, rho: float) -> float:
  """``‖g_v‖ / ‖g‖``: ``g_v`` the part of SAM's gradient orthogonal to ``g = clean``."""
  norm = optax.tree.norm(clean)
  perturbed = gradient(jax.tree.map(lambda w, g: w + rho * g / norm, params, clean))
  orthogonal = sharpness.orthogonal_component(perturbed, clean)
  return float(optax.tree.norm(orthogonal) / norm)


def perturbation_norm_ratio(piece: optax.GradientTransformation, params, clean) -> float:
  """``‖ε‖ / ρ`` of a perturbation built at radius 1, on its first step."""
  epsilon, _ = piece.update(clean, piece.init(params), params)
  return float(optax.tree.norm(epsilon))


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.perturbation_scale",
                                   description=__doc__.split("\n", 1)[0])
  parser.add_argument("--rho", type=float, nargs="+", default=[0.01, 0.05])
  parser.add_argument("--asam-eta", type=float, default=0.01,
                      help="ASAM's eta (T = |w| + eta; the library's default)")
  parser.add_argument("--gasam-max-scale", type=float, default=10.0,
                      help="GA-SAM's max_scale (the library's default)")
  parser.add_argument("--steps", type=int, nargs="+", default=[0, 10, 40],
                      help="measure after these many AdamW steps")
  parser.add_argument("--glue-dir", default=glue_quality.default_glue_dir(),
                      help="glue_data folder (default: $GLUE_DIR, else ../shared/glue)")
  args = parser.parse_args(argv)
  task = data.get_task("stsb")
  folder = pretrained_lib.default_model_dir()
  pretrained = pretrained_lib.load_pretrained(folder, task.num_labels)
  model = model_lib.SequenceClassifier(pretrained.config, task.num_labels)
  batch = flatness.measurement_batch(
      task, pretrained_lib.load_tokenizer(folder), glue_dir=args.glue_dir, train_size=1000,
      data_seed=0, examples=32, max_length=64, micro_batch=0)
  gradient = jax.jit(jax.grad(flatness.measurement_loss(
      model, batch, is_regression=True, micro_batch=len(batch["example_mask"]))))
  optimizer = optax.adamw(1e-4, weight_decay=0.01)

  @jax.jit
  def step(params, state):
    updates, state = optimizer.update(gradient(params), state, params)
    return optax.apply_updates(params, updates), state

  params, state = pretrained.params, optimizer.init(pretrained.params)
  for done in range(max(args.steps) + 1):
    if done in args.steps:
      clean = gradient(params)
      print(json.dumps({"adamw_steps": done, "gradient_norm": float(
          optax.tree.norm(clean)), "orthogonal_ratio": {
              f"{rho:g}": orthogonal_ratio(gradient, params, clean, rho)
              for rho in args.rho},
          "asam_norm_ratio": perturbation_norm_ratio(
              perturbations.parameter_magnitude_ellipsoid(1.0, args.asam_eta), params,
              clean),
          "gasam_norm_ratio": perturbation_norm_ratio(
              perturbations.gradient_strength_ellipsoid(
                  1.0, max_scale=args.gasam_max_scale), params, clean)}), flush=True)
    params, state = step(params, state)
  return 0


if __name__ == "__main__":
  sys.exit(main())

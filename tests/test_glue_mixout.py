"""The GLUE command with Mixout and DPS-Mix: mixed weights in the loss, raw ones outside."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_sam
from examples.glue import methods
from examples.glue import model as model_lib
from examples.glue import pretrained as pretrained_lib
from examples.glue import train
from tests.test_glue_train import TINY_BERT
from tests.test_glue_train import _final_params
from tests.test_glue_train import _run
from tests.test_glue_train import needs_glue
from tests.test_glue_train import tiny_model  # pylint: disable=unused-import


def _mask_rows(opt_state, path):
  is_mixout = lambda node: isinstance(node, optax_sam.subnetworks.MixoutState)
  (mixing,) = [n for n in jax.tree.leaves(opt_state, is_leaf=is_mixout) if is_mixout(n)]
  node = mixing.mask
  for part in path:
    node = node[part]
  return np.asarray(node[:, 0])


def test_train_step_mixes_the_weights_inside_the_loss_only():
  config = pretrained_lib.encoder_config(dict(TINY_BERT, vocab_size=100))
  model = model_lib.SequenceClassifier(config, 2)
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(1, 100, (4, 16), dtype=np.int32),
           "attention_mask": np.ones((4, 16), np.int32),
           "token_type_ids": np.zeros((4, 16), np.int32),
           "labels": np.array([0, 1, 1, 0], np.int32),
           "example_mask": np.ones(4, np.float32)}
  params = model.init(jax.random.key(0), *(batch[k][:1] for k in (
      "input_ids", "attention_mask", "token_type_ids")))["params"]
  method = methods.METHODS["mixout"]
  tx = optax.chain(optax_sam.mixout(0.5, scope=optax_sam.subnetworks.encoder_dense_kernels),
                   optax.sgd(0.1))
  opt_state = tx.init(params)  # mixes toward these weights: train them a little first
  params = jax.tree.map(lambda w: w + 0.1 * jnp.sign(w), params)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=opt_state, dropout_key=jax.random.key(1))
  mixed_step = jax.jit(train.make_train_step(model, tx, is_regression=False,
                                             params_transform=method.params_transform))
  plain_step = jax.jit(train.make_train_step(model, tx, is_regression=False))
  after, loss = mixed_step(state, batch)
  # The loss is the one at the mixed weights...
  mixed = optax_sam.mixout_params(params, state.opt_state)
  _, loss_at_mixed = plain_step(state._replace(params=mixed), batch)
  _, loss_at_raw = plain_step(state, batch)
  assert float(loss) == float(loss_at_mixed) != float(loss_at_raw)
  # ...and SGD moved only the rows Mixout kept (the out-of-scope bias always moves).
  path = ("encoder", "layer_0", "intermediate", "kernel")
  kept = _mask_rows(state.opt_state, path)
  assert 0 < kept.sum() < kept.size
  before, moved = params, after.params
  for part in path:
    before, moved = before[part], moved[part]
  changed = np.any(np.asarray(moved) != np.asarray(before), axis=1)
  np.testing.assert_array_equal(changed, kept)
  bias = ("encoder", "layer_0", "intermediate", "bias")
  assert np.all(np.asarray(after.params[bias[0]][bias[1]][bias[2]][bias[3]])
                != np.asarray(params[bias[0]][bias[1]][bias[2]][bias[3]]))


@needs_glue
def test_dev_evaluation_and_the_exported_model_use_the_raw_weights(tiny_model, tmp_path,
                                                                   monkeypatch):
  seen = []
  evaluate = train.metrics.evaluate

  def recording(predict, encoded, task, batch_size, pad_to_multiple_of=32):
    batch = next(iter(train.data.batches(encoded, batch_size,
                                         pad_to_multiple_of=pad_to_multiple_of)))
    seen.append((batch, np.asarray(predict(batch))))
    return evaluate(predict, encoded, task, batch_size, pad_to_multiple_of)

  monkeypatch.setattr(train.metrics, "evaluate", recording)
  _run(tiny_model, tmp_path, "--method", "mixout", "--mixout-p", "0.5", "--lr", "1e-2",
       "--keep-checkpoint")
  exported = _final_params(tmp_path)

  # The checkpointed state: the raw weights and the optimizer state that mixes them.
  pretrained = pretrained_lib.load_pretrained(tiny_model, 2, seed=0)
  context = methods.MethodContext(total_steps=2, seed=0, params=None, loss_fn_for=None,
                                  train_batches=None, num_train_batches=0)
  tx = methods.build_optimizer(methods.METHODS["mixout"], {"p": 0.5}, context,
                               train.learning_rate_schedule(1e-3, 2, 0.06), 0.01,
                               train.weight_decay_mask(pretrained.params), 1.0)
  template = train.TrainState(step=jnp.zeros((), jnp.int32), params=pretrained.params,
                              opt_state=tx.init(pretrained.params),
                              dropout_key=jax.random.PRNGKey(0))
  on_one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  checkpoints = train.checkpoints_lib.Checkpoints(tmp_path / train.CHECKPOINT_FILE)
  state = checkpoints.restore(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x),
                                     sharding=on_one_device), template)).state
  checkpoints.close()
  jax.tree.map(np.testing.assert_array_equal, exported, state.params)

  model = model_lib.SequenceClassifier(pretrained.config, 2)
  batch, logits = seen[-1]
  outputs = lambda params: np.asarray(model.apply(
      {"params": params}, batch["input_ids"], batch["attention_mask"],
      batch["token_type_ids"]))
  np.testing.assert_allclose(logits, outputs(state.params), rtol=1e-5, atol=1e-6)
  mixed = optax_sam.mixout_params(state.params, state.opt_state)
  assert np.max(np.abs(outputs(mixed) - logits)) > 1e-3

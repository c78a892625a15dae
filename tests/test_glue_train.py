"""End-to-end runs of ``python -m examples.glue.train`` on a tiny random BERT."""

import inspect
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_sam
from examples.glue import methods
from examples.glue import model as model_lib
from examples.glue import pretrained
from examples.glue import train
from tests import harness

REPO = pathlib.Path(__file__).resolve().parents[1]
GLUE_DIR = pathlib.Path(os.environ.get("GLUE_DIR", REPO.parent / "shared" / "glue"))
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(),
                                reason=f"GLUE data not found at {GLUE_DIR} (set GLUE_DIR)")
TINY_BERT = {
    "model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64,
    "type_vocab_size": 2, "hidden_act": "gelu", "pad_token_id": 0,
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> pathlib.Path:
  """A random 1-layer BERT with the MiniLM vocabulary, as a Hugging Face folder."""
  folder = tmp_path_factory.mktemp("tiny_bert")
  config = pretrained.encoder_config(TINY_BERT)
  module = model_lib.SequenceClassifier(config, 2)
  ids = np.zeros((1, 4), np.int32)
  params = module.init(jax.random.key(0), ids, ids, ids)["params"]
  del params["classifier"]  # Like a pre-trained encoder: the head starts fresh.
  pretrained.save_pretrained(folder, params, TINY_BERT)
  pretrained.load_tokenizer(pretrained.default_model_dir()).save_pretrained(str(folder))
  return folder


def _argv(model, output_dir, *flags, task="wnli"):
  """A quick run: 3 batches of 8 per epoch, at most 2 steps unless ``flags`` say more."""
  return ["--task", task, "--model", str(model), "--glue-dir", str(GLUE_DIR),
          "--output-dir", str(output_dir), "--train-size", "24", "--batch-size", "8",
          "--max-length", "32", "--epochs", "1", "--max-steps", "2", "--num-devices", "1",
          "--log-every", "1", "--lr", "1e-3", *flags]


def _run(model, output_dir, *flags, task="wnli"):
  assert train.main(_argv(model, output_dir, *flags, task=task)) == 0
  return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def _final_params(output_dir, num_labels=2):
  return pretrained.load_pretrained(output_dir / "model", num_labels).params


def test_every_registered_flag_is_a_keyword_of_the_library_constructor():
  assert {"adamw", "sam", "asam", "fsam", "gasam"} <= set(methods.METHODS)
  for method in methods.METHODS.values():
    if method.constructor is None:
      continue
    keywords = inspect.signature(getattr(optax_sam, method.constructor)).parameters
    assert set(method.flags.values()) <= set(keywords), method.name
  for name in ("delta_sam", "dps", "child_tuning_d_mask", "dps_mix",
               "mixout"):  # Library additions appear.
    assert hasattr(optax_sam, name) == any(
        m.constructor == name for m in methods.METHODS.values())


def test_subnetwork_methods_keep_the_papers_scope(monkeypatch):
  """The library's default scope is every matrix; the example passes the papers' BERT
  scope, which on this model is the encoder's and pooler's kernels."""
  scopes = {}

  def recorder(constructor):
    def record(*args, scope, **kwargs):
      del args, kwargs
      scopes[constructor] = scope
      return optax.identity()
    return record

  constructors = ("dps", "dps_frozen", "dps_mix", "mixout", "child_tuning_f",
                  "child_tuning_d_mask")
  for constructor in constructors:
    monkeypatch.setattr(optax_sam, constructor, recorder(constructor))
  monkeypatch.setattr(optax_sam, "child_tuning_d", lambda mask: optax.identity())
  context = methods.MethodContext(total_steps=100, seed=0, params=None,
                                  loss_fn_for=None, train_batches=lambda: [],
                                  num_train_batches=0)
  for name in ("dps", "dps-frozen", "dps-mix", "mixout", "child-tuning-f",
               "child-tuning-d"):
    methods.METHODS[name].build({}, context, optax.identity())
  assert scopes == dict.fromkeys(constructors, methods.PAPER_SCOPE)

  ids = np.zeros((1, 4), np.int32)
  shapes = jax.eval_shape(model_lib.SequenceClassifier(pretrained.encoder_config(TINY_BERT),
                                                       2).init,
                          jax.random.key(0), ids, ids, ids)["params"]
  chosen = {"/".join(k.key for k in path) for path, x in
            jax.tree_util.tree_flatten_with_path(shapes)[0]
            if methods.PAPER_SCOPE("/".join(k.key for k in path), x)}
  assert chosen == {"pooler/kernel", *(f"encoder/layer_0/{name}/kernel" for name in (
      "attention/query", "attention/key", "attention/value", "attention/output",
      "intermediate", "output"))}


def test_only_flags_that_were_given_reach_the_constructor():
  args = train.parse_args(["--task", "rte", "--method", "fsam", "--rho", "0.01",
                           "--keep-ratio", "0.2", "--fisher", "squared_gradient"])
  assert methods.hyperparameters_from_args(methods.METHODS["fsam"], args) == {
      "rho": 0.01, "keep_ratio": 0.2, "fisher": "squared_gradient"}
  with pytest.raises(ValueError, match="--keep-ratio, --rho does not apply to --method dps"):
    methods.hyperparameters_from_args(methods.METHODS["dps"], args)


def test_weight_decay_skips_biases_and_layer_norms():
  config = pretrained.encoder_config(TINY_BERT)
  module = model_lib.SequenceClassifier(config, 2)
  ids = np.zeros((1, 4), np.int32)
  shapes = jax.eval_shape(module.init, jax.random.key(0), ids, ids, ids)["params"]
  decayed = {"/".join(k.key for k in path) for path, decay in
             jax.tree_util.tree_flatten_with_path(train.weight_decay_mask(shapes))[0]
             if decay}
  assert decayed == {
      "embeddings/word_embeddings/embedding", "embeddings/position_embeddings/embedding",
      "embeddings/token_type_embeddings/embedding", "pooler/kernel", "classifier/kernel",
      *(f"encoder/layer_0/{name}/kernel" for name in (
          "attention/query", "attention/key", "attention/value", "attention/output",
          "intermediate", "output"))}


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
  schedule = train.learning_rate_schedule(1e-3, total_steps=100, warmup_ratio=0.1)
  assert [float(schedule(t)) for t in (0, 5, 10, 55, 100)] == pytest.approx(
      [0.0, 5e-4, 1e-3, 5e-4, 0.0])


def test_delta_sam_step_without_the_clean_gradient_is_the_same_step_with_less_work():
  assert [name for name, method in methods.METHODS.items()
          if not method.reads_clean_gradient] == ["delta-sam"]
  # A small vocabulary, so that the passes and not AdamW's elementwise work dominate.
  config = pretrained.encoder_config(dict(TINY_BERT, vocab_size=1000))
  model = model_lib.SequenceClassifier(config, 2)
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(1, 1000, (4, 32), dtype=np.int32),
           "attention_mask": np.ones((4, 32), np.int32),
           "token_type_ids": np.zeros((4, 32), np.int32),
           "labels": np.array([0, 1, 1, 0], np.int32),
           "example_mask": np.array([1, 1, 1, 0], np.float32)}
  params = model.init(jax.random.key(0), *(batch[k][:1] for k in (
      "input_ids", "attention_mask", "token_type_ids")))["params"]
  tx = optax.chain(optax_sam.delta_sam(), optax.adamw(1e-3))
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), dropout_key=jax.random.key(1))
  steps = {clean: jax.jit(train.make_train_step(
      model, tx, is_regression=False, clean_gradient=clean))
           for clean in (True, False)}
  (with_clean, loss), (without_clean, loss_without) = (
      steps[clean](state, batch) for clean in (True, False))
  assert float(loss) == float(loss_without)
  harness.assert_trees_close(with_clean.params, without_clean.params, rtol=1e-6,
                             atol=1e-7)
  flops = {clean: steps[clean].lower(state, batch).compile().cost_analysis()["flops"]
           for clean in (True, False)}
  # One backward pass less (for this model about 7% of a δ-SAM step: XLA shares the
  # clean forward pass with δ-SAM's own pass at w only when the backward needs it).
  assert flops[False] < 0.95 * flops[True], flops


@needs_glue
@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_method_trains_a_few_jitted_steps(method, tiny_model, tmp_path):
  # DPS needs stages of at least one step: two steps make one Stage I and one Stage II.
  flags = ("--update-ratio", "0.5") if method.startswith("dps") else ()
  # SAM also covers the regression head (squared error, Pearson and Spearman).
  task = "stsb" if method == "sam" else "wnli"
  records = _run(tiny_model, tmp_path, "--method", method, *flags, task=task)
  losses = [r["loss"] for r in records if r["event"] == "train"]
  assert len(losses) == 2 and np.all(np.isfinite(losses))
  final = [r for r in records if r["event"] == "final"]
  assert set(final[0]["metrics"]) == ({"pearson", "spearman"} if task == "stsb"
                                      else {"accuracy"})
  num_labels = 1 if task == "stsb" else 2
  before = pretrained.load_pretrained(tiny_model, num_labels).params
  after = _final_params(tmp_path, num_labels)
  for module in ("encoder", "pooler"):
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), before[module], after[module])
    assert all(jax.tree.leaves(changed)), f"{method} left some {module} parameters unchanged"
  assert (tmp_path / "curves.png").stat().st_size > 0


@needs_glue
def test_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one(tiny_model, tmp_path,
                                                                     capsys):
  # FSAM's state (mask, step count) must survive too: the mask is refreshed every 2 steps.
  flags = ("--method", "fsam", "--fisher", "squared_gradient", "--mask-every", "2",
           "--epochs", "2", "--max-steps", "99")
  _run(tiny_model, tmp_path / "whole", *flags)
  interrupted = _run(tiny_model, tmp_path / "parts", *flags, "--stop-after-epoch", "1")
  assert [r["event"] for r in interrupted][-1] == "eval"
  assert not (tmp_path / "parts" / "model").exists()
  assert train.main(_argv(tiny_model, tmp_path / "parts", *flags, "--resume",
                          "--seed", "1")) == 2
  assert capsys.readouterr().err.endswith(
      "error: --resume with different settings than the checkpointed run (seed: 0 -> 1)\n")
  resumed = _run(tiny_model, tmp_path / "parts", *flags, "--resume")
  assert [r["step"] for r in resumed if r["event"] == "train"] == list(range(1, 7))
  jax.tree.map(np.testing.assert_array_equal, _final_params(tmp_path / "whole"),
               _final_params(tmp_path / "parts"))


@needs_glue
def test_eight_device_run_matches_one_device(tiny_model, tmp_path):
  assert len(jax.devices()) == 8
  # One example per device; dropout is on, so the per-example keys must agree too.
  _run(tiny_model, tmp_path / "one", "--method", "sam")
  _run(tiny_model, tmp_path / "eight", "--method", "sam", "--num-devices", "8")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               _final_params(tmp_path / "one"), _final_params(tmp_path / "eight"))


@needs_glue
@pytest.mark.slow
def test_short_run_of_the_embedded_checkpoint(tmp_path):
  argv = ["--task", "wnli", "--glue-dir", str(GLUE_DIR), "--output-dir", str(tmp_path),
          "--train-size", "16", "--batch-size", "8", "--max-length", "64",
          "--max-steps", "2", "--num-devices", "2", "--log-every", "1"]
  assert train.main(argv) == 0
  records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
  assert records[0]["fresh_head_modules"] == ["classifier"]
  assert np.all(np.isfinite([r["loss"] for r in records if r["event"] == "train"]))
  assert 0 <= records[-1]["metrics"]["accuracy"] <= 1
  tuned = pretrained.load_pretrained(tmp_path / "model", num_labels=2)
  assert tuned.fresh_modules == ()
  original = pretrained.load_pretrained(pretrained.default_model_dir(), num_labels=2)
  assert not np.array_equal(tuned.params["encoder"]["layer_5"]["output"]["kernel"],
                            original.params["encoder"]["layer_5"]["output"]["kernel"])


def test_bad_input_exits_2_with_one_line_and_no_traceback(tmp_path):
  glue = tmp_path / "glue"
  (glue / "RTE").mkdir(parents=True)
  (glue / "RTE" / "train.tsv").write_text(
      "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta b\tnot_entailment\n")
  result = subprocess.run(
      [sys.executable, "-m", "examples.glue.train", "--task", "rte", "--glue-dir", str(glue),
       "--output-dir", str(tmp_path / "out")],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      f"error: {glue / 'RTE' / 'train.tsv'}, line 3: expected 4 tab-separated fields, got 3"]
  assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--task", "squad"], "unknown task 'squad'; choose one of cola, sst2, mrpc, stsb, "
                          "qqp, mnli, mnli-mm, qnli, rte, wnli"),
    (["--task", "rte", "--model", "/no/such/model"],
     "missing model file /no/such/model/config.json"),
    (["--task", "rte", "--method", "sam", "--keep-ratio", "0.1"],
     "--keep-ratio does not apply to --method sam"),
    pytest.param(["--task", "rte", "--method", "fsam", "--keep-ratio", "2", "--model",
                  "{tiny}", "--glue-dir", "{glue}", "--max-length", "32"],
                 "--method fsam: keep_ratio must be in", marks=needs_glue),
    (["--task", "rte", "--method", "lion"], "unknown method 'lion'; choose one of adamw"),
    (["--task", "rte", "--batch-size", "12"], "--batch-size 12 is not divisible by the 8 "
                                              "devices it is sharded over"),
    (["--epochs", "1"], "the following arguments are required: --task"),
    (["--task", "rte", "--adam-beta2", "1"],
     "argument --adam-beta2: expected a number in (0, 1), got '1'"),
])
def test_usage_errors_are_one_line_with_exit_status_2(argv, message, tiny_model, tmp_path,
                                                      capsys):
  argv = [a.format(tiny=tiny_model, glue=GLUE_DIR) for a in argv]
  try:
    status = train.main(argv + ["--output-dir", str(tmp_path)])
  except SystemExit as exit_:  # argparse's own errors.
    status = exit_.code
  assert status == 2
  error = capsys.readouterr().err
  assert error.startswith("error: " + message) and error.count("\n") == 1


@needs_glue
def test_data_seed_chooses_the_subsample_and_defaults_to_the_seed(tiny_model, tmp_path,
                                                                  monkeypatch):
  seeds = []
  subsample = train.data.stratified_subsample

  def recording(split, size, seed, is_regression):
    seeds.append(seed)
    return subsample(split, size, seed, is_regression)

  monkeypatch.setattr(train.data, "stratified_subsample", recording)
  _run(tiny_model, tmp_path / "default", "--seed", "3", "--max-steps", "1")
  _run(tiny_model, tmp_path / "fixed", "--seed", "3", "--data-seed", "0", "--max-steps", "1")
  assert seeds == [3, 0]

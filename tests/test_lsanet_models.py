"""Backbones, attention modules, LSA and the LSANet assembly (shapes, counts, invariants)."""
import functools
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lsanet_jax.attention import ATTENTION_KINDS, eca_kernel_size
from lsanet_jax.backbones import BACKBONES, Classifier, count_params
from lsanet_jax.lsa import LayerSelectiveAttention
from lsanet_jax.models import LSANet, head_names
from runkit.xla import ONCE, compiler_options


def fast_jit(fn, **kwargs):
  """jax.jit at runkit.xla's settings for a program run once (on CPU: LLVM optimisation off, XLA's classic
  fusion emitters): these tests run each program once or a few times on tiny inputs, so compiling is nearly all
  their time, and these settings compile a LSANet training step 3-4x faster. They change no semantics (no
  fast-math either way, the same HLO); each comparison below is between programs compiled alike."""
  return jax.jit(fn, compiler_options=compiler_options(ONCE), **kwargs)


def abstract_params(model, image_size, channels=3):
  x = jnp.zeros((1, image_size, image_size, channels))
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


@pytest.mark.parametrize("name, expected", [("resnet18", 11_689_512), ("resnet50", 25_557_032),
                                            ("mobilenet_v2", 3_504_872)])
def test_param_counts_match_torchvision(name, expected):
  # torchvision counts conv/linear weights and BN scale+bias; running stats are buffers.
  variables = abstract_params(Classifier(name, 1000, stem="224"), 224)
  assert count_params(variables["params"]) == expected


def test_resnet_stems_follow_medmnist_forms():
  for stem, size, first_stage in (("28", 28, 28), ("224", 224, 56)):
    model = Classifier("resnet18", 9, stem=stem, width=0.25)
    variables = abstract_params(model, size)
    _, stages = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, size, size, 3))), variables)
    assert stages[0].shape == (2, first_stage, first_stage, 16)
    assert stages[-1].shape[1] == -(-first_stage // 8)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_every_backbone_takes_every_attention(backbone, attention):
  model = LSANet(backbone, 7, width=0.125, attention=attention, aux="dks", lsa=True, lsa_dim=16)
  variables = abstract_params(model, 28, channels=1)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((3, 28, 28, 1))), variables)
  assert set(out["logits"]) == {"aux1", "aux2", "main", "fused"}
  for logits in out["logits"].values():
    assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  names = " ".join(jax.tree_util.keystr(p)
                   for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"]))
  if attention != "none":
    assert "attention" in names
  else:
    assert "attention" not in names


def test_attention_adds_the_papers_parameters():
  base = count_params(abstract_params(Classifier("resnet18", 10, width=0.5), 28)["params"])
  se = count_params(abstract_params(Classifier("resnet18", 10, width=0.5, attention="se"), 28)["params"])
  eca = count_params(abstract_params(Classifier("resnet18", 10, width=0.5, attention="eca"), 28)["params"])
  # SE per block with C channels: C*(C/16) + C/16 + (C/16)*C + C; two basic blocks per stage.
  expected_se = sum(2 * (2 * c * (c // 16) + c // 16 + c) for c in (32, 64, 128, 256))
  assert se - base == expected_se
  assert eca - base == sum(2 * eca_kernel_size(c) for c in (32, 64, 128, 256))
  assert [eca_kernel_size(c) for c in (64, 128, 256, 512)] == [3, 5, 5, 5]


def test_lsa_weights_are_a_softmax_over_layers_and_fuse_the_branches():
  lsa = LayerSelectiveAttention(num_classes=4, dim=8, reduction=2)
  # Any inputs do (numpy's normal draws: no compile of a sampler per shape).
  rng = np.random.default_rng(0)
  feats = [jnp.asarray(rng.normal(size=(5, c)), jnp.float32) for c in (6, 10, 12)]

  def init_and_apply(key):  # one compiled program instead of an eager apply's op-by-op compiles
    variables = lsa.init(key, feats, train=False)
    return lsa.apply(variables, feats, train=False)

  logits, alpha = fast_jit(init_and_apply)(jax.random.key(3, impl="rbg"))
  chex.assert_shape(logits, (5, 4))
  chex.assert_shape(alpha, (5, 3, 8))
  np.testing.assert_allclose(alpha.sum(axis=1), 1.0, rtol=1e-6)
  assert np.all(np.asarray(alpha) > 0)
  with pytest.raises(ValueError, match="at least two"):
    lsa.init(jax.random.key(0), feats[:1], train=False)


_LSA_ALONE = LayerSelectiveAttention(4, dim=32)


@functools.cache
def _lsa_alone_init():
  """The module's initialiser, compiled once for both trainings (same shapes)."""
  return fast_jit(lambda key, feats: _LSA_ALONE.init(key, feats, train=False))


@functools.cache
def _lsa_alone_step():
  """_lsa_alone_step_fn compiled once (built on first use: compiler_options needs the backend)."""
  return fast_jit(_lsa_alone_step_fn)


def _lsa_alone_step_fn(params, opt_state, batch_stats, feats, y):
  """One Adam step (lr 1e-2) of the LSA module and its fused classifier trained alone on the fused head's CE."""
  import optax

  def loss_fn(params):
    (logits, alpha), updates = _LSA_ALONE.apply({"params": params, "batch_stats": batch_stats}, feats, train=True,
                                                mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (alpha, updates)

  (_, (alpha, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  change, opt_state = optax.adam(1e-2).update(grads, opt_state)
  return optax.apply_updates(params, change), opt_state, updates["batch_stats"], alpha, grads


def _train_lsa_alone(strengths, steps=100, n=512, features=24, seed=0):
  """Branch features relu(strength_i * prototype_i[y] + noise), 4 classes; returns (layer weights, alpha) of
  the last step."""
  import optax
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 4, n)
  prototypes = rng.normal(size=(len(strengths), 4, features))
  feats = [jnp.asarray(np.maximum(0, s * prototypes[i][y] + rng.normal(size=(n, features))), jnp.float32)
           for i, s in enumerate(strengths)]
  variables = _lsa_alone_init()(jax.random.key(seed), feats)
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = optax.adam(1e-2).init(params)
  for i in range(steps):
    params, opt_state, batch_stats, alpha, grads = _lsa_alone_step()(params, opt_state, batch_stats, feats,
                                                                     jnp.asarray(y))
    if i == 0:  # the fused head's loss reaches the selection layer
      assert float(jnp.linalg.norm(grads["select"]["kernel"])) > 0
  alpha = np.asarray(alpha)
  return alpha.mean(axis=(0, 2)), alpha


def test_lsa_layer_weights_follow_branch_usefulness_and_stay_even_for_equal_branches():
  # docs/lsanet.md, "LSA layer weights": the mechanism moves the layer weights (averaged over samples and
  # channels) away from a useless branch ...
  weights, _ = _train_lsa_alone((0.0, 0.5, 1.5))  # pure noise, weak signal, strong signal
  assert weights[0] < 0.2 and weights[2] > 0.5, weights
  # ... and keeps them near 1/3 when the branches are equally useful, as the DKS branches on digits are,
  # although per sample and channel the selection is far from uniform (the average hides it).
  weights, alpha = _train_lsa_alone((1.0, 1.0, 1.0))
  assert np.all((weights > 0.25) & (weights < 0.42)), weights
  assert alpha.max(axis=1).mean() > 0.6


def test_plain_lsanet_is_the_backbone_and_light_heads_are_smaller():
  plain = abstract_params(LSANet("resnet18", 10, width=0.25), 28, 1)
  reference = abstract_params(Classifier("resnet18", 10, width=0.25), 28, 1)
  assert count_params(plain["params"]) == count_params(reference["params"])
  dks = abstract_params(LSANet("resnet18", 10, width=0.25, aux="dks"), 28, 1)
  light = abstract_params(LSANet("resnet18", 10, width=0.25, aux="light"), 28, 1)
  # DKS branches copy stages 3-4 (after stage 2) and stage 4 (after stage 3).
  assert set(dks["params"]) >= {"aux1_stage3", "aux1_stage4", "aux2_stage4", "aux1_head", "aux2_head"}
  assert count_params(plain["params"]) < count_params(light["params"]) < count_params(dks["params"])
  assert head_names((2, 3), lsa=True) == ["aux1", "aux2", "main", "fused"]


def test_bad_model_settings_are_named():
  with pytest.raises(ValueError, match="unknown backbone"):
    abstract_params(LSANet("resnet34", 10), 28)
  with pytest.raises(ValueError, match="unknown attention"):
    abstract_params(LSANet("resnet18", 10, attention="nonlocal"), 28)
  with pytest.raises(ValueError, match="stages 1..3"):
    abstract_params(LSANet("resnet18", 10, aux="dks", aux_stages=(4,)), 28)
  with pytest.raises(ValueError, match="enable auxiliary"):
    abstract_params(LSANet("resnet18", 10, lsa=True), 28)


# The two bf16 tests share one pair of models (the lsanet variant: DKS branches, LSA, synergy; width 1/16), one
# batch and one set of float32 initial weights, so each program (initialiser, eval-mode forward and training
# step, in fp32 and bf16) is compiled once for the module.
BF16_IMAGE_SHAPE = (16, 16, 3)


@pytest.fixture(scope="module")
def bf16_models():
  """fp32 and --bf16 models, a batch, the float32 initial variables and each model's eval-mode logits on it."""
  from lsanet_jax import steps, train
  from lsanet_jax.config import VARIANTS, TrainConfig

  configs = {name: TrainConfig(width=0.0625, lsa_dim=16, bf16=name == "bf16", **VARIANTS["lsanet"])
             for name in ("fp32", "bf16")}
  models = {name: train.build_model(c, 5) for name, c in configs.items()}
  assert models["bf16"].dtype == jnp.bfloat16
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (16, *BF16_IMAGE_SHAPE), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 5, (16, 1)).astype(np.int32))
  x0 = jnp.zeros((1, *BF16_IMAGE_SHAPE))
  # The bf16 model's own initialiser, traced only: what dtype would its parameters have?
  shapes = jax.eval_shape(functools.partial(models["bf16"].init, train=False), jax.random.key(0), x0)
  # What train.init_variables does (its float32 twin initialises; an RBG key compiles far faster than
  # threefry on CPU), compiled with fast_jit.
  float32_twin = models["bf16"].clone(dtype=jnp.float32)
  variables = fast_jit(functools.partial(float32_twin.init, train=False))(train.init_key(0), x0)
  logits = {name: fast_jit(functools.partial(model.apply, train=False))(variables, steps.preprocess(images))["logits"]
            for name, model in models.items()}
  return types.SimpleNamespace(configs=configs, models=models, images=images, labels=labels, shapes=shapes,
                               variables=variables, logits=logits)


def test_bf16_compute_keeps_float32_params_and_logits(bf16_models):
  shapes, variables = bf16_models.shapes, bf16_models.variables
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(shapes["params"]))
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes, variables)
  out = bf16_models.logits["bf16"]
  assert set(out) == {"aux1", "aux2", "main", "fused"}
  assert all(v.dtype == jnp.float32 and np.all(np.isfinite(v)) for v in out.values())
  lsa = LayerSelectiveAttention(num_classes=3, dim=8, dtype=jnp.bfloat16)
  feats = [jnp.ones((2, 4), jnp.bfloat16), jnp.zeros((2, 6), jnp.bfloat16)]

  def init_and_apply(key):  # one compiled program instead of eager op-by-op compiles
    lsa_vars = lsa.init(key, feats, train=False)
    return lsa.apply(lsa_vars, feats, train=False)

  logits, alpha = fast_jit(init_and_apply)(jax.random.key(1))
  assert logits.dtype == jnp.float32 and alpha.dtype == jnp.float32
  np.testing.assert_allclose(alpha.sum(axis=1), 1.0, rtol=1e-6)


def test_bf16_training_step_tracks_fp32_and_keeps_float32_weights(bf16_models):
  """--bf16 (bfloat16 compute, float32 master weights): same parameters give the fp32 logits
  and loss to bf16 precision, and the updated parameters and optimiser state stay float32."""
  import optax
  from lsanet_jax import steps, train

  configs, models, variables, logits = (bf16_models.configs, bf16_models.models, bf16_models.variables,
                                        bf16_models.logits)
  tx = optax.adam(1e-3)
  states, parts = {}, {}
  for name, model in models.items():
    state = train.create_train_state(model, tx, BF16_IMAGE_SHAPE, None, variables)
    step = fast_jit(functools.partial(steps.train_step, model=model, tx=tx, config=configs[name],
                                      task="multi-class"))
    states[name], parts[name] = step(state, bf16_models.images, bf16_models.labels, jax.random.key(1))
  assert set(logits["bf16"]) == {"aux1", "aux2", "main", "fused"}
  for head, z32 in logits["fp32"].items():
    z16 = logits["bf16"][head]
    assert z16.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(z32)))
    assert scale > 0.1  # not a degenerate comparison of near-zero logits
    np.testing.assert_allclose(z16, z32, atol=0.05 * scale, err_msg=head)
    np.testing.assert_allclose(jax.nn.softmax(z16), jax.nn.softmax(z32), atol=0.03, err_msg=head)
  np.testing.assert_allclose(parts["bf16"]["loss"], parts["fp32"]["loss"], rtol=0.03)
  trees = (states["bf16"]["params"], states["bf16"]["opt_state"], states["bf16"]["batch_stats"])
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(trees)
             if jnp.issubdtype(a.dtype, jnp.floating))
  chex.assert_trees_all_equal_shapes_and_dtypes(states["bf16"]["params"], states["fp32"]["params"])
  # One Adam step moves both the same way (bf16 rounding can flip only near-zero gradients).
  # (In numpy: the same float32 differences without an eager compile per parameter shape.)
  delta = lambda s: np.concatenate([(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
      jax.tree_util.tree_leaves(s["params"]), jax.tree_util.tree_leaves(variables["params"]))])
  agree = float(np.mean(np.sign(delta(states["bf16"])) == np.sign(delta(states["fp32"]))))
  assert agree > 0.9, agree

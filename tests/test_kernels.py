"""Every attention implementation against the XLA path, and the registry that picks one.

The fused Triton kernel runs in Pallas interpret mode and the Pallas TPU path in TPU interpret
mode on CPU; both are also lowered for their accelerator (no accelerator needed).
"""

import logging
import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from aa_flax import attention, kernels, layers, parallel, trainer
from aa_flax.kernels import augmented_attention, notices, relative_attention, tpu_attention
from aa_flax.layers import AAConv
from aa_flax.models import create_model

GRADIENT_NAMES = ("q", "k", "v", "rel_h", "rel_w")


pytestmark = pytest.mark.usefixtures("fast_compiles")


def random_inputs(seed, batch=2, heads=2, height=3, width=5, key_depth=4, value_depth=3,
                  dtype=np.float32):
  rng = np.random.default_rng(seed)
  shape = (batch, heads, height, width)
  arrays = (rng.normal(size=shape + (key_depth,)), rng.normal(size=shape + (key_depth,)),
            rng.normal(size=shape + (value_depth,)),
            rng.normal(size=(2 * height - 1, key_depth)),
            rng.normal(size=(2 * width - 1, key_depth)))
  return tuple(jnp.asarray(a, dtype) for a in arrays)


def outputs_and_grads(fn):
  """``args -> (out, grads of every arg)`` in one jitted program; the output cotangent differs
  per element (catches transposed gradients)."""
  def run(*args):
    out, vjp = jax.vjp(fn, *args)
    cotangent = jnp.sin(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return out, vjp(cotangent.astype(out.dtype))
  return jax.jit(run)


xla_outputs_and_grads = outputs_and_grads(attention.multihead_attention_2d)  # compiled per shape


def assert_matches_xla(fn, args, atol=2e-5, grad_atol=1e-4):
  """Output and the gradients of q, k, v (and both tables) of ``fn`` equal the XLA path's."""
  got_out, got = outputs_and_grads(fn)(*args)
  want_out, want = xla_outputs_and_grads(*args)
  np.testing.assert_allclose(got_out, want_out, atol=atol, rtol=atol)
  for name, g, w in zip(GRADIENT_NAMES, got, want):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, atol=grad_atol, rtol=grad_atol, err_msg=name)


def assert_bf16_close_to_f32_truth(fn, args):
  """bf16 output and gradients within 2% (of the largest entry) of the float32 XLA truth."""
  out, grads = outputs_and_grads(fn)(*args)
  truth_out, truths = xla_outputs_and_grads(*(a.astype(jnp.float32) for a in args))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), truth_out, atol=3e-2)
  for name, g, t in zip(GRADIENT_NAMES, grads, truths):
    assert g.dtype == jnp.bfloat16, name
    error = np.max(np.abs(np.asarray(g, np.float32) - t)) / np.max(np.abs(t))
    assert error < 2e-2, (name, error)


# ------------------------------------------------------------------ fused Triton kernel

# (H, W): H != W. (3, 5): one 16-query block. (5, 17): W padded to 32 columns, 85 queries in
# two 64-query blocks (not a multiple of the block), key rows padded 5 -> 6 for the dk/dv
# programs of 2 rows. (3, 1): the single-column map (H > W).
SHAPES = [(3, 5), (5, 17), (3, 1)]


@pytest.mark.parametrize("height,width", SHAPES)
def test_fused_matches_xla(height, width):
  assert_matches_xla(relative_attention.multihead_attention_2d,
                     random_inputs(height * 10 + width, height=height, width=width))


def test_fused_plain_attention_without_tables():
  q, k, v, _, _ = random_inputs(7, height=4, width=3, key_depth=20, value_depth=18)
  assert_matches_xla(relative_attention.multihead_attention_2d, (q, k, v))


def test_fused_bfloat16_within_bf16_rounding():
  assert_bf16_close_to_f32_truth(relative_attention.multihead_attention_2d,
                                 random_inputs(3, height=3, width=4, dtype=jnp.bfloat16))


def test_fused_gradient_never_materialises_quadratic_arrays():
  """No array in the differentiated program is as large as the [B, N, HW, HW] logits."""
  batch, heads, height, width = 1, 2, 16, 16
  args = random_inputs(5, batch=batch, heads=heads, height=height, width=width)
  quadratic = batch * heads * (height * width) ** 2
  jaxpr = jax.make_jaxpr(outputs_and_grads(relative_attention.multihead_attention_2d))(
      *args).jaxpr

  def sizes(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        yield int(np.prod(var.aval.shape))
      if eqn.primitive.name == "pallas_call":  # its body works on [64, Wp] tiles
        continue
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
            yield from sizes(getattr(sub, "jaxpr", sub))

  assert max(sizes(jaxpr)) <= quadratic / 8
  # The XLA path does hold them, so the check can see them.
  xla_jaxpr = jax.make_jaxpr(outputs_and_grads(attention.multihead_attention_2d))(
      *args).jaxpr
  assert max(sizes(xla_jaxpr)) >= quadratic


@pytest.mark.parametrize("dtype,height,width", [(jnp.bfloat16, 7, 7), (jnp.float32, 5, 17)])
def test_fused_lowers_to_triton_for_gpu(dtype, height, width):
  """Cross-lowering for CUDA (no GPU needed) runs the Pallas Triton lowering of all kernels."""
  args = random_inputs(9, batch=1, height=height, width=width, key_depth=20, value_depth=3,
                       dtype=dtype)
  fused = lambda *a: relative_attention.multihead_attention_2d(*a, interpret=False)  # noqa: E731
  hlo = outputs_and_grads(fused).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  for name in ("forward", "dq", "dkdv"):
    assert f'name = "relative_attention_2d_{name}"' in hlo


# ------------------------------------------------------------------ Pallas TPU path


@pytest.mark.parametrize("heads,dtype,height,width", [
    (1, jnp.float32, 3, 5),  # 15 positions in one 128 block
    # 135 positions: two blocks, the second mostly padding. Interpret mode runs the kernels
    # once per (batch, head), so 2 heads cost a quarter of 8.
    (2, jnp.bfloat16, 9, 15),
])
def test_tpu_path_in_interpret_mode_matches_xla(heads, dtype, height, width):
  args = random_inputs(heads + height, heads=heads, height=height, width=width, dtype=dtype)
  if dtype == jnp.float32:
    assert_matches_xla(tpu_attention.multihead_attention_2d, args)
  else:
    assert_bf16_close_to_f32_truth(tpu_attention.multihead_attention_2d, args)


def test_tpu_path_lowers_for_tpu():
  """The jax side of the TPU compilation (Pallas -> Mosaic, block-shape rules) without a TPU."""
  args = random_inputs(12, batch=1, heads=8, height=14, width=14, key_depth=20, value_depth=3,
                       dtype=jnp.bfloat16)
  tpu = lambda *a: tpu_attention.multihead_attention_2d(*a, interpret=False)  # noqa: E731
  hlo = outputs_and_grads(tpu).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  assert hlo.count("tpu_custom_call") >= 3  # forward, dq and dk/dv kernels


# ------------------------------------------------------------------ cuDNN path


def test_augmented_depth_attention_matches_xla():
  """q'·k' over [q, A_w, A_h] / [k, e_x2, e_y2] reproduces content + relative logits."""
  height, width = 3, 5
  args = random_inputs(13, height=height, width=width)
  assert_matches_xla(lambda *a: augmented_attention.multihead_attention_2d(
      *a, implementation="xla"), args)
  q_aug, k_aug = augmented_attention.augment(*args[:2], *args[3:])
  assert q_aug.shape == k_aug.shape == args[0].shape[:4] + (4 + width + height,)


def test_cudnn_path_falls_back_to_xla_where_cudnn_cannot_run():
  args = random_inputs(11, height=2, width=3)
  assert not augmented_attention.cudnn_applies(jnp.float32, 30)  # CPU here
  np.testing.assert_array_equal(kernels.attention_fn("cudnn")(*args),
                                attention.multihead_attention_2d(*args))
  with pytest.raises(ValueError, match="'flash' is not one of"):
    augmented_attention.multihead_attention_2d(*args, implementation="flash")


# ------------------------------------------------------------------ registry and checks


def test_registry_resolves_auto_per_backend_and_rejects_unavailable_paths(monkeypatch):
  assert kernels.ATTENTION_IMPLS == ("auto", "xla", "pallas", "cudnn", "pallas_tpu")
  assert [kernels.resolve_impl("auto", b) for b in ("tpu", "gpu", "cpu")] == [
      "pallas_tpu", "cudnn", "xla"]
  assert kernels.available_impls("tpu") == ("auto", "xla", "pallas_tpu")
  assert kernels.available_impls("gpu") == ("auto", "xla", "pallas", "cudnn")
  assert kernels.attention_fn("auto") is attention.multihead_attention_2d  # CPU here
  with pytest.raises(ValueError, match=r"'pallas' does not run on backend 'tpu'.*"
                                       r"\('auto', 'xla', 'pallas_tpu'\)"):
    kernels.resolve_impl("pallas", "tpu")
  with pytest.raises(ValueError, match="'triton' is not one of"):
    kernels.attention_fn("triton")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="'pallas_tpu' does not run on backend 'gpu'"):
    kernels.attention_fn("pallas_tpu")
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="'cudnn' does not run on backend 'tpu'"):
    AAConv(features=8, num_heads=2, min_key_depth_per_head=2, attention_impl="cudnn").init(
        jax.random.key(0), jnp.zeros((1, 3, 3, 4)))
  with pytest.raises(NotImplementedError, match="interpret=True"):
    relative_attention.resolve_interpret(None)
  assert relative_attention.resolve_interpret(True) is True
  assert tpu_attention.resolve_interpret(None) is False  # compiled on TPU


def test_registry_functions_return_weights_and_remat():
  args = random_inputs(4, height=2, width=3)
  want_out, want_weights = attention.multihead_attention_2d(*args, return_weights=True)
  # Every non-XLA implementation gets its weights from the same wrapper; cuDNN's CPU fallback
  # is the cheapest to run it through.
  out, weights = jax.jit(lambda *a: kernels.attention_fn("cudnn", remat=True)(
      *a, relative_method="skew", return_weights=True))(*args)
  np.testing.assert_allclose(out, want_out, atol=2e-5)
  np.testing.assert_allclose(weights, want_weights, atol=1e-6)
  assert_matches_xla(kernels.attention_fn("pallas", remat=True), args)


@pytest.mark.parametrize("impl", ["pallas", "cudnn", "pallas_tpu"])
def test_every_implementation_applies_the_shared_input_check(impl):
  q, k, v, rel_h, rel_w = random_inputs(8, height=3, width=5)
  fn = kernels.IMPLEMENTATIONS[impl].fn
  with pytest.raises(ValueError, match="'diagonal' is not one of"):
    fn(q, k, v, rel_h, rel_w, relative_method="diagonal")
  with pytest.raises(ValueError, match="both rel_h and rel_w"):
    fn(q, k, v, rel_h, None)
  with pytest.raises(ValueError, match=r"rel_h \[2H-1, d\] = \(5, 4\) and rel_w"):
    fn(q, k, v, rel_w, rel_h)
  with pytest.raises(ValueError, match="q, k, v must be"):
    fn(q, k[:, :, :2], v, rel_h, rel_w)


# ------------------------------------------------------------------ layers and models


AACONV_SETTINGS = dict(features=16, key_ratio=0.5, value_ratio=0.5, num_heads=2,
                       min_key_depth_per_head=4)


def aaconv_loss_and_grads(impl, params, x):
  layer = AAConv(**AACONV_SETTINGS, attention_impl=impl)
  return jax.jit(jax.value_and_grad(
      lambda p: jnp.sum(jnp.sin(layer.apply({"params": p}, x)))))(params)


@pytest.fixture(scope="module")
def aaconv_xla():
  """Input, parameters and the XLA path's loss and gradients, shared by the kernel cases."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 8))
  layer = AAConv(**AACONV_SETTINGS, attention_impl="xla")
  params = jax.jit(layer.init)(jax.random.key(1), x)["params"]
  return x, params, aaconv_loss_and_grads("xla", params, x)


@pytest.mark.parametrize("impl", ["pallas", "pallas_tpu"])
def test_aaconv_with_kernel_matches_xla(impl, aaconv_xla):
  """AAConv's ``attention_impl``: same outputs and parameter gradients as ``"xla"``."""
  x, params, (want_loss, want) = aaconv_xla
  got_loss, got = aaconv_loss_and_grads(impl, params, x)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_aa_resnet_tiny_train_step_on_tpu_path_equals_xla():
  """One SGD step of aa_resnet_tiny (attention at 4x6 and 2x3) in TPU interpret mode."""
  images = jax.random.normal(jax.random.key(0), (2, 8, 12, 3))
  labels = jnp.array([0, 2])
  tx = optax.sgd(0.1, momentum=0.9)
  # The implementation does not change the variables; init runs the forward pass, which on
  # the TPU path is interpreted, so both steps start from the XLA model's init.
  xla_model = create_model("aa_resnet_tiny", 3, attention_impl="xla")
  variables = jax.jit(lambda x: xla_model.init(jax.random.key(1), x, train=False))(images)

  def train_step(impl):
    model = create_model("aa_resnet_tiny", 3, attention_impl=impl)

    @jax.jit
    def step(variables):
      def loss_fn(params):
        logits, state = model.apply({**variables, "params": params}, images, train=True,
                                    mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, state["batch_stats"]
      (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
      updates, _ = tx.update(grads, tx.init(variables["params"]), variables["params"])
      return loss, optax.apply_updates(variables["params"], updates), stats

    return step(variables)

  want, got = train_step("xla"), train_step("pallas_tpu")
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[1:]),
                          jax.tree.leaves(want[1:])):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------ what "auto" picks per layer

# AA-ResNet-50's attention maps (d_k^h = 20) and the depth the fused kernels see there.
RESNET50_MAPS = {size: (size * size, 20 + 2 * size) for size in (7, 14, 28, 56)}


@pytest.mark.parametrize("backend,dtype,expected", [
    ("tpu", jnp.bfloat16, ["xla", "pallas_tpu", "pallas_tpu", "pallas_tpu"]),
    ("tpu", jnp.float32, ["xla", "pallas_tpu", "pallas_tpu", "pallas_tpu"]),
    # 56x56: depth 20 + 112 = 132, over what cuDNN runs on every GPU (128): the Triton kernel.
    ("gpu", jnp.bfloat16, ["xla", "cudnn", "cudnn", "pallas"]),
    ("gpu", jnp.float32, ["xla", "pallas", "pallas", "pallas"]),
    ("cpu", jnp.bfloat16, ["xla"] * 4),
])
def test_auto_picks_per_layer_at_7_14_28_and_56(backend, dtype, expected):
  assert [kernels.auto_impl(backend, length, depth, dtype)
          for length, depth in RESNET50_MAPS.values()] == expected


def test_crossover_is_where_the_byte_model_turns():
  """The crossover lengths follow from the byte model: from them on the fused path moves no
  more bytes than the XLA path, one position shorter it moves more."""
  assert kernels.CROSSOVER_LENGTH == {"tpu": 182, "gpu": 160}
  for backend, length in kernels.CROSSOVER_LENGTH.items():
    fused = lambda n: kernels.fused_bytes(backend, n, kernels.REFERENCE_DEPTH)  # noqa: E731
    assert fused(length - 1) > kernels.xla_bytes(length - 1)
    assert all(fused(n) <= kernels.xla_bytes(n) for n in range(length, 64 * 64 + 1))
    assert kernels.auto_impl(backend, length - 1, 40, jnp.bfloat16) == "xla"
    assert kernels.auto_impl(backend, length, 40, jnp.bfloat16) != "xla"
  # TPU padding waste: 49 positions fill 128-row blocks of 128-lane depth.
  assert kernels.fused_bytes("tpu", 49, 34) == (6 + 12) * 128 * 128 * 2
  assert kernels.xla_bytes(49) == 12 * 4 * 49 * 49


def test_auto_resolves_per_layer_in_aa_resnet50_on_tpu(monkeypatch):
  """Traced as on a TPU host: the 14x14 layers take the fused path, the 7x7 ones XLA."""
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  model = create_model("aa_resnet50", 10, dtype=jnp.bfloat16, attention_impl="auto")
  with layers.recorded_attention_paths() as paths:
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)),
                                      train=False))
  assert layers.attention_paths_by_stage(paths) == (
      "stage2: 14x14 pallas_tpu x4; stage3: 14x14 pallas_tpu x6; stage4: 7x7 xla x3")


# ------------------------------------------------------------------ saying what runs


@pytest.fixture
def notices_log(caplog):
  """Warnings logged through absl, with the once-per-process memory cleared before and after."""
  notices.say_once.cache_clear()
  with caplog.at_level(logging.WARNING, logger="absl"):
    yield caplog
  notices.say_once.cache_clear()


def test_interpret_mode_on_cpu_is_said_once(notices_log):
  args = random_inputs(3, height=2, width=3)
  for impl in ("pallas", "pallas", "pallas_tpu", "pallas_tpu"):
    jax.eval_shape(kernels.attention_fn(impl), *args)
  messages = [r.getMessage() for r in notices_log.records]
  assert len(messages) == 2
  assert messages[0].startswith("attention_impl='pallas' on backend 'cpu' runs the Pallas "
                                "kernels in interpret mode")
  assert messages[1].startswith("attention_impl='pallas_tpu' on backend 'cpu' runs the "
                                "Pallas TPU kernels in TPU interpret mode")
  jax.eval_shape(kernels.attention_fn("xla"), *args)
  jax.eval_shape(kernels.attention_fn("auto", length=6, depth=9, dtype=jnp.float32), *args)
  assert len(notices_log.records) == 2  # what runs is what was asked: nothing to say


def test_cudnn_fallback_says_which_path_runs_and_why(notices_log, monkeypatch):
  args = random_inputs(5, height=2, width=3)
  for _ in range(2):
    jax.eval_shape(kernels.attention_fn("cudnn"), *args)
  assert [r.getMessage() for r in notices_log.records] == [
      "attention_impl='cudnn' runs the XLA path (float32 logits and softmax, [B, N, HW, HW] "
      "in memory) instead of cuDNN: backend 'cpu' has no cuDNN."]
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert augmented_attention.cudnn_unsupported(jnp.float32, 30) == (
      "cuDNN runs bfloat16/float16, not float32")


# ------------------------------------------------------------------ the whole train step lowers


def lowered_train_step(monkeypatch, impl: str, backend: str, platform: str,
                       devices: int = 1) -> str:
  """StableHLO of ``trainer.make_train_step`` for aa_resnet50 (bf16, 224 px, 2 images per
  device), jitted as a run jits it on a mesh of ``devices``, traced as on a ``backend`` host
  and lowered for ``platform``."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  model = create_model("aa_resnet50", 1000, dtype=jnp.bfloat16, attention_impl=impl)
  tx = optax.sgd(0.1, momentum=0.9)

  def init_state(key):
    variables = model.init(key, jnp.zeros((1, 224, 224, 3), jnp.bfloat16), train=False)
    return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                              batch_stats=variables["batch_stats"],
                              opt_state=tx.init(variables["params"]))

  state = jax.eval_shape(init_state, jax.random.key(0))
  mesh = parallel.create_mesh(jax.devices()[:devices])
  step = trainer.jit_train_step(
      trainer.make_train_step(model, tx, optax.constant_schedule(0.1), mean=(0.5,) * 3,
                              std=(0.25,) * 3, dtype=jnp.bfloat16, label_smoothing=0.0, seed=0,
                              skip_nonfinite=True),
      jax.tree.map(lambda _: parallel.replicated(mesh), state), mesh)
  batch = 2 * devices
  images = jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.uint8)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return step.trace(state, {"image": images, "label": labels}).lower(
      lowering_platforms=(platform,)).as_text()


def test_aa_resnet50_train_step_lowers_for_tpu_with_mosaic_kernels(monkeypatch):
  hlo = lowered_train_step(monkeypatch, "pallas_tpu", "tpu", "tpu")
  # Forward and both backward kernels, at both map sizes (14x14 and 7x7) of the 13 layers.
  assert set(re.findall(r'kernel_name = "(\w+)"', hlo)) == {
      "_flash_attention_kernel", "_flash_attention_dq_kernel", "_flash_attention_dkv_kernel"}
  assert hlo.count("stablehlo.custom_call @tpu_custom_call") == 6


def kernel_batches(hlo: str) -> list[int]:
  """The batch each fused kernel call (Mosaic or Triton) of lowered ``hlo`` works on: the
  leading dimension of its first operand."""
  return [int(batch) for batch in re.findall(
      r"custom_call @(?:tpu_custom_call|__gpu\$xla\.gpu\.triton)\(.*\} : \(tensor<(\d+)x", hlo)]


@pytest.mark.parametrize("impl,backend,platform,calls", [
    ("pallas_tpu", "tpu", "tpu", 6), ("pallas", "gpu", "cuda", 39),
    ("auto", "tpu", "tpu", 3)])  # "auto" on TPU: the fused path at 14x14 only
def test_train_step_with_the_batch_sharded_runs_the_kernels_per_device(monkeypatch, impl,
                                                                       backend, platform, calls):
  """Batch 4 sharded over 2 devices: every kernel call, forward and backward, runs on one
  device's 2 examples (jax refuses Mosaic kernels outside a shard_map)."""
  hlo = lowered_train_step(monkeypatch, impl, backend, platform, devices=2)
  assert kernel_batches(hlo) == [2] * calls


def test_aa_resnet50_train_step_lowers_for_cuda_with_triton_kernels(monkeypatch):
  hlo = lowered_train_step(monkeypatch, "pallas", "gpu", "cuda")
  for name in ("forward", "dq", "dkdv"):  # one call per augmented layer each
    assert hlo.count(f'name = "relative_attention_2d_{name}"') == 13


def test_eval_step_and_one_image_on_a_mesh_lower_for_tpu(monkeypatch):
  """On 2 devices: the run's eval step (batch 4) runs the Mosaic kernels on each device's 2
  examples; one replicated image (which 2 devices cannot split) runs whole on every device.
  (A model's init needs neither: its forward pass is dead code, dropped before lowering.)"""
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  model = create_model("aa_resnet_tiny", 3, attention_impl="pallas_tpu")
  mesh = parallel.create_mesh(jax.devices()[:2])
  replicated = parallel.replicated(mesh)

  def init(key):
    variables = model.init(key, jnp.zeros((1, 8, 12, 3)), train=False)
    return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                              batch_stats=variables["batch_stats"], opt_state=())

  state = jax.eval_shape(init, jax.random.key(0))
  eval_step = trainer.jit_eval_step(
      trainer.make_eval_step(model, mean=(0.5,) * 3, std=(0.25,) * 3, dtype=jnp.float32),
      jax.tree.map(lambda _: replicated, state), mesh)
  batch = {"image": jax.ShapeDtypeStruct((4, 8, 12, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((4,), jnp.int32),
           "mask": jax.ShapeDtypeStruct((4,), jnp.float32)}
  eval_hlo = eval_step.trace(state, batch).lower(lowering_platforms=("tpu",)).as_text()
  assert kernel_batches(eval_hlo) and set(kernel_batches(eval_hlo)) == {2}

  predict = jax.jit(parallel.traced_on(mesh, lambda s, x: model.apply(
      {"params": s.params, "batch_stats": s.batch_stats}, x, train=False)),
      in_shardings=(jax.tree.map(lambda _: replicated, state), replicated))
  one_image = jax.ShapeDtypeStruct((1, 8, 12, 3), jnp.float32)
  one_hlo = predict.trace(state, one_image).lower(lowering_platforms=("tpu",)).as_text()
  assert kernel_batches(one_hlo) and set(kernel_batches(one_hlo)) == {1}


# ------------------------------------------------------------------ on a mesh of several devices


def pallas_call_batches(jaxpr) -> list[int]:
  """The leading dimension of the first operand of every ``pallas_call`` in ``jaxpr`` and its
  sub-jaxprs (jit, shard_map, custom VJPs): the batch each kernel call works on."""
  batches = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      batches.append(eqn.invars[0].aval.shape[0])
      continue
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
          batches += pallas_call_batches(getattr(sub, "jaxpr", sub))
  return batches


@pytest.mark.parametrize("impl", ["pallas", "pallas_tpu"])
@pytest.mark.parametrize("batch,per_device", [(4, 1), (2, 2)])
def test_kernels_on_a_mesh_run_per_device_and_match_one_device_and_xla(impl, batch,
                                                                       per_device):
  """On a mesh of 4 (simulated) devices, in interpret mode: a batch of 4 runs one example per
  device, a batch of 2 (which 4 devices cannot split) whole on every device; outputs and the
  gradients of q, k, v and both tables equal the run without a mesh and the XLA path."""
  mesh = parallel.create_mesh(jax.devices()[:4])
  args = random_inputs(30 + batch, batch=batch, heads=3, height=3, width=5)
  sharding = parallel.batch_sharded(mesh) if batch % 4 == 0 else parallel.replicated(mesh)
  fn = kernels.IMPLEMENTATIONS[impl].fn
  on_mesh = jax.jit(parallel.traced_on(mesh, outputs_and_grads(fn)),
                    in_shardings=(sharding,) * 3 + (parallel.replicated(mesh),) * 2)
  assert set(pallas_call_batches(jax.make_jaxpr(on_mesh)(*args).jaxpr)) == {per_device}
  assert set(pallas_call_batches(jax.make_jaxpr(outputs_and_grads(fn))(*args).jaxpr)) == {batch}
  got_out, got = on_mesh(*args)
  for (want_out, want), atol in ((outputs_and_grads(fn)(*args), 1e-5),
                                 (xla_outputs_and_grads(*args), 1e-4)):
    np.testing.assert_allclose(got_out, want_out, atol=atol, rtol=atol)
    for name, g, w in zip(GRADIENT_NAMES, got, want):
      np.testing.assert_allclose(g, w, atol=atol, rtol=atol, err_msg=name)


@pytest.mark.parametrize("impl", ["pallas", "pallas_tpu"])
def test_kernels_inside_a_shard_map_run_as_they_are(impl):
  """Inside the caller's own shard_map over the mesh (batch 16 on 4 devices) the kernels run
  on the 4 examples each device is given (not split again), with the outputs of the run
  without a mesh."""
  mesh = parallel.create_mesh(jax.devices()[:4])
  args = random_inputs(40, batch=16, heads=1, height=3, width=5)
  fn = kernels.IMPLEMENTATIONS[impl].fn
  data, whole = PartitionSpec(parallel.DATA_AXIS), PartitionSpec()
  mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(data,) * 3 + (whole,) * 2,
                                 out_specs=data, check_vma=False))
  assert set(pallas_call_batches(jax.make_jaxpr(mapped)(*args).jaxpr)) == {4}
  np.testing.assert_allclose(mapped(*args), fn(*args), atol=1e-6, rtol=1e-6)

def test_mesh_in_context_leaves_the_xla_path_train_step_unchanged():
  """``trainer.jit_train_step`` traces with the mesh in context; on the XLA path that lowers
  to the program a plain jit with the same shardings lowers to."""
  model = create_model("aa_resnet_tiny", 3, attention_impl="xla")
  tx = optax.sgd(0.1, momentum=0.9)

  def init_state(key):
    variables = model.init(key, jnp.zeros((1, 8, 12, 3)), train=False)
    return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                              batch_stats=variables["batch_stats"],
                              opt_state=tx.init(variables["params"]))

  state = jax.eval_shape(init_state, jax.random.key(0))
  mesh = parallel.create_mesh(jax.devices()[:4])
  step = trainer.make_train_step(model, tx, optax.constant_schedule(0.1), mean=(0.5,) * 3,
                                 std=(0.25,) * 3, dtype=jnp.float32, label_smoothing=0.0,
                                 seed=0, skip_nonfinite=True)
  sharding = jax.tree.map(lambda _: parallel.replicated(mesh), state)
  batch = {"image": jax.ShapeDtypeStruct((8, 8, 12, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((8,), jnp.int32)}
  plain = jax.jit(step, in_shardings=(sharding, parallel.batch_sharded(mesh)),
                  out_shardings=(sharding, parallel.replicated(mesh)), donate_argnums=0)
  lowered = [jitted.trace(state, batch).lower().as_text(debug_info=False)
             for jitted in (trainer.jit_train_step(step, sharding, mesh), plain)]
  assert lowered[0] == lowered[1]


def test_aa_resnet_tiny_train_step_on_2_devices_with_tpu_path_equals_xla():
  """``trainer.jit_train_step`` on 2 devices, batch 4 (two images each), the TPU kernels in
  interpret mode, each device on its 2 images: the loss, updated parameters and batch
  statistics of the XLA path."""
  mesh = parallel.create_mesh(jax.devices()[:2])
  batch = parallel.global_batch(
      {"image": np.asarray(jax.random.randint(jax.random.key(0), (4, 8, 12, 3), 0, 256),
                           np.uint8),
       "label": np.array([0, 2, 1, 2], np.int32)}, mesh)
  tx = optax.sgd(0.1, momentum=0.9)
  xla_model = create_model("aa_resnet_tiny", 3, attention_impl="xla")
  variables = jax.jit(lambda x: xla_model.init(jax.random.key(1), x, train=False))(
      jnp.zeros((1, 8, 12, 3)))
  state = jax.device_get(trainer.TrainState(  # on the host: each step donates its own copy
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"])))
  sharding = jax.tree.map(lambda _: parallel.replicated(mesh), state)

  def train_step(impl):
    step = trainer.make_train_step(
        create_model("aa_resnet_tiny", 3, attention_impl=impl), tx, optax.constant_schedule(0.1),
        mean=(127.0,) * 3, std=(64.0,) * 3, dtype=jnp.float32, label_smoothing=0.0, seed=0,
        skip_nonfinite=False)
    jitted = trainer.jit_train_step(step, sharding, mesh)
    call_batches = pallas_call_batches(jax.make_jaxpr(jitted)(state, batch).jaxpr)
    new_state, metrics = jitted(jax.device_put(state, sharding), batch)
    return call_batches, (metrics["loss"], new_state.params, new_state.batch_stats)

  (xla_calls, want), (tpu_calls, got) = train_step("xla"), train_step("pallas_tpu")
  assert not xla_calls and tpu_calls and set(tpu_calls) == {2}
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[1:]),
                          jax.tree.leaves(want[1:])):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))

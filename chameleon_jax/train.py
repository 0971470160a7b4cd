"""Fine-tuning: the loss, a sharded optax train step, and a training loop with exact resume.

Pieces (all usable on their own):

- :func:`resolve_labels`, :func:`loss_sums`, :func:`model_loss`: transformers' causal-LM loss
  convention (labels shifted inside, -100 ignored, mean over the remaining tokens), plus a
  loss-mask choice (``loss_on``), optional z-loss, and ``image_targets``: by default image-token
  logits are masked exactly as transformers' forward masks them; with ``image_targets=True`` they
  are not, and ``<image>`` placeholder labels become the real image tokens (trainable targets).
- :class:`TrainConfig`: the JSON training config (unknown keys are errors).
- :class:`Trainer`: params / grads / optimizer state sharded alike over a (data, fsdp, tensor)
  mesh, AdamW with warmup + cosine decay, global-norm clipping, gradient accumulation (a scan over
  microbatches, normalized by the step's total target count, so it equals one big batch), remat,
  fp32 master params with ``compute_dtype`` matmuls, frozen VQ-VAE (images become tokens in the
  data path, before the differentiated step), full fine-tuning or LoRA (:mod:`.lora`), Orbax
  checkpoints (state + data position) with keep-last-N, metrics JSONL.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from . import lora as lora_lib
from .data import IGNORE_INDEX
from .errors import ChameleonError
from .model import Chameleon, causal_mask, default_positions
from .sharding import to_host

LOSS_ON = ("all", "text", "image")


# ------------------------------------------------------------------ loss
def _image_table(vocab, vocab_size: int) -> np.ndarray:
    """bool [V]: ids that are image tokens (IMGIMG codes and the <image> placeholder)."""
    table = np.zeros((vocab_size,), bool)
    ids = vocab.image_token_ids
    table[ids[ids < vocab_size]] = True
    if vocab.image_token_id is not None and vocab.image_token_id < vocab_size:
        table[vocab.image_token_id] = True
    return table


def resolve_labels(labels, input_ids, config, *, image_targets: bool = False, loss_on: str = "all"):
    """Labels as the loss uses them (same shape, unshifted).

    ``input_ids`` holds the real image tokens (placeholders already replaced). With
    ``image_targets`` a label equal to the ``<image>`` placeholder becomes the image token at that
    position. ``loss_on``: "all" keeps every label, "text" ignores image-token labels (codes and
    placeholders), "image" keeps only those. The image delimiters (boi, eoi) count as text: the
    model still learns where an image starts and ends.
    """
    if loss_on not in LOSS_ON:
        raise ChameleonError(f"loss_on: expected one of {list(LOSS_ON)}, got {loss_on!r}")
    vocab = config.image_vocab
    if image_targets and vocab.image_token_id is not None:
        labels = jnp.where(labels == vocab.image_token_id, input_ids, labels)
    if loss_on != "all":
        table = jnp.asarray(_image_table(vocab, config.vocab_size))
        is_image = table[jnp.clip(labels, 0, config.vocab_size - 1)]
        is_image &= labels >= 0
        labels = jnp.where(is_image if loss_on == "text" else ~is_image, IGNORE_INDEX, labels)
    return labels


def shifted_targets(labels):
    """labels [B, T] -> the target of each position [B, T] (next label; -100 at the end)."""
    pad = jnp.full(labels.shape[:-1] + (1,), IGNORE_INDEX, labels.dtype)
    return jnp.concatenate([labels[..., 1:], pad], axis=-1)


def loss_sums(logits, labels):
    """(sum of token NLL, sum of logsumexp^2, number of targets) over non-ignored shifted labels.

    logits [B, T, V] fp32; labels [B, T] unshifted (position t's logits predict labels[t + 1]).
    """
    targets = shifted_targets(labels)
    valid = targets != IGNORE_INDEX
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, lse - picked, 0.0)
    z = jnp.where(valid, lse * lse, 0.0)
    return nll.sum(), z.sum(), valid.sum()


def forward_loss_sums(module, params, input_ids, labels, attention_mask, positions=None, *,
                      image_targets=False):
    """Forward over image-merged ``input_ids`` with already resolved labels -> loss_sums."""
    if positions is None:
        positions = default_positions(attention_mask)
    logits, _ = module.apply(
        {"params": params}, input_ids, positions, causal_mask(attention_mask),
        suppress_image_tokens=not image_targets,
    )
    return loss_sums(logits, labels)


def model_loss(module, params, input_ids, labels, attention_mask, positions=None, pixel_values=None, *,
               loss_mask=None, loss_on: str = "all", image_targets: bool = False, z_loss: float = 0.0):
    """Mean loss over non-ignored tokens (+ ``z_loss * mean(logsumexp^2)``), and its parts.

    ``input_ids`` hold ``<image>`` placeholders; ``pixel_values`` (with ``params`` holding the
    VQ-VAE) become the image tokens, under stop_gradient. ``loss_mask`` [B, T]: 0 drops that label.
    Returns (loss, {"nll": mean CE, "z": mean lse^2, "count": targets}). Traceable (jit / grad).
    """
    merged = input_ids
    if pixel_values is not None:
        image_ids = module.apply({"params": params}, pixel_values, method=Chameleon.image_tokens)
        image_ids = jax.lax.stop_gradient(image_ids)
        merged = module.apply({"params": params}, input_ids, image_ids, method=Chameleon.merge_image_tokens)
    labels = resolve_labels(labels, merged, module.config, image_targets=image_targets, loss_on=loss_on)
    if loss_mask is not None:
        labels = jnp.where(loss_mask > 0, labels, IGNORE_INDEX)
    nll, z, count = forward_loss_sums(module, params, merged, labels, attention_mask, positions,
                                      image_targets=image_targets)
    n = jnp.maximum(count, 1).astype(jnp.float32)
    return (nll + z_loss * z) / n, {"nll": nll / n, "z": z / n, "count": count}


# ------------------------------------------------------------------ config
_MESH_KEYS = ("data", "fsdp", "tensor")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the JSON config's keys are these field names (see configs/train-*.json).

    Paths are relative to the working directory. ``demo``: build a tiny model, tokenizer and
    dataset under ``output_dir/demo-assets`` and use them where model/tokenizer/data are unset.
    Keys starting with ``_`` are comments; any other unknown key is an error.
    """

    model: str | None = None  # HF or converted checkpoint directory
    tokenizer: str | None = None  # default: the model directory
    data: str | None = None  # JSONL file (data.py)
    output_dir: str = "runs/train"
    demo: bool = False
    # data
    max_length: int = 4096
    buckets: tuple[int, ...] | None = None
    truncate: bool = False
    skip_bad_lines: bool = False
    append_eos: bool = True
    length_grouping: int = 0
    image_normalization: str = "hf"
    # batch / schedule
    batch_size: int = 8  # global, per microbatch
    grad_accum: int = 1
    steps: int = 1000
    seed: int = 0
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    end_lr_ratio: float = 0.1  # cosine decays to learning_rate * end_lr_ratio at `steps`
    weight_decay: float = 0.0  # decoupled (AdamW); matrices only, not norms or biases
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    # numerics / parallelism
    compute_dtype: str = "float32"  # matmul dtype; master params stay float32
    base_dtype: str = "float32"  # LoRA only: dtype of the frozen base params
    remat: str = "none"  # none | full | dots | dots_no_batch (model.decoder.REMAT_POLICIES)
    mesh: Mapping[str, int] = field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    # loss
    loss_on: str = "auto"  # all | text | image | auto (text, or all with train_image_tokens)
    train_image_tokens: bool = False
    z_loss: float = 0.0
    # LoRA (None: full fine-tuning)
    lora: lora_lib.LoraConfig | None = None
    # checkpoints / logs
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: bool = True
    log_every: int = 10
    metrics_file: str | None = None  # default output_dir/metrics.jsonl
    export_final: bool = False  # write output_dir/final (HF layout, LoRA merged) at the last step

    def __post_init__(self):
        from .model.decoder import REMAT_POLICIES

        def bad(key, msg):
            raise ChameleonError(f"train config: {key}: {msg}")

        for key in ("batch_size", "grad_accum", "steps", "max_length", "checkpoint_every", "keep_checkpoints",
                    "log_every"):
            if getattr(self, key) < 1:
                bad(key, f"expected an integer >= 1, got {getattr(self, key)!r}")
        if self.remat not in REMAT_POLICIES:
            bad("remat", f"expected one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        for key in ("compute_dtype", "base_dtype"):
            if getattr(self, key) not in ("float32", "bfloat16"):
                bad(key, f"expected 'float32' or 'bfloat16', got {getattr(self, key)!r}")
        if self.loss_on not in LOSS_ON + ("auto",):
            bad("loss_on", f"expected one of {list(LOSS_ON) + ['auto']}, got {self.loss_on!r}")
        if self.image_normalization not in ("hf", "meta"):
            bad("image_normalization", f"expected 'hf' or 'meta', got {self.image_normalization!r}")
        unknown = sorted(set(self.mesh) - set(_MESH_KEYS))
        if unknown:
            bad("mesh", f"unknown axis {unknown}; expected some of {list(_MESH_KEYS)}")
        if self.warmup_steps < 0 or self.learning_rate <= 0:
            bad("learning_rate/warmup_steps", "learning_rate must be > 0 and warmup_steps >= 0")
        if not self.demo and (self.model is None or self.data is None):
            bad("model/data", "both are required (or set demo=true)")

    @property
    def effective_loss_on(self) -> str:
        if self.loss_on != "auto":
            return self.loss_on
        return "all" if self.train_image_tokens else "text"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "train config") -> "TrainConfig":
        if not isinstance(d, Mapping):
            raise ChameleonError(f"{source}: expected a JSON object, got {type(d).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if not k.startswith("_")}  # "_comment" keys
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ChameleonError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
        kw = {}
        for key, value in d.items():
            default = fields[key].default
            if key == "lora":
                kw[key] = None if value is None else lora_lib.LoraConfig.from_dict(value, f"{source}: lora")
            elif key == "mesh":
                if not isinstance(value, Mapping) or not all(isinstance(v, int) for v in value.values()):
                    raise ChameleonError(
                        f'{source}: mesh: expected {{"data": 1, "fsdp": -1, "tensor": 1}}, got {value!r}')
                kw[key] = {**{"data": 1, "fsdp": 1, "tensor": 1}, **value}
            elif key == "buckets":
                ok = value is None or (isinstance(value, list) and all(isinstance(b, int) for b in value))
                if not ok:
                    raise ChameleonError(f"{source}: buckets: expected a list of lengths, got {value!r}")
                kw[key] = None if value is None else tuple(value)
            else:
                kw[key] = _check_type(key, value, default, source)
        try:
            return cls(**kw)
        except TypeError as e:
            raise ChameleonError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str, overrides=()) -> "TrainConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except OSError as e:
            raise ChameleonError(f"{path}: cannot read train config ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ChameleonError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(apply_overrides(d, overrides), source=path)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"] = None if self.lora is None else self.lora.to_dict()
        d["mesh"] = dict(self.mesh)
        d["buckets"] = None if self.buckets is None else list(self.buckets)
        return d


def _check_type(key, value, default, source):
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:  # str or None
        ok = value is None or isinstance(value, str)
    if not ok:
        want = type(default).__name__ if default is not None else "a string"
        raise ChameleonError(f"{source}: {key}: expected {want}, got {value!r}")
    return value


def apply_overrides(d: dict, overrides) -> dict:
    """``["lr=1e-4", "lora.rank=4", "mesh.fsdp=8"]`` applied to a config dict (values parsed as JSON,
    else kept as strings)."""
    d = json.loads(json.dumps(d))
    for item in overrides:
        if "=" not in item:
            raise ChameleonError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node, parts = d, key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return d


# ------------------------------------------------------------------ optimizer
def lr_schedule(tc: TrainConfig) -> Callable:
    """Linear warmup from 0 to learning_rate, then cosine to learning_rate * end_lr_ratio at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, tc.warmup_steps, max(tc.steps, tc.warmup_steps + 1),
        tc.learning_rate * tc.end_lr_ratio)


def _decay_mask(params):
    def decays(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        return x.ndim >= 2 and not any("norm" in n for n in names) and names[-1] != "bias"

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    tx = optax.adamw(lr_schedule(tc), tc.adam_b1, tc.adam_b2, tc.adam_eps, weight_decay=tc.weight_decay,
                     mask=_decay_mask)
    if tc.max_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(tc.max_grad_norm), tx)
    return tx


# ------------------------------------------------------------------ sharding helpers
def _tree(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def _gather_spec(spec: P) -> P:
    """The spec with the fsdp axis removed (FSDP: weights are all-gathered for compute)."""
    out = []
    for s in spec:
        axes = (s,) if isinstance(s, str) else tuple(s or ())
        axes = tuple(a for a in axes if a != "fsdp")
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def build_mesh(spec: Mapping[str, int]):
    from .sharding import make_mesh

    sizes = [int(spec.get(k, 1)) for k in _MESH_KEYS]
    devices = jax.devices()
    if -1 not in sizes:
        n = math.prod(sizes)
        if n > len(devices):
            raise ChameleonError(
                f"train config: mesh {dict(spec)} needs {n} devices, {len(devices)} available")
        devices = devices[:n]
    return make_mesh(*sizes, devices=devices)


# ------------------------------------------------------------------ step
def make_train_step(module, tx, tc: TrainConfig, shardings: dict, frozen_shardings, mesh, lora_config=None):
    """The pure train step ``(state, frozen, batch) -> (state, metrics)``, jitted with the state's
    shardings (donated). ``batch``: input_ids (image tokens merged), labels, attention_mask, all
    [A, B, T]. With LoRA, ``state["params"]`` are the adapters and ``frozen`` the base.
    ``shardings``: the state's (:func:`state_shardings`)."""
    config = module.config
    loss_on, image_targets, zc = tc.effective_loss_on, tc.train_image_tokens, tc.z_loss
    schedule = lr_schedule(tc)
    full_shardings = frozen_shardings if lora_config is not None else shardings["params"]
    gather = mesh.shape["fsdp"] > 1
    replicated = NamedSharding(mesh, P())

    def combine(params, frozen):
        if lora_config is not None:
            full = lora_lib.apply(frozen, params, lora_config)
        else:
            full = {**frozen, **params}
        if gather:
            full = jax.tree.map(
                lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _gather_spec(s.spec))),
                full, full_shardings)
        return full

    def micro_loss(params, frozen, mb, denom):
        nll, z, count = forward_loss_sums(module, combine(params, frozen), mb["input_ids"], mb["labels"],
                                          mb["attention_mask"], image_targets=image_targets)
        return (nll + zc * z) / denom, (nll, z)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state, frozen, batch):
        labels = resolve_labels(batch["labels"], batch["input_ids"], config, image_targets=image_targets,
                                loss_on=loss_on)
        count = (shifted_targets(labels) != IGNORE_INDEX).sum()
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        batch = {**batch, "labels": labels}
        params = state["params"]
        if batch["input_ids"].shape[0] == 1:
            grads, (nll, z) = grad_fn(params, frozen, jax.tree.map(lambda x: x[0], batch), denom)
        else:
            def body(carry, mb):
                g_acc, nll_acc, z_acc = carry
                g, (nll, z) = grad_fn(params, frozen, mb, denom)
                return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, z_acc + z), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            (grads, nll, z), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), batch)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # No op of the model draws randomness yet (no dropout); the key still advances every step and
        # is checkpointed, so stochastic additions resume exactly too.
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state["rng"]))[0])
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": rng}
        metrics = {"loss": nll / denom, "z_loss": z / denom, "grad_norm": grad_norm,
                   "lr": schedule(state["step"]), "targets": count, "tokens": batch["attention_mask"].sum()}
        return new_state, metrics

    return jax.jit(step, out_shardings=(shardings, replicated), donate_argnums=(0,))


def state_shardings(tx, abstract_params, param_shardings, mesh) -> dict:
    """Shardings of the train state; each optimizer moment takes its param's sharding."""
    replicated = NamedSharding(mesh, P())
    opt = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), param_shardings,
                                transform_non_params=lambda _: replicated)
    return {"step": replicated, "params": param_shardings, "opt_state": opt, "rng": replicated}


# ------------------------------------------------------------------ trainer
# TrainConfig fields the jitted step depends on (the rest: paths, data, logging, checkpoints).
_STEP_KEYS = frozenset({"compute_dtype", "base_dtype", "remat", "loss_on", "train_image_tokens", "z_loss",
                        "lora", "learning_rate", "warmup_steps", "end_lr_ratio", "steps", "weight_decay",
                        "adam_b1", "adam_b2", "adam_eps", "max_grad_norm"})
_STEP_CACHE: dict = {}


@functools.lru_cache(maxsize=8)
def _vq_encoder(vq_config):
    """Jitted pixel_values [N, 3, H, W] -> VQ codes [N, h*w] (one per VQ config)."""
    from .model.vqvae import VQVAE

    module = VQVAE(vq_config)
    return jax.jit(lambda p, x: module.apply({"params": p}, x, method=VQVAE.encode))

class Trainer:
    """The fine-tuning loop of a :class:`TrainConfig` (see the module docstring).

    ``model`` (a :class:`chameleon_jax.ChameleonModel`) and ``processor`` may be given instead of
    loading ``tc.model`` / ``tc.tokenizer``; the model's params are copied, never donated.
    State: ``state`` = {"step", "params" (trainable: all but the VQ-VAE, or the LoRA adapters),
    "opt_state", "rng"}; ``frozen`` = the LoRA base params ({} for full fine-tuning).
    Checkpoints: ``output_dir/checkpoints/<step>/{state, meta}`` (Orbax CheckpointManager; each
    save is written to a temp dir and renamed, the last ``keep_checkpoints`` are kept); ``meta``
    holds the step, the data position and the config. A new Trainer on the same output_dir resumes
    from the latest one (``resume``).
    """

    def __init__(self, tc: TrainConfig, model=None, processor=None,
                 log: Callable[[str], None] | None = print):
        import orbax.checkpoint as ocp

        from .data import DataLoader, build_demo_assets, read_jsonl
        from .processing import ChameleonProcessor
        from .sharding import param_shardings

        self.tc, self.log = tc, log or (lambda _msg: None)
        self.is_main = jax.process_index() == 0
        paths = {"model": tc.model, "tokenizer": tc.tokenizer, "data": tc.data}
        if tc.demo:
            assets = build_demo_assets(os.path.join(tc.output_dir, "demo-assets"), seed=tc.seed)
            paths = {k: v or assets[k if k != "tokenizer" else "model"] for k, v in paths.items()}
        paths["tokenizer"] = paths["tokenizer"] or paths["model"]
        self.paths = paths
        self.mesh = mesh = build_mesh(tc.mesh)
        replicated = NamedSharding(mesh, P())

        # ---- model and params
        if model is None:
            from .api import load

            if paths["model"] is None:
                raise ChameleonError("train config: model is required")
            model = load(paths["model"], dtype=tc.base_dtype if tc.lora else "float32", mesh=mesh)
        self.config = config = model.config.replace(dtype=tc.compute_dtype)
        self.module = Chameleon(config, remat_policy=tc.remat)
        flat_sh = param_shardings(config, mesh)
        flat = traverse_util.flatten_dict(dict(model.params), sep="/")
        base_dtype = tc.base_dtype if tc.lora else "float32"
        # A jitted copy: new buffers in the right sharding and dtype (the caller's stay valid).
        copy = jax.jit(lambda t: jax.tree.map(lambda x: x.astype(base_dtype), t),
                       out_shardings={k: flat_sh[k] for k in flat if not k.startswith("vqmodel/")})
        base = _tree(copy({k: v for k, v in flat.items() if not k.startswith("vqmodel/")}))
        base_sh = _tree({k: v for k, v in flat_sh.items() if not k.startswith("vqmodel/")})
        vq = _tree({k[len("vqmodel/"):]: to_host(v) for k, v in flat.items()
                    if k.startswith("vqmodel/")})
        self.lora = tc.lora
        if tc.lora is not None:
            self.frozen, frozen_sh = base, base_sh
            adapters = lora_lib.init_adapters(tc.lora, base, jax.random.key(tc.lora.seed))
            param_sh = jax.tree.map(lambda _: replicated, adapters)
            trainable = jax.device_put(adapters, param_sh)
        else:
            self.frozen, frozen_sh = {}, {}
            trainable, param_sh = base, base_sh
        self.tx = make_optimizer(tc)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
        self.shardings = state_shardings(self.tx, abstract, param_sh, mesh)
        opt_state = jax.jit(self.tx.init, out_shardings=self.shardings["opt_state"])(trainable)
        self.state = {
            "step": jax.device_put(jnp.int32(0), replicated),
            "params": trainable,
            "opt_state": opt_state,
            "rng": jax.device_put(jax.random.key_data(jax.random.key(tc.seed)), replicated),
        }
        # Trainers with the same model config, mesh and step-relevant settings share one jitted step (and
        # its compiled programs), e.g. a resumed run in the same process or a notebook re-creating one.
        relevant = {k: v for k, v in tc.to_dict().items() if k in _STEP_KEYS}
        key = (config, mesh, json.dumps(relevant, sort_keys=True))
        if key not in _STEP_CACHE:
            while len(_STEP_CACHE) >= 4:  # bounded: each entry holds compiled programs
                _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
            _STEP_CACHE[key] = make_train_step(self.module, self.tx, tc, self.shardings, frozen_sh, mesh,
                                               tc.lora)
        self._step_fn = _STEP_CACHE[key]

        # ---- frozen VQ-VAE, on one local device: images -> tokens in the data path
        self._vq = None
        if vq and config.vq_config is not None:
            self._vq = jax.device_put(vq, jax.local_devices()[0])
            self._encode = _vq_encoder(config.vq_config)

        # ---- data
        self.processor = processor or ChameleonProcessor.from_pretrained(
            paths["tokenizer"], normalization=tc.image_normalization)
        if paths["data"] is None:
            raise ChameleonError("train config: data is required")
        self.dataset = read_jsonl(paths["data"], self.processor, max_length=tc.max_length,
                                  truncate=tc.truncate, skip_bad_lines=tc.skip_bad_lines,
                                  append_eos=tc.append_eos)
        self.loader = DataLoader(self.dataset, self.processor, batch_size=tc.batch_size,
                                 grad_accum=tc.grad_accum, seed=tc.seed, max_length=tc.max_length,
                                 buckets=tc.buckets,
                                 length_grouping=tc.length_grouping, process_index=jax.process_index(),
                                 process_count=jax.process_count())

        # ---- checkpoints
        self.step = 0
        self.history: list[dict] = []
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(tc.output_dir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints, create=True,
                                                 enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True),  # half-written saves
            item_names=("state", "meta"),
        )
        self.metrics_path = tc.metrics_file or os.path.join(tc.output_dir, "metrics.jsonl")
        if tc.resume and self.manager.latest_step() is not None:
            self.restore()

    # ------------------------------------------------------------------ batches
    def prepare(self, batch: dict) -> dict:
        """A host batch from the loader -> global device arrays, image placeholders replaced by the
        frozen VQ-VAE's tokens (computed here once per batch, never differentiated)."""
        ids = batch["input_ids"].copy()
        pixels = batch.get("pixel_values")
        if pixels is not None:
            if self._vq is None:
                raise ChameleonError("data: records hold images but the model has no VQ-VAE (vq_config)")
            n = len(pixels)
            padded = np.zeros((1 << (n - 1).bit_length(),) + pixels.shape[1:], np.float32)  # few compiles
            padded[:n] = pixels
            codes = np.asarray(self._encode(self._vq, padded))[:n]
            tokens = self.config.image_vocab.code_to_bpe[codes]
            slots = ids == self.config.image_vocab.image_token_id
            if slots.sum() != tokens.size:
                raise ChameleonError(
                    f"data: batch holds {slots.sum()} <image> slots but {n} image(s) give {tokens.size}")
            ids[slots] = tokens.reshape(-1)
        from .sharding import logical_to_spec

        out = {}
        host = {"input_ids": ids, "labels": batch["labels"], "attention_mask": batch["attention_mask"]}
        for key, local in host.items():
            shape = (local.shape[0], local.shape[1] * jax.process_count(), local.shape[2])
            sharding = NamedSharding(self.mesh, logical_to_spec((None, "batch", None), shape, self.mesh))
            out[key] = jax.make_array_from_process_local_data(sharding, local, shape)
        return out

    # ------------------------------------------------------------------ loop
    def train_step(self, batch: dict) -> dict:
        """One optimizer step on a prepared batch; returns the (device) metrics."""
        self.state, metrics = self._step_fn(self.state, self.frozen, batch)
        self.step += 1
        return metrics

    def run(self, max_steps: int | None = None) -> list[dict]:
        """Train until ``tc.steps`` (or ``max_steps`` more); checkpoint every ``checkpoint_every``
        steps and at the end. Returns the metrics of the steps run (also in ``history``)."""
        tc = self.tc
        target = tc.steps if max_steps is None else min(tc.steps, self.step + max_steps)
        pending, t0, start = [], time.perf_counter(), len(self.history)
        self._compile_window = True  # the first window's tokens/s includes compiling the step
        while self.step < target:
            batch = next(self.loader)
            metrics = self.train_step(self.prepare(batch))
            pending.append((self.step, batch["epoch"], batch["index"], metrics))
            if self.step % tc.log_every == 0 or self.step == target:
                t0 = self._flush(pending, t0)
                pending = []
            if self.step % tc.checkpoint_every == 0 and self.step < target:
                self.save()
        if self.manager.latest_step() != self.step:
            self.save()
        if tc.export_final and self.step == tc.steps:
            self.export(os.path.join(tc.output_dir, "final"))
        return self.history[start:]

    def _flush(self, pending, t0) -> float:
        t1 = time.perf_counter()
        values = [jax.tree.map(to_host, m) for *_, m in pending]
        tokens = sum(int(v["tokens"]) for v in values)
        tps = tokens / max(t1 - t0, 1e-9)
        records = []
        for (step, epoch, index, _), v in zip(pending, values):
            rec = {"step": step, "loss": float(v["loss"]), "lr": float(v["lr"]),
                   "grad_norm": float(v["grad_norm"]), "tokens": int(v["tokens"]),
                   "targets": int(v["targets"]), "tokens_per_s": tps, "epoch": int(epoch),
                   "index": int(index)}
            if self.tc.z_loss:
                rec["z_loss"] = float(v["z_loss"])
            records.append(rec)
        self.history += records
        if self.is_main:
            os.makedirs(os.path.dirname(os.path.abspath(self.metrics_path)), exist_ok=True)
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                for rec in records:
                    f.write(json.dumps(rec) + "\n")
            r = records[-1]
            note = " (incl. compile)" if self._compile_window else ""
            self.log(f"step {r['step']}/{self.tc.steps}  loss {r['loss']:.4f}  lr {r['lr']:.2e}  "
                     f"grad_norm {r['grad_norm']:.3f}  {tps:,.0f} tok/s{note}  "
                     f"epoch {r['epoch']} example {r['index']}")
        self._compile_window = False
        return time.perf_counter()

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict:
        return {"step": self.step, "data": self.loader.state_dict(), "train_config": self.tc.to_dict(),
                "lora": None if self.lora is None else self.lora.to_dict()}

    def save(self) -> None:
        import orbax.checkpoint as ocp

        self.manager.save(self.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state), meta=ocp.args.JsonSave(self._meta())), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int | None = None) -> None:
        """Load the train state and data position of checkpoint ``step`` (default: the latest)."""
        import orbax.checkpoint as ocp

        step = self.manager.latest_step() if step is None else step
        where = os.path.join(self.tc.output_dir, "checkpoints", str(step))
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        saved_lora, lora = meta.get("lora"), None if self.lora is None else self.lora.to_dict()
        if saved_lora != lora:
            raise ChameleonError(f"{where}: checkpoint has lora={saved_lora}, the config has {lora}; "
                                 "use another output_dir")
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                self.state, self.shardings)
        try:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            restored = self.manager.restore(step, args=args)
        except Exception as e:  # Orbax raises many types; name the directory
            raise ChameleonError(
                f"{where}: cannot restore the train state ({type(e).__name__}: {e})") from None
        self.state = restored["state"]
        self.loader.load_state_dict(meta["data"])
        self.step = int(meta["step"])
        self.log(f"resumed from {where} (step {self.step}, epoch {self.loader.epoch}, "
                 f"example {self.loader.index})")

    def close(self) -> None:
        """Wait for and release the checkpoint manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    # ------------------------------------------------------------------ results
    def params(self, merged: bool = True) -> dict:
        """Full inference params (VQ-VAE included); LoRA adapters merged unless ``merged=False``
        (then the base params alone)."""
        p = self.state["params"]
        if self.lora is not None:
            p = lora_lib.merge(self.frozen, p, self.lora) if merged else self.frozen
        out = dict(p)
        if self._vq is not None:
            out["vqmodel"] = self._vq
        return out

    def model(self, merged: bool = True):
        """A :class:`chameleon_jax.ChameleonModel` of the current params (float32 compute)."""
        from .api import ChameleonModel

        params = jax.tree.map(lambda x: jax.device_put(to_host(x)), self.params(merged))
        return ChameleonModel(self.config.replace(dtype="float32"), params)

    def export(self, directory: str) -> str:
        """Write an HF-layout checkpoint (float32, adapters merged) + tokenizer files to ``directory``;
        with LoRA also the adapters alone to ``directory``-adapters."""
        from .checkpoint import TOKENIZER_FILES, save_hf

        tok_dir = self.paths["tokenizer"]
        extra = [os.path.join(tok_dir, f) for f in TOKENIZER_FILES
                 if tok_dir and os.path.isfile(os.path.join(tok_dir, f))]
        params = jax.tree.map(lambda x: to_host(x).astype(np.float32), self.params())
        if self.is_main:
            save_hf(params, self.config.replace(dtype="float32"), directory, overwrite=True,
                    extra_files=extra)
            if self.lora is not None:
                lora_lib.save_adapters(directory.rstrip("/") + "-adapters", self.state["params"], self.lora,
                                       overwrite=True)
        self.log(f"exported {directory}")
        return directory

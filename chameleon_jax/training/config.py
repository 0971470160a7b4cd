"""The training job's settings: :class:`TrainConfig` (the JSON training config; unknown keys are errors)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ChameleonError, read_json
from ..model.loss import LOSS_ON
from . import lora as lora_lib

# ------------------------------------------------------------------ config
MESH_KEYS = ("data", "fsdp", "tensor")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the JSON config's keys are these field names (see configs/train-*.json).

    Paths are relative to the working directory. ``demo``: build a tiny model, tokenizer and
    dataset under ``output_dir/demo-assets`` and use them where model/tokenizer/data are unset.
    Keys starting with ``_`` are comments; any other unknown key is an error.
    """

    model: str | None = None  # HF or converted checkpoint directory
    tokenizer: str | None = None  # default: the model directory
    data: str | None = None  # JSONL file (training/data.py)
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
    remat: str = "full"  # none | full | dots | dots_no_batch (model.decoder.REMAT_POLICIES); full: the planner
    #                      shows 7B at 4096 tokens needs it (temporaries 165 GiB per v5e chip with none, 18 with full)
    scan_layers: bool = False  # one nn.scan over the decoder layers (params stacked [L, ...] while training;
    #                            checkpoints convert either way, params() and exports are per-layer)
    optimizer_dtype: str = "float32"  # dtype of the Adam moments (bfloat16 halves the optimizer state)
    offload_optimizer: bool = False  # keep the optimizer state in host memory (pinned_host) between steps
    mesh: Mapping[str, int] = field(default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    # loss
    loss_on: str = "auto"  # all | text | image | auto (text, or all with train_image_tokens)
    train_image_tokens: bool = False
    z_loss: float = 0.0
    loss_chunk: int = 0  # > 0: LM head + loss over sequence chunks of this many tokens (no [B, T, V] logits)
    attention_chunk: int = 0  # > 0: attention over query blocks of this many tokens (no [B, H, T, T] scores)
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
        from ..model.decoder import REMAT_POLICIES

        def bad(key, msg):
            raise ChameleonError(f"train config: {key}: {msg}")

        for key in ("batch_size", "grad_accum", "steps", "max_length", "checkpoint_every", "keep_checkpoints",
                    "log_every"):
            if getattr(self, key) < 1:
                bad(key, f"expected an integer >= 1, got {getattr(self, key)!r}")
        for key in ("loss_chunk", "attention_chunk"):
            if getattr(self, key) < 0:
                bad(key, f"expected 0 (off) or an integer >= 1, got {getattr(self, key)!r}")
        if self.remat not in REMAT_POLICIES:
            bad("remat", f"expected one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        for key in ("compute_dtype", "base_dtype", "optimizer_dtype"):
            if getattr(self, key) not in ("float32", "bfloat16"):
                bad(key, f"expected 'float32' or 'bfloat16', got {getattr(self, key)!r}")
        if self.loss_on not in LOSS_ON + ("auto",):
            bad("loss_on", f"expected one of {list(LOSS_ON) + ['auto']}, got {self.loss_on!r}")
        if self.image_normalization not in ("hf", "meta"):
            bad("image_normalization", f"expected 'hf' or 'meta', got {self.image_normalization!r}")
        unknown = sorted(set(self.mesh) - set(MESH_KEYS))
        if unknown:
            bad("mesh", f"unknown axis {unknown}; expected some of {list(MESH_KEYS)}")
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
        d = read_json(path, "train config")
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


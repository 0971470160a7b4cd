"""Model configuration: frozen dataclasses built from, and written back to, HF ``config.json``."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

from .errors import ChameleonError, read_json
from .vocab import ImageVocab

# Keys every transformers PretrainedConfig may write; they carry nothing this project uses.
_HF_GENERIC_KEYS = frozenset(
    """architectures transformers_version torch_dtype dtype use_cache initializer_range
    attention_dropout image_token_id _name_or_path output_attentions output_hidden_states
    return_dict is_encoder_decoder tie_encoder_decoder chunk_size_feed_forward id2label label2id
    problem_type tokenizer_class prefix sep_token_id decoder_start_token_id task_specific_params
    finetuning_task pruned_heads add_cross_attention cross_attention_hidden_size is_decoder
    tf_legacy_loss use_bfloat16 torchscript output_scores return_dict_in_generate
    _attn_implementation_autoset _commit_hash pretraining_tp qk_layernorm""".split()
)
_VQ_GENERIC_KEYS = frozenset({"model_type", "initializer_range", "transformers_version", "dtype", "torch_dtype"})
_ROPE_TYPES = ("default", "linear", "dynamic")
# HF spellings read by from_hf_dict besides the dataclass fields (for "did you mean" suggestions).
_HF_SPELLINGS = frozenset({"model_type", "rope_parameters", "rope_scaling", "rope_theta", "vq_config",
                           "vocabulary_map", "eos_token_id"})
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "model_parallel_size")
_FLOAT_FIELDS = ("rms_norm_eps", "qk_norm_eps", "rope_theta")
_BOOL_FIELDS = ("attention_bias", "mlp_bias", "tie_word_embeddings", "swin_norm")


def _unknown_note(names, known) -> str:
    """``a, b (did you mean c?)``: each unknown name with the closest known one, if any is close."""
    parts = []
    for name in names:
        close = difflib.get_close_matches(name.rsplit(".", 1)[-1], sorted(known), n=1, cutoff=0.85)
        parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return ", ".join(parts)


def _warn_unknown(source: str, names, known) -> None:
    warnings.warn(f"{source}: ignoring field(s) this project does not know: {_unknown_note(names, known)}. "
                  "transformers writes extra fields it was given; a misspelled one here means its default is used",
                  stacklevel=4)
_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class VQConfig:
    """VQ-VAE (image tokenizer) hyper-parameters, HF ``vq_config`` field names."""

    embed_dim: int = 256
    num_embeddings: int = 8192
    double_latent: bool = False
    latent_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    attn_type: str = "vanilla"

    @property
    def tokens_per_image(self) -> int:
        side = self.resolution // 2 ** (len(self.channel_multiplier) - 1)
        return side * side

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "vq_config", unknown_out: list | None = None) -> "VQConfig":
        """Unknown fields are ignored with a warning (or appended to ``unknown_out``, for the caller's)."""
        if not isinstance(d, Mapping):
            raise ChameleonError(f"{source}: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - _VQ_GENERIC_KEYS)
        if unknown and unknown_out is not None:
            unknown_out.extend(unknown)
        elif unknown:
            _warn_unknown(source, unknown, names)
        kw = {k: v for k, v in d.items() if k in names}

        def ints(key, value, lo):
            if not isinstance(value, list) or not all(_is_int(v) and lo <= v < 2**31 for v in value):
                raise ChameleonError(f"{source}: {key}: expected a list of integers >= {lo}, got {value!r:.80}")
            return tuple(value)

        for key in ("embed_dim", "num_embeddings", "latent_channels", "resolution", "in_channels", "base_channels",
                    "num_res_blocks"):
            if key in kw and not (_is_int(kw[key]) and 1 <= kw[key] < 2**31):
                raise ChameleonError(f"{source}: {key}: expected an integer >= 1, got {kw[key]!r:.80}")
        if "double_latent" in kw and not isinstance(kw["double_latent"], bool):
            raise ChameleonError(f"{source}: double_latent: expected true or false, got {kw['double_latent']!r:.80}")
        mult = kw.get("channel_multiplier", list(cls.channel_multiplier))
        kw["channel_multiplier"] = ints("channel_multiplier", list(mult) if isinstance(mult, tuple) else mult, 1)
        if not kw["channel_multiplier"]:
            raise ChameleonError(f"{source}: channel_multiplier: expected a non-empty list of integers >= 1")
        kw["attn_resolutions"] = ints("attn_resolutions", kw.get("attn_resolutions") or [], 0)
        cfg = cls(**kw)
        for c in (cfg.base_channels * m for m in (1,) + cfg.channel_multiplier):
            if c % 32:
                raise ChameleonError(f"{source}: channel counts must be multiples of 32 (GroupNorm), got {c}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_multiplier"] = list(self.channel_multiplier)
        d["attn_resolutions"] = list(self.attn_resolutions)
        d["model_type"] = "chameleon_vqgan"
        return d


@dataclass(frozen=True)
class ChameleonConfig:
    """Decoder hyper-parameters (HF field names) plus the VQ config and the vocabulary map.

    ``dtype`` is the compute dtype of matmuls; norms, softmax, RoPE and logits stay fp32.
    ``vocabulary_map`` (token name -> id) is excluded from hashing and equality: it is large and
    only its image-token tables (``image_vocab``) matter to the model.
    """

    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    qk_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    swin_norm: bool = False
    model_parallel_size: int = 1
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    dtype: str = "float32"
    # Runtime choice, not saved: "einsum" (ours), "xla" / "cudnn" (jax.nn.dot_product_attention), or a name
    # given to model.attention.register_attention (e.g. a Pallas TPU kernel).
    attention_impl: str = "einsum"
    vq_config: VQConfig | None = field(default_factory=VQConfig)
    vocabulary_map: Mapping[str, int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ChameleonError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ChameleonError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_type not in _ROPE_TYPES:
            raise ChameleonError(f"rope type {self.rope_type!r} is not supported; expected one of {_ROPE_TYPES}")
        if self.hidden_act != "silu":
            raise ChameleonError(f"hidden_act {self.hidden_act!r} is not supported; Chameleon uses 'silu'")
        if self.dtype not in _DTYPES:
            raise ChameleonError(f"dtype {self.dtype!r} is not supported; expected one of {_DTYPES}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @cached_property
    def image_vocab(self) -> ImageVocab:
        return ImageVocab.from_vocabulary_map(self.vocabulary_map)

    def replace(self, **kw) -> "ChameleonConfig":
        return dataclasses.replace(self, **kw)

    # ----------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "ChameleonConfig":
        """Build from the dict of an HF ``config.json``; unknown fields raise ChameleonError."""
        if not isinstance(d, Mapping):
            raise ChameleonError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type != "chameleon":
            raise ChameleonError(
                f"{source}: model_type is {model_type!r}, expected 'chameleon' (is this a Chameleon checkpoint?)"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ChameleonError(f"{source}: missing required field(s) {missing}")
        d = dict(d)
        d.pop("model_type")
        kw: dict[str, Any] = {}
        rope = d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {}
        d.pop("rope_scaling", None)
        if not isinstance(rope, Mapping):
            raise ChameleonError(f"{source}: rope_parameters/rope_scaling must be an object, got {rope!r}")
        kw["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
        if kw["rope_type"] not in _ROPE_TYPES:
            raise ChameleonError(f"{source}: rope type {kw['rope_type']!r} is not supported; expected one of {_ROPE_TYPES}")
        kw["rope_factor"] = _positive(rope.get("factor", 1.0), f"{source}: rope factor")
        theta = rope.get("rope_theta", d.pop("rope_theta", None))
        d.pop("rope_theta", None)
        if theta is not None:
            kw["rope_theta"] = _positive(theta, f"{source}: rope_theta")
        vq = d.pop("vq_config", None)
        vq_unknown: list[str] = []
        kw["vq_config"] = VQConfig.from_dict(vq, f"{source}: vq_config", vq_unknown) if vq is not None else None
        vm = d.pop("vocabulary_map", None)
        if vm is not None and not (isinstance(vm, Mapping) and all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in vm.items())):
            raise ChameleonError(f"{source}: vocabulary_map: expected an object of token name -> id (an integer "
                                 f">= 0), got {str(vm)[:80]}")
        kw["vocabulary_map"] = dict(vm) if vm is not None else None
        eos = d.pop("eos_token_id", 2)
        kw["eos_token_id"] = tuple(eos) if isinstance(eos, list) else eos
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d["num_attention_heads"]
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_type", "rope_factor", "dtype", "attention_impl"}
        # transformers' save_pretrained writes any kwarg it was given (hidden_dropout_prob, ...) and
        # loads such files: so do we, saying which fields were ignored. Known fields stay strict.
        unknown = sorted(set(d) - names - _HF_GENERIC_KEYS) + [f"vq_config.{k}" for k in vq_unknown]
        if unknown:
            vq_names = {f.name for f in dataclasses.fields(VQConfig)}
            _warn_unknown(source, unknown, names | _HF_SPELLINGS | _HF_GENERIC_KEYS | vq_names)
        for k in names:
            if k in d:
                kw[k] = d[k]
        for k in ("attention_bias", "mlp_bias", "swin_norm"):
            if kw.get(k) is None:
                kw.pop(k, None)
        if kw.get("model_parallel_size") is None:
            kw["model_parallel_size"] = 1
        _check_types(kw, source)
        try:
            return cls(**kw)
        except TypeError as e:
            raise ChameleonError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF ``config.json`` dict (transformers 5 spelling: ``rope_parameters``)."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        d: dict[str, Any] = {
            "architectures": ["ChameleonForConditionalGeneration"],
            "model_type": "chameleon",
        }
        for f in dataclasses.fields(self):
            if f.name in ("rope_theta", "rope_type", "rope_factor", "vq_config", "vocabulary_map", "dtype", "qk_norm_eps",
                          "attention_impl"):
                continue
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        d["rope_parameters"] = rope
        d["vq_config"] = self.vq_config.to_dict() if self.vq_config is not None else None
        d["vocabulary_map"] = dict(self.vocabulary_map) if self.vocabulary_map is not None else None
        if self.image_vocab.image_token_id is not None:
            d["image_token_id"] = self.image_vocab.image_token_id
        return d

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ChameleonConfig":
        path = os.fspath(path)
        return cls.from_hf_dict(read_json(path, "config file"), source=path)

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` atomically (temp file, then rename)."""
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive(v, where: str) -> float:
    """A JSON number > 0 as a float (bools, strings, null and the like raise, naming ``where``)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or v == float("inf"):
        raise ChameleonError(f"{where}: expected a number > 0, got {v!r}")
    return float(v)


def _check_types(kw: dict, source: str) -> None:
    """The known fields' JSON types (None, where allowed, is dropped before this)."""
    def bad(key, want):
        raise ChameleonError(f"{source}: {key}: expected {want}, got {kw[key]!r}")

    for key in _INT_FIELDS:
        if key in kw and (not isinstance(kw[key], int) or isinstance(kw[key], bool) or not 1 <= kw[key] < 2**31):
            bad(key, "an integer >= 1" + (" (below 2**31)" if isinstance(kw[key], int) and kw[key] >= 2**31 else ""))
    for key in _FLOAT_FIELDS:
        if key in kw and (not isinstance(kw[key], (int, float)) or isinstance(kw[key], bool) or not kw[key] > 0):
            bad(key, "a number > 0")
    for key in _BOOL_FIELDS:
        if key in kw and not isinstance(kw[key], bool):
            bad(key, "true or false")
    for key in ("bos_token_id", "pad_token_id", "eos_token_id"):
        ids = kw.get(key)
        for i in ids if isinstance(ids, tuple) else (ids,):
            if i is not None and (not isinstance(i, int) or isinstance(i, bool) or i < 0):
                bad(key, "a token id (an integer >= 0), a list of them (eos) or null")


def load_preset(name: str) -> ChameleonConfig:
    """A preset shipped in the package (``chameleon_jax/presets/<name>.json``: chameleon-7b,
    chameleon-30b), or a path to a config.json. Works from an installed wheel."""
    if name.endswith(".json"):
        return ChameleonConfig.from_json_file(name)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
    path = os.path.join(here, f"{name}.json")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(here) if f.endswith(".json"))
        raise ChameleonError(f"preset {name!r}: no such preset; known presets: {known}")
    return ChameleonConfig.from_json_file(path)

"""Meta's original Chameleon release as a *tensor source* (HF names, HF layout).

``MetaRelease(path)`` reads Meta's files lazily and serves every tensor under its Hugging Face
name, in the layout ``transformers.ChameleonForConditionalGeneration`` holds, so
``checkpoint.hf.read_params(release, release.config)`` converts it like an HF directory.

Accepted ``path`` forms (see :func:`resolve_release`):
  * the release root, holding ``models/<size>/`` and ``tokenizer/``; when ``models/`` holds
    several sizes, ``model="7b"`` picks one;
  * a model directory (``models/7b``: ``params.json`` + ``consolidated.pth`` or
    ``consolidated.NN.pth``); the tokenizer directory is looked up as ``tokenizer/`` beside it,
    one level up or two levels up (the release layout), or given as ``tokenizer_dir``.

What is done to Meta's tensors (checked against transformers' ``convert_chameleon_weights_to_hf.py``
and Meta's ``chameleon/inference/{transformer,loader,vqgan}.py``):
  * names: ``tok_embeddings``, ``layers.N.attention.{wq,wk,wv,wo}``, ``feed_forward.{w1,w3,w2}``,
    ``attention_norm``, ``ffn_norm``, ``attention.{q,k}_normalization``, ``norm``, ``output``;
    ``rope.freqs`` is ignored; fused ``wqkv`` (rows q | k | v of the shard) and ``w13`` (w1 | w3)
    are split (no real release file is known to hold them: every shard stores wq/wk/wv and w1/w3,
    which Meta's code fuses in memory; accepted anyway);
  * wq, wk and the q/k norm params are stored for interleaved RoPE; they are permuted to
    rotate_half order per head (``[h, Dh/2, 2] -> [h, 2, Dh/2]``);
  * model-parallel shards (``consolidated.00..NN.pth``): embeddings, wo and w2 are split on
    dim 1, the other projections (and ``output``) on dim 0; attention_norm/ffn_norm/norm are
    copies (averaged, as transformers does; differing copies are reported in ``notes``); each
    shard holds one q/k LayerNorm shared by its heads, repeated here to ``[heads, head_dim]``;
  * ``tokenizer/vqgan.ckpt``'s ``state_dict``: ``encoder.*``, ``quant_conv.*``,
    ``quantize.embedding.weight``, ``post_quant_conv.*`` and the VQ-GAN decoder ``decoder.*``
    -> ``model.vqmodel.<same>``; other tensors (the training loss's) are ignored, with a note.

Missing ``tokenizer/vqgan.ckpt``: the text model still converts; ``config.vq_config`` is None and
``notes`` says so (``require_vqgan=True`` makes it an error). Every ``.pth``/``.ckpt`` is read
only with ``torch.load(..., weights_only=True, mmap=True)``: pickles holding code are refused,
tensors stay memory-mapped and :meth:`MetaRelease.get` materializes one HF tensor at a time.
torch is the optional ``convert`` extra and is imported only here, inside functions.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from ..config import ChameleonConfig
from ..errors import ChameleonError, read_json
from .meta_files import (
    _LONG_ROPE_POSITIONS, _POSITIONS, _interleaved_to_half, _np_dtype, _shard_files, _state_dict,
    intermediate_size, load_torch_file, read_text_tokenizer, read_vqgan_yaml, resolve_release,
    to_numpy,
)


# ------------------------------------------------------------------ the tensor source
@dataclass(frozen=True)
class _Entry:
    """How one HF tensor is assembled: pieces (file index, raw key, row range) combined by kind."""

    kind: str  # cat0 | cat1 | mean | qknorm
    pieces: tuple[tuple[int, str, tuple[int, int] | None], ...]
    shape: tuple[int, ...]
    rope: bool = False  # permute rows from interleaved to rotate_half
    repeat: int = 1  # qknorm: heads per shard


_TOP = {"tok_embeddings.weight", "output.weight", "norm.weight", "rope.freqs"}
_LAYER_KEY = re.compile(
    r"layers\.(\d+)\.(attention\.(?:wq|wk|wv|wo|wqkv)\.weight|feed_forward\.(?:w1|w2|w3|w13)\.weight|"
    r"attention_norm\.weight|ffn_norm\.weight|attention\.[qk]_normalization\.(?:weight|bias))"
)
_VQ_MODEL_PREFIXES = ("encoder.", "quant_conv.", "post_quant_conv.", "decoder.")


class MetaRelease:
    """Meta's release as a tensor source: ``keys() / shape(n) / dtype(n) / get(n) / where(n)``
    under HF names, plus ``config``, ``tokenizer_path`` and ``notes``.

    Args:
      path: release root or model dir (module docstring).
      model: which ``models/<name>`` when the root holds several (case-insensitive, "7b"/"30b").
      tokenizer_dir: where text_tokenizer.json / vqgan.{ckpt,yaml} are, if not found by layout.
      require_vqgan: make a missing ``vqgan.ckpt`` an error instead of a text-only conversion.
    """

    def __init__(self, path, model: str | None = None, tokenizer_dir=None, require_vqgan: bool = False):
        self.model_dir, self.tokenizer_dir = resolve_release(path, model, tokenizer_dir)
        self.directory = self.model_dir  # read_params names it in "missing tensor" messages
        self._notes: list[str] = []
        self._norm_diffs: dict[str, float] = {}
        self._vq: dict = {}
        self.params_path = os.path.join(self.model_dir, "params.json")
        params = read_json(self.params_path, "model parameters (params.json)")
        consolidate = os.path.join(self.model_dir, "consolidate_params.json")
        extra = read_json(consolidate, "consolidate_params.json") if os.path.isfile(consolidate) else {}
        model_args = params.get("model") if isinstance(params.get("model"), dict) else {}
        self.params = {**params, **model_args, **extra}  # Meta's loader merges them this way
        self.tokenizer_path = os.path.join(self.tokenizer_dir, "text_tokenizer.json")
        vocabulary_map, special_ids = read_text_tokenizer(self.tokenizer_path)
        self.vqgan_ckpt_path = os.path.join(self.tokenizer_dir, "vqgan.ckpt")
        self.vqgan_yaml_path = os.path.join(self.tokenizer_dir, "vqgan.yaml")
        have_vq = os.path.isfile(self.vqgan_ckpt_path)
        if not have_vq and require_vqgan:
            raise ChameleonError(f"{self.vqgan_ckpt_path}: VQ-GAN image tokenizer checkpoint not found")
        vq_config = read_vqgan_yaml(self.vqgan_yaml_path) if have_vq else None
        if not have_vq:
            self._notes.append(f"{self.vqgan_ckpt_path} not found: converting the text model only "
                               "(vq_config is None; the result cannot read or write images)")

        self._paths = _shard_files(self.model_dir)
        if not self._paths:
            raise ChameleonError(f"{self.model_dir}: no consolidated.pth or consolidated.NN.pth found")
        self._files = [_state_dict(load_torch_file(p), p, "a model state dict") for p in self._paths]
        self._check_shard_keys()
        config = self._build_config(vocabulary_map, special_ids, vq_config)
        self._plan: dict[str, _Entry] = {}
        self._plan_decoder(config)
        if have_vq:
            self._plan_vqgan()
        self.config = config

    # ----------------------------------------------------------------- tensor source
    def keys(self) -> list[str]:
        return list(self._plan)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._plan[name].shape

    def dtype(self, name: str) -> np.dtype:
        i, key, _ = self._plan[name].pieces[0]
        return _np_dtype(self._files[i][key] if i < len(self._paths) else self._vq[key])

    def where(self, name: str) -> str:
        files = sorted({self._path(i) for i, _, _ in self._plan[name].pieces})
        return files[0] if len(files) == 1 else self.where_raw()

    def get(self, name: str) -> np.ndarray:
        """One HF tensor [HF shape], in the checkpoint's dtype (bf16 as ml_dtypes.bfloat16)."""
        e = self._plan[name]
        parts = [self._raw(i, key, rows) for i, key, rows in e.pieces]
        if e.kind == "qknorm":
            hd = parts[0].shape[0]
            out = np.concatenate([np.broadcast_to(_interleaved_to_half(p, hd), (e.repeat, hd)) for p in parts])
        elif e.kind == "mean":
            out = parts[0]
            if any(not np.array_equal(p, out) for p in parts[1:]):
                stacked = np.stack([p.astype(np.float32) for p in parts])
                self._norm_diffs[name] = float(np.abs(stacked - stacked.mean(0)).max())
                out = stacked.mean(0).astype(out.dtype)
        elif len(parts) == 1:
            out = parts[0]
        else:
            out = np.concatenate(parts, axis=0 if e.kind == "cat0" else 1)
        if e.rope:
            out = _interleaved_to_half(out, self.config.head_dim)
        if out.shape != e.shape:  # the plan's shapes are what read_params validated
            raise ChameleonError(f"{self.where(name)}: tensor {name!r} assembled to {list(out.shape)}, expected {list(e.shape)}")
        return out

    @property
    def notes(self) -> list[str]:
        """Things the user should know about this conversion (text-only, averaged norms, ...)."""
        out = list(self._notes)
        if self._norm_diffs:
            worst = max(self._norm_diffs, key=self._norm_diffs.get)
            out.append(f"{len(self._norm_diffs)} norm weight(s) differ across the model-parallel shards and were "
                       f"averaged (largest deviation {self._norm_diffs[worst]:.3g} in {worst})")
        return out

    def close(self) -> None:
        """Drop the memory-mapped files."""
        self._files = []
        self._vq = {}

    # ----------------------------------------------------------------- internals
    def _path(self, i: int) -> str:
        return self._paths[i] if i < len(self._paths) else self.vqgan_ckpt_path

    def _raw(self, i: int, key: str, rows) -> np.ndarray:
        if i < len(self._paths):
            self._remap_if_needed()
            t = self._files[i][key]
        else:
            t = self._vq[key]
        part = to_numpy(t if rows is None else t[rows[0]:rows[1]])
        self._mapped_bytes += part.nbytes
        return part

    # Pages of a memory-mapped file that were read stay resident (and count as this process's
    # memory) while the mapping lives. Re-opening the shard files every _REMAP_BYTES read drops
    # the old mappings, so converting holds about that much of the source, not all of it.
    _REMAP_BYTES = 2**29
    _mapped_bytes = 0

    def _remap_if_needed(self) -> None:
        if self._mapped_bytes >= self._REMAP_BYTES:
            self._files = [_state_dict(load_torch_file(p), p, "a model state dict") for p in self._paths]
            self._mapped_bytes = 0

    def where_raw(self) -> str:
        """The model's .pth file(s), for messages."""
        if len(self._paths) == 1:
            return self._paths[0]
        return os.path.join(self.model_dir, f"consolidated.{{00..{len(self._paths) - 1:02d}}}.pth")

    def _raw_shape(self, i: int, key: str) -> tuple[int, ...]:
        return tuple(self._files[i][key].shape)

    def _check_shard_keys(self) -> None:
        first = set(self._files[0])
        for path, sd in zip(self._paths, self._files):
            for k in sd:
                if k not in _TOP and not _LAYER_KEY.fullmatch(k):
                    raise ChameleonError(f"{path}: unexpected tensor {k!r} (not part of Meta's Chameleon transformer)")
            if set(sd) != first:
                diff = sorted(set(sd) ^ first)
                raise ChameleonError(f"{path}: holds different tensors than {self._paths[0]} (e.g. {diff[:3]})")

    def _require(self, key: str):
        if key not in self._files[0]:
            raise ChameleonError(f"{self._paths[0]}: missing tensor {key!r}")

    def _param(self, name: str, default=None, required: bool = False):
        v = self.params.get(name, default)
        if required and v is None:
            raise ChameleonError(f"{self.params_path}: missing field {name!r} (or 'model.{name}')")
        return v

    def _build_config(self, vocabulary_map, special_ids, vq_config) -> ChameleonConfig:
        shards = len(self._paths)
        try:
            dim = int(self._param("dim", required=True))
            n_layers = int(self._param("n_layers", required=True))
            n_heads = int(self._param("n_heads", required=True))
            n_kv = int(self._param("n_kv_heads") or n_heads)
            mult = self._param("ffn_dim_multiplier")
            mult = float(mult) if mult is not None else None
            multiple_of = int(self._param("multiple_of", 256))
            rope_theta = float(self._param("rope_theta", 10000.0))
            norm_eps = float(self._param("norm_eps", 1e-5))
            swin = bool(self._param("swin_norm", False))
        except (TypeError, ValueError) as e:
            raise ChameleonError(f"{self.params_path}: bad field value ({e})") from None
        if self._param("qk_normalization") is False:
            raise ChameleonError(f"{self.params_path}: qk_normalization is false; Chameleon (and this project) "
                                 "requires the q/k LayerNorms")
        mp = self._param("model_parallel_size")
        if mp is not None and int(mp) != shards:
            self._notes.append(f"{self.params_path}: model_parallel_size is {mp} but {shards} shard file(s) "
                               "were found; the files' shapes decide")
        self._require("tok_embeddings.weight")
        width = sum(self._raw_shape(i, "tok_embeddings.weight")[1] for i in range(shards))
        if width != dim:
            raise ChameleonError(
                f"{self.model_dir}: tok_embeddings widths sum to {width} over {shards} shard file(s), but "
                f"{self.params_path} says dim={dim}: is a consolidated.NN.pth shard missing?"
            )
        if n_heads % shards or n_kv % shards:
            raise ChameleonError(f"{self.model_dir}: {shards} shard files cannot split n_heads={n_heads} / "
                                 f"n_kv_heads={n_kv} evenly")
        ffn = intermediate_size(dim, mult, multiple_of)
        if "layers.0.feed_forward.w2.weight" in self._files[0]:
            held = sum(self._raw_shape(i, "layers.0.feed_forward.w2.weight")[1] for i in range(shards))
            if held != ffn:
                raise ChameleonError(
                    f"{self.params_path}: dim={dim}, ffn_dim_multiplier={mult}, multiple_of={multiple_of} give "
                    f"an FFN width of {ffn}, but layers.0.feed_forward.w2.weight in {self.where_raw()} holds {held}"
                )
        vocab_size = self._param("vocab_size")
        if vocab_size is None or int(vocab_size) <= 0:
            vocab_size = self._raw_shape(0, "tok_embeddings.weight")[0]
        dtype = str(_np_dtype(self._files[0]["tok_embeddings.weight"]))
        try:
            return ChameleonConfig(
                vocab_size=int(vocab_size),
                hidden_size=dim,
                intermediate_size=ffn,
                num_hidden_layers=n_layers,
                num_attention_heads=n_heads,
                num_key_value_heads=n_kv,
                max_position_embeddings=_LONG_ROPE_POSITIONS if rope_theta > 10000.0 else _POSITIONS,
                rms_norm_eps=norm_eps,
                rope_theta=rope_theta,
                swin_norm=swin,
                model_parallel_size=shards,
                dtype=dtype if dtype in ("float32", "bfloat16", "float16") else "float32",
                vq_config=vq_config,
                vocabulary_map=vocabulary_map,
                **special_ids,
            )
        except ChameleonError as e:
            raise ChameleonError(f"{self.params_path}: {e}") from None

    def _plan_decoder(self, c: ChameleonConfig) -> None:
        shards = range(len(self._paths))
        hd = c.head_dim
        hl, kvl = c.num_attention_heads // len(self._paths), c.num_key_value_heads // len(self._paths)
        sd = self._files[0]
        layers = {int(m.group(1)) for k in sd if (m := _LAYER_KEY.fullmatch(k))}
        beyond = sorted(i for i in layers if i >= c.num_hidden_layers)
        if beyond:
            raise ChameleonError(f"{self._paths[0]}: holds layers.{beyond[0]}.*, but {self.params_path} says "
                                 f"n_layers={c.num_hidden_layers}")

        def add(name, kind, keys, rows=None, rope=False, repeat=1):
            for k in keys if isinstance(keys, list) else [keys]:
                self._require(k)
            keys = keys if isinstance(keys, list) else [keys] * len(shards)
            pieces = tuple((i, keys[i], rows) for i in shards)
            shapes = [list(self._raw_shape(i, k)) for i, k, _ in pieces]
            if rows is not None:
                for s in shapes:
                    s[0] = rows[1] - rows[0]
            if kind == "qknorm":
                if any(s != [hd] for s in shapes):
                    raise ChameleonError(f"{self._paths[0]}: tensor {keys[0]!r} has shape {shapes[0]}, expected "
                                         f"[{hd}] (one LayerNorm per model-parallel shard)")
                shape = (len(shards) * repeat, hd)
            elif kind == "mean":
                if any(s != shapes[0] for s in shapes):
                    raise ChameleonError(f"{self.model_dir}: tensor {keys[0]!r} differs in shape across shards {shapes}")
                shape = tuple(shapes[0])
            else:
                ax = 0 if kind == "cat0" else 1
                if any(len(s) != 2 or s[1 - ax] != shapes[0][1 - ax] for s in shapes):
                    raise ChameleonError(f"{self.model_dir}: tensor {keys[0]!r} shapes {shapes} do not concatenate")
                shape = tuple(sum(s[ax] for s in shapes) if d == ax else shapes[0][d] for d in range(2))
            self._plan[name] = _Entry(kind, pieces, shape, rope, repeat)

        add("model.embed_tokens.weight", "cat1", "tok_embeddings.weight")
        add("model.norm.weight", "mean", "norm.weight")
        add("lm_head.weight", "cat0", "output.weight")
        for n in range(c.num_hidden_layers):
            a, f, hf = f"layers.{n}.attention.", f"layers.{n}.feed_forward.", f"model.layers.{n}."
            if a + "wqkv.weight" in sd:
                rows = self._raw_shape(0, a + "wqkv.weight")[0]
                if rows != (hl + 2 * kvl) * hd:
                    raise ChameleonError(f"{self._paths[0]}: tensor {a}wqkv.weight has {rows} rows, expected "
                                         f"(heads {hl} + 2 x kv heads {kvl}) x head_dim {hd} per shard")
                bounds = np.cumsum([0, hl * hd, kvl * hd, kvl * hd])
                for proj, lo, hi in zip("qkv", bounds[:-1], bounds[1:]):
                    add(hf + f"self_attn.{proj}_proj.weight", "cat0", a + "wqkv.weight", (int(lo), int(hi)), proj != "v")
            else:
                for proj in "qkv":
                    add(hf + f"self_attn.{proj}_proj.weight", "cat0", a + f"w{proj}.weight", rope=proj != "v")
            add(hf + "self_attn.o_proj.weight", "cat1", a + "wo.weight")
            for proj, heads in (("q", hl), ("k", kvl)):
                for p in ("weight", "bias"):
                    add(hf + f"self_attn.{proj}_norm.{p}", "qknorm", a + f"{proj}_normalization.{p}", repeat=heads)
            if f + "w13.weight" in sd:
                rows = self._raw_shape(0, f + "w13.weight")[0]
                if rows % 2:
                    raise ChameleonError(f"{self._paths[0]}: tensor {f}w13.weight has an odd row count {rows}")
                add(hf + "mlp.gate_proj.weight", "cat0", f + "w13.weight", (0, rows // 2))
                add(hf + "mlp.up_proj.weight", "cat0", f + "w13.weight", (rows // 2, rows))
            else:
                add(hf + "mlp.gate_proj.weight", "cat0", f + "w1.weight")
                add(hf + "mlp.up_proj.weight", "cat0", f + "w3.weight")
            add(hf + "mlp.down_proj.weight", "cat1", f + "w2.weight")
            add(hf + "input_layernorm.weight", "mean", f"layers.{n}.attention_norm.weight")
            add(hf + "post_attention_layernorm.weight", "mean", f"layers.{n}.ffn_norm.weight")

    def _plan_vqgan(self) -> None:
        path = self.vqgan_ckpt_path
        ckpt = load_torch_file(path)
        if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
            ckpt = ckpt["state_dict"]
        self._vq = _state_dict(ckpt, path, "a 'state_dict'")
        index = len(self._paths)
        ignored = []
        for key, t in self._vq.items():
            if key.startswith(_VQ_MODEL_PREFIXES) or key == "quantize.embedding.weight":
                self._plan["model.vqmodel." + key] = _Entry("cat0", ((index, key, None),), tuple(t.shape))
            else:
                ignored.append(key)
        if ignored:
            self._notes.append(f"{path}: ignored {len(ignored)} tensor(s) that are not part of the VQ-GAN model "
                               f"(e.g. {ignored[:3]})")
        if not any(key.startswith("decoder.") for key in self._vq):
            self._notes.append(f"{path}: holds no decoder.* tensors; image generation will not be possible")

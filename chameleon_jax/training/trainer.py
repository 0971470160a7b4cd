"""Fine-tuning: the training loop with checkpoints and exact resume (:class:`Trainer`).

The package's pieces, each usable on its own: the loss (:mod:`chameleon_jax.model.loss`), the
settings (:mod:`.config`), the sharded step and optimizer (:mod:`.step`), JSONL data
(:mod:`.data`), LoRA (:mod:`.lora`). :class:`Trainer` puts them together: params / grads /
optimizer state sharded alike over a (data, fsdp, tensor) mesh, AdamW with warmup + cosine
decay, global-norm clipping, gradient accumulation (a scan over microbatches, normalized by the
step's total target count, so it equals one big batch), remat, fp32 master params with
``compute_dtype`` matmuls, frozen VQ-VAE (images become tokens in the data path, before the
differentiated step), full fine-tuning or LoRA, Orbax checkpoints (state + data position) with
keep-last-N, metrics JSONL.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Callable

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from ..checkpoint.killpoint import point
from ..checkpoint.outdir import check_output
from ..errors import ChameleonError
from ..model import Chameleon
from ..sharding import to_host
from . import lora as lora_lib
from .config import TrainConfig
from .step import _tree, build_mesh, convert_layout, init_train_state, layout_of, make_train_step

# ------------------------------------------------------------------ trainer
# TrainConfig fields the jitted step depends on (the rest: paths, data, logging, checkpoints).
_STEP_KEYS = frozenset({"compute_dtype", "base_dtype", "remat", "scan_layers", "optimizer_dtype", "loss_on", "train_image_tokens", "z_loss", "loss_chunk", "attention_chunk",
                        "lora", "learning_rate", "warmup_steps", "end_lr_ratio", "steps", "weight_decay",
                        "adam_b1", "adam_b2", "adam_eps", "max_grad_norm"})
_STEP_CACHE: dict = {}


@functools.lru_cache(maxsize=8)
def _vq_encoder(vq_config):
    """Jitted pixel_values [N, 3, H, W] -> VQ codes [N, h*w] (one per VQ config)."""
    from ..model.vqvae import VQVAE

    module = VQVAE(vq_config)
    return jax.jit(lambda p, x: module.apply({"params": p}, x, method=VQVAE.encode))


@functools.lru_cache(maxsize=1)
def _temp_path_class():
    """Orbax's atomic-rename temp dir with kill points (checkpoint/killpoint.py) around its steps:
    the temp dir made, its rename to ``<step>``."""
    from orbax.checkpoint._src.path.atomicity import AtomicRenameTemporaryPath

    from ..checkpoint.killpoint import point

    class KillPointTemporaryPath(AtomicRenameTemporaryPath):
        async def create(self):
            path = await super().create()
            point(f"trainer: orbax temp dir created {self.get().name}")
            return path

        async def finalize(self, *args, **kwargs):
            point(f"trainer: orbax temp dir complete, before rename to {self.get_final().name}")
            await super().finalize(*args, **kwargs)
            point(f"trainer: orbax renamed to {self.get_final().name}")

    return KillPointTemporaryPath

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

        from ..demo.assets import build_demo_assets
        from .data import DataLoader, process_rows, read_jsonl
        from ..processing import ChameleonProcessor
        from ..sharding import param_shardings

        self.tc, self.log = tc, log or (lambda _msg: None)
        self.is_main = jax.process_index() == 0
        # Before anything is read or written: the run writes under output_dir (checkpoints, final/).
        check_output(tc.output_dir, [("model", tc.model if model is None else None),
                                     ("tokenizer", tc.tokenizer if processor is None else None)],
                     what="train config: output_dir")
        paths = {"model": tc.model, "tokenizer": tc.tokenizer, "data": tc.data}
        if tc.demo:
            assets = build_demo_assets(os.path.join(tc.output_dir, "demo-assets"), seed=tc.seed)
            paths = {k: v or assets[k if k != "tokenizer" else "model"] for k, v in paths.items()}
        paths["tokenizer"] = paths["tokenizer"] or paths["model"]
        self.paths = paths
        self.mesh = mesh = build_mesh(tc.mesh)

        # ---- model and params
        if model is None:
            from ..api import load

            if paths["model"] is None:
                raise ChameleonError("train config: model is required")
            model = load(paths["model"], dtype=tc.base_dtype if tc.lora else "float32", mesh=mesh)
        self.config = config = model.config.replace(dtype=tc.compute_dtype)
        self.module = Chameleon(config, remat_policy=tc.remat, scan_layers=tc.scan_layers,
                                attention_chunk=tc.attention_chunk)
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
        # tc.scan_layers: the state holds the scanned layout (layers [L, ...]); params(), exports and
        # restoring a checkpoint of the other layout convert (step.convert_layout).
        self.state, self.frozen, self.shardings, frozen_sh, self.tx = init_train_state(
            tc, base, base_sh, mesh, config.num_hidden_layers)
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
        # Multi-host: every process reads the same order but collates only the rows its devices hold.
        self.loader = DataLoader(self.dataset, self.processor, batch_size=tc.batch_size,
                                 grad_accum=tc.grad_accum, seed=tc.seed, max_length=tc.max_length,
                                 buckets=tc.buckets, length_grouping=tc.length_grouping,
                                 rows=process_rows(self._batch_sharding(), (tc.grad_accum, tc.batch_size, 1)))

        # ---- checkpoints
        self.step = 0
        self.history: list[dict] = []
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(tc.output_dir, "checkpoints")),
            options=ocp.CheckpointManagerOptions(max_to_keep=tc.keep_checkpoints, create=True,
                                                 enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True,  # half-written saves
                                                 temporary_path_class=_temp_path_class()),
            item_names=("state", "meta"),
        )
        self.metrics_path = tc.metrics_file or os.path.join(tc.output_dir, "metrics.jsonl")
        if tc.resume and self.manager.latest_step() is not None:
            self.restore()
        self._prune_metrics()

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
        out = {}
        host = {"input_ids": ids, "labels": batch["labels"], "attention_mask": batch["attention_mask"]}
        for key, local in host.items():  # this process's rows -> one global [A, B, T] array
            shape = (local.shape[0], self.tc.batch_size, local.shape[2])
            out[key] = jax.make_array_from_process_local_data(self._batch_sharding(), local, shape)
        return out

    def _batch_sharding(self) -> NamedSharding:
        """The sharding of an [A, B, T] batch: B over the data and fsdp axes (when it divides)."""
        from ..sharding import logical_to_spec

        shape = (self.tc.grad_accum, self.tc.batch_size, 1)
        return NamedSharding(self.mesh, logical_to_spec((None, "batch", None), shape, self.mesh))

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
        unchecked = None  # (step, metrics) whose loss the host has not looked at yet
        while self.step < target:
            batch = next(self.loader)
            metrics = self.train_step(self.prepare(batch))
            pending.append((self.step, batch["epoch"], batch["index"], metrics))
            # The previous step's loss is read once this one is queued, so the device never waits
            # on the host; a checkpoint is only written after its own step's loss was read.
            if unchecked is not None:
                self._stop_if_not_finite(*unchecked, pending)
            unchecked = (self.step, metrics)
            if self.step % tc.log_every == 0 or self.step == target:
                t0 = self._flush(pending, t0)
                pending = []
            if self.step % tc.checkpoint_every == 0 and self.step < target:
                self._stop_if_not_finite(*unchecked, pending)
                unchecked = None
                self.save()
        if unchecked is not None:
            self._stop_if_not_finite(*unchecked, pending)
        if self.manager.latest_step() != self.step:
            self.save()
        if tc.export_final and self.step == tc.steps:
            self.export(os.path.join(tc.output_dir, "final"))
        return self.history[start:]

    def _prune_metrics(self) -> None:
        """Drop metrics.jsonl records of steps after the current one: a killed run logged them after
        its last checkpoint, and this run does them again (so each step is logged once). A torn last
        line (killed while appending) goes too. Rewritten atomically (temp file + rename)."""
        import glob

        path = self.metrics_path
        if not self.is_main:
            return
        for stale in glob.glob(glob.escape(path) + ".tmp-*"):  # a killed prune's temp file
            os.remove(stale)
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, TypeError, KeyError, IndexError):
                continue
            if step <= self.step:
                keep.append(line)
        if len(keep) == len(lines):
            return
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in keep))
        point(f"trainer: pruned metrics written to {os.path.basename(tmp)}")
        os.replace(tmp, path)
        point("trainer: pruned metrics renamed")

    def _stop_if_not_finite(self, step: int, metrics: dict, pending: list) -> None:
        """Raise ChameleonError if ``step``'s loss or gradient norm is NaN/inf: the params are then
        no longer usable, so the run stops before any checkpoint holds them (the last one stays)."""
        loss, grad_norm = float(to_host(metrics["loss"])), float(to_host(metrics["grad_norm"]))
        if np.isfinite(loss) and np.isfinite(grad_norm):
            return
        unlogged = [p for p in pending if p[0] <= step]
        if unlogged:
            self._flush(unlogged, time.perf_counter())  # the metrics file shows the bad step
        last = self.manager.latest_step()
        where = os.path.join(self.tc.output_dir, "checkpoints")
        kept = (f"the last good checkpoint (step {last} in {where}) is intact; a new run resumes from it"
                if last is not None else f"no checkpoint was written to {where}")
        raise ChameleonError(
            f"step {step}: the loss is {loss} and the gradient norm {grad_norm}; training stopped at this step "
            f"without saving. {kept}. Check the model's params and the data for NaN/inf, or lower learning_rate")

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
            point(f"trainer: metrics of steps {records[0]['step']}..{records[-1]['step']} appended")
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
                "lora": None if self.lora is None else self.lora.to_dict(), "layout": layout_of(self.state)}

    def save(self) -> None:
        import orbax.checkpoint as ocp

        point(f"trainer: before saving checkpoint {self.step}")
        self.manager.save(self.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self.state), meta=ocp.args.JsonSave(self._meta())), force=True)
        self.manager.wait_until_finished()
        point(f"trainer: saved checkpoint {self.step}")

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
        # A checkpoint of the other layout (scan_layers on / off) is read as it was saved, then converted.
        n = self.config.num_hidden_layers
        saved = meta.get("layout", "per-layer")
        here = layout_of(self.state)
        shardings = self.shardings
        if saved != here:
            shardings = convert_layout(self.shardings, n, saved == "scanned", self.mesh)
        state_like = jax.eval_shape(lambda s: convert_layout(s, n, saved == "scanned"), self.state)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                state_like, shardings)
        try:
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            restored = self.manager.restore(step, args=args)
        except Exception as e:  # Orbax raises many types; name the directory
            raise ChameleonError(
                f"{where}: cannot restore the train state ({type(e).__name__}: {e})") from None
        state = restored["state"]
        if saved != here:
            state = jax.jit(lambda s: convert_layout(s, n, here == "scanned"), out_shardings=self.shardings,
                            donate_argnums=0)(state)
        self.state = state
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
        p, frozen = self._per_layer(self.state["params"]), self._per_layer(self.frozen)
        if self.lora is not None:
            p = lora_lib.merge(frozen, p, self.lora) if merged else frozen
        out = dict(p)
        if self._vq is not None:
            out["vqmodel"] = self._vq
        return out

    def _per_layer(self, tree):
        """``tree`` in the per-layer layout checkpoints and exports use (a copy when scanned)."""
        if not tree or layout_of(tree) == "per-layer":
            return tree
        return jax.jit(lambda t: convert_layout(t, self.config.num_hidden_layers, False))(tree)

    def model(self, merged: bool = True):
        """A :class:`chameleon_jax.ChameleonModel` of the current params (float32 compute)."""
        from ..api import ChameleonModel

        params = jax.tree.map(lambda x: jax.device_put(to_host(x)), self.params(merged))
        return ChameleonModel(self.config.replace(dtype="float32"), params)

    def export(self, directory: str) -> str:
        """Write an HF-layout checkpoint (float32, adapters merged) + tokenizer files to ``directory``;
        with LoRA also the adapters alone to ``directory``-adapters."""
        from ..checkpoint.hf import save_hf
        from ..checkpoint.orbax import TOKENIZER_FILES

        tok_dir = self.paths["tokenizer"]
        check_output(directory, [("model", self.paths["model"]), ("tokenizer", tok_dir)], what="export directory")
        extra = [os.path.join(tok_dir, f) for f in TOKENIZER_FILES
                 if tok_dir and os.path.isfile(os.path.join(tok_dir, f))]
        params = jax.tree.map(lambda x: to_host(x).astype(np.float32), self.params())
        if self.is_main:
            save_hf(params, self.config.replace(dtype="float32"), directory, overwrite=True,
                    extra_files=extra)
            if self.lora is not None:
                lora_lib.save_adapters(directory.rstrip("/") + "-adapters", self._per_layer(self.state["params"]), self.lora,
                                       overwrite=True)
        self.log(f"exported {directory}")
        return directory


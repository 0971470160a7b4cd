"""Memory planner: compile the real train step or a decode step on abstract params (no weights) for a
device topology (a TPU slice through libtpu's ahead-of-time compiler, or N CPU devices) and report
per-device bytes against the chip's memory.

``plan(config, "v5e:2x4", {"fsdp": 8}, task="train", seq=4096, batch=8)`` -> :class:`PlanResult`.
TPU topologies need the ``tpu-aot`` extra (``jax[tpu]``, libtpu); run with ``JAX_PLATFORMS=cpu``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from .config import ChameleonConfig
from .errors import ChameleonError

GiB = 1024**3
# Per-chip HBM of the TPU generations (public spec sheets).
HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5litepod": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}
TASKS = ("train", "lora", "generate")


def topology_devices(topology: str) -> tuple[list, int | None]:
    """``"v5e:2x4"`` (TPU, abstract devices from libtpu) or ``"cpu:8"`` -> (devices, HBM bytes per chip
    or None)."""
    if ":" not in topology:
        raise ChameleonError(f"--topology {topology!r}: expected GEN:SHAPE (v5e:2x4, v4:2x2x2) or cpu:N")
    gen, shape = topology.split(":", 1)
    if gen == "cpu":
        if not shape.isdigit() or int(shape) < 1:
            raise ChameleonError(f"--topology {topology!r}: expected cpu:N with N >= 1")
        devices = jax.devices("cpu")
        if len(devices) < int(shape):
            raise ChameleonError(f"--topology {topology!r}: only {len(devices)} CPU devices "
                                 "(set JAX_NUM_CPU_DEVICES before jax starts)")
        return devices[: int(shape)], None
    if gen not in HBM_BYTES:
        raise ChameleonError(f"--topology {topology!r}: unknown TPU generation {gen!r}; expected one of "
                             f"{sorted(HBM_BYTES)} or cpu")
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover
        raise ChameleonError(f"--topology {topology!r}: jax.experimental.topologies unavailable ({e})") from None
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{gen}-{math.prod(int(s) for s in shape.split('x'))}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if "tpu" not in os.environ.get("JAX_PLATFORMS", "tpu"):
        # Compiling only (no TPU attached): several planner processes may hold libtpu at once.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:
        raise ChameleonError(
            f"--topology {topology!r}: libtpu could not describe it ({type(e).__name__}: {e}); TPU topologies "
            "need the tpu-aot extra: pip install 'chameleon-jax[tpu-aot]'") from None
    return list(desc.devices), HBM_BYTES[gen]


@dataclass
class PlanResult:
    task: str
    topology: str
    mesh: dict
    devices: int
    params_bytes: int  # per device, from the shardings
    optimizer_bytes: int
    cache_bytes: int
    argument_bytes: int  # XLA's memory analysis (per device)
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    total_bytes: int  # arguments + outputs - aliased (donated) + temporaries
    hbm_bytes: int | None
    compile_s: float
    flops: float | None = None
    bytes_accessed: float | None = None  # per step (cost analysis)
    error: str | None = None  # XLA's out-of-memory message when the program does not fit (figures from it)
    host_bytes: int = 0  # per device, in host memory (the offloaded optimizer state; not in the total)
    memory_spaces: dict | None = None  # cost analysis' bytes accessed per memory space / operand, when given

    def fits(self) -> bool | None:
        if self.error:
            return False
        return None if self.hbm_bytes is None else self.total_bytes <= self.hbm_bytes

    def table(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        rows = [("task", self.task), ("topology", f"{self.topology} ({self.devices} devices)"),
                ("mesh", ",".join(f"{k}={v}" for k, v in self.mesh.items())),
                ("params / device", g(self.params_bytes)), ("optimizer state / device", g(self.optimizer_bytes)),
                ("KV cache / device", g(self.cache_bytes)), ("arguments (XLA)", g(self.argument_bytes)),
                ("temporaries (XLA)", g(self.temp_bytes)), ("total / device", g(self.total_bytes)),
                ("HBM / chip", "n/a" if self.hbm_bytes is None else g(self.hbm_bytes)),
                ("fits", {None: "n/a", True: "yes", False: "NO"}[self.fits()]),
                ("host memory / device", g(self.host_bytes)),
                ("compile time", f"{self.compile_s:.1f} s")]
        if self.error:
            rows.append(("XLA", self.error))
        if self.bytes_accessed is not None:
            rows.append(("bytes accessed / step", g(self.bytes_accessed)))
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of arrays or ShapeDtypeStructs with shardings (device 0's share)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        dt = jnp.dtype(x.dtype)
        bits = jnp.iinfo(dt).bits if jnp.issubdtype(dt, jnp.integer) else dt.itemsize * 8  # int4: half a byte
        total += math.prod(shape) * bits // 8
    return total


def _abstract(shapes, shardings, dtype=None):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=sh), shapes, shardings)


def abstract_train_state(config: ChameleonConfig, mesh, tc, scan: bool = False):
    """(state, frozen, their shardings, tx) as ShapeDtypeStructs carrying shardings, as Trainer builds them."""
    from .checkpoint.hf import expected_params
    from .sharding import param_shardings
    from .training import lora as lora_lib
    from .training.step import _tree, make_optimizer, state_shardings

    flat = {k: v for k, v in expected_params(config, vq_decoder=False).items() if not k.startswith("vqmodel/")}
    flat_sh = param_shardings(config, mesh, {k: v.shape for k, v in flat.items()})
    replicated = NamedSharding(mesh, P())
    base_dtype = tc.base_dtype if tc.lora else "float32"
    base = _tree({k: jax.ShapeDtypeStruct(v.shape, jnp.dtype(base_dtype), sharding=flat_sh[k]) for k, v in flat.items()})
    base_sh = _tree(flat_sh)
    tx = make_optimizer(tc)
    adapters = None
    if tc.lora is not None:  # on the per-layer tree (adapter paths name their layer)
        adapters = jax.eval_shape(lambda p: lora_lib.init_adapters(tc.lora, p, jax.random.key(0)), base)
    if scan:
        from .model.scan import stack_layers
        from .training.step import stacked_shardings

        n = config.num_hidden_layers
        base_sh = stacked_shardings(base_sh, mesh, n)
        stack = lambda xs: jax.ShapeDtypeStruct((n,) + xs[0].shape, xs[0].dtype)  # noqa: E731
        base = _abstract(stack_layers(base, n, stack), base_sh)
        if adapters is not None:
            adapters = stack_layers(adapters, n, stack)
    if adapters is not None:
        param_sh = jax.tree.map(lambda _: replicated, adapters)
        trainable, frozen, frozen_sh = _abstract(adapters, param_sh), base, base_sh
    else:
        trainable, param_sh, frozen, frozen_sh = base, base_sh, {}, {}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    shardings = state_shardings(tx, abstract, param_sh, mesh, offload=tc.offload_optimizer)
    opt = _abstract(jax.eval_shape(tx.init, abstract), shardings["opt_state"])
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), "params": trainable,
             "opt_state": opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)}
    return state, frozen, shardings, frozen_sh, tx


def _topology_mesh(topology: str, mesh: Mapping[str, int]):
    """(HBM bytes per chip or None, {data, fsdp, tensor} sizes, the Mesh over the topology's devices)."""
    from .sharding import make_mesh

    devices, hbm = topology_devices(topology)
    sizes = {k: int(mesh.get(k, 1)) for k in ("data", "fsdp", "tensor")}
    if math.prod(sizes.values()) != len(devices):
        raise ChameleonError(f"--mesh {sizes}: data*fsdp*tensor must equal the topology's {len(devices)} devices")
    return hbm, sizes, make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices)


# libtpu option for v5e: no memory-space assignment into VMEM. As compiled (the default) XLA prefetches
# weights into VMEM and its cost analysis counts each prefetch as a read and a write beside the dot's own
# read; with this, each HBM byte is counted once. For ``plan(..., compiler_options=NO_VMEM_PREFETCH)``.
NO_VMEM_PREFETCH = {"xla_vf_vmem_memory_space_assignment": False}


def plan(config: ChameleonConfig, topology: str, mesh: Mapping[str, int], *, task: str = "train", seq: int = 4096,
         batch: int = 8, remat: str = "full", dtype: str = "bfloat16", loss_chunk: int = 0, lora_rank: int = 16,
         base_dtype: str = "bfloat16", scan: bool = False, optimizer_dtype: str = "float32",
         offload_optimizer: bool = False, attention_chunk: int = 0, quantize: str | None = None,
         compiler_options: Mapping | None = None) -> PlanResult:
    """Compile ``task`` for ``topology`` on abstract params and return its per-device memory figures.

    ``compiler_options``: XLA / libtpu options for this compile (``jax.stages.Lowered.compile``'s), e.g.
    :data:`NO_VMEM_PREFETCH`."""
    from .model.decoder import Chameleon
    from .training.config import TrainConfig
    from .training.lora import LoraConfig
    from .training.step import make_train_step

    if task not in TASKS:
        raise ChameleonError(f"--task {task!r}: expected one of {list(TASKS)}")
    if quantize is not None and task != "generate":
        raise ChameleonError("--quantize: only with --task generate (weight-only int8/int4 is for inference)")
    hbm, sizes, m = _topology_mesh(topology, mesh)
    cfg = config.replace(dtype=dtype)
    tokens_sh = NamedSharding(m, P(None, ("data", "fsdp"), None))
    cache_bytes = opt_bytes = 0
    if task in ("train", "lora"):
        tc = TrainConfig(demo=True, compute_dtype=dtype, remat=remat, loss_chunk=loss_chunk, batch_size=batch,
                         attention_chunk=attention_chunk,
                         max_length=seq, base_dtype=base_dtype if task == "lora" else "float32",
                         scan_layers=scan, optimizer_dtype=optimizer_dtype, offload_optimizer=offload_optimizer,
                         lora=LoraConfig(rank=lora_rank, targets=("all",)) if task == "lora" else None)
        state, frozen, shardings, frozen_sh, tx = abstract_train_state(cfg, m, tc, scan)
        module = Chameleon(cfg, remat_policy=remat, scan_layers=scan, attention_chunk=attention_chunk)
        step = make_train_step(module, tx, tc, shardings, frozen_sh, m, tc.lora)
        tok = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32, sharding=tokens_sh)
        args = (state, frozen, {"input_ids": tok, "labels": tok, "attention_mask": tok})
        params_bytes = per_device_bytes(state["params"]) + per_device_bytes(frozen)
        opt_bytes = per_device_bytes(state["opt_state"])
        fn = step
    else:
        from .checkpoint.hf import expected_params
        from .model.decoder import init_cache
        from .sharding import param_shardings
        from .training.step import _tree

        flat = {k: v for k, v in expected_params(cfg, vq_decoder=False).items() if not k.startswith("vqmodel/")}
        flat_sh = param_shardings(cfg, m, {k: v.shape for k, v in flat.items()})
        from .quant import abstract_quantized  # generate --quantize: weight-only int8 / int4

        params = _tree(abstract_quantized({k: jax.ShapeDtypeStruct(v.shape, jnp.dtype(dtype), sharding=flat_sh[k])
                                           for k, v in flat.items()}, quantize))
        if scan:  # load(..., scan_layers=True): the layers stacked, the KV cache too
            from .generation.aot import stack_abstract

            params = stack_abstract(params, cfg.num_hidden_layers)
        cache_spec = P(("data", "fsdp") if batch % (sizes["data"] * sizes["fsdp"]) == 0 else None,
                       "tensor" if cfg.num_key_value_heads % sizes["tensor"] == 0 else None, None, None)
        cache_sh = NamedSharding(m, P(None, *cache_spec) if scan else cache_spec)
        cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cache_sh),
                             jax.eval_shape(lambda: init_cache(cfg, batch, seq, dtype, stacked=scan)))
        module = Chameleon(cfg, scan_layers=scan)
        rows = NamedSharding(m, P(cache_spec[0], None))

        def decode_step(params, cache, token, index):
            """One decode step: a token per row into slot ``index`` of the cache, next-token logits."""
            pos = jnp.broadcast_to(index, token.shape)
            kv_valid = jnp.broadcast_to(jnp.arange(seq)[None] <= index, (token.shape[0], seq))
            mask = kv_valid[:, None, :]
            hidden, cache = module.apply({"params": params}, token, pos, mask, cache=cache, cache_index=index,
                                         method=Chameleon.hidden_states)
            logits = module.apply({"params": params}, hidden[:, -1:], method=Chameleon.logits)
            return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache

        fn = jax.jit(decode_step, donate_argnums=(1,))
        args = (params, cache, jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=rows),
                jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(m, P())))
        params_bytes = per_device_bytes(params)
        cache_bytes = per_device_bytes(cache)
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    try:
        compiled = lowered.compile(compiler_options=dict(compiler_options) if compiler_options else None)
    except Exception as e:  # XLA:TPU refuses programs that exceed HBM: report that, with its figures
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg:
            raise
        compile_s = time.perf_counter() - t0
        known = params_bytes + (0 if offload_optimizer else opt_bytes) + cache_bytes
        temp = _gib_in(msg, r"temporaries \(([\d.]+)G\)")
        need = _gib_in(msg, r"(?:total memory required|program requires)[^(]*\(([\d.]+)G\)")
        total = known + temp if temp else need or known
        return PlanResult(task, topology, sizes, m.devices.size, params_bytes, opt_bytes, cache_bytes, known, 0, 0,
                          temp, total, hbm, compile_s, error=msg.splitlines()[0][:300])
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    spaces = {k: v for k, v in (cost or {}).items() if k.startswith("bytes accessed") and k != "bytes accessed"}
    return PlanResult(task, topology, sizes, m.devices.size, params_bytes, opt_bytes, cache_bytes,
                      mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                      mem.temp_size_in_bytes, total, hbm, compile_s,
                      flops=(cost or {}).get("flops"), bytes_accessed=(cost or {}).get("bytes accessed"),
                      host_bytes=opt_bytes if offload_optimizer else 0, memory_spaces=spaces or None)


def _gib_in(message: str, pattern: str) -> int:
    import re

    m = re.search(pattern, message)
    return int(float(m.group(1)) * GiB) if m else 0


def parse_mesh(text: str) -> dict:
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        if k.strip() not in ("data", "fsdp", "tensor") or not v.strip().isdigit():
            raise ChameleonError(f"--mesh {text!r}: expected e.g. fsdp=8 or data=2,fsdp=2,tensor=2")
        out[k.strip()] = int(v)
    return out


def plan_image_generation(config: ChameleonConfig, topology: str, mesh: Mapping[str, int], *, prompt: int = 64,
                          batch: int = 8, dtype: str = "bfloat16", guidance: tuple[float, float] = (3.0, 1.2),
                          images: int = 0, scan: bool = False) -> PlanResult:
    """``--task generate --image``: compile image mode's whole loop (head blocks, prefill, the decode
    ``while_loop`` over ``image_seq_length`` steps) on abstract params for ``batch`` prompts of ``prompt``
    tokens (with ``images`` input images) and report it like :func:`plan`. Guidance other than (1, 1)
    runs 3 cache rows per prompt (full prompt, its images, unconditioned), so the KV cache and the
    rows of every step are 3x text mode's. Memory: params (all the model holds, the VQ-VAE encoder
    included), the head's row blocks and the loop state (KV cache), plus the larger of the prefill's
    and the decode loop's temporaries; ``bytes_accessed``/``flops``: the decode loop's, which XLA's
    cost analysis counts for one trip of the loop body, i.e. per generated token."""
    from .generation.aot import abstract_params, compile_generate
    from .generation.image import ImageSettings

    hbm, sizes, m = _topology_mesh(topology, mesh)
    cfg = config.replace(dtype=dtype)
    if cfg.vq_config is not None and not len(cfg.image_vocab.image_token_ids):
        # a preset carries no vocabulary map (the tokenizer does): Chameleon's layout, image codes at ids 4..
        from .vocab import BOI_TOKEN, EOI_TOKEN, image_code_name

        n = cfg.vq_config.num_embeddings
        vm = {image_code_name(c): 4 + c for c in range(n)} | {BOI_TOKEN: 4 + n, EOI_TOKEN: 5 + n}
        cfg = cfg.replace(vocabulary_map=vm)
    settings, loop = ImageSettings(*guidance).validate(cfg, prompt)
    params = abstract_params(cfg, m, dtype, scan_layers=scan)
    t0 = time.perf_counter()
    try:
        out = compile_generate(cfg, params, m, batch=batch, prompt_length=prompt, settings=loop, modality="image",
                               streams=settings.streams, guidance=guidance, images=images)
    except Exception as e:  # XLA:TPU refuses programs that exceed HBM: report that
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        known = per_device_bytes(params)
        return PlanResult("generate (image)", topology, sizes, m.devices.size, known, 0, 0, known, 0, 0, 0, known, hbm,
                          time.perf_counter() - t0, error=str(e).splitlines()[0][:300])
    compile_s = time.perf_counter() - t0
    # XLA's argument figures leave out params a program never reads (the VQ-VAE, the LM head once its
    # rows are copied), but the model holds them all: count params + head blocks + loop state held, plus
    # the larger of the prefill's and the decode loop's temporaries and (not donated) outputs.
    params_bytes, state = per_device_bytes(params), out["abstract"]["state"]
    held = params_bytes + per_device_bytes(out["abstract"]["blocks"]) + per_device_bytes(state)
    pre, dec = (out[k].memory_analysis() for k in ("prefill", "decode"))
    extra = [pre.temp_size_in_bytes, dec.temp_size_in_bytes + max(0, dec.output_size_in_bytes - dec.alias_size_in_bytes)]
    mem = (pre, dec)[int(extra[1] >= extra[0])]
    cost = out["decode"].cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) and cost else cost) or {}
    return PlanResult("generate (image)", topology, sizes, m.devices.size, params_bytes, 0,
                      per_device_bytes(state["cache"]), held, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                      mem.temp_size_in_bytes, held + max(extra), hbm, compile_s, flops=cost.get("flops"),
                      bytes_accessed=cost.get("bytes accessed"))

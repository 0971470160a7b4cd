"""Ahead-of-time compiling of a generate call on abstract inputs (no weights, no devices needed).

:func:`compile_generate` lowers and compiles the very programs :meth:`Generator.generate` runs, in
its order: the head's row blocks (:class:`~.heads.VocabHead`), the prefill, and the decode loop
(the ``lax.while_loop`` with the KV cache, guidance and token choice), for params given as
``jax.ShapeDtypeStruct`` with shardings, e.g. over a TPU topology's abstract devices
(``jax.experimental.topologies``; see :mod:`chameleon_jax.plan`). Each program's outputs (shape,
dtype and the sharding XLA chose) become the next one's abstract inputs, as the arrays would at
run time, so a TPU lowering or compile failure anywhere in the loop shows up on a CPU host.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ..config import ChameleonConfig
from ..model import Chameleon
from ..sharding import batch_sharding
from .processors import GenerationSettings
from .sampler import Generator


def abstract_params(config: ChameleonConfig, mesh, dtype: str | None = None, scan_layers: bool = False) -> dict:
    """The param tree as ShapeDtypeStructs sharded over ``mesh`` as :func:`chameleon_jax.load` places
    them (VQ-VAE encoder included when the config has one; no VQ-GAN decoder); ``dtype``: every
    param's (default: as initialized, float32); ``scan_layers``: the stacked tree ``load(...,
    scan_layers=True)`` holds (each layer leaf [L, ...], the layer axis replicated)."""
    from ..checkpoint.hf import expected_params
    from ..sharding import param_shardings
    from ..training.step import _tree

    flat = expected_params(config, vq_decoder=False)
    sh = param_shardings(config, mesh, {k: v.shape for k, v in flat.items()})
    dt = None if dtype is None else np.dtype(dtype)
    tree = _tree({k: jax.ShapeDtypeStruct(v.shape, dt or v.dtype, sharding=sh[k]) for k, v in flat.items()})
    return stack_abstract(tree, config.num_hidden_layers) if scan_layers else tree


def stack_abstract(tree, num_layers: int):
    """An abstract per-layer tree (ShapeDtypeStructs with NamedShardings) -> the stacked one."""
    from ..model.scan import stack_layers, stacked_sharding

    def stack(xs):
        return jax.ShapeDtypeStruct((num_layers,) + xs[0].shape, xs[0].dtype, sharding=stacked_sharding(xs[0].sharding))

    return stack_layers(tree, num_layers, stack)


def _like(outputs, shardings):
    """A compiled program's outputs -> ShapeDtypeStructs carrying the shardings XLA gave them."""
    return jax.tree.map(lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s), outputs, shardings)


def compile_generate(config: ChameleonConfig, params, mesh, *, batch: int, prompt_length: int,
                     settings: GenerationSettings | None = None, modality: str = "text", streams: int = 1,
                     guidance: tuple[float, float] = (1.0, 1.0), images: int = 0,
                     generator: Generator | None = None) -> dict:
    """Compile one generate call of ``batch`` prompts (``streams`` cache rows each) of
    ``prompt_length`` tokens, with ``images`` input images (pixel_values through the VQ-VAE
    encoder in the prefill), for abstract ``params`` on ``mesh``; the prompt rows are sharded as
    :meth:`ChameleonModel.put_batch` places them. Params holding the stacked ``layers`` tree
    (:func:`abstract_params` with ``scan_layers``) compile the scanned model (stacked KV cache). Image mode: ``modality="image"``,
    ``settings.max_new_tokens`` = the image's token count, ``streams=3`` with guidance.

    Returns {"plan", "blocks", "prefill", "decode", "abstract"}: the :class:`~.sampler.Plan`, the
    ``jax.stages.Compiled`` of each program (``memory_analysis()``, ``cost_analysis()``, ``as_text()``),
    and "abstract": {"blocks", "state"}, the head's row blocks and the loop state as the programs
    output them (ShapeDtypeStructs with XLA's shardings).
    """
    settings = (settings or GenerationSettings()).validate(config, prompt_length)
    from ..model.scan import is_stacked

    gen = generator or Generator(Chameleon(config, scan_layers=is_stacked(params)), config)
    rows = batch * streams
    plan = gen.plan(batch, prompt_length, settings, modality, streams)
    knobs = gen.knobs(settings, modality, guidance)
    replicated = NamedSharding(mesh, P())
    knobs = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=replicated) for k, v in knobs.items()}

    def rows_of(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, shape))

    ids = rows_of((rows, plan.prompt_bucket), np.int32)
    mask = rows_of((rows, plan.prompt_bucket), np.int32)
    pixels = order = None
    if images:
        vq = config.vq_config
        pixels = rows_of((images, vq.in_channels, vq.resolution, vq.resolution), np.float32)
        # as build_streams gives it for image mode with guidance: the image stream sees the images again
        order = jax.ShapeDtypeStruct((images * (2 if streams == 3 else 1),), np.int32, sharding=replicated)

    head = gen.head(modality)
    out = {"plan": plan, "blocks": head._build.lower(params).compile()}
    blocks = _like(out["blocks"].out_info, out["blocks"].output_shardings)
    out["prefill"] = gen._prefill.lower(params, blocks, ids, mask, pixels, order, knobs, plan=plan).compile()
    state = _like(out["prefill"].out_info, out["prefill"].output_shardings)
    limit = jax.ShapeDtypeStruct((), np.int32, sharding=replicated)
    out["decode"] = gen._decode.lower(params, blocks, state, knobs, limit, plan=plan).compile()
    out["abstract"] = {"blocks": blocks, "state": state}
    return out

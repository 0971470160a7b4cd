"""Fine-tuning data: JSONL of interleaved image-text records -> padded, bucketed numpy batches.

Record forms (one JSON object per line; other keys are ignored):

- ``{"text": "a photo <image> of a cat", "images": ["cat.png"]}``: a document, trained on every
  token. Each ``<image>`` takes the next image in order.
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "...", "images": [...]}]}``: a
  chat, trained on assistant turns only. Rendered (in the spirit of HF's Chameleon chat template)::

      <s>{system}\\n USER: {content}\\n ASSISTANT: {content}</s> USER: ...

  The loss covers each assistant ``{content}`` and the ``</s>`` after it. A message whose
  ``content`` holds no ``<image>`` but lists images gets ``<image>\\n`` per image in front.
- ``{"input_ids": [1, 260, ...], "labels": [...]}``: already tokenized, image tokens included (e.g.
  images tokenized once up front with ``model.image_tokens``); taken as is, no bos/eos added.
  ``labels`` (same length; -100 = no loss) defaults to ``input_ids`` (trained on every token).

Image paths are relative to the JSONL file's directory. Each ``<image>`` becomes
``boi + image_seq_length x <image> + eoi``; the frozen VQ-VAE later turns the placeholders into
image tokens (the trainer does that once per batch, outside the differentiated step).

Batching (:class:`DataLoader`): one optimizer step takes ``grad_accum x batch_size`` examples,
delivered as ``[grad_accum, batch_size, T]`` arrays, right-padded with the pad token
(attention_mask 0, labels -100). ``T`` is the smallest *length bucket* holding the longest example
of the step (default buckets: powers of two from 64 up to ``max_length``, and ``max_length``), so
the jitted step compiles once per bucket, not once per length. No packing: examples never share a
row. Order: a permutation of the dataset per epoch from ``(seed, epoch)``; with
``length_grouping=g`` each window of ``g`` step batches is sorted by length first (less padding)
and the batches of a window are shuffled. The last incomplete step batch of an epoch is dropped.
The position ``(epoch, index)`` (index = examples consumed in the epoch) goes into checkpoints;
``load_state_dict`` resumes exactly there.

Multi-host: ``batch_size`` is global. Every process computes the same order (it depends only on
the seed, the epoch and the dataset) and the same bucket length (from the whole step batch), but
collates, tokenizes nothing more and decodes images of only its own rows of each microbatch: by
default process ``i`` of ``n`` takes rows ``[i * batch_size / n, (i + 1) * batch_size / n)``;
``rows`` overrides that with the rows the batch sharding gives this process's devices
(:func:`process_rows`). The position is global, so a checkpoint resumes the same order with any
process count.

Bad input raises ChameleonError naming ``file:line``: a line that is not JSON or lacks fields
(``skip_bad_lines`` skips and counts those instead), a missing image file, a sequence longer than
``max_length`` (``truncate`` cuts it instead, dropping an image the cut would split).

The loader is plain numpy + Pillow (through the processor): deterministic, single-threaded image
decoding per step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import ChameleonError
from ..model.loss import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
USER_PREFIX, ASSISTANT_PREFIX = "USER: ", "ASSISTANT: "


@dataclass(frozen=True)
class Example:
    """One tokenized record: ``ids``/``labels`` int32 [L] (labels -100 where no loss), the image
    files in placeholder order, and ``source`` (``file:line``) for messages."""

    ids: np.ndarray
    labels: np.ndarray
    images: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Dataset:
    examples: list[Example]
    path: str
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)


def default_buckets(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    return tuple(out) + (max_length,)


class _Bad(Exception):
    """A malformed record (skippable with skip_bad_lines)."""


Segment = tuple[str | None, bool, list[str]]  # (text, or None for </s>; trained; image paths)


def _parse_record(line: str, directory: str, tok: "_Tokenizer") -> tuple[list[Segment], bool]:
    """A JSONL line -> ([(text segment or None for </s>, trained, image paths)], is_document), or
    for a pre-tokenized record ((ids, labels), True); raises _Bad on malformed input."""
    image_token = tok.image_token
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Bad(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise _Bad(f"expected a JSON object, got {type(rec).__name__}")

    def images_of(obj, where: str) -> list[str]:
        imgs = obj.get("images", [])
        if not isinstance(imgs, list) or not all(isinstance(p, str) for p in imgs):
            raise _Bad(f"{where}\"images\" must be a list of file paths, got {imgs!r:.80}")
        return [p if os.path.isabs(p) else os.path.join(directory, p) for p in imgs]

    def checked(text, imgs, where: str, implicit: bool) -> str:
        n = text.count(image_token)
        if n == 0 and imgs and implicit:
            return f"{image_token}\n" * len(imgs) + text
        if n != len(imgs):
            raise _Bad(f"{where}text has {n} {image_token} placeholder(s) but {len(imgs)} image(s) "
                       "are listed")
        return text

    if sum(k in rec for k in ("text", "messages", "input_ids")) > 1:
        raise _Bad('has more than one of "text", "messages", "input_ids"; use one form per record')
    if "input_ids" in rec:
        return _token_record(rec, tok), True
    if "text" in rec:
        text = rec["text"]
        if not isinstance(text, str):
            raise _Bad(f'"text" must be a string, got {type(text).__name__}')
        imgs = images_of(rec, "")
        return [(checked(text, imgs, "", implicit=False), True, imgs)], True
    if "messages" not in rec:
        raise _Bad('needs a "text" field (document) or a "messages" field (chat)')
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise _Bad('"messages" must be a non-empty list of {"role", "content"} objects')
    segments = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]: "
        if not isinstance(m, dict):
            raise _Bad(f"{where}expected an object, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _Bad(f"{where}role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _Bad(f'{where}"content" must be a string, got {type(content).__name__}')
        imgs = images_of(m, where)
        content = checked(content, imgs, where, implicit=True)
        if role == "system":
            segments.append((content + "\n", False, imgs))
        elif role == "user":
            segments.append((USER_PREFIX + content + "\n", False, imgs))
        else:
            segments.append((ASSISTANT_PREFIX, False, []))
            segments.append((content, True, imgs))
            segments.append((None, True, []))  # </s>
    if not any(role == "assistant" for role in (m.get("role") for m in msgs)):
        raise _Bad("a chat record needs at least one assistant message (the loss is on assistant turns)")
    return segments, False


def _token_record(rec: dict, tok: "_Tokenizer") -> tuple[np.ndarray, np.ndarray]:
    """A pre-tokenized record -> (ids, labels) int64, checked against the tokenizer's vocabulary;
    raises _Bad on malformed input."""
    def ints(key):
        v = rec[key]
        if not isinstance(v, list) or not v or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise _Bad(f'"{key}" must be a non-empty list of integers')
        big = next((i for i in v if not -2**31 <= i < 2**31), None)
        if big is not None:
            raise _Bad(f'"{key}" holds {big}, not a token id')
        return np.asarray(v, np.int64)

    if "images" in rec:
        raise _Bad('"input_ids" records hold their image tokens already; drop "images"')
    ids = ints("input_ids")
    labels = ints("labels") if "labels" in rec else ids.copy()
    if len(labels) != len(ids):
        raise _Bad(f'"labels" has {len(labels)} entries but "input_ids" has {len(ids)}')
    if ((labels < 0) & (labels != IGNORE_INDEX)).any():
        raise _Bad(f'"labels" entries must be token ids or {IGNORE_INDEX}')
    top = max(int(ids.max()), int(labels.max()))
    if ids.min() < 0 or top >= tok.vocab_size:
        raise _Bad(f"token ids must lie in [0, {tok.vocab_size}) (the tokenizer's vocabulary), "
                   f"got {int(ids.min())}..{top}")
    if tok.image_id is not None and (ids == tok.image_id).any():
        raise _Bad("input_ids hold the <image> placeholder; put the image's tokens in its place")
    return ids, labels


class _Tokenizer:
    """Text segments -> ids with each ``<image>`` expanded to boi + N x <image> + eoi."""

    def __init__(self, processor):
        p = processor
        self.tok, self.image_token = p.tokenizer, p.image_token
        self.bos, self.eos = p.bos_token_id, p.eos_token_id
        self.boi, self.eoi, self.image_id = p.boi_token_id, p.eoi_token_id, p.image_token_id
        self.per_image = p.image_seq_length
        self.vocab_size = p.tokenizer.get_vocab_size(with_added_tokens=True)
        if self.eos is None:
            raise ChameleonError("tokenizer: no eos_token (needed to end documents and assistant turns)")

    def encode(self, segments) -> tuple[list[int], list[int], list[int]]:
        """-> (ids, trained 0/1 per id, start index of each image span)."""
        pieces = [piece for text, _, _ in segments if text for piece in text.split(self.image_token)]
        encoded = iter(self.tok.encode_batch(pieces, add_special_tokens=False)) if pieces else iter(())
        ids = [] if self.bos is None else [self.bos]
        trained = [0] * len(ids)
        spans = []
        for text, train, _ in segments:
            if text is None:
                ids.append(self.eos)
                trained.append(1)
                continue
            for j, _ in enumerate(text.split(self.image_token)):
                if j:
                    spans.append(len(ids))
                    ids += [self.boi] + [self.image_id] * self.per_image + [self.eoi]
                    trained += [int(train)] * (self.per_image + 2)
                piece = next(encoded).ids
                ids += piece
                trained += [int(train)] * len(piece)
        return ids, trained, spans


def read_jsonl(path: str, processor, *, max_length: int, truncate: bool = False, skip_bad_lines: bool = False,
               append_eos: bool = True) -> Dataset:
    """Parse, check and tokenize every record of a JSONL file (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ChameleonError(f"{path}: data file not found")
    directory = os.path.dirname(os.path.abspath(path))
    tok = _Tokenizer(processor)
    examples: list[Example] = []
    stats = {"lines": 0, "skipped": 0, "truncated": 0, "skipped_lines": []}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except UnicodeDecodeError as e:
        raise ChameleonError(f"{path}: not UTF-8 text ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        stats["lines"] += 1
        where = f"{path}:{lineno}"
        try:
            segments, is_document = _parse_record(line, directory, tok)
            if isinstance(segments, tuple):  # pre-tokenized: taken as is, only cut to max_length
                ids_a, labels = segments
                if len(ids_a) > max_length:
                    if not truncate:
                        raise _Bad(f"{len(ids_a)} tokens is longer than max_length {max_length}; raise "
                                   "max_length or set truncate=true to cut it")
                    ids_a, labels = ids_a[:max_length], labels[:max_length]
                    stats["truncated"] += 1
                examples.append(Example(ids_a.astype(np.int32), labels.astype(np.int32), (), where))
                continue
            images = [p for _, _, imgs in segments for p in imgs]
            for img in images:
                if not os.path.isfile(img):
                    raise _Bad(f"image file {img} not found")
        except _Bad as e:
            if not skip_bad_lines:
                raise ChameleonError(f"{where}: {e}") from None
            stats["skipped"] += 1
            if len(stats["skipped_lines"]) < 20:
                stats["skipped_lines"].append(f"{where}: {e}")
            continue
        if is_document and append_eos:
            segments.append((None, True, []))
        ids, trained, spans = tok.encode(segments)
        if len(ids) > max_length:
            if not truncate:
                raise ChameleonError(
                    f"{where}: {len(ids)} tokens ({len(images)} image(s) x {tok.per_image + 2}) is longer "
                    f"than max_length {max_length}; raise max_length or set truncate=true to cut it"
                )
            cut = max_length
            kept = [s for s in spans if s + tok.per_image + 2 <= cut]
            if len(kept) < len(spans):  # don't split an image: cut before its boi
                cut = min(cut, spans[len(kept)])
            ids, trained, images = ids[:cut], trained[:cut], images[: len(kept)]
            stats["truncated"] += 1
        ids_a = np.asarray(ids, np.int32)
        labels = np.where(np.asarray(trained, bool), ids_a, IGNORE_INDEX).astype(np.int32)
        examples.append(Example(ids_a, labels, tuple(images), where))
    if not examples:
        raise ChameleonError(
            f"{path}: no usable records ({stats['lines']} line(s), {stats['skipped']} skipped)")
    stats["examples"] = len(examples)
    return Dataset(examples, path, stats)


class DataLoader:
    """Deterministic, resumable batches over a :class:`Dataset` (see the module docstring).

    ``batch_size`` is global. ``process_index`` / ``process_count`` (default: this JAX process's)
    pick this process's share of each microbatch: a contiguous ``batch_size / process_count`` rows,
    or the row indices ``rows`` (sorted, within ``range(batch_size)``; :func:`process_rows` gives
    them for a batch sharding). The bucket length is chosen from the global step batch so every
    process agrees. Each batch's ``"rows"`` [grad_accum, local rows] are the dataset indices of the
    examples collated.
    """

    def __init__(self, dataset: Dataset, processor, *, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 max_length: int, buckets=None, length_grouping: int = 0, process_index: int | None = None,
                 process_count: int | None = None, rows=None):
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        process_index, process_count = int(process_index), int(process_count)
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ChameleonError(f"process_index {process_index}: expected 0 <= index < process_count "
                                 f"{process_count}")
        self.dataset, self.processor = dataset, processor
        self.batch_size, self.grad_accum, self.seed = int(batch_size), int(grad_accum), int(seed)
        self.step_size = self.batch_size * self.grad_accum
        if self.batch_size < 1 or self.batch_size % process_count:
            raise ChameleonError(
                f"batch_size {batch_size}: the global batch must divide evenly over the {process_count} "
                f"processes (each loads batch_size / {process_count} rows); use a multiple of {process_count}")
        if len(dataset) < self.step_size:
            raise ChameleonError(
                f"{dataset.path}: {len(dataset)} examples, fewer than one step "
                f"(batch_size {batch_size} x grad_accum {grad_accum} = {self.step_size})"
            )
        self.buckets = tuple(sorted(buckets or default_buckets(max_length)))
        if self.buckets[-1] < max_length:
            raise ChameleonError(
                f"buckets {list(self.buckets)}: the largest must be >= max_length {max_length}")
        self.length_grouping = int(length_grouping)
        self.process_index, self.process_count = process_index, process_count
        if rows is None:
            local = self.batch_size // process_count
            rows = range(process_index * local, (process_index + 1) * local)
        self.rows = np.asarray(list(rows), np.int64)
        if (self.rows.size == 0 or np.any(np.diff(self.rows) <= 0) or self.rows[0] < 0
                or self.rows[-1] >= self.batch_size):
            raise ChameleonError(f"rows {self.rows.tolist()[:16]}: expected increasing row indices within "
                                 f"batch_size {self.batch_size}")
        self.pad_id = processor.pad_token_id if processor.pad_token_id is not None else 0
        self.lengths = np.array([len(e) for e in dataset.examples])
        self.epoch, self.index = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ order
    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.step_size

    def order(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch, step_size] example indices of ``epoch``."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(len(self.dataset))[: self.steps_per_epoch * self.step_size]
        batches = perm.reshape(self.steps_per_epoch, self.step_size)
        if self.length_grouping > 1:
            g = self.length_grouping
            out = []
            for w in range(0, len(batches), g):
                window = batches[w:w + g].reshape(-1)
                window = window[np.argsort(self.lengths[window], kind="stable")]
                window = window.reshape(-1, self.step_size)
                out.append(window[rng.permutation(len(window))])
            batches = np.concatenate(out)
        self._order_cache = (epoch, batches)
        return batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "num_examples": len(self.dataset), "step_size": self.step_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_examples", "step_size"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ChameleonError(
                    f"{self.dataset.path}: the checkpoint's data position was made with {key}={state[key]}, "
                    f"but now {key}={self.state_dict()[key]}; resuming would not continue the same order"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    # ------------------------------------------------------------------ batches
    def bucket(self, length: int) -> int:
        for b in self.buckets:
            if b >= length:
                return b
        raise ChameleonError(f"sequence of {length} tokens exceeds the largest bucket {self.buckets[-1]}")

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        idx = self.order(self.epoch)[self.index // self.step_size]
        self.index += self.step_size
        if self.index + self.step_size > len(self.dataset):
            self.epoch, self.index = self.epoch + 1, 0
        return self.collate(idx)

    def collate(self, idx: np.ndarray) -> dict:
        """Example indices of one step (grad_accum * batch_size) -> this process's arrays."""
        a, b = self.grad_accum, self.batch_size
        t = self.bucket(int(self.lengths[idx].max()))  # from the global step: every process agrees
        rows = idx.reshape(a, b)[:, self.rows]
        local = rows.shape[1]
        ids = np.full((a, local, t), self.pad_id, np.int32)
        labels = np.full((a, local, t), IGNORE_INDEX, np.int32)
        mask = np.zeros((a, local, t), np.int32)
        images: list[str] = []
        for i in range(a):
            for j in range(local):
                ex = self.dataset.examples[rows[i, j]]
                n = len(ex)
                ids[i, j, :n], labels[i, j, :n], mask[i, j, :n] = ex.ids, ex.labels, 1
                images += ex.images
        pixels = self.processor.preprocess_images(images) if images else None
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels,
                "epoch": self.epoch, "index": self.index, "rows": rows}


def process_rows(sharding, shape) -> np.ndarray:
    """The batch rows (dim 1 of an [A, B, T] batch of global ``shape``) that this process's devices
    hold under ``sharding``, in increasing order: what ``jax.make_array_from_process_local_data``
    expects this process to pass (its devices' slices, concatenated in order)."""
    rows = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        rows.update(range(shape[1])[index[1]])
    return np.asarray(sorted(rows), np.int64)

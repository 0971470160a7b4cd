"""Hugging Face Hub ids (``"facebook/chameleon-7b"``) -> a local snapshot directory.

Only used when a path given to :func:`chameleon_jax.load` or ``ChameleonProcessor.from_pretrained``
is not a local directory or file and looks like ``owner/name``. Resolution goes through
``huggingface_hub`` (optional: ``pip install huggingface_hub``), so its cache (``HF_HOME`` /
``HF_HUB_CACHE``), token (``HF_TOKEN`` or ``huggingface-cli login``) and offline mode
(``HF_HUB_OFFLINE=1``, or ``local_files_only=True``) apply. Only config / tokenizer JSON and
safetensors files are fetched (never pickles).
"""

from __future__ import annotations

import os
import re

from .errors import ChameleonError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")


def looks_like_repo_id(path: str) -> bool:
    return bool(_REPO_ID.match(path)) and not os.path.exists(path) and ".." not in path


def resolve(path: str | os.PathLike, *, local_files_only: bool | None = None, revision: str | None = None,
            token: str | None = None) -> str:
    """``path`` itself when it exists locally or is no Hub id; else the snapshot directory of that
    repo (downloaded into the Hub cache unless it is there already or ``local_files_only``)."""
    path = os.fspath(path)
    if not looks_like_repo_id(path):
        return path
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise ChameleonError(f"{path}: no such local path; loading it as a Hugging Face Hub id needs "
                             "huggingface_hub (pip install huggingface_hub)") from None
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        return huggingface_hub.snapshot_download(path, revision=revision, token=token,
                                                 local_files_only=local_files_only, allow_patterns=list(PATTERNS))
    except hub_errors.GatedRepoError:
        raise ChameleonError(
            f"{path}: the Hub repo is gated and this account has no access yet: accept its license on "
            f"https://huggingface.co/{path}, then set HF_TOKEN (or run `huggingface-cli login`)") from None
    except hub_errors.RepositoryNotFoundError:
        raise ChameleonError(f"{path}: no such local path and no such Hub repo (or it is private: set HF_TOKEN)") from None
    except hub_errors.RevisionNotFoundError:
        raise ChameleonError(f"{path}: revision {revision!r} not found on the Hub") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, OSError) as e:
        from huggingface_hub import constants

        where = "offline mode is on" if local_files_only else "the Hub could not be reached (no network?)"
        raise ChameleonError(
            f"{path}: not a local path, not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and {where}: "
            f"download it once with network access, or pass a local checkpoint directory ({type(e).__name__})"
        ) from None

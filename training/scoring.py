"""Score a data set with a progress bar, saving partial results so a killed run resumes.

Scoring thousands of images on a CPU takes minutes. Scores are appended to a cache
file (written atomically) every few batches; the cache is keyed by everything that
determines the scores (weights hash, the images' own bytes and shape, k, seed), so a
stale cache is never reused: not even when the files behind a data spec changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from model.checkpoint import atomic_write_bytes
from model.scores import MODEL_SCORE_NAMES, compute_scores
from model.vaebm import VAEBM
from training.runtime import progress_bar

log = logging.getLogger(__name__)


def cache_key(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def scores_key(weights_sha256: str, images: np.ndarray, iwae_k: int, seed: int) -> str:
    """The cache key of scoring ``images``: keyed on their content, not on the data spec
    that named them, since the files behind a spec can change between two runs."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
    data = {"sha256": digest, "shape": list(images.shape), "dtype": str(images.dtype)}
    return cache_key(weights=weights_sha256, data=data, k=iwae_k, seed=seed)


def score_dataset(
    model: VAEBM,
    images: np.ndarray,
    *,
    iwae_k: int,
    seed: int,
    batch_size: int = 64,
    cache: Path | None = None,
    key: str = "",
    desc: str = "scoring",
    save_every: int = 8,
) -> dict[str, np.ndarray]:
    """All scores for uint8 images (N, C, H, W); resumes from ``cache`` when it matches ``key``."""
    done = _load_cache(cache, key) if cache else {}
    start = len(done["elbo_bpd"]) if done else 0
    parts = {name: [done[name]] if done else [] for name in MODEL_SCORE_NAMES}
    with progress_bar(total=len(images), initial=start, desc=desc, unit="img") as bar:
        for i, begin in enumerate(range(start, len(images), batch_size)):
            batch = images[begin : begin + batch_size]
            for name, values in compute_scores(model, batch, iwae_k=iwae_k, seed=seed).items():
                parts[name].append(values)
            bar.update(len(batch))
            if cache and (i + 1) % save_every == 0:
                _save_cache(cache, key, parts)
    scores = {name: np.concatenate(values) for name, values in parts.items()}
    if cache:
        _save_cache(cache, key, parts)
    return scores


def _save_cache(path: Path, key: str, parts: dict[str, list[np.ndarray]]) -> None:
    buffer = io.BytesIO()
    arrays = {n: np.concatenate(v) for n, v in parts.items()}
    np.savez(buffer, key=np.array(key), **arrays)  # type: ignore[arg-type]  # no score is named allow_pickle
    atomic_write_bytes(path, buffer.getvalue())


def _load_cache(path: Path, key: str) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return {}
            cached = {name: f[name] for name in MODEL_SCORE_NAMES}
    except Exception as exc:  # a damaged zip raises BadZipFile, EOFError, zlib.error, ...
        log.warning("ignoring unreadable score cache %s: %s", path, exc)
        return {}
    log.info("resuming from %s: %d images already scored", path, len(cached["elbo_bpd"]))
    return cached

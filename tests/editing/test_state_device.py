"""Where a weight method keeps its state: the ``auto`` rule at Llama-3-8B's shape, explicit
devices, and the editor holding its state there (on this CPU-only machine, the CPU)."""

from __future__ import annotations

import pytest
import torch

from editing.editor import Editor
from editing.hparams import EditHparams
from editing.models import LoadedModel
from editing.state_device import bytes_needed, choose, resolve

GPU = torch.device("cuda:0")  # a name only: nothing here touches a GPU
LLAMA3_8B = (14336, 4096, 5)  # in, out, edited blocks


def test_the_state_at_llama3_8b_is_the_memory_plans() -> None:
    """docs/gpu.md: 5.64 GB a layer kept (C0, S_KK, the prior factor, S_RK, W0)."""
    kept = bytes_needed(*LLAMA3_8B[:2], 1) - 3 * (14336**2 + 14336 * 4096) * 8
    assert kept == pytest.approx(5.64e9, rel=0.01)


@pytest.mark.parametrize(
    ("free", "fast", "where"),
    [
        (125e9, True, GPU),  # an H200 after the weights: state and peak fit with room
        (64e9, True, torch.device("cpu")),  # an 80 GB card: the plan's peak would crowd it
        (125e9, False, torch.device("cpu")),  # room, but float64 at 1/64 of float32's rate
        (None, True, torch.device("cpu")),  # free memory unknown
    ],
)
def test_auto_keeps_the_state_beside_a_gpu_model_only_with_room_and_fast_float64(
    free: float | None, fast: bool, where: torch.device
) -> None:
    needed = bytes_needed(*LLAMA3_8B)
    assert choose(GPU, needed, None if free is None else int(free), fast) == where


def test_a_cpu_model_keeps_it_on_the_cpu_and_a_device_setting_is_taken_as_given() -> None:
    cpu = torch.device("cpu")
    assert choose(cpu, 10**15, 0, False) == cpu
    assert resolve("auto", cpu, *LLAMA3_8B) == cpu
    assert resolve("cuda:1", cpu, *LLAMA3_8B) == torch.device("cuda:1")
    with pytest.raises(ValueError, match="state_device"):
        EditHparams(state_device="the-gpu")


def test_the_editor_holds_a_weight_methods_state_on_its_state_device(
    lm: LoadedModel, c0: dict
) -> None:
    editor = Editor(lm, EditHparams(state_device="cpu"), "d4s", c0=c0)
    assert editor.state_device == torch.device("cpu")
    assert all(m.device.type == "cpu" for m in editor.method.c0.values())
    assert Editor(lm, EditHparams(), "memory", c0=c0).state_device is None  # it keeps none

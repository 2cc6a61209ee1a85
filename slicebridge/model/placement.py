"""One model over several devices: which device holds which decoder layer, the move, and what went where.

A model larger than one GPU spans a device group (``cuda:0+cuda:1``): the embeddings on the first device, the
decoder layers in contiguous runs balanced by their tensors' bytes (``plan``), the final norm where the last layer
is and the head on the last device (a head tied to the embeddings stays with them). ``place`` moves a portable
sliced model so; its forward then takes the hidden states from one layer's device to the next
(``sliced_decoder.to_layer_device``). ``hf_device_map`` turns the same plan into accelerate's device map for a
Hugging Face model (the official slicegpt model, dispatched by accelerate's hooks). ``Placement.describe`` and
``describe_device_map`` say in words what went where, for results: ``{"cuda:0": "embed, layers 0-13", ...}``.

A device may appear more than once in a group (``cpu+cpu``: two shares on the host, as tests use it), so a plan
names each layer's device by its position in the group.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

log = logging.getLogger(__name__)

_LAYER = re.compile(r"(?P<prefix>.*?)layers\.(?P<index>\d+)")


def plan(
    layer_bytes: Sequence[int], devices: Sequence[object], *, first_bytes: int = 0, last_bytes: int = 0
) -> list[int]:
    """The device of each layer, as its position in ``devices``: contiguous runs in the devices' order, the fullest
    device as empty as can be. ``first_bytes`` (the embeddings) sit on the first device before the layers,
    ``last_bytes`` (the head) on the last one after them. Of equally good plans, the one filling earlier devices
    first; with more devices than layers some devices hold no layer."""
    count, total = len(devices), len(layer_bytes)
    if count < 1:
        raise ValueError("a placement needs at least one device")
    if any(size < 0 for size in (*layer_bytes, first_bytes, last_bytes)):
        raise ValueError("sizes in bytes cannot be negative")
    before = [0]
    for size in layer_bytes:
        before.append(before[-1] + size)

    def load(device: int, start: int, end: int) -> int:
        extra = (first_bytes if device == 0 else 0) + (last_bytes if device == count - 1 else 0)
        return before[end] - before[start] + extra

    best = [[load(0, 0, end) for end in range(total + 1)]]  # best[d][end]: layers [0, end) on devices 0..d
    starts: list[list[int]] = [[0] * (total + 1)]  # where device d's run starts in that best plan
    for device in range(1, count):
        row, row_starts = [], []
        for end in range(total + 1):
            # the latest start among the best: device d takes as few layers as it can, earlier devices fill first
            cost, start = min((max(best[-1][start], load(device, start, end)), -start) for start in range(end + 1))
            row.append(cost)
            row_starts.append(-start)
        best.append(row)
        starts.append(row_starts)
    layers, end = [0] * total, total
    for device in range(count - 1, -1, -1):
        start = starts[device][end]
        layers[start:end] = [device] * (end - start)
        end = start
    return layers


def module_bytes(module: nn.Module) -> int:
    """The bytes of a module's parameters and buffers (each tensor counted once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Placement:
    """Where a portable model's parts are: ``layers[i]`` and ``head`` are positions in ``devices``."""

    devices: list[str]
    layers: list[int]
    head: int

    def entries(self) -> list[tuple[str, int]]:
        """(part, device position) in the order the forward runs them: embed, layers.N, norm, head."""
        norm = self.layers[-1] if self.layers else 0
        layers = [(f"layers.{index}", device) for index, device in enumerate(self.layers)]
        return [("embed", 0), *layers, ("norm", norm), ("head", self.head)]

    def describe(self) -> dict[str, str]:
        """``{"cuda:0": "embed, layers 0-13", "cuda:1": "layers 14-27, norm, head"}`` (a device named twice in the
        group, as ``cpu+cpu``, is keyed ``cpu#0``, ``cpu#1``); a device holding nothing is left out."""
        keys = [
            f"{device}#{self.devices[:position].count(device)}" if self.devices.count(device) > 1 else device
            for position, device in enumerate(self.devices)
        ]
        return _summarize((name, keys[position]) for name, position in self.entries())


def place(model: nn.Module, devices: Sequence[str]) -> Placement:
    """Spread a portable sliced model over ``devices`` (in place, in its dtype) as ``plan`` has it."""
    devices = [str(device) for device in devices]
    decoder = model.get_decoder()
    layers = decoder.layers
    first_parts = [module for module in decoder.children() if module is not layers]  # embeddings (norm, rotary: none)
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight
    layer_devices = plan(
        [module_bytes(layer) for layer in layers],
        devices,
        first_bytes=sum(map(module_bytes, first_parts)),
        last_bytes=0 if tied else module_bytes(head),
    )
    for module in first_parts:
        module.to(devices[0])
    for layer, position in zip(layers, layer_devices, strict=True):
        layer.to(devices[position])
    placement = Placement(devices, layer_devices, 0 if tied else len(devices) - 1)
    head.to(devices[placement.head])
    log.info("placed over %s: %s", "+".join(devices), placement.describe())
    return placement


def hf_device_map(model: nn.Module, placement: Placement) -> dict[str, str]:
    """accelerate's device map of a Hugging Face causal LM on ``placement``, in the model's order: its decoder
    layers (its longest ``ModuleList``) as planned, its head on the head's device, and every other module on the
    way to the layers on the first device (registered before the layers) or on the last layer's (after them)."""
    named = dict(model.named_modules())
    lists = [name for name, module in named.items() if isinstance(module, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of decoder layers to place")
    layers_name = max(lists, key=lambda name: len(named[name]))
    if len(named[layers_name]) != len(placement.layers):
        raise ValueError(f"{layers_name} holds {len(named[layers_name])} layers, the plan {len(placement.layers)}")
    devices, head = placement.devices, model.get_output_embeddings()
    last = devices[placement.layers[-1]] if placement.layers else devices[0]
    device_map: dict[str, str] = {}

    def walk(prefix: str, module: nn.Module) -> None:
        after = False
        for child_name, child in module.named_children():
            name = prefix + child_name
            if name == layers_name:
                device_map.update({f"{name}.{index}": devices[at] for index, at in enumerate(placement.layers)})
                after = True
            elif layers_name.startswith(name + "."):
                walk(name + ".", child)
                after = True
            elif child is head:
                device_map[name] = devices[placement.head]
            else:
                device_map[name] = last if after else devices[0]

    walk("", model)
    return device_map


def describe_device_map(device_map: Mapping[str, object]) -> dict[str, str]:
    """An accelerate device map in words, as ``Placement.describe`` has it (GPU numbers as ``cuda:N``)."""
    named = (
        (name, f"cuda:{device}" if isinstance(device, int) else str(device)) for name, device in device_map.items()
    )
    return _summarize(named)


def _summarize(entries: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The parts on each device, in order."""
    held: dict[str, list[str]] = {}
    for name, device in entries:
        held.setdefault(device, []).append(name)
    return {device: ", ".join(_collapse(names)) for device, names in held.items()}


def _collapse(names: list[str]) -> list[str]:
    """Runs of consecutive layers in words: ``model.layers.3``, ``model.layers.4`` as ``model.layers 3-4``."""
    collapsed: list[str] = []
    run: tuple[str, int, int] | None = None  # the prefix, first and last index of the run that ends the list
    for name in names:
        match = _LAYER.fullmatch(name)
        if match and run is not None and match["prefix"] == run[0] and int(match["index"]) == run[2] + 1:
            run = (run[0], run[1], run[2] + 1)
            collapsed[-1] = f"{run[0]}layers {run[1]}-{run[2]}"
        elif match:
            run = (match["prefix"], int(match["index"]), int(match["index"]))
            collapsed.append(name if run[0] else f"layer {run[1]}")  # model.layers.7 stays a module's name
        else:
            run = None
            collapsed.append(name)
    return collapsed

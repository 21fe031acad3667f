"""Target construction across layers (METHODS §6), independent of the solver.

A builder decides which layers are edited and what each layer's output should become. It runs
before any weight changes (``build``); in the edit loop the editor asks ``residual(j, hidden)``
for the wanted change ``R [n, d]`` of edited layer ``j``, where ``hidden(l)`` returns the *current*
(partially edited) residual at the decisive token of each bare prompt. Builders never write
weights and never see the solver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from kedit.optimize import Anchors

Hidden = Callable[[int], torch.Tensor]  # layer -> [n, d] current residual at the decisive tokens


class Session(Protocol):
    """What a builder may ask of the editor (see kedit.editor.Editor)."""

    def optimize(self, layer: int) -> Anchors: ...

    def replay(self, layer: int, z: torch.Tensor, read_layers: list[int]) -> dict[int, torch.Tensor]: ...


@dataclass
class Targets:
    edit_layers: list[int]           # layers the solver changes, shallow to deep
    final_layer: int                 # layer whose target ``final_target`` the edit aims at
    final_target: torch.Tensor       # [n, d] (diagnostics: remaining residual at the last layer)
    anchors: list[Anchors]
    per_layer: dict[int, torch.Tensor] = field(default_factory=dict)  # fixed targets z_l [n, d], if any
    share: bool = False              # backward spreading: R = (z_L - h_L) / (layers left)

    def select(self, rows: list[int]) -> Targets:
        """The targets of requests ``rows`` only (single-request editing after batched anchors)."""
        return Targets(self.edit_layers, self.final_layer, self.final_target[rows], self.anchors,
                       {k: v[rows] for k, v in self.per_layer.items()}, self.share)

    def residual(self, j: int, hidden: Hidden) -> torch.Tensor:
        """Wanted output change ``R [n, d]`` of edited layer ``edit_layers[j]`` given current states."""
        if self.share:
            return (self.final_target - hidden(self.final_layer)) / (len(self.edit_layers) - j)
        layer = self.edit_layers[j]
        return self.per_layer[layer] - hidden(layer)


class OneLayer:
    """Edit only the last layer with ``R = z - h_L`` (anchor at that layer)."""

    name: ClassVar[str] = "onelayer"

    def anchor_layers(self, layers: list[int]) -> list[int]:
        return [layers[-1]]

    def build(self, session: Session, layers: list[int]) -> Targets:
        a = session.optimize(layers[-1])
        return Targets([layers[-1]], layers[-1], a.z, [a], per_layer={layers[-1]: a.z})


class BackwardSpread:
    """MEMIT: anchor at the last layer; layer j gets ``r / (L - j + 1)`` of the remaining residual."""

    name: ClassVar[str] = "backward"

    def anchor_layers(self, layers: list[int]) -> list[int]:
        return [layers[-1]]

    def build(self, session: Session, layers: list[int]) -> Targets:
        a = session.optimize(layers[-1])
        return Targets(list(layers), layers[-1], a.z, [a], share=True)


class ForwardReplay:
    """Anchor at the first layer; later targets from one no-grad replay of the original model.

    The targets ``z_2..z_L`` are what the unedited model computes downstream of ``z_1``, so they
    are mutually consistent; every layer then gets its full residual ``z_j - h_j``, no division.
    """

    name: ClassVar[str] = "forward"

    def anchor_layers(self, layers: list[int]) -> list[int]:
        return [layers[0]]

    def build(self, session: Session, layers: list[int]) -> Targets:
        a = session.optimize(layers[0])
        per_layer = {layers[0]: a.z, **session.replay(layers[0], a.z, list(layers[1:]))}
        return Targets(list(layers), layers[-1], per_layer[layers[-1]], [a], per_layer=per_layer)


class BLUE:
    """Baseline: independent anchors at the first and last layers; only those two are edited."""

    name: ClassVar[str] = "blue"

    def anchor_layers(self, layers: list[int]) -> list[int]:
        return [layers[0], layers[-1]] if len(layers) > 1 else [layers[0]]

    def build(self, session: Session, layers: list[int]) -> Targets:
        anchors = [session.optimize(layer) for layer in self.anchor_layers(layers)]
        edit = self.anchor_layers(layers)
        return Targets(edit, edit[-1], anchors[-1].z, anchors, per_layer={a.layer: a.z for a in anchors})


TARGETS: dict[str, type] = {"onelayer": OneLayer, "backward": BackwardSpread, "forward": ForwardReplay, "blue": BLUE}


def make_targets(name: str):
    """Instantiate a registered target construction by name (unknown names list the valid ones)."""
    if name not in TARGETS:
        raise ValueError(f"unknown target construction {name!r}; available: {sorted(TARGETS)}")
    return TARGETS[name]()

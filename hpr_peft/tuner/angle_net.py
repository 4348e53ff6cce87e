"""The angle predictor of an HPR layer, defined once for the layer and for the batched trainer.

``f(h) = π · sigmoid(z(h))`` where ``z`` is an MLP: ``(Linear + GELU)`` per hidden width, then
``Linear(., 1)``. An :class:`~hpr_peft.tuner.layer.HPRLayer` holds one ``nn.Sequential`` per adapter
(:func:`build_angle_net`). The trainer fits the nets of many layers at once as stacked tensors
(:class:`StackedAngleNets`); they are initialised from, and written back to, ``build_angle_net``
modules, so the trainer and the layer cannot disagree about the layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "StackedAngleNets",
    "angle_from_logits",
    "build_angle_net",
    "default_angle_hidden_sizes",
    "predict_angle",
]


def default_angle_hidden_sizes(hidden_size: int) -> list[int]:
    """Angle-net widths used when the config says ``None``: one hidden block of ``d // 2``."""
    return [max(1, hidden_size // 2)]


def build_angle_net(hidden_size: int, hidden_sizes: Sequence[int] | None) -> nn.Sequential:
    """The angle predictor: ``(Linear + GELU)`` per hidden width, then ``Linear(., 1)``.

    Its output ``z`` becomes the angle ``π · sigmoid(z)`` (:func:`angle_from_logits`).
    """
    if hidden_sizes is None:
        hidden_sizes = default_angle_hidden_sizes(hidden_size)
    modules: list[nn.Module] = []
    width = hidden_size
    for size in hidden_sizes:
        modules += [nn.Linear(width, size), nn.GELU()]
        width = size
    modules.append(nn.Linear(width, 1))
    return nn.Sequential(*modules)


def angle_from_logits(z: torch.Tensor) -> torch.Tensor:
    """The angle in radians, ``π · sigmoid(z)``, in ``(0, π)``."""
    return math.pi * torch.sigmoid(z)


def _parameter_dtype(module: nn.Module) -> torch.dtype:
    for parameter in module.parameters():
        return parameter.dtype
    return torch.float32


def predict_angle(net: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Predicted angle ``π · sigmoid(net(h))`` in radians, shape ``h.shape[:-1]``, float32.

    ``h`` is cast to the net's parameter dtype for the matmuls; the result is always float32.
    """
    z = net(h.to(_parameter_dtype(net))).squeeze(-1)
    return angle_from_logits(z.float())


class StackedAngleNets:
    """The angle nets of ``L`` layers with one layout, as stacked tensors for batched training.

    ``weights[k]`` is ``(L, in_k, out_k)`` (the transposed ``nn.Linear`` weight) and ``biases[k]``
    ``(L, out_k)`` for the ``k``-th Linear of :func:`build_angle_net`; ``keys`` names each Linear's
    ``weight`` / ``bias`` in that module's state dict.
    """

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor], keys: list[tuple[str, str]]):
        self.weights = weights
        self.biases = biases
        self.keys = keys

    @classmethod
    def initialise(
        cls, hidden_size: int, hidden_sizes: Sequence[int], seeds: Sequence[int], device: torch.device
    ) -> StackedAngleNets:
        """Default ``nn.Linear`` initialisation of each net from its own seed (one per layer), so a
        layer's start does not depend on which other layers train alongside it."""
        per_layer: list[list[nn.Linear]] = []
        keys: list[tuple[str, str]] = []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = build_angle_net(hidden_size, hidden_sizes)
            named = [(name, m) for name, m in net.named_children() if isinstance(m, nn.Linear)]
            keys = [(f"{name}.weight", f"{name}.bias") for name, _ in named]
            per_layer.append([m for _, m in named])
        n_linear = len(keys)
        weights = [
            torch.stack([linears[k].weight.detach().t().contiguous() for linears in per_layer])
            .to(device)
            .requires_grad_(True)
            for k in range(n_linear)
        ]
        biases = [
            torch.stack([linears[k].bias.detach().clone() for linears in per_layer])
            .to(device)
            .requires_grad_(True)
            for k in range(n_linear)
        ]
        return cls(weights, biases, keys)

    def parameters(self) -> list[torch.Tensor]:
        """Weights first, then biases (the order the optimizer and the best-epoch copies use)."""
        return [*self.weights, *self.biases]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``z`` of every layer's net on its own rows: ``x`` is ``(L, n, d)``, the result ``(L, n)``."""
        return _stacked_logits(x, self.weights, self.biases)

    def angles(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted angles ``(L, n)`` in radians."""
        return angle_from_logits(self.logits(x))

    def state_dicts(
        self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], input_scale: torch.Tensor
    ) -> list[dict[str, torch.Tensor]]:
        """Per layer, the ``build_angle_net`` state dict of the given stacked tensors (CPU), with the
        per-feature ``input_scale`` ``(L, d)`` folded into the first Linear (``W / s``): nets trained on
        ``h / s`` then act on raw ``h``."""
        scale = input_scale.cpu()
        out = []
        for i in range(scale.shape[0]):
            state: dict[str, torch.Tensor] = {}
            for k, (weight_key, bias_key) in enumerate(self.keys):
                weight = weights[k][i].t().contiguous()  # (out, in) like nn.Linear
                if k == 0:
                    weight = (weight / scale[i].unsqueeze(0)).contiguous()
                state[weight_key] = weight
                state[bias_key] = biases[k][i].clone().contiguous()
            out.append(state)
        return out


def _stacked_logits(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]
) -> torch.Tensor:
    h = x
    for k in range(len(weights)):
        h = torch.baddbmm(biases[k].unsqueeze(1), h, weights[k])
        if k < len(weights) - 1:
            h = F.gelu(h)
    return h.squeeze(-1)

"""Store a model's ``nn.Linear`` weights input-major, for faster small-batch matmuls on CPU.

``nn.Linear`` keeps its weight ``[out, in]`` and multiplies by its transpose. With this torch
build's fp32 CPU kernels, multiplying by a contiguous ``[in, out]`` copy instead is faster for the
few-row inputs of a decode step, by a wide margin once 16 or more rows run with two threads
(measured here, 2 threads: a 16 x 256 @ 256 x 1024 product takes 243 us through ``F.linear`` and
52 us on the input-major copy; a decode step of 16 sequences of a 4-layer, 256-wide Llama goes
from 6.9 to 4.7 ms, and of an 8-layer, 1024-wide one from 88 to 74-77 ms: ``python -m
bench.linear_layout``). bf16 showed no gain (and a loss at one row), so callers use it for fp32
models only.

Only modules whose type is exactly ``nn.Linear`` are converted (subclasses, quantized layers and
the like keep their own forward), and never a weight shared with another parameter (a language
model head tied to the input embeddings): converting it would store the matrix twice.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

__all__ = ["InputMajorLinear", "convert_linears"]


class InputMajorLinear(nn.Module):
    """``nn.Linear`` with its weight stored transposed (``[in, out]``, contiguous)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight_t = nn.Parameter(
            linear.weight.detach().t().contiguous(), requires_grad=linear.weight.requires_grad
        )
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        """The ``[out, in]`` view ``nn.Linear`` would hold, for code that inspects it."""
        return self.weight_t.t()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.matmul(inputs, self.weight_t)
        flat = inputs.reshape(-1, self.in_features)
        out = torch.addmm(self.bias, flat, self.weight_t)
        return out.view(*inputs.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def convert_linears(model: nn.Module) -> int:
    """Replace every plain, untied ``nn.Linear`` of ``model`` in place; return how many."""
    uses = Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and uses[child.weight.data_ptr()] == 1
    ]
    for parent, name, child in targets:
        setattr(parent, name, InputMajorLinear(child))
    return len(targets)

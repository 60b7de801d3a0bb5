"""Faster fp32 ``nn.Linear`` products for the few-row inputs of a decode step on CPU.

``nn.Linear`` keeps its weight ``[out, in]`` and computes ``x @ W.T`` (``F.linear``). With this
torch build's fp32 CPU kernels that is slow once 8-16 or more rows run with two threads: its cost
grows with the rows, as if each row were its own matrix-vector product. Two other forms of the
same product were measured faster (2 threads; ``python -m bench.linear_layout`` and the numbers
below, in microseconds for 16 rows):

- **input-major**: the weight copied once to a contiguous ``[in, out]`` and ``x @ W_t``. Best for
  small weights (768 x 256: 195 through ``F.linear``, 40 input-major, 58 the other way), and
  never slower for one row. The copy replaces the original, so memory is unchanged.
- **weight-major**: ``(W @ x.T).T`` on the weight as it is. Best for large weights (2048 x 2048:
  2259 input-major, 1780 this way; 5632 x 2048: 7547 through ``F.linear``, 3871 this way), and it
  needs no copy, so it also serves a head tied to the input embeddings. Below 12 rows it falls
  back to ``F.linear``, which wins there.

The two cross near a million weight elements. A decode step of 16 sequences of a random Llama
went from 6.9-7.1 to 4.7-5.2 ms (4 layers, 256 wide) and from 88-90 to 61-65 ms (8 layers,
1024 wide). bf16 showed no gain (and a loss at one row), so callers use this for fp32 models only.

Only modules whose type is exactly ``nn.Linear`` are converted: subclasses, quantized layers
and the like keep their own forward.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InputMajorLinear", "WeightMajorLinear", "convert_linears"]

INPUT_MAJOR_MAX_ELEMENTS = 1 << 20
"""Weights smaller than this are stored input-major; larger ones go weight-major."""
WEIGHT_MAJOR_MIN_ROWS = 12
"""Fewer input rows than this go through ``F.linear`` in :class:`WeightMajorLinear`."""


class _ConvertedLinear(nn.Module):
    """What both forms keep of the ``nn.Linear`` they replace."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bias = linear.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class InputMajorLinear(_ConvertedLinear):
    """``nn.Linear`` with its weight stored transposed (``[in, out]``, contiguous)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.weight_t = nn.Parameter(
            linear.weight.detach().t().contiguous(), requires_grad=linear.weight.requires_grad
        )

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


class WeightMajorLinear(_ConvertedLinear):
    """``nn.Linear`` over the same weight parameter, computing ``(W @ x.T).T`` for 12 rows or
    more. The output is that product's transposed view (no copy); torch's later operations
    take it as they take any strided tensor."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.weight = linear.weight  # the same Parameter: a tied weight stays tied

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        flat = inputs.reshape(-1, self.in_features)
        if flat.shape[0] < WEIGHT_MAJOR_MIN_ROWS:
            return F.linear(inputs, self.weight, self.bias)
        if self.bias is None:
            out = torch.mm(self.weight, flat.t())
        else:
            out = torch.addmm(self.bias.unsqueeze(1), self.weight, flat.t())
        return out.t().view(*inputs.shape[:-1], self.out_features)


def convert_linears(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` in place; return how many.

    Small, unshared weights become :class:`InputMajorLinear`; large or shared ones (a language
    model head tied to the input embeddings) :class:`WeightMajorLinear`, which keeps the very
    same parameter, so nothing is stored twice.
    """
    uses = Counter(p.data_ptr() for _, p in model.named_parameters(remove_duplicate=False))
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in targets:
        shared = uses[child.weight.data_ptr()] > 1
        small = child.weight.numel() < INPUT_MAJOR_MAX_ELEMENTS
        replacement = InputMajorLinear(child) if small and not shared else WeightMajorLinear(child)
        setattr(parent, name, replacement)
    return len(targets)

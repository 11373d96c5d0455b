"""Linear layers for decoding on a CPU: oneDNN products on weights packed once.

PyTorch runs `nn.Linear` on a CPU through MKL's sgemm, which lays the weight matrix out
for its kernels again on every call. A decoding step multiplies a few rows by every
weight of the model, so that repacking is most of the step: on 2 AMD EPYC cores (AVX2),
SmolLM2's 30 gate projections (576 -> 1536) took 11.9 ms for 2 rows and 17.5 ms for 28
with MKL, against 4.3 ms and 13.3 ms with oneDNN on weights packed ahead of time, and the
output projection (576 -> 49,152) 28 ms against 16 ms for 32 rows. Prefill-sized products
(hundreds of rows) cost the same either way. This is the kernel torch.compile's CPU
backend switches to after freezing when the batch size varies.

oneDNN's kernel also computes each row the same whatever else is in the batch (checked
for 1 to 1,100 rows on every shape of SmolLM2), where MKL switches kernels for fewer than
12 rows: a sequence gets the same logits alone and in any batch, not just close ones.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear kernel."""
    mkldnn = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(mkldnn, "_reorder_linear_weight")
        and hasattr(mkldnn, "_linear_pointwise")
    )


class PackedLinear(nn.Module):
    """An inference-only `nn.Linear` whose float32 weights oneDNN has packed.

    The packed copy replaces the module's weights; a weight shared with another module
    (tied embeddings) stays where it is for that module.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
            self._bias = None if linear.bias is None else linear.bias.detach().clone()

    def __deepcopy__(self, memo: dict[int, object]) -> PackedLinear:
        twin = PackedLinear.__new__(PackedLinear)
        nn.Module.__init__(twin)
        twin.in_features, twin.out_features = self.in_features, self.out_features
        # Shared: nothing writes packed weights, and an opaque oneDNN tensor has no storage
        # to copy.
        twin._packed = self._packed
        twin._bias = None if self._bias is None else self._bias.clone()
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self._bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linears(model: nn.Module) -> int:
    """Replace every float32 `nn.Linear` of a CPU model by a `PackedLinear`, in place.

    Returns:
        How many were replaced: 0 when the kernel is missing, or for another device or
        dtype.
    """
    if not available():
        return 0
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
        and child.weight.device.type == "cpu"
        and child.weight.dtype == torch.float32
    ]
    for parent, name in targets:  # one layer at a time: the old weights go as the new come
        setattr(parent, name, PackedLinear(getattr(parent, name)))
    if targets:
        # What the model still holds (embeddings, norms) may be views of the weights file
        # the loader mapped in (safetensors). Packing read every page of that file, and the
        # mapping keeps them all resident while any tensor refers to it: copies of the rest
        # let it go (SmolLM2 after a generation: 1.17 GB resident against 1.56 GB, and
        # 1.08 GB unpacked).
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                tensor.data = tensor.data.clone()
    return len(targets)

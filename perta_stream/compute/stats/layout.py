"""Between the tensors a checkpoint stores and the parameters the model's modules hold.

For dense families they are the same. A mixture-of-experts module in transformers 5 fuses its
experts into 3-D parameters, while checkpoints keep one matrix per expert and projection
(plan/model_families.ExpertNames): the engine stacks the checkpoint's matrices into the module's
parameters to run a layer, accumulates statistics per module parameter, and hands them back
split into the checkpoint's tensors, so the statistics carry exactly the checkpoint's names and
shapes (the merge pairs them with the weights by name).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from perta_stream.plan.model_families import FamilyInfo
from perta_stream.plan.stats_plan import LAYER_PREFIX

_FUSED = re.compile(rf"^({re.escape(LAYER_PREFIX)}\d+\.)mlp\.experts\.(gate_up_proj|down_proj)$")
_IN_MLP = re.compile(rf"^({re.escape(LAYER_PREFIX)}\d+\.)mlp\.(.+)$")

Part = tuple[str, int, int, int]
"""(checkpoint tensor_name, expert, first row, row after the last) of a fused parameter."""


class CheckpointLayout:
    """The checkpoint's tensors of every module parameter, and the conversions both ways.

    Args:
        family: the model's family.
        module_shapes: module parameter name -> shape, as the meta-device model holds them.
    """

    def __init__(self, family: FamilyInfo, module_shapes: Mapping[str, tuple[int, ...]]):
        self._parts: dict[str, list[Part]] = {}
        self._renamed: dict[str, str] = {}
        self.checkpoint_shapes: dict[str, tuple[int, ...]] = {}
        names = family.experts
        for module_name, shape in module_shapes.items():
            fused = _FUSED.match(module_name) if names is not None else None
            in_mlp = _IN_MLP.match(module_name) if names is not None else None
            if fused is not None and names is not None and len(shape) == 3:
                prefix, which = fused.groups()
                experts, rows, columns = shape
                base = f"{prefix}{names.block}.experts."
                # gate_up_proj stacks gate over up (rows [0, width) and [width, 2 width)), as transformers' forward chunks it.
                projections = [(names.gate, 0, rows // 2), (names.up, rows // 2, rows)] if which == "gate_up_proj" else [(names.down, 0, rows)]
                parts = [(f"{base}{e}.{proj}.weight", e, start, stop) for e in range(experts) for proj, start, stop in projections]
                self._parts[module_name] = parts
                for tensor_name, _, start, stop in parts:
                    self.checkpoint_shapes[tensor_name] = (stop - start, columns)
            elif in_mlp is not None and names is not None:
                tensor_name = f"{in_mlp.group(1)}{names.block}.{in_mlp.group(2)}"
                self._renamed[module_name] = tensor_name
                self.checkpoint_shapes[tensor_name] = shape
            else:
                self.checkpoint_shapes[module_name] = shape

    def checkpoint_names(self, module_names: Sequence[str]) -> list[str]:
        """The checkpoint tensors that hold the given module parameters."""
        out: list[str] = []
        for module_name in module_names:
            if module_name in self._parts:
                out.extend(tensor_name for tensor_name, *_ in self._parts[module_name])
            else:
                out.append(self._renamed.get(module_name, module_name))
        return out

    def to_module(self, weights: Mapping[str, torch.Tensor], module_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The module parameters `module_names` from the checkpoint tensors `weights` (fused ones stacked: a copy)."""
        out: dict[str, torch.Tensor] = {}
        for module_name in module_names:
            parts = self._parts.get(module_name)
            if parts is None:
                out[module_name] = weights[self._renamed.get(module_name, module_name)]
                continue
            experts = parts[-1][1] + 1
            per_expert = [[weights[tensor_name] for tensor_name, e, *_ in parts if e == expert] for expert in range(experts)]
            out[module_name] = torch.stack([torch.cat(blocks) if len(blocks) > 1 else blocks[0] for blocks in per_expert])
        return out

    def to_checkpoint(self, stats: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """Statistics per module parameter -> per checkpoint tensor (fused ones split into views, no copy)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for module_name, kinds in stats.items():
            parts = self._parts.get(module_name)
            if parts is None:
                out[self._renamed.get(module_name, module_name)] = dict(kinds)
                continue
            for tensor_name, expert, start, stop in parts:
                out[tensor_name] = {kind: tensor[expert, start:stop] for kind, tensor in kinds.items()}
        return out

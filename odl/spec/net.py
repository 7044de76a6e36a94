"""The shape of a spec's network, and the two layouts of a request to its serving graph.

``SpecNet`` is what the trainer (``trainers.spec_model``), the exporter
(``exporters.spec_savedmodel``) and serving (``serving.spec_scoring``) share: the model's
embedding inputs in a fixed order, where each sits in the [n, W] key matrix, their dims.  It is
TensorFlow-free so serving's request path and the stream's decoding can import it.

A request reaches the serving graph in one of two layouts:

- **per input** (``serving_default``): ``<input>_emb`` [B, width, dim] for every input, ``mask``
  [B, W] and ``numeric`` -- what the plain export takes;
- **packed** (``serving_packed``, the optimised export only): the single-valued inputs of one dim
  side by side as ``singles_<dim>`` [B, k, dim] (input order), each list or sequence input as
  its own ``<input>_emb``, ``mask`` and ``numeric``.  With 26 single-valued inputs (Criteo) a
  call passes 3 tensors instead of 28, and the graph starts from the stacked tensor the model
  builds anyway (``trainers.spec_model.spec_logits``).

``pack_request`` turns the first into the second (numpy), so both are spelled here only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from odl.spec.encode import count_names, list_width
from odl.spec.model import FeatureSpec, TableSpec

MASK, NUMERIC = "mask", "numeric"
PACKED_SIGNATURE = "serving_packed"     # the packed layout's signature (optimised export)


@dataclass(frozen=True)
class Input:
    name: str
    table: str
    width: int
    pooling: str        # sum | mean | attention


def spec_inputs(spec: FeatureSpec) -> list[Input]:
    """The model's embedding inputs, in a fixed order: sparse features, then sequences."""
    out = [Input(n, f.table, list_width(spec, f), f.pooling) for n, f in spec.sparse.items()]
    out += [Input(n, s.table, s.length, s.pooling) for n, s in spec.realtime.sequences.items()]
    return out


def emb_name(inp: Input) -> str:
    """An input's vectors in a request (per-input layout; list inputs in both)."""
    return f"{inp.name}_emb"


def singles_name(dim: int) -> str:
    """The single-valued inputs of one dim, side by side (packed layout)."""
    return f"singles_{dim}"


def table_learning_rate(table: TableSpec, inputs: int, rate: float, full_inputs: int) -> float:
    """A table's sparse step size: its own ``learning_rate``, else the trainer's ``rate``,
    scaled by ``full_inputs / inputs`` once a row feeds the network more than ``full_inputs``
    embedding inputs (``trainer.sparse_rate_inputs``; 0: never scaled).  Why: every input of a
    row moves the same logit, and Adagrad's first step on a fresh row is about the learning
    rate, so n inputs move it ~n times as far; a rate tuned for a few inputs overshoots on a
    wide log (docs/evaluation.md: the best rate fell from 0.1-0.2 at 4-8 inputs to 0.02 at
    26).  VW's normalised updates answer the same problem per row.  ``inputs`` counts the
    network's embedding inputs (``SpecNet.inputs``): a pooled list or sequence is one (a
    sum-pooled list moves the logit once per value: a spec with long sum-pooled lists may set
    its tables' rates)."""
    if table.learning_rate is not None:
        return table.learning_rate
    if full_inputs == 0 or inputs <= full_inputs:
        return rate
    return rate * full_inputs / inputs


@dataclass(frozen=True)
class SpecNet:
    """The shape of a spec's network: its inputs, where each sits in the [n, W] row matrix,
    their dims and the FM group's dim."""
    inputs: tuple[Input, ...]
    spans: tuple[tuple[int, int], ...]
    dims: tuple[int, ...]
    fm_dim: int
    num_numeric: int

    @staticmethod
    def of(spec: FeatureSpec) -> "SpecNet":
        inputs = tuple(spec_inputs(spec))
        spans, at = [], 0
        for i in inputs:
            spans.append((at, at + i.width))
            at += i.width
        dims = tuple(spec.tables[i.table].dim for i in inputs)
        fm_dim = max(set(dims), key=dims.count) if dims else 0
        return SpecNet(inputs, tuple(spans), dims, fm_dim,
                       len(spec.numeric) + len(count_names(spec)))

    @property
    def width(self) -> int:
        """Columns of the row matrix (all inputs side by side)."""
        return self.spans[-1][1] if self.spans else 0

    @property
    def head_width(self) -> int:
        """Inputs of the DCN head: every pooled vector and the numeric features."""
        return sum(self.dims) + self.num_numeric

    @property
    def single_groups(self) -> dict[int, tuple[int, ...]]:
        """dim -> the single-valued inputs of that dim (indices, input order): the stacked
        tensors of the model and the ``singles_<dim>`` of a packed request."""
        groups: dict[int, list[int]] = {}
        for k, (i, d) in enumerate(zip(self.inputs, self.dims)):
            if i.width == 1:
                groups.setdefault(d, []).append(k)
        return {d: tuple(ks) for d, ks in groups.items()}

    @property
    def multi_valued(self) -> tuple[int, ...]:
        """The list and sequence inputs (indices, input order): pooled one by one."""
        return tuple(k for k, i in enumerate(self.inputs) if i.width > 1)

    def request_shapes(self, packed: bool = False) -> dict[str, tuple[int | None, ...]]:
        """A request's tensors and their shapes (None: the batch), in signature order."""
        if packed:
            out = {singles_name(d): (None, len(ks), d) for d, ks in self.single_groups.items()}
            out.update({emb_name(self.inputs[k]): (None, self.inputs[k].width, self.dims[k])
                        for k in self.multi_valued})
        else:
            out = {emb_name(i): (None, i.width, d) for i, d in zip(self.inputs, self.dims)}
        out[MASK] = (None, self.width)
        out[NUMERIC] = (None, self.num_numeric)
        return out


def pack_request(net: SpecNet, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A per-input request as the packed layout (one copy of the single-valued vectors)."""
    out = {singles_name(d): np.concatenate([request[emb_name(net.inputs[k])] for k in ks], axis=1)
           for d, ks in net.single_groups.items()}
    for k in net.multi_valued:
        out[emb_name(net.inputs[k])] = request[emb_name(net.inputs[k])]
    out[MASK] = request[MASK]
    out[NUMERIC] = request[NUMERIC]
    return out

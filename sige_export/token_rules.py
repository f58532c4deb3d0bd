"""Sparse token rules of the sparsifier: transformers at high resolution run on the changed tokens only.

A feature map entering a transformer (``[B, C, H, W] -> [B, C, H*W]``) becomes a *rows* value:
the tensor restricted to the changed token positions (the pixels of the scattered tiles of that
resolution), plus its cached full value. Per-token ops (linear layers, LayerNorm, GELU/GEGLU,
residual adds, softmax over keys) run on those rows; attention keys and values are the cached map
updated at the changed rows, and queries are computed for changed rows only, as the SIGE
reference does for Stable Diffusion. Leaving the transformer scatters the rows back into the
cached feature map.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .sparsify import Op

ROW_WISE_UNARY = {"Erf", "Sigmoid", "Tanh", "Relu", "Sqrt", "Neg", "Exp", "Cast", "Identity", "Gelu", "Silu"}
ROW_WISE_BINARY = {"Add", "Sub", "Mul", "Div", "Pow"}


@dataclass(frozen=True)
class Rows:
    """A tensor known at ``rows`` of its token axis: ``values`` has the token axis cut to those rows."""

    values: str
    tensor: str  # the dense tensor: its cache is the base the rows are written into
    rows: str  # int64 [N] token positions (graph input)
    axis: int  # token axis in the dense tensor's shape
    length: int  # tokens in the full tensor (H * W)


class TokenRules:
    """Mixin of :class:`sige_export.sparsify._Sparsifier` (uses its builder, reps and caches)."""

    def _row_input(self, hw: tuple[int, int]) -> str:
        name = f"rows/{hw[0]}x{hw[1]}"
        self.token_rows[name] = hw
        return name

    def _materialize_rows(self, r: Rows, base: str | None = None) -> str:
        """The cached full tensor with the changed rows written in (ScatterElements along the token axis).

        The result is the new value of that cache: recorded for commits.
        """
        b = self.b
        shape = self.info.static_shape(r.tensor)
        index_shape = [1] * len(shape)
        index_shape[r.axis] = -1
        idx = b.node("Reshape", [r.rows, b.const("edit/rows_shape", np.array(index_shape, np.int64))], "edit/rows_idx")
        idx = b.node("Expand", [idx, b.node("Shape", [r.values], "edit/rows_values_shape")], "edit/rows_idx")
        out = b.node("ScatterElements", [base or self.cache(r.tensor), idx, r.values], "edit/rows_scatter",
                     axis=r.axis)
        if base is None:
            self.cache_updates[r.tensor] = out
        return out

    def _gather_rows(self, full: str, rows: str, axis: int) -> str:
        return self.b.node("Gather", [full, rows], "edit/rows_gather", axis=axis)

    def _token_rule(self, op: "Op") -> bool | None:
        """Apply a rows rule to ``op`` if it touches a rows value: True done, False dense, None not applicable."""
        rows_in = [i for i in op.inputs if i in self.reps and self.reps[i].rows is not None]
        if not rows_in:
            return self._enter_tokens(op)
        rule = getattr(self, f"_rows_{op.kind}", None)
        if rule is None and op.kind in ROW_WISE_UNARY:
            rule = self._rows_unary
        if rule is None and op.kind in ROW_WISE_BINARY:
            rule = self._rows_binary
        if rule is not None and rule(op):
            return True
        return False

    # -- entering and leaving
    def _enter_tokens(self, op: "Op") -> bool | None:
        """Reshape [B, C, H, W] -> [B, C, H*W] of a confined map at >= attention_min_res starts a rows value."""
        if op.kind != "Reshape":
            return None
        x = op.inputs[0]
        xs, ys = self._nchw(x), self.info.static_shape(op.output)
        if xs is None or ys is None or ys != (xs[0], xs[1], xs[2] * xs[3]):
            return None
        if min(xs[2], xs[3]) < self.opts.attention_min_res or x not in self.dynamic:
            return None
        self._ensure_editable(x)
        if not self.reps[x].confined:
            return None
        rows = self._row_input((xs[2], xs[3]))
        flat = self.b.node("Reshape", [self.full(x), self.b.const("edit/flat_shape", np.array(ys, np.int64))],
                           "edit/tokens")
        from .sparsify import Rep

        self.reps[op.output] = Rep(rows=Rows(self._gather_rows(flat, rows, 2), op.output, rows, 2,
                                             ys[2]), confined=True)
        return True

    def _rows_Reshape(self, op: "Op") -> bool:
        from .sparsify import Rep

        r = self.reps[op.inputs[0]].rows
        xs, ys = self.info.static_shape(op.inputs[0]), self.info.static_shape(op.output)
        if xs is None or ys is None or op.inputs[1] not in self.info.consts:
            return False
        before = int(np.prod(xs[:r.axis]))
        after = int(np.prod(xs[r.axis + 1:]))
        for a, d in enumerate(ys):
            if d == r.length and int(np.prod(ys[:a])) == before and int(np.prod(ys[a + 1:])) == after:
                target = list(ys)
                target[a] = -1  # the number of rows varies per edit
                values = self.b.node("Reshape", [r.values, self.b.const("edit/shape", np.array(target, np.int64))],
                                     "edit/rows_reshape")
                self.reps[op.output] = Rep(rows=replace(r, values=values, tensor=op.output, axis=a),
                                           confined=True)
                return True
        # Leaving: the token axis splits into (H, W) of a feature map; scatter the rows into it.
        if len(ys) == 4 and ys[2] * ys[3] == r.length and r.axis == len(xs) - 1 and tuple(xs[:-1]) == ys[:2]:
            flat = self.b.node("Reshape", [self.cache(op.output),
                                           self.b.const("edit/flat_shape", np.array(xs, np.int64))], "edit/map_flat")
            full = self._materialize_rows(r, base=flat)
            out = self.b.node("Reshape", [full, self.b.const("edit/map_shape", np.array(ys, np.int64))], "edit/map")
            self.cache_updates[op.output] = out
            self.reps[op.output] = Rep(full=out, confined=True)
            return True
        return False

    def _rows_Transpose(self, op: "Op") -> bool:
        from .sparsify import Rep

        r = self.reps[op.inputs[0]].rows
        perm = list(op.attrs["perm"])
        values = self.b.node("Transpose", [r.values], "edit/rows_transpose", perm=perm)
        self.reps[op.output] = Rep(rows=replace(r, values=values, tensor=op.output,
                                                axis=perm.index(r.axis)), confined=True)
        return True

    def _rows_result(self, op: "Op", r: Rows, values: str) -> bool:
        from .sparsify import Rep

        self.reps[op.output] = Rep(rows=replace(r, values=values, tensor=op.output), confined=True)
        return True

    def _emit_like(self, op: "Op", inputs: list[str]) -> str:
        """The op's single node on new inputs (attributes kept)."""
        node = op.nodes[0]
        out = self.b.fresh("edit/" + op.output)
        new = type(node)()
        new.CopyFrom(node)
        new.name = out
        del new.input[:]
        new.input.extend(inputs)
        del new.output[:]
        new.output.append(out)
        self.b.nodes.append(new)
        return out

    def _rows_unary(self, op: "Op") -> bool:
        r = self.reps[op.inputs[0]].rows
        if any(i not in self.info.consts for i in op.inputs[1:] if i):
            return False
        if op.kind == "Gelu":
            return self._rows_result(op, r, self._activation(r.values, "gelu", 0.0))
        if op.kind == "Silu":
            return self._rows_result(op, r, self._activation(r.values, "silu", 0.0))
        if len(op.nodes) != 1:
            return False
        return self._rows_result(op, r, self._emit_like(op, [r.values] + list(op.inputs[1:])))

    def _rows_binary(self, op: "Op") -> bool:
        """Elementwise with broadcasting: other operands are gathered at the rows or broadcast over them."""
        if len(op.nodes) != 1:
            return False
        out_shape = self.info.static_shape(op.output)
        if out_shape is None:
            return False
        first = next(i for i in op.inputs if i in self.reps and self.reps[i].rows is not None)
        ref = self.reps[first].rows
        first_shape = self.info.static_shape(first)
        if first_shape is None:
            return False
        axis_out = ref.axis + len(out_shape) - len(first_shape)
        new_inputs = []
        for i in op.inputs:
            shape = self.info.static_shape(i)
            if shape is None:
                return False
            a = axis_out - (len(out_shape) - len(shape))
            rep = self.reps.get(i) if i in self.dynamic else None
            if rep is not None and rep.rows is not None:
                if rep.rows.rows != ref.rows or rep.rows.axis != a:
                    return False
                new_inputs.append(rep.rows.values)
            elif a < 0 or shape[a] == 1:
                new_inputs.append(self.full(i) if i in self.dynamic else self.static(i))
            elif shape[a] == ref.length:
                src = self.full(i) if i in self.dynamic else self.static(i)
                new_inputs.append(self._gather_rows(src, ref.rows, a))
            else:
                return False
        return self._rows_result(op, replace(ref, axis=axis_out), self._emit_like(op, new_inputs))

    def _rows_MatMul(self, op: "Op") -> bool:
        """Rows of A (its second-to-last axis or a batch axis B broadcasts over) times a full B."""
        a, bm = op.inputs
        ra = self.reps.get(a).rows if a in self.reps else None
        sa, sb = self.info.static_shape(a), self.info.static_shape(bm)
        if ra is None or sa is None or sb is None or ra.axis != len(sa) - 2:
            return False
        b_full = self.full(bm) if bm in self.dynamic else self.static(bm)
        return self._rows_result(op, ra, self._emit_like(op, [ra.values, b_full]))

    def _rows_Gemm(self, op: "Op") -> bool:
        return False

    def _rows_Softmax(self, op: "Op") -> bool:
        r = self.reps[op.inputs[0]].rows
        shape = self.info.static_shape(op.inputs[0])
        if shape is None or op.attrs.get("axis", -1) % len(shape) == r.axis:
            return False
        return self._rows_result(op, r, self._emit_like(op, [r.values]))

    def _rows_LayerNormalization(self, op: "Op") -> bool:
        r = self.reps[op.inputs[0]].rows
        shape = self.info.static_shape(op.inputs[0])
        if shape is None or op.attrs.get("axis", -1) % len(shape) <= r.axis or len(op.nodes) != 1:
            return False
        if any(i not in self.info.consts for i in op.inputs[1:] if i):
            return False
        return self._rows_result(op, r, self._emit_like(op, [r.values] + list(op.inputs[1:])))

    def _rows_Slice(self, op: "Op") -> bool:
        r = self.reps[op.inputs[0]].rows
        shape = self.info.static_shape(op.inputs[0])
        if shape is None or any(i not in self.info.consts for i in op.inputs[1:] if i) or len(op.inputs) < 4:
            return False
        axes = [int(v) % len(shape) for v in self.info.consts[op.inputs[3]].reshape(-1)]
        if r.axis in axes:
            return False
        return self._rows_result(op, r, self._emit_like(op, [r.values] + list(op.inputs[1:])))

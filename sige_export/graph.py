"""Small helpers over ONNX graphs: static shapes, constants, consumers, sub-model extraction."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import onnx_io


def attrs_of(node: onnx.NodeProto) -> dict:
    """Node attributes as plain Python values (strings decoded)."""
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Turn tensor-valued Constant nodes into initializers so every constant is looked up one way."""
    graph = model.graph
    keep = []
    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            alias = onnx.TensorProto()
            alias.CopyFrom(inits[node.input[0]])
            alias.name = node.output[0]
            graph.initializer.append(alias)
            inits[alias.name] = alias
            continue
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            a = attrs_of(node)
            if "value" in a:
                arr = numpy_helper.to_array(node.attribute[0].t)
            elif "value_float" in a:
                arr = np.array(a["value_float"], np.float32)
            elif "value_floats" in a:
                arr = np.array(a["value_floats"], np.float32)
            elif "value_int" in a:
                arr = np.array(a["value_int"], np.int64)
            elif "value_ints" in a:
                arr = np.array(a["value_ints"], np.int64)
            else:
                keep.append(node)
                continue
            graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return model


class Constants(Mapping):
    """The graph's initializers by name as numpy arrays, each converted on first use: the graph passes read
    few weights (norm affines, shapes), and a copy of all of them would double a big model's memory."""

    def __init__(self, tensors: dict[str, onnx.TensorProto]) -> None:
        self.tensors = tensors
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None:
            arr = self._arrays[name] = numpy_helper.to_array(self.tensors[name])
        return arr

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


@dataclass
class GraphInfo:
    """Read-only facts about a graph: producers, consumers, shapes, constant values."""

    model: onnx.ModelProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: defaultdict(list))
    shapes: dict[str, tuple] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    consts: Constants = field(default_factory=lambda: Constants({}))

    @classmethod
    def build(cls, model: onnx.ModelProto, weights: dict[str, onnx.TensorProto] | None = None) -> "GraphInfo":
        """``weights``: the data of initializers that ``model`` holds detached (:func:`onnx_io.detach_weights`)."""
        inferred = onnx_io.infer_shapes(model, weights=False, data_prop=True)
        weights = weights or {}
        info = cls(model=model, consts=Constants({i.name: weights.get(i.name, i) for i in model.graph.initializer}))
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                info.shapes[vi.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim
                )
            info.dtypes[vi.name] = t.elem_type
        for init in model.graph.initializer:
            info.shapes[init.name] = tuple(init.dims)
            info.dtypes[init.name] = init.data_type
        for node in model.graph.node:
            for o in node.output:
                info.producer[o] = node
            for i in node.input:
                if i:
                    info.consumers[i].append(node)
        for o in model.graph.output:
            info.consumers[o.name]  # graph outputs count as uses via is_graph_output
        missing = [o for n in model.graph.node for o in n.output if o and info.static_shape(o) is None]
        if missing:
            info._shapes_from_runtime(missing)
        return info

    def _shapes_from_runtime(self, names: list[str]) -> None:
        """Shapes ONNX inference could not give (e.g. newer ops), observed by running the model once."""
        import onnxruntime as ort

        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        onnx_io.attach_weights(m, self.consts.tensors)
        m.graph.output.extend(helper.make_value_info(n, onnx.TypeProto()) for n in names)
        feeds = {}
        inits = {i.name for i in m.graph.initializer}
        for vi in m.graph.input:
            if vi.name in inits:
                continue
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            if any(d <= 0 for d in dims):
                return
            feeds[vi.name] = np.zeros(dims, helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        try:
            sess = onnx_io.session(m)
            values = sess.run(names, feeds)
        except Exception:  # the caller treats unknown shapes as dense islands
            return
        for n, v in zip(names, values):
            self.shapes[n] = tuple(np.shape(v))

    def is_graph_output(self, name: str) -> bool:
        return any(o.name == name for o in self.model.graph.output)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        s = self.shapes.get(name)
        if s is None or any(not isinstance(d, int) or d <= 0 for d in s):
            return None
        return s


def topological_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is produced before use (stable for sorted graphs)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in available})
            raise ValueError(f"graph is not a DAG or has undefined inputs: {missing[:5]}")
        pending = rest
    return ordered


def extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str], name: str) -> onnx.ModelProto:
    """The sub-model computing ``outputs`` from ``inputs`` (tensors named as inputs become graph inputs)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    value_types = {vi.name: vi for vi in list(graph.value_info) + list(graph.input) + list(graph.output)}
    cut = set(inputs)
    needed_nodes: list[onnx.NodeProto] = []
    needed_inits: set[str] = set()
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        t = stack.pop()
        if t in seen or t == "":
            continue
        seen.add(t)
        if t in cut:
            continue
        if t in inits:
            needed_inits.add(t)
            continue
        node = producer.get(t)
        if node is None:
            raise ValueError(f"cannot extract {name!r}: tensor {t!r} is neither produced nor an input")
        needed_nodes.append(node)
        seen.update(o for o in node.output if o != t)
        stack.extend(node.input)
    order = {id(n): k for k, n in enumerate(graph.node)}
    needed_nodes.sort(key=lambda n: order[id(n)])

    def vi(t: str) -> onnx.ValueInfoProto:
        if t in value_types:
            return value_types[t]
        raise ValueError(f"cannot extract {name!r}: no type known for {t!r}")

    sub = helper.make_graph(
        needed_nodes,
        name,
        [vi(t) for t in inputs],
        [vi(t) for t in outputs],
        [i for i in graph.initializer if i.name in needed_inits],
    )
    out = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    used = {(n.domain, n.op_type, n.overload) for n in needed_nodes}
    out.functions.extend(f for f in model.functions if (f.domain, f.name, f.overload) in used)
    return out


def fold_constants(model: onnx.ModelProto, max_rounds: int = 64) -> onnx.ModelProto:
    """Evaluate nodes whose inputs are all constant (and Shape of statically shaped tensors) into initializers.

    Exporters compute pads, scales and reshape targets with small subgraphs that ONNX shape
    inference cannot see through; folding them gives every tensor a static shape.
    """
    from onnx.reference import ReferenceEvaluator

    for _ in range(max_rounds):
        graph = model.graph
        consts = {i.name for i in graph.initializer}
        shapes: dict[str, tuple] = {}
        if any(n.op_type == "Shape" for n in graph.node):
            inferred = onnx_io.infer_shapes(model, weights=False)
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
                dims = vi.type.tensor_type.shape.dim
                if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
                    shapes[vi.name] = tuple(d.dim_value for d in dims)
        keep, new_inits, changed = [], [], False
        for node in graph.node:
            foldable = node.domain in ("", "ai.onnx") and node.op_type not in ("RandomNormal", "RandomUniform",
                                                                               "RandomNormalLike", "RandomUniformLike")
            if foldable and node.op_type == "Shape" and node.input[0] in shapes and not node.attribute:
                new_inits.append(numpy_helper.from_array(np.array(shapes[node.input[0]], np.int64), node.output[0]))
                consts.add(node.output[0])
                changed = True
                continue
            if foldable and node.input and all(i == "" or i in consts for i in node.input):
                init = [i for i in list(graph.initializer) + new_inits if i.name in set(node.input)]
                sub = helper.make_model(
                    helper.make_graph([node], "fold", [], [helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o], init),
                    opset_imports=list(model.opset_import), ir_version=model.ir_version)
                try:
                    values = ReferenceEvaluator(sub).run(None, {})
                except Exception:  # leave anything the reference cannot evaluate to the runtime
                    keep.append(node)
                    continue
                for name, value in zip([o for o in node.output if o], values):
                    new_inits.append(numpy_helper.from_array(np.asarray(value), name))
                    consts.add(name)
                changed = True
                continue
            keep.append(node)
        if not changed:
            break
        del graph.node[:]
        graph.node.extend(keep)
        graph.initializer.extend(new_inits)
    return model


def _inferred_dims(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Dims of every inferred tensor and graph input (0 where unknown)."""
    inferred = onnx_io.infer_shapes(model, weights=False)
    return {vi.name: [d.dim_value if d.HasField("dim_value") else 0 for d in vi.type.tensor_type.shape.dim]
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input)}


def conv_transposes_as_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite each 2-D ConvTranspose of stride s (equal on both axes, constant weights, group 1) as a Conv
    with s * s phases of output channels followed by DepthToSpace(s, CRD: a channel's phases are adjacent, so a
    norm after it can move before it, see :func:`norms_before_depth_to_space`).

    Output pixel ``Y = m * s + p`` of a transposed conv sums input pixels ``m - d`` for the taps
    ``kh = d * s + p + pad``; the Conv's kernel spans the union of ``d`` over the phases (3 x 3 for k4 s2 p1,
    2 x 2 for k3 s2 p1 op1, 1 x 1 for k2 s2), zero where a phase has no tap; an output that is not a
    multiple of the stride is cropped by a Slice. A Conv has sparse rules and schedules (a ConvTranspose
    ran dense, unscheduled, in both passes); transposes with dilation, groups or ``output_shape`` are left
    as they are.
    """
    graph = model.graph
    if not any(n.op_type == "ConvTranspose" for n in graph.node):
        return model
    shapes = _inferred_dims(model)
    inits = {i.name: i for i in graph.initializer}
    nodes = []
    for node in graph.node:
        plan = _conv_transpose_plan(node, shapes, inits)
        if plan is None:
            nodes.append(node)
            continue
        weight, bias, pads, stride, crop = plan
        base = node.name or node.output[0]
        wname, bname = f"{base}/phase_weight", f"{base}/phase_bias"
        graph.initializer.extend([numpy_helper.from_array(weight, wname), numpy_helper.from_array(bias, bname)])
        conv_out = f"{base}/phases" if stride > 1 else node.output[0]
        nodes.append(helper.make_node("Conv", [node.input[0], wname, bname], [conv_out], name=f"{base}/phase_conv",
                                      kernel_shape=list(weight.shape[2:]), pads=pads, strides=[1, 1]))
        if stride > 1:
            shuffled = f"{base}/shuffled" if crop else node.output[0]
            nodes.append(helper.make_node("DepthToSpace", [conv_out], [shuffled], name=f"{base}/depth_to_space",
                                          blocksize=stride, mode="CRD"))
            if crop:
                starts, ends, axes = f"{base}/crop_starts", f"{base}/crop_ends", f"{base}/crop_axes"
                graph.initializer.extend([numpy_helper.from_array(np.zeros(2, np.int64), starts),
                                          numpy_helper.from_array(np.array(crop, np.int64), ends),
                                          numpy_helper.from_array(np.array([2, 3], np.int64), axes)])
                nodes.append(helper.make_node("Slice", [shuffled, starts, ends, axes], [node.output[0]],
                                              name=f"{base}/crop"))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model


def _conv_transpose_plan(node: onnx.NodeProto, shapes: dict, inits: dict
                         ) -> tuple[np.ndarray, np.ndarray, list[int], int, list[int] | None] | None:
    """``(conv weight, conv bias, conv pads, stride, crop)`` of the phase Conv of a ConvTranspose, or None
    (``crop``: the output's height and width where the shuffled phases are larger)."""
    if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx") or node.input[1] not in inits:
        return None
    a = attrs_of(node)
    w = numpy_helper.to_array(inits[node.input[1]])
    xshape = shapes.get(node.input[0], [])
    if w.ndim != 4 or len(xshape) != 4 or min(xshape[2:]) <= 0 or w.dtype != np.float32:
        return None
    if int(a.get("group", 1)) != 1 or "output_shape" in a or a.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
        return None
    strides = list(a.get("strides", [1, 1]))
    if list(a.get("dilations", [1, 1])) != [1, 1] or strides[0] != strides[1]:
        return None
    s = int(strides[0])
    pads = list(a.get("pads", [0, 0, 0, 0]))
    out_pad = list(a.get("output_padding", [0, 0]))
    cin, cout, kernel = w.shape[0], w.shape[1], w.shape[2:]
    taps, conv_pads, sizes = [], [0, 0, 0, 0], []
    for axis in range(2):
        k, begin, n = int(kernel[axis]), int(pads[axis]), int(xshape[2 + axis])
        out = (n - 1) * s - begin - int(pads[2 + axis]) + k + int(out_pad[axis])
        # per phase p, the offsets d (input m - d) with a tap k_index = d * s + p + begin
        ds = [d for p in range(s) for d in range(-((p + begin) // s), (k - 1 - p - begin) // s + 1)]
        if out <= 0 or not ds:
            return None
        lo, hi = min(ds), max(ds)
        size = hi - lo + 1
        end = -(-out // s) - 1 + size - n - hi
        if hi < 0 or end < 0:
            return None
        taps.append((k, begin, hi, size))
        sizes.append(out)
        conv_pads[axis], conv_pads[2 + axis] = hi, end
    (kh, bh, ph, sh), (kw, bw, pw, sw) = taps
    weight = np.zeros((s * s * cout, cin, sh, sw), np.float32)
    for rh in range(s):
        for rw in range(s):
            rows = slice(rh * s + rw, s * s * cout, s * s)  # CRD: each output channel's phases are adjacent
            for jh in range(sh):
                th = (ph - jh) * s + rh + bh
                for jw in range(sw):
                    tw = (pw - jw) * s + rw + bw
                    if 0 <= th < kh and 0 <= tw < kw:
                        weight[rows, :, jh, jw] = w[:, :, th, tw].T
    bias = np.zeros(cout, np.float32)
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in inits:
            return None
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
    crop = sizes if any(o % s for o in sizes) else None
    return weight, np.repeat(bias, s * s), conv_pads, s, crop


def norms_before_depth_to_space(model: onnx.ModelProto) -> onnx.ModelProto:
    """``InstanceNormalization(DepthToSpace(y, s, CRD))`` -> ``DepthToSpace(GroupNorm(y))``, as the Reshape /
    InstanceNormalization / Reshape / Mul / Add pattern of a group norm with one group per output channel (its s * s
    phase channels of ``y``, adjacent in CRD order: the same elements) and the affine repeated per phase.

    The norm then runs on the tensor a (transposed) conv writes in blocks, so the edit pass corrects its statistics
    from those blocks (a norm after the DepthToSpace had dense statistics: a pass over the whole map for each
    moment). Norms with non-constant affine or other consumers are left as they are.
    """
    graph = model.graph
    if not any(n.op_type == "DepthToSpace" for n in graph.node):
        return model
    shapes = _inferred_dims(model)
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in graph.output}
    moved: dict[int, list] = {}  # id(DepthToSpace) -> its replacement nodes; the norm node is dropped
    dropped: set[int] = set()
    for d2s in graph.node:
        a = attrs_of(d2s)
        if d2s.op_type != "DepthToSpace" or a.get("mode", "DCR") != "CRD" or d2s.output[0] in outputs:
            continue
        users = consumers.get(d2s.output[0], [])
        norm = users[0] if len(users) == 1 else None
        y = d2s.input[0]
        shape = shapes.get(y, [])
        if (norm is None or norm.op_type != "InstanceNormalization" or len(shape) != 4 or min(shape) <= 0
                or norm.input[1] not in inits or norm.input[2] not in inits):
            continue
        s2 = int(a["blocksize"]) ** 2
        b, cs, h, w = shape
        c = cs // s2
        gamma = numpy_helper.to_array(inits[norm.input[1]]).reshape(-1).astype(np.float32)
        beta = numpy_helper.to_array(inits[norm.input[2]]).reshape(-1).astype(np.float32)
        if gamma.size != c or beta.size != c:
            continue
        base = norm.name or norm.output[0]
        names = {k: f"{base}/before_shuffle/{k}" for k in ("grouped", "normed", "back", "scaled", "shifted",
                                                            "gshape", "shape", "ones", "zeros", "gamma", "beta")}
        graph.initializer.extend([
            numpy_helper.from_array(np.array([b, c, s2 * h * w], np.int64), names["gshape"]),
            numpy_helper.from_array(np.array(shape, np.int64), names["shape"]),
            numpy_helper.from_array(np.ones(c, np.float32), names["ones"]),
            numpy_helper.from_array(np.zeros(c, np.float32), names["zeros"]),
            numpy_helper.from_array(np.repeat(gamma, s2).reshape(1, cs, 1, 1), names["gamma"]),
            numpy_helper.from_array(np.repeat(beta, s2).reshape(1, cs, 1, 1), names["beta"])])
        eps = float(attrs_of(norm).get("epsilon", 1e-5))
        shuffled = helper.make_node("DepthToSpace", [names["shifted"]], [norm.output[0]], name=d2s.name,
                                    blocksize=int(a["blocksize"]), mode="CRD")
        moved[id(d2s)] = [
            helper.make_node("Reshape", [y, names["gshape"]], [names["grouped"]], name=names["grouped"]),
            helper.make_node("InstanceNormalization", [names["grouped"], names["ones"], names["zeros"]],
                             [names["normed"]], name=names["normed"], epsilon=eps),
            helper.make_node("Reshape", [names["normed"], names["shape"]], [names["back"]], name=names["back"]),
            helper.make_node("Mul", [names["back"], names["gamma"]], [names["scaled"]], name=names["scaled"]),
            helper.make_node("Add", [names["scaled"], names["beta"]], [names["shifted"]], name=names["shifted"]),
            shuffled]
        dropped.add(id(norm))
    if not moved:
        return model
    nodes = []
    for n in graph.node:
        if id(n) in dropped:
            continue
        nodes.extend(moved.get(id(n), [n]))
    del graph.node[:]
    graph.node.extend(nodes)
    return model

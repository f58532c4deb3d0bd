"""MACs counter: hand computations, torch cross-checks, the ai.sige rule and the paper's totals."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from sige_export import SIGE_DOMAIN, frontend, zoo
from sige_export.macs import MACS_RULES, count_macs, count_torch_macs


def _export(module: torch.nn.Module, *args: torch.Tensor, names: list[str]) -> onnx.ModelProto:
    loaded = frontend.LoadedModel(name="m", module=module.eval(), source="test",
                                  inputs={n: a.numpy() for n, a in zip(names, args)})
    return frontend.to_dense_onnx(loaded)


def hook_macs(module: torch.nn.Module, *args: torch.Tensor) -> int:
    """Independent count: nn.Conv2d / nn.Linear forward hooks, textbook formulas."""
    total = 0

    def conv_hook(m: torch.nn.Conv2d, inp, out) -> None:
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: torch.nn.Linear, inp, out) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    hs = []
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            hs.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            hs.append(m.register_forward_hook(linear_hook))
    with torch.no_grad():
        module(*args)
    for h in hs:
        h.remove()
    return total


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.c3 = torch.nn.Conv2d(8, 16, 1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return self.fc(y.mean((2, 3)))


class _Attn(torch.nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(c, 3 * c)
        self.proj = torch.nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, L, C]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.proj(w @ v)


def test_conv_net_hand_computation() -> None:
    x = torch.randn(1, 3, 16, 16)
    hand = (16 * 16 * 8 * 3 * 9) + (8 * 8 * 8 * 2 * 9) + (8 * 8 * 16 * 8) + 16 * 10
    m = _Net()
    assert hook_macs(m, x) == hand
    assert count_torch_macs(m, (x,)).total == hand
    report = count_macs(_export(m, x, names=["x"]))
    assert report.total == hand and not report.unknown
    assert {n.op_type for n in report.nodes} == {"Conv", "Gemm"}


def test_attention_matmuls_counted() -> None:
    b, l, c = 2, 5, 8
    x = torch.randn(b, l, c)
    hand = b * l * c * 3 * c + b * l * l * c + b * l * l * c + b * l * c * c
    m = _Attn(c)
    assert count_torch_macs(m, (x,)).total == hand
    report = count_macs(_export(m, x, names=["x"]))
    assert report.total == hand
    assert report.by_op_type().get("MatMul", 0) >= 2 * b * l * l * c


def test_sdpa_counted_on_torch_side() -> None:
    q = torch.randn(1, 2, 6, 4)
    k = torch.randn(1, 2, 7, 4)
    v = torch.randn(1, 2, 7, 5)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    assert count_torch_macs(M(), (q, k, v)).total == 2 * 6 * 7 * 4 + 2 * 6 * 7 * 5


def test_input_shapes_override_and_graph_level_rules() -> None:
    w = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["y"], ["z"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert count_macs(model).unknown == ["conv"]
    r = count_macs(model, {"x": (2, 3, 10, 12)})
    assert r.total == 2 * 4 * 10 * 12 * 3 * 9
    assert [(n.name, n.op_type) for n in r.nodes] == [("conv", "Conv")]
    with pytest.raises(Exception):
        count_macs(model, strict=True)


def test_sige_sparse_conv_rule() -> None:
    assert (SIGE_DOMAIN, "SigeSparseConv2d") in MACS_RULES
    n_blocks, cin, cout, bh, bw = 5, 6, 4, 6, 8
    w = numpy_helper.from_array(np.zeros((cout, cin // 2, 3, 3), np.float32), "w")
    node = helper.make_node("SigeSparseConv2d", ["x", "idx", "w"], ["y"], domain=SIGE_DOMAIN, name="sc",
                            block=[bh, bw], strides=[1, 1], group=2)
    g = helper.make_graph([node], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, cin, 32, 32]),
                           helper.make_tensor_value_info("idx", TensorProto.INT32, [n_blocks, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(SIGE_DOMAIN, 1)])
    r = count_macs(model)
    oh, ow = bh - 2, bw - 2
    assert r.total == (2 * n_blocks) * cout * oh * ow * (cin // 2) * 9
    assert r.nodes[0].domain == SIGE_DOMAIN


def test_custom_rule_hook() -> None:
    x = torch.randn(1, 3, 8, 8)
    model = _export(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()), x, names=["x"])
    rules = dict(MACS_RULES)
    rules[("", "Relu")] = lambda node, ctx: math.prod(ctx.require(node.output[0]))
    assert count_macs(model, rules=rules).total == 64 * 4 * 27 + 4 * 64


@pytest.mark.parametrize("name", ["gaugan-cityscapes", "gancomp-gaugan"])
def test_zoo_tiny_torch_count_equals_hooks(name: str) -> None:
    # (ONNX == torch counts for every zoo entry is checked in test_zoo_export.py, reusing its export.)
    m = zoo.create(name, "tiny")
    x = zoo.example_inputs(name, "tiny")
    assert count_torch_macs(m, x).total == hook_macs(m, *x.values()) > 0


@pytest.mark.parametrize("name,giga", [("gaugan-cityscapes", 281.28), ("gancomp-gaugan", 31.16)])
def test_full_gan_macs_match_papers(name: str, giga: float) -> None:
    # GAN Compression / SIGE report 281G (GauGAN) and 31.2G (GAN Compression) MACs.
    with torch.device("meta"):
        m = zoo.create(name, "full")
    x = {k: v.to("meta") for k, v in zoo.example_inputs(name, "full").items()}
    assert round(count_torch_macs(m, x).total / 1e9, 2) == giga

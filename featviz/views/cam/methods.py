"""The pytorch-grad-cam methods by name, and ``explain``: one method on a batch.

``explain`` adds featviz's guard rails: one target per image, graph cut at the layer, hooks
released, blank/noise maps flagged.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from featviz.errors import FeatvizError
from featviz.registry import parse_names
from featviz.views.cam.layers import ModelInfo
from featviz.views.cam.mapstats import NOISE_RATIO, MapStats, classify, model_state  # noqa: F401 - re-exported
from featviz.views.cam.targets import CamTarget, bind_targets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CamMethod:
    """One pytorch-grad-cam method: its class and what it needs from the model.

    Attributes:
        cls: Class name in ``pytorch_grad_cam``.
        gradients: Needs gradients of the target with respect to the layer.
        input_gradient: Also needs the input's gradient (so the whole network is back-propagated).
        note: One line for ``--help`` and docs.
        family: ``grad-cam`` (a pytorch-grad-cam class) or ``transformer`` (featviz's transcription of
            the official code, ``featviz.views.cam.transformer``: it reads the ViT's attention, not a layer).
    """

    cls: str
    gradients: bool
    note: str
    input_gradient: bool = False
    family: str = "grad-cam"


CAM_METHODS: dict[str, CamMethod] = {
    "gradcam": CamMethod("GradCAM", True, "channel weights = mean gradient"),
    "hirescam": CamMethod("HiResCAM", True, "element-wise gradient × activation, summed"),
    "gradcam_elementwise": CamMethod("GradCAMElementWise", True, "ReLU(gradient × activation), summed"),
    "gradcam++": CamMethod("GradCAMPlusPlus", True, "second-order weights (Chattopadhyay et al.)"),
    "xgradcam": CamMethod("XGradCAM", True, "activation-normalised gradient weights"),
    "ablationcam": CamMethod("AblationCAM", False, "drop in the target when each channel is zeroed"),
    "scorecam": CamMethod("ScoreCAM", False, "target score of the image masked by each channel"),
    "eigencam": CamMethod("EigenCAM", False, "first principal component of the activations"),
    "eigengradcam": CamMethod("EigenGradCAM", True, "first principal component of gradient × activation"),
    "layercam": CamMethod("LayerCAM", True, "ReLU(gradient) × activation"),
    "fullgrad": CamMethod("FullGrad", True, "input and bias gradients of all conv/BN layers",
                           input_gradient=True),
    "kpca_cam": CamMethod("KPCA_CAM", False, "kernel-PCA component of the activations"),
    "fem": CamMethod("FEM", False, "feature explanation method (k-sigma channel masks)"),
    "shapleycam": CamMethod("ShapleyCAM", True, "gradient and Hessian-vector product weights",
                             input_gradient=True),
    "finercam": CamMethod("FinerCAM", True, "target logit minus the most similar classes' logits"),
    "seg_eigen_cam": CamMethod("SegEigenCAM", True, "|gradient| × activation, principal component"),
    "refinecam": CamMethod("RefineCAM", True, "product of GradCAM++ maps over the layers"),
    "sess": CamMethod("SESS", True, "GradCAM over scaled sliding windows, fused"),
    "random_cam": CamMethod("RandomCAM", True, "random channel weights (a sanity baseline)"),
    "legrad": CamMethod("LeGrad", True, "ViTs: positive gradients of each late block's score w.r.t. its attention "
                        "(Bousselham et al. 2024)", family="transformer"),
    "gae": CamMethod("GAE", True, "ViTs: gradient-weighted attention relevance propagated through every block "
                     "(Chefer et al. ICCV 2021)", family="transformer"),
}
"""snake_case name -> method: pytorch-grad-cam classes (imported inside ``make_cam``), and the two
transformer methods featviz transcribes from their official code (``featviz.views.cam.transformer``)."""

NOT_CAM_METHODS: dict[str, str] = {
    "deep_feature_factorization": "DeepFeatureFactorization factorises activations into concepts; it "
                                  "explains no target, so it gives no per-target heatmap",
    "guided_backprop": "GuidedBackpropReLUModel gives pixel gradients of the input, not a class "
                       "activation map of a layer",
}
"""pytorch-grad-cam exports that are not per-target CAM methods, and why."""

# the methods whose backward only needs the layer's output gradient: featviz cuts the graph there
_CUT_GRAPH = {n for n, s in CAM_METHODS.items() if s.gradients and not s.input_gradient and s.family == "grad-cam"}
_NO_AUG_SMOOTH = {"finercam", "refinecam", "sess"}  # their __call__ has no aug_smooth


METHOD_ALIASES: dict[str, str] = {
    "gradcam_plusplus": "gradcam++", "gradcampp": "gradcam++", "grad_cam": "gradcam", "kpcacam": "kpca_cam",
    "score_cam": "scorecam", "eigen_cam": "eigencam", "le_grad": "legrad", "chefer": "gae",
}
"""Other spellings of the methods' names (after ``-`` -> ``_``), and the name each stands for."""


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """Turn ``"gradcam,scorecam"``, ``["gradcam", "eigencam"]`` or ``"all"`` into method names.

    ``-`` and ``_`` are the same in a name (``grad-cam`` is ``grad_cam``, an alias of ``gradcam``).

    Raises:
        UnknownNameError: an unknown name (with suggestions) or a pytorch-grad-cam export that is
            not a CAM method (with the reason).
        OptionError: ``spec`` names no method (empty, ``","``).
    """
    return parse_names(spec, CAM_METHODS, option="--method", kind="CAM method", aliases=METHOD_ALIASES,
                       refused=NOT_CAM_METHODS, spelling=lambda n: n.replace("-", "_"))


def make_cam(name: str, model: nn.Module, layers: list[nn.Module], reshape_transform=None, *,
             batch_size: int = 32, token_layer: bool = False, output_kind: str = "logits",
             options: dict[str, Any] | None = None):
    """Construct the pytorch-grad-cam object for ``name``, extended by featviz (this registers its hooks).

    The object is an instance of ``extended(<pytorch-grad-cam class>)`` (meta-methods get an
    extended ``base_method``), so its maps are pytorch-grad-cam's own. ``options`` are extra
    constructor arguments (e.g. ``{"num_scales": 4}`` for SESS, ``{"k": 3}`` for FEM). Call
    ``release_cam`` on the result when done; featviz never relies on ``with`` because
    pytorch-grad-cam's ``__exit__`` swallows ``IndexError``.
    """
    import inspect

    import pytorch_grad_cam as pgc

    spec = CAM_METHODS[name]
    cls = getattr(pgc, spec.cls)
    kw = dict(options or {})
    if name == "ablationcam":
        kw.setdefault("ablation_layer", pgc.AblationLayerVit() if token_layer else pgc.AblationLayer())  # fresh
        kw.setdefault("batch_size", batch_size)
    elif name == "sess":
        kw.setdefault("batch_size", batch_size)
        kw.setdefault("use_softmax_scores", output_kind == "logits")  # softmax over embedding dims means nothing
    if name == "fullgrad":
        layers = []  # FullGrad picks every conv/BN bias layer itself
    base = inspect.signature(cls).parameters.get("base_method")
    if base is not None:  # FinerCAM, SESS, RefineCAM wrap a BaseCAM method: extend that one
        kw["base_method"] = extended(kw.get("base_method", base.default))
        cam = cls(model, layers, reshape_transform, **kw)
    else:
        cam = extended(cls)(model, layers, reshape_transform, **kw)
    if name == "scorecam":
        cam.batch_size = batch_size  # masked images per forward (pytorch-grad-cam reads this attribute; 16 default)
    return cam


def _base_cams(cam) -> list:
    """The BaseCAM objects inside a (meta-)method: FinerCAM/SESS wrap one, RefineCAM one per layer."""
    if hasattr(cam, "base_cam_per_layer"):
        return list(cam.base_cam_per_layer)
    if hasattr(cam, "base_cam"):
        return [cam.base_cam]
    return [cam]


def release_cam(cam) -> None:
    """Remove every hook a CAM object registered and drop its tensors (memory must not grow)."""
    for base in _base_cams(cam):
        base.activations_and_grads.release()  # featviz's recorder: see _ActivationsAndGradients
        base.outputs = None
        base.featviz_recorder = None


class _Recorder:
    """Each image's raw map and gradient size, as the extended method's ``get_cam_image`` sees them."""

    def __init__(self, n: int):
        self.stats = [MapStats() for _ in range(n)]

    def record(self, cam, grads, uses_gradients: bool) -> None:
        raw = np.maximum(np.asarray(cam, dtype=np.float64), 0)
        if raw.shape[0] != len(self.stats):  # SESS explains patches, not images
            return
        for i, st in enumerate(self.stats):
            mx = float(raw[i].max()) if np.isfinite(raw[i]).all() else float("nan")
            st.raw_max = mx if st.raw_max is None else max(st.raw_max, mx)
            st.raw_mean = float(raw[i].mean()) if st.raw_mean is None else max(st.raw_mean, float(raw[i].mean()))
            if grads is not None and uses_gradients:
                g = float(np.linalg.norm(np.asarray(_numpy(grads[i]), dtype=np.float64)))
                st.grad_norm = g if st.grad_norm is None else max(st.grad_norm, g)


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


# ------------------------------------------------------------------ the pytorch-grad-cam extension
_BAR = re.compile(r"\s*\d+%\|.*\|\s*\d+/\d+\s*\[.*\]\s*")  # a tqdm progress line


@contextmanager
def _inner_bars_hidden() -> Iterator[None]:
    """Hold back ScoreCAM's/AblationCAM's per-image tqdm bars.

    They draw a bar per image on stderr while they score masked copies; featviz shows one bar for
    the run. Their stderr is held for that loop, and everything in it but those bars (a warning, a
    log line) is passed on afterwards.
    """
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        rest = [ln for ln in re.split(r"[\r\n]", held.getvalue()) if ln.strip() and not _BAR.fullmatch(ln)]
        if rest:
            sys.stderr.write("\n".join(rest) + "\n")


def _activations_and_gradients_class():
    from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

    class _ActivationsAndGradients(ActivationsAndGradients):
        """pytorch-grad-cam's recorder, whose ``clear`` lets go of the tensors.

        It does not detach them in place (``detach_`` fails on the views a ``reshape_transform``
        returns).
        """

        def clear(self) -> None:
            self.activations, self.gradients = [], []

    return _ActivationsAndGradients


class _FeatvizCAM:
    """What featviz adds to a pytorch-grad-cam method, by subclassing it (see ``extended``).

    * ``get_cam_image``: the raw map of every image is recorded (``_Recorder``), before
      pytorch-grad-cam's ReLU and min-max scaling hide its size;
    * ``get_cam_weights``: ScoreCAM's/AblationCAM's per-image tqdm bars are held back
      (``_inner_bars_hidden``), and AblationCAM puts the target layer back if scoring fails;
    * ``activations_and_grads``: a recorder whose ``release`` works on token layers too.
    """

    featviz_recorder: _Recorder | None = None
    _featviz_quiet = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ag = self.activations_and_grads
        ag.release()  # nothing is recorded yet; featviz's recorder takes its place
        self.activations_and_grads = _activations_and_gradients_class()(
            ag.model, self.target_layers, ag.reshape_transform, ag.detach)

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        if not self._featviz_quiet:
            return super().get_cam_weights(input_tensor, target_layer, targets, activations, grads)
        try:
            with _inner_bars_hidden():
                return super().get_cam_weights(input_tensor, target_layer, targets, activations, grads)
        except BaseException:
            ablation = getattr(self, "ablation_layer", None)
            if ablation is not None:  # AblationCAM swaps the layer out while it scores
                from pytorch_grad_cam.utils.find_layers import replace_layer_recursive

                replace_layer_recursive(self.model, ablation, target_layer)
            raise

    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth=False):
        cam = super().get_cam_image(input_tensor, target_layer, targets, activations, grads, eigen_smooth)
        if self.featviz_recorder is not None:
            self.featviz_recorder.record(cam, grads, self.uses_gradients)
        return cam


@functools.cache
def extended(cls: type) -> type:
    """The pytorch-grad-cam method ``cls`` with featviz's additions (``_FeatvizCAM``).

    A subclass with the same name, whose maps are ``cls``'s own.
    """
    quiet = cls.__name__ in ("ScoreCAM", "AblationCAM")  # the methods that draw per-image tqdm bars
    attrs = {"__module__": __name__, "_featviz_quiet": quiet,
             "__doc__": f"pytorch-grad-cam's {cls.__name__}, extended by featviz"}
    return type(cls.__name__, (_FeatvizCAM, cls), attrs)


# ------------------------------------------------------------------ one method on one batch
def _cut_graph_hook(zero: torch.Tensor):
    """Forward hook: make the layer's output the start of the autograd graph.

    The trunk below the layer runs without recording (no parameter and no input requires grad),
    so the backward pass stops at the layer. ``x.detach() + zero`` (zero a 0-d leaf) has the same
    values, is a non-leaf (in-place ops downstream stay legal) and receives the same gradient
    pytorch-grad-cam would record. Grad mode is switched on for the rest of the forward, so a
    backbone that runs under ``torch.no_grad()`` still gives gradients.
    """

    def hook(_module, _inputs, output):
        torch.set_grad_enabled(True)
        if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
            return output.detach() + zero.to(device=output.device, dtype=output.dtype)
        return None

    return hook


def _grad_on_hook(_module, _inputs, _output) -> None:
    torch.set_grad_enabled(True)  # a backbone under torch.no_grad() still records after the layer


class GradientError(FeatvizError):
    """A gradient method was asked for where no gradient flows from the output to the layer."""


def explain(info: ModelInfo, x: torch.Tensor, method: str, layers: list[nn.Module],
            targets: list[CamTarget], *, reshape_transform=None, aug_smooth: bool = False,
            eigen_smooth: bool = False, batch_size: int = 32, token_layer: bool = False,
            method_kwargs: dict[str, Any] | None = None,
            options: dict[str, Any] | None = None) -> tuple[np.ndarray, list[MapStats]]:
    """Compute one method's maps for a batch, with featviz's guard rails.

    Args:
        info: The probed model (``probe_model``).
        x: Normalised images (B, 3, H, W) on the model's device.
        method: A ``CAM_METHODS`` name.
        layers: Target layer modules (several are averaged, as pytorch-grad-cam does).
        targets: One target per image (never broadcast silently).
        reshape_transform: For token layers (``featviz.models.features.reshape_transform``).
        aug_smooth: pytorch-grad-cam's test-time augmentation smoothing (6 passes).
        eigen_smooth: First principal component of the weighted activations.
        batch_size: Inner batch of ScoreCAM/AblationCAM/SESS forwards.
        token_layer: The layers output tokens (picks AblationCAM's ViT ablation layer).
        method_kwargs: Extra call arguments (FinerCAM's ``target_idx``).
        options: Extra constructor arguments for the method (see ``make_cam``).

    Returns:
        maps (B, H, W) float32 in [0, 1] exactly as pytorch-grad-cam returns them, and per-image
        ``MapStats``.

    Raises:
        ValueError: the number of targets is not the number of images.
        GradientError: a gradient method where no gradient reaches the layer.
    """
    if len(targets) != x.shape[0]:
        raise ValueError(f"one target per image is required: got {len(targets)} targets for {x.shape[0]} images")
    spec = CAM_METHODS[method]
    if spec.family == "transformer":  # the ViT's own attention: no layer, no reshape, no smoothing
        from featviz.views.cam.transformer import explain_transformer

        return explain_transformer(info, _inner_model(info), x, method, targets)
    model = info.forward
    if (aug_smooth or method == "sess") and not all(t.bound for t in targets):
        bind_targets(info, x, targets)  # their first forward is not the clean batch
    recorder = _Recorder(x.shape[0])
    with ExitStack() as stack:
        stack.enter_context(model_state(model, weights_require_grad=spec.input_gradient))
        handles = _guard_hooks(info, method, layers, targets, x)
        stack.callback(lambda: [h.remove() for h in handles])
        cam = make_cam(method, model, layers, reshape_transform, batch_size=batch_size,
                       token_layer=token_layer, output_kind=info.kind, options=options)
        stack.callback(release_cam, cam)
        for base in _base_cams(cam):
            base.featviz_recorder = recorder
        kwargs = dict(method_kwargs or {})
        if aug_smooth:
            kwargs["aug_smooth"] = True
        maps = cam(x, None if method == "finercam" else targets, eigen_smooth=eigen_smooth, **kwargs)
        _check_gradients(info, method, cam, layers)
    stats = [classify(st, t.slope) for st, t in zip(recorder.stats, targets, strict=True)]
    return np.asarray(maps, dtype=np.float32), stats


def _guard_hooks(info: ModelInfo, method: str, layers: list[nn.Module], targets: list[CamTarget],
                 x: torch.Tensor) -> list:
    """Featviz's forward hooks for one explanation.

    Where the graph starts, and a check on the first (clean) output that binds the targets and
    refuses a gradient method when no gradient flows.
    """
    spec = CAM_METHODS[method]
    handles = []
    if method in _CUT_GRAPH:
        zero = torch.zeros((), device=x.device, requires_grad=True)
        # prepend: the cut must happen before pytorch-grad-cam's own hooks see the output
        handles += [m.register_forward_hook(_cut_graph_hook(zero), prepend=True) for m in layers]
    elif spec.gradients:  # FullGrad/ShapleyCAM differentiate the input: grad mode must stay on
        handles += [m.register_forward_hook(_grad_on_hook, prepend=True) for m in layers]
    state = {"first": True}

    def on_output(_module, _inputs, output):
        if not state["first"]:
            return
        state["first"] = False
        for t, o in zip(targets, output, strict=False):
            if not t.bound:
                t.bind(o.detach())
        if spec.gradients and not output.requires_grad:
            raise GradientError(
                f"{method} needs gradients from the model output back to layer(s) "
                f"{_layer_names(info, layers)}, but none flow: the model detaches or runs under "
                "torch.no_grad() after that layer. Use a gradient-free method (eigencam, scorecam, "
                "ablationcam, kpca_cam, fem) or a later layer")

    handles.append(info.forward.register_forward_hook(on_output))
    return handles


def _check_gradients(info: ModelInfo, method: str, cam, layers: list[nn.Module]) -> None:
    """A gradient method whose layers received no gradient explained nothing: say so."""
    if not CAM_METHODS[method].gradients or method in ("fullgrad", "sess"):
        return
    for base in _base_cams(cam):
        if len(base.activations_and_grads.gradients) < len(base.target_layers):
            raise GradientError(
                f"{method}: no gradient reached layer(s) {_layer_names(info, layers)}; the model output "
                "does not depend on them. Pick a layer on the path to the output")


def _layer_names(info: ModelInfo, layers: list[nn.Module]) -> str:
    names = {id(m): n for n, m in info.forward.named_modules()}
    return ", ".join(repr(names.get(id(m), type(m).__name__)) for m in layers)


def _inner_model(info: ModelInfo) -> nn.Module:
    """The model itself: ``info.forward``, or the model an ``OutputSelector`` wraps."""
    from featviz.views.cam.layers import OutputSelector

    return info.forward.model if isinstance(info.forward, OutputSelector) else info.forward


def not_applicable(method: str, info: ModelInfo, *, token_layer: bool, aug_smooth: bool = False,
                   input_hw: tuple[int, int] | None = None) -> str | None:
    """Why ``method`` cannot run on this model/layer/target/input size (None when it can)."""
    if CAM_METHODS[method].family == "transformer":
        from featviz.views.cam.transformer import why_not

        if aug_smooth:
            return f"{method} has no --aug-smooth (the official code has none)"
        return why_not(method, _inner_model(info))
    if method == "finercam" and (info.kind != "logits" or info.num_classes < 2):
        return "finercam compares a class with its most similar classes, so it needs a classifier with ≥ 2 classes"
    if method == "sess" and info.kind == "segmentation":
        return "sess scores image patches with one score per patch, so it needs an (N, D) output, not a segmenter"
    if method == "sess" and input_hw is not None and input_hw[0] != input_hw[1]:
        return (f"sess slides square windows of the shorter side over the image, so it needs square inputs; "
                f"this run uses {input_hw[0]}×{input_hw[1]}")
    if method == "shapleycam" and token_layer:
        return ("shapleycam does not apply to token layers: pytorch-grad-cam 1.5.7 skips the reshape_transform on "
                "its activations (detach=False path); pick a convolutional layer")
    if method in _NO_AUG_SMOOTH and aug_smooth:
        return f"{method} has no --aug-smooth in pytorch-grad-cam 1.5.7"
    if method == "fullgrad" and not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and m.bias is not None
                                        for m in info.forward.modules()):
        return "fullgrad needs Conv2d/BatchNorm2d layers with biases, and this model has none"
    return None



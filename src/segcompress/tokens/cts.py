"""CTS: content-aware token sharing (Lu, de Geus, Dubbelman, CVPR 2023).

A small policy net (timm ``efficientnet_lite0`` features, then a 1×1 conv to 2 logits at stride
32) predicts, for each superpatch of 2×2 patches, whether it holds a single class. Before the
encoder, the K superpatches most likely uniform in each image *share* one token: their
32×32 pixels are 2×2-averaged to one 16×16 patch and embedded with the same patch embedding; its
position embedding is the average of the four. The other patches are embedded as usual. Sequence:
[class token, unshared patches (row-major), shared superpatches (row-major)], N − 3K tokens.

The policy net is trained separately, before the segmenter, on targets derived from the labels
(:func:`policy_targets`, :func:`train_policy`). The reference starts it from ImageNet-pretrained
``efficientnet_lite0`` weights; here its initial weights are a setting (``pretrained``: random,
timm's ImageNet weights, or a local file, :class:`PolicyNet`), recorded in the policy file's
metadata as ``policy_init`` (:func:`policy_init_of`). At inference it runs with its batch norms
folded into its convolutions (:func:`fold_policy`, :class:`InferencePolicy`): the same logits,
faster; its FLOPs are counted on the plain net.

Ranking. The reference softmaxes the two logits and takes the top K of P(uniform). In float32
P(uniform) saturates at 1.0 once the logit difference exceeds about 17, so confident superpatches
tie and which of them are shared depends on how top-k happens to break ties. Here superpatches
are ranked by the logit difference l_uniform − l_mixed, the same order as P(uniform) wherever P
is not saturated, and equal scores are broken by the superpatch's row-major index (lowest first,
a stable sort), so the chosen set is deterministic (:func:`top_superpatches`).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from segcompress.flops import analytic_gmacs
from segcompress.models.spec import SegmenterSpec
from segcompress.tokens.cost import NUM_PREFIX, decoder_tokens
from segcompress.tokens.patch import TokenMethod
from segcompress.tokens.state import TokenState, cumulative_index

log = logging.getLogger(__name__)

POLICY_BACKBONE = "efficientnet_lite0"
_warned_untrained = False
IGNORE_INDEX = 255


#: Metadata key of a policy file that says how its backbone was initialised (:func:`policy_init_label`).
POLICY_INIT_KEY = "policy_init"
#: Metadata key of a policy file that holds its backbone's channel multiplier (:class:`PolicyNet`).
POLICY_MULTIPLIER_KEY = "channel_multiplier"
#: Suffixes of a local pretrained backbone file.
PRETRAINED_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth")


def policy_init_label(pretrained: str | None) -> str:
    """How a policy backbone is initialised, as recorded: ``random``, ``timm:<name>`` or ``file:<path>``."""
    if pretrained is None:
        return "random"
    if pretrained == "timm":
        return f"timm:{POLICY_BACKBONE}"
    return f"file:{pretrained}"


def _policy_backbone(pretrained: str | None, channel_multiplier: float = 1.0) -> nn.Module:
    """timm's ``efficientnet_lite0`` feature extractor (stride-32 map), initialised as ``pretrained``
    says; ``channel_multiplier`` < 1 narrows every block's channels (timm's EfficientNet-Lite
    builder; its stem and depth stay), a net for which no ImageNet weights exist."""
    import timm

    check_channel_multiplier(channel_multiplier, pretrained)
    if channel_multiplier != 1.0:  # random init only (checked above)
        from timm.models.efficientnet import _gen_efficientnet_lite

        return _gen_efficientnet_lite(POLICY_BACKBONE, channel_multiplier=channel_multiplier, pretrained=False,
                                      features_only=True, out_indices=(4,))

    def create(overlay: dict[str, str] | None = None, weights: bool = True) -> nn.Module:
        return timm.create_model(POLICY_BACKBONE, pretrained=weights, pretrained_cfg_overlay=overlay,
                                 features_only=True, out_indices=(4,))

    if pretrained is None:
        return create(weights=False)
    if pretrained == "timm":
        try:
            return create()
        except Exception as e:  # offline, no cache, hub errors: one line that says what to do
            raise ValueError(
                f"CTS policy: timm's ImageNet weights for {POLICY_BACKBONE} could not be loaded "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'}); give a local "
                ".safetensors/.pth file or null (random init) as methods.cts.policy.pretrained / --pretrained"
            ) from None
    path = Path(pretrained)
    if path.suffix not in PRETRAINED_SUFFIXES:
        raise ValueError(f"{path}: CTS policy pretrained weights must be a {' or '.join(PRETRAINED_SUFFIXES)} "
                         "file, \"timm\" or null")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CTS policy pretrained weights not found (methods.cts.policy.pretrained / "
                                "--pretrained: a local .safetensors/.pth file, \"timm\" or null)")
    backbone = create({"file": str(path)})
    _check_complete(backbone, path)
    return backbone


def check_channel_multiplier(channel_multiplier: float, pretrained: str | None = None) -> None:
    """Refuse a channel multiplier out of (0, 1], and ImageNet weights for a narrowed net."""
    if not 0.0 < channel_multiplier <= 1.0:
        raise ValueError(f"methods.cts.policy.channel_multiplier must be in (0, 1], got {channel_multiplier}")
    if pretrained is not None and channel_multiplier != 1.0:
        raise ValueError(f"methods.cts.policy: pretrained weights ({pretrained!r}) exist for {POLICY_BACKBONE} "
                         f"itself only; set channel_multiplier to 1.0 or pretrained to null, not {channel_multiplier}")


def _check_complete(backbone: nn.Module, path: Path) -> None:
    """timm loads a file non-strictly: fail when it did not hold every backbone tensor."""
    from timm.models import load_state_dict

    state = load_state_dict(str(path))
    own = backbone.state_dict()
    bad = [k for k, v in own.items() if k not in state or tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{path}: not {POLICY_BACKBONE} weights ({len(bad)} of {len(own)} backbone tensors missing "
                         f"or of another shape, e.g. {bad[0]!r})")


class PolicyNet(nn.Module):
    """CTS policy: ``efficientnet_lite0`` (features only) + 1×1 conv to 2 logits per 32×32 region.

    Args:
        pretrained: the backbone's initial weights: ``None`` (random init, the only option on
            offline machines without a file), ``"timm"`` (timm's ImageNet weights, through its
            own pretrained mechanism: needs the network or a warm cache) or the path of a local
            ``.safetensors``/``.pth`` state dict of timm's ``efficientnet_lite0`` (loaded through
            the same mechanism; a file that lacks any backbone tensor is an error). The head is
            always randomly initialised. ``init`` records the choice (:func:`policy_init_label`).
        channel_multiplier: every block's channels times this (1.0: ``efficientnet_lite0``, the
            reference; < 1: a narrower net of the same depth, random init only), so that a
            scaled-down study can keep the policy's share of the segmenter's FLOPs.
    """

    def __init__(self, pretrained: str | None = None, channel_multiplier: float = 1.0) -> None:
        super().__init__()
        self.backbone = _policy_backbone(pretrained, channel_multiplier)
        self.init = policy_init_label(pretrained)
        self.channel_multiplier = float(channel_multiplier)
        channels = self.backbone.feature_info.channels()[-1]
        self.head = nn.Conv2d(channels, 2, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2, ⌈H/32⌉, ⌈W/32⌉) for normalised images (B, 3, H, W); class 1 = uniform."""
        return self.head(self.backbone(img)[-1])


#: Convolution → batch norm pairs of timm's EfficientNet modules, by class name: in each module's
#: forward the batch norm directly follows its convolution, so it can be folded into it.
_CONV_BN_PAIRS: dict[str, tuple[tuple[str, str], ...]] = {
    "EfficientNetFeatures": (("conv_stem", "bn1"),),
    "DepthwiseSeparableConv": (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
}


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of ``conv`` with the eval-mode batch norm ``bn`` (running statistics) folded in."""
    import copy

    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded = copy.deepcopy(conv)  # not a new Conv2d: its random init would draw from the global RNG
    folded.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
    folded.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * scale, requires_grad=False)
    return folded


#: Whether :class:`ConvAct` may use its fused oneDNN call on CPU: PyTorch has oneDNN and the op,
#: and is not an Arm Compute Library build (where PyTorch's own compiler does not fuse either).
ONEDNN_FUSION: bool = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                       and hasattr(torch.ops.mkldnn, "_is_mkldnn_acl_supported")
                       and not torch.ops.mkldnn._is_mkldnn_acl_supported())

#: oneDNN's name and scalars for an activation fused into the convolution before it (:class:`ConvAct`).
_ONEDNN_ACTIVATIONS: dict[type, tuple[str, list[float]]] = {
    nn.Identity: ("none", []), nn.ReLU: ("relu", []), nn.ReLU6: ("hardtanh", [0.0, 6.0]),
}


class ConvAct(nn.Module):
    """A frozen, folded convolution and the activation after it; on CPU one oneDNN call with the
    activation fused into the convolution's output. The two run as written instead on other
    devices and dtypes, under autocast, with oneDNN switched off (``torch.backends.mkldnn``),
    when a gradient is wanted (the fused op has none), for a convolution that pads in its own way,
    and when traced (a FLOPs counter then sees the convolution).

    PyTorch runs a 1×1 convolution at one thread and a batch under 16 through its generic
    im2col-and-GEMM path, plus a copy of the channels-last input; oneDNN's kernel, with ReLU6
    applied as the output is written, saves that copy and a pass over every feature map.

    Args:
        conv: the convolution (batch norm already folded into it).
        act: the activation after it, one of ``_ONEDNN_ACTIVATIONS``'s types.
    """

    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        if type(act) not in _ONEDNN_ACTIVATIONS:
            raise TypeError(f"CTS policy: cannot fuse {type(act).__name__} into a convolution (unsupported timm version)")
        self.conv, self.act = conv, act
        self.attr, self.scalars = _ONEDNN_ACTIVATIONS[type(act)]
        # a subclass (timm's Conv2dSame), 'same' padding or another padding mode: padded in forward
        self.fusable = type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)

    def fused(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through the fused oneDNN call."""
        c = self.conv
        return (ONEDNN_FUSION and self.fusable and torch.backends.mkldnn.enabled and x.device.type == "cpu"
                and x.dtype == c.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and not (torch.is_grad_enabled() and (x.requires_grad or c.weight.requires_grad))
                and not torch.jit.is_tracing())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if self.fused(x):
            return torch.ops.mkldnn._convolution_pointwise(x, c.weight, c.bias, list(c.padding), list(c.stride),
                                                           list(c.dilation), c.groups, self.attr, self.scalars, None)
        return self.act(c(x))


def fold_policy(policy: nn.Module) -> nn.Module:
    """An inference copy of a CTS policy net that computes the same logits faster on CPU.

    Every batch norm is folded into the convolution before it, and each convolution runs with its
    activation as one :class:`ConvAct` (one oneDNN call on CPU), on channels-last weights and
    feature maps. Measured on ViT-S/16's 512² crops, batch 8, one thread: folding and
    channels-last took the plain net's 1.61 s of CPU per batch to 1.05 s (an earlier machine);
    the fused calls and a channels-last input then took the policy alone from 0.72-0.79 s to
    0.47-0.51 s, and inside CTS's forward pass from 0.61-0.74 s to 0.41-0.58 s (another). The
    copy is frozen, in eval mode, and for inference only (no batch norm left to train); ``policy``
    is left unchanged. Logits agree with the plain net's to float32 rounding (about 1e-5
    relative). :class:`InferencePolicy` runs it on oneDNN's blocked layout on CPU, faster still.
    """
    import copy

    net = copy.deepcopy(policy).eval().requires_grad_(False)
    with torch.no_grad():
        for module in list(net.modules()):
            for conv_name, bn_name in _CONV_BN_PAIRS.get(type(module).__name__, ()):
                conv, bn = getattr(module, conv_name), getattr(module, bn_name)
                if not isinstance(bn, nn.BatchNorm2d):
                    raise TypeError(f"{type(module).__name__}.{bn_name}: expected a BatchNorm2d to fold, got "
                                    f"{type(bn).__name__} (unsupported timm version)")
                # timm's BatchNormAct2d: norm, then drop (identity in eval) and act; the act is fused
                setattr(module, conv_name, ConvAct(_fold_conv_bn(conv, bn), getattr(bn, "act", nn.Identity())))
                setattr(module, bn_name, nn.Identity())
    left = [n for n, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise TypeError(f"CTS policy: batch norm {left[0]!r} was not folded (unsupported timm version)")
    if isinstance(getattr(net, "head", None), nn.Conv2d):
        net.head = ConvAct(net.head, nn.Identity())
    return net.to(memory_format=torch.channels_last)


class InferencePolicy(nn.Module):
    """A frozen policy net as CTS runs it: :func:`fold_policy`'s faster copy computes the logits,
    while FLOPs counting (fvcore traces the model) sees the plain net, batch norms included.

    The counted cost is thus that of the reference architecture, as :func:`policy_gmacs` counts it
    for matching, whichever implementation runs; folding changes the time, not the FLOPs budget.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.plain = policy.eval().requires_grad_(False)
        self.folded = fold_policy(self.plain)
        convs = {name: m for name, m in self.folded.named_modules() if isinstance(m, ConvAct)}
        self.convs = list(convs.values())  # a plain list: already registered under ``folded``
        # any other layer with weights or its own op (e.g. a squeeze-excite of another timm
        # variant) may not take a oneDNN tensor: such a net always runs channels-last
        self.blockable = all(isinstance(m, nn.Identity) for name, m in self.folded.named_modules()
                             if not any(m.children()) and not any(name.startswith(c + ".") for c in convs))

    def blocked(self, img: torch.Tensor) -> bool:
        """Whether ``img`` runs through the folded net as a oneDNN tensor: where the net holds only
        :class:`ConvAct` layers (and identities) and every one takes its fused oneDNN call
        (:meth:`ConvAct.fused`: CPU, float32, no autocast, no gradient)."""
        return self.blockable and all(m.fused(img) for m in self.convs)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """Logits (B, 2, ⌈H/32⌉, ⌈W/32⌉), as :meth:`PolicyNet.forward`.

        On CPU the feature maps stay in oneDNN's own blocked layout from the first convolution to
        the logits (``Tensor.to_mkldnn``; the fused convolutions and the residual additions take it
        as it is), instead of channels-last: on ViT-S/16's 512² crops, batch 8, one thread, its
        convolutions took 0.34 s instead of 0.45 s (depthwise 0.09 against 0.12, 1×1 0.24 against
        0.32; the smallest of three passes, summed per layer), the logits equal to float32 rounding.
        Elsewhere the input is channels-last like the folded net's weights.
        """
        if torch.jit.is_tracing():
            return self.plain(img)
        if self.blocked(img):
            return self.folded(img.to_mkldnn()).to_dense()
        return self.folded(img.contiguous(memory_format=torch.channels_last))


def save_policy(policy: PolicyNet, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write the policy weights as safetensors (atomically; the same weights give the same bytes)."""
    from segcompress.io import write_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: policy path must end in .safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
    meta = {"backbone": POLICY_BACKBONE, POLICY_INIT_KEY: policy.init,
            POLICY_MULTIPLIER_KEY: json.dumps(policy.channel_multiplier), **(metadata or {})}
    write_safetensors(path, state, {k: str(v) for k, v in meta.items()})


def load_policy(path: str | Path | None, map_location: str | torch.device = "cpu",
                channel_multiplier: float | None = None) -> nn.Module:
    """A frozen policy net for inference from ``path`` (safetensors); ``None``: untrained (warns).

    The net's channel multiplier is the file's (:func:`channel_multiplier_of`); a
    ``channel_multiplier`` given too must equal it (a policy trained at another width is an
    error that says to retrain), and builds the untrained net when ``path`` is None. It runs with
    its batch norms folded into its convolutions (:class:`InferencePolicy`): the trained net's
    logits, faster; it cannot be trained or saved as a policy file.
    """
    if path is None:
        policy = PolicyNet(channel_multiplier=1.0 if channel_multiplier is None else channel_multiplier)
        global _warned_untrained
        if not _warned_untrained:
            log.warning("CTS without a policy file: the policy net is untrained (fine for FLOPs and speed only)")
            _warned_untrained = True
    else:
        from safetensors.torch import load_file

        policy = PolicyNet(channel_multiplier=channel_multiplier_of(path, channel_multiplier))
        state = load_file(str(_existing_policy(path)), device=str(map_location))
        missing, unexpected = policy.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: not a CTS policy net (missing {missing[:3]}, unexpected {unexpected[:3]})")
    policy.requires_grad_(False)
    return InferencePolicy(policy.to(map_location))


def _existing_policy(path: str | Path) -> Path:
    """``path`` as a Path; a missing file is named as a CTS policy to train."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CTS policy weights not found (train them with `segcompress policy`)")
    return path


def _policy_metadata(path: str | Path) -> dict[str, str]:
    from segcompress.models.checkpoint import read_metadata

    return read_metadata(_existing_policy(path))


def policy_init_of(path: str | Path) -> str | None:
    """How the policy in ``path`` was initialised before training (``random``, ``timm:<name>``,
    ``file:<path>``), from its metadata; None for a file written before this was recorded."""
    return _policy_metadata(path).get(POLICY_INIT_KEY)


def channel_multiplier_of(path: str | Path, expected: float | None = None) -> float:
    """The channel multiplier of the policy in ``path`` (1.0 for a file written before it was
    recorded); with ``expected`` (the settings' value), a file of another width is an error."""
    own = float(json.loads(_policy_metadata(path).get(POLICY_MULTIPLIER_KEY, "1.0")))
    if expected is not None and own != float(expected):
        raise ValueError(f"{path}: CTS policy trained with channel_multiplier {own}, the settings say "
                         f"{float(expected)}; retrain it (`segcompress policy`, or rerun the workflow)")
    return own


def uniform_fraction_of(path: str | Path | None) -> float | None:
    """The share of uniform superpatches the policy in ``path`` saw in training
    (:class:`PolicyTraining`), from its metadata; None without a file or for one written before
    this was recorded."""
    value = None if path is None else _policy_metadata(path).get("uniform_fraction")
    return None if value in (None, "null") else float(value)


def superpatch_grid(grid: tuple[int, int]) -> tuple[int, int]:
    """Superpatches (rows, cols) of 2×2 patches on a patch grid (odd last row/column left out)."""
    return grid[0] // 2, grid[1] // 2


def policy_targets(labels: torch.Tensor, patch_size: int = 16, border_ignore: bool = True,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Policy targets (B, H/2p, W/2p) from label maps (B, H, W): 1 if the 2p×2p region holds one class.

    As the reference (``policy_gt_gen``): ``ignore_index`` counts as a label and an all-ignore
    region is uniform; a region with exactly one class plus ignore is 0, except on the border of
    the superpatch grid with ``border_ignore`` (ADE20K's setting), where it is ``ignore_index``
    and left out of the loss (Cityscapes: ``border_ignore=False``).
    """
    s = 2 * patch_size
    lab = labels.float().unsqueeze(1)
    hi = F.max_pool2d(lab, s, s)
    lo = -F.max_pool2d(-lab, s, s)
    uniform = hi == lo
    hi_valid = F.max_pool2d(lab.masked_fill(labels.unsqueeze(1) == ignore_index, -1.0), s, s)
    one_plus_ignore = ~uniform & (hi_valid == lo)
    target = uniform.long()
    if border_ignore:
        border = torch.zeros_like(uniform)
        border[..., 0, :] = True
        border[..., -1, :] = True
        border[..., :, 0] = True
        border[..., :, -1] = True
        target = target.masked_fill(one_plus_ignore & border, ignore_index)
    return target.squeeze(1)


@dataclass(frozen=True)
class PolicyTraining:
    """What :func:`train_policy` saw: the loss of every step, and the share of uniform
    superpatches among the labelled targets of its batches (None when it saw none). CTS loses
    little while K stays below that share of the superpatches; above it, it must share regions
    that hold several classes (the policy can only choose which)."""

    losses: list[float]
    uniform_fraction: float | None


def train_policy(
        policy: PolicyNet,
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
        iters: int,
        patch_size: int = 16,
        border_ignore: bool = True,
        lr: float = 5e-5,
        weight_decay: float = 1e-3,
        device: str | torch.device = "cpu",
        on_step: Callable[[int, float], None] | None = None,
) -> PolicyTraining:
    """Train the policy net as the reference: AdamW (lr 5e-5, wd 1e-3), cross-entropy, ignore 255.

    Args:
        policy: the net (trained in place).
        batches: (image (B,3,H,W) normalised, label (B,H,W) with 255 = ignore) batches; cycled
            until ``iters`` steps are done.
        iters: optimisation steps.
        patch_size: the ViT patch size (regions are 2×2 patches).
        border_ignore: see :func:`policy_targets`.
        on_step: called with (step, loss) after every step (progress, logging).

    Returns:
        The loss of every step and the share of uniform superpatches among the targets it saw.
    """
    policy.to(device).train()
    policy.requires_grad_(True)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    uniform = labelled = 0
    from segcompress.data.datasets import cycle

    it = cycle(batches, "policy training")
    for step in range(iters):
        img, label = next(it)
        img, label = img.to(device), label.to(device)
        target = policy_targets(label, patch_size, border_ignore)
        uniform += int((target == 1).sum())
        labelled += int((target != IGNORE_INDEX).sum())
        logits = policy_logits(policy, img, (target.shape[-2], target.shape[-1]))
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):  # a batch with only ignored regions has no gradient
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    policy.eval()
    policy.requires_grad_(False)
    return PolicyTraining(losses, uniform / labelled if labelled else None)


def policy_logits(policy: nn.Module, img: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Policy logits (B, 2, *shape) on the superpatch grid ``shape``.

    With 16-pixel patches the net's stride-32 output is that grid (an odd last row/column is
    cropped); for other patch sizes it is bilinearly resized onto it.
    """
    logits = policy(img)
    h, w = logits.shape[-2:]
    if h >= shape[0] and w >= shape[1] and h - shape[0] <= 1 and w - shape[1] <= 1:
        return logits[..., :shape[0], :shape[1]]
    return F.interpolate(logits, size=shape, mode="bilinear", align_corners=False)


def uniform_scores(policy: nn.Module, img: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Uniformity score of each superpatch, (B, Sh·Sw) row-major: the policy's logit difference
    l_uniform − l_mixed (P(uniform) is its sigmoid; unlike P it does not saturate)."""
    logits = policy_logits(policy, img, superpatch_grid(grid))
    return (logits[:, 1] - logits[:, 0]).reshape(img.shape[0], -1)


def top_superpatches(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of the ``k`` highest scores per row; equal scores: the lowest index first."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def mean_2x2(x: torch.Tensor) -> torch.Tensor:
    """The mean of every 2×2 block of the last two axes (even sizes), (..., h/2, w/2).

    The same numbers as ``x.reshape(..., h/2, 2, w/2, 2).mean(dim=(-3, -1))`` (sums in the order
    (top-left + top-right) + (bottom-left + bottom-right)), whose one reduction over two strided
    axes ran 6x slower on CPU (43 against 7 ms for a batch of 8 images at 512², one thread).
    """
    top, bottom = x[..., 0::2, :], x[..., 1::2, :]
    return ((top[..., 0::2] + top[..., 1::2]) + (bottom[..., 0::2] + bottom[..., 1::2])) / 4


def share_tokens(encoder: nn.Module, img: torch.Tensor, scores: torch.Tensor, k: int) -> TokenState:
    """Embed ``img`` with the top-``k`` superpatches of each image shared (one token per 2×2 patches).

    Only the N − 3k tokens that exist are embedded (a linear map with the patch embedding's
    weights), so the counted embedding cost is that of N − 3k patches.

    Args:
        encoder: the timm ViT (class token, position embedding with a class entry, no registers).
        img: normalised crops (B, 3, H, W) at the encoder's size.
        scores: (B, Sh·Sw) uniformity score per superpatch (:func:`uniform_scores`; higher is
            shared first, ties by index).
        k: superpatches to share per image, 0 ≤ k ≤ Sh·Sw.
    """
    pe = encoder.patch_embed
    p = pe.patch_size[0]
    B, C, H, W = img.shape
    gh, gw = H // p, W // p
    sh, sw = superpatch_grid((gh, gw))
    n, ns = gh * gw, sh * sw
    if not 0 <= k <= ns:
        raise ValueError(f"CTS k={k} is out of range 0..{ns} superpatches")
    if encoder.cls_token is None or getattr(encoder, "reg_token", None) is not None or encoder.no_embed_class:
        raise ValueError("CTS supports ViTs with one class token whose position embedding covers it")
    prefix = encoder.num_prefix_tokens
    pos = encoder.pos_embed
    if pos.shape[1] != prefix + n:
        raise ValueError(f"position embedding has {pos.shape[1] - prefix} entries for a {gh}x{gw} grid")
    E = pos.shape[-1]
    # Pixels of every patch, in the conv weight's (c, kh, kw) order, and of every pooled superpatch.
    patches = img.reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, n, C * p * p)
    pooled = mean_2x2(img[:, :, :2 * sh * p, :2 * sw * p])
    super_px = pooled.reshape(B, C, sh, p, sw, p).permute(0, 2, 4, 1, 3, 5).reshape(B, ns, C * p * p)
    pos_grid = pos[:, prefix:].reshape(1, gh, gw, E)
    pos_super = pos_grid[:, :2 * sh, :2 * sw].reshape(1, sh, 2, sw, 2, E).mean(dim=(2, 4)).reshape(1, ns, E)
    pos_grid = pos_grid.reshape(1, n, E)
    # Which superpatches are shared, and which patches that covers.
    top = top_superpatches(scores, k)
    shared_super = torch.zeros(B, ns, dtype=torch.bool, device=img.device).scatter_(1, top, torch.ones_like(top, dtype=torch.bool))
    rows = torch.arange(gh, device=img.device)[:, None]
    cols = torch.arange(gw, device=img.device)[None, :]
    inside = ((rows < 2 * sh) & (cols < 2 * sw)).reshape(-1)
    super_of = ((rows // 2).clamp_max(max(sh - 1, 0)) * sw + (cols // 2).clamp_max(max(sw - 1, 0))).reshape(-1)
    shared_patch = inside & shared_super[:, super_of] if ns else torch.zeros(B, n, dtype=torch.bool, device=img.device)
    n_keep = n - 4 * k
    keep_idx = (~shared_patch).nonzero()[:, 1].view(B, n_keep)  # row-major unshared patches
    super_idx = shared_super.nonzero()[:, 1].view(B, k)  # row-major shared superpatches
    rows_px = torch.cat([
        patches.gather(1, keep_idx[..., None].expand(-1, -1, C * p * p)),
        super_px.gather(1, super_idx[..., None].expand(-1, -1, C * p * p)),
    ], dim=1)
    weight = pe.proj.weight.reshape(E, C * p * p)
    tokens = pe.norm(F.linear(rows_px, weight, pe.proj.bias))
    tok_pos = torch.cat([
        pos_grid.expand(B, -1, -1).gather(1, keep_idx[..., None].expand(-1, -1, E)),
        pos_super.expand(B, -1, -1).gather(1, super_idx[..., None].expand(-1, -1, E)),
    ], dim=1)
    cls = encoder.cls_token.expand(B, -1, -1) + pos[:, :prefix]
    x = torch.cat([cls, tokens + tok_pos], dim=1)
    x = encoder.norm_pre(encoder.patch_drop(encoder.pos_drop(x)))
    # Map: unshared patch → its place among the unshared; shared patch → its superpatch's token.
    slot_super = prefix + n_keep + cumulative_index(shared_super)
    token_of = torch.where(shared_patch, slot_super[:, super_of] if ns else shared_patch.long(),
                           prefix + cumulative_index(~shared_patch))
    size = torch.ones(B, prefix + n_keep + k, dtype=x.dtype, device=x.device)
    size[:, prefix + n_keep:] = 4.0
    return TokenState(x, size, token_of, (gh, gw), prefix, counts=None, merged=k > 0)


class _Scores(nn.Module):
    def __init__(self, policy: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.policy, self.grid = policy, grid

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return uniform_scores(self.policy, img, self.grid)


@functools.lru_cache(maxsize=16)
def policy_gmacs(height: int, width: int, patch_size: int = 16, channel_multiplier: float = 1.0) -> float:
    """Counted GMACs of the policy scoring on one (height, width) crop (fvcore convention).

    Input-independent; measured once per crop and channel multiplier by tracing the policy net
    with fvcore.
    """
    from segcompress.flops import count_gmacs

    grid = (height // patch_size, width // patch_size)
    net = PolicyNet(channel_multiplier=channel_multiplier)
    return count_gmacs(_Scores(net, grid), torch.zeros(1, 3, height, width))


def policy_metadata(**fields: object) -> dict[str, str]:
    """String metadata for :func:`save_policy`."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}


class CTS(TokenMethod):
    """CTS: the policy net picks the K superpatches per image that share one token.

    Args:
        k: shared superpatches per image.
        policy: the policy net (frozen).
        policy_path: where it came from (for the knob).
        prop_attn: proportional attention (reference: off).
        decoder_on_merged: decoder on the shared tokens (reference: on).
    """

    name = "cts"

    def __init__(self, k: int, policy: nn.Module, policy_path: str | None = None, prop_attn: bool = False,
                 decoder_on_merged: bool = True):
        super().__init__(prop_attn, decoder_on_merged)
        if k < 0:
            raise ValueError(f"CTS k must be >= 0, got {k}")
        self.k = int(k)
        # Not a registered submodule: the frozen policy stays out of the Segmenter's parameters and
        # state dict (it has its own file) and stays in eval mode; _apply moves it with the model.
        object.__setattr__(self, "policy", policy.eval().requires_grad_(False))
        self.policy_path = policy_path

    def _apply(self, fn: Any, recurse: bool = True) -> "CTS":
        self.policy._apply(fn)
        return super()._apply(fn, recurse)

    def start(self, model: nn.Module, img: torch.Tensor) -> TokenState:
        if self.k == 0:
            return super().start(model, img)
        with torch.no_grad():
            scores = uniform_scores(self.policy, img, model.grid_of(img))
        return share_tokens(model.encoder, img, scores, self.k)

    def knob(self) -> dict[str, Any]:
        return {"k": self.k, "policy_file": self.policy_path, **super().knob()}


def cts_gmacs(spec: SegmenterSpec, knob: dict[str, Any], include_policy: bool = True,
              channel_multiplier: float = 1.0) -> float:
    """GFLOPs of CTS at ``knob``: N − 3K tokens everywhere, N − 3K patches embedded, plus the policy net.

    ``include_policy=False`` leaves the policy net out (the CTS paper's unclear convention);
    ``channel_multiplier`` is the policy net's (:class:`PolicyNet`).
    """
    k = int(knob["k"])
    sh, sw = superpatch_grid(spec.grid)
    if not 0 <= k <= sh * sw:
        raise ValueError(f"CTS k={k} is out of range 0..{sh * sw}")
    if k == 0:
        return analytic_gmacs(spec)
    n = spec.grid[0] * spec.grid[1]
    tokens = NUM_PREFIX + n - 3 * k
    h, w = spec.crop
    return analytic_gmacs(
        spec, tokens_in=tokens, tokens_out=tokens, embed_patches=n - 3 * k,
        decoder_tokens=decoder_tokens(spec, tokens, bool(knob.get("decoder_on_merged", True))),
        extra_macs=policy_gmacs(h, w, spec.patch_size, channel_multiplier) * 1e9 if include_policy else 0.0,
    )

"""Batched view augmentations on the training device that return their parameters ω.

One call of :class:`BatchAugment` turns a batch of source images into one augmented view per image
and the per-sample parameters ω that produced it.  The two views of SSL are two calls with the same
generator (the second call continues its stream).  All arithmetic is batched tensor code: there is
no Python loop over the images, and no host synchronisation when the generator lives on the CPU
(see *Randomness* below).

Why written here and not taken from kornia (the library the official code uses for its batch-side
ops, and which also returns the sampled parameters): for the same pipeline on the CPU (crop, flip,
jitter p 0.8, grayscale p 0.2, blur p 0.5, normalise; batch 256), kornia 0.9's
``AugmentationSequential`` does 2.8× the work of this module at 32 px and 2.5× at 96 px
(``bench/bench_augment.py --clock cpu --threads 1``: CPU seconds per batch of two views, measured
once on a shared 2-core VM, ``bench/results/augment-cpu-cpuclock.json``; a wall-clock run with 2
threads on the same loaded VM gave 3.1× and 1.5×, dominated by the load).  Kornia also gives
neither torchvision-exact colour ops nor views reproducible from ``(seed, epoch, step)`` on every
device.

A pipeline of small ops
-----------------------
Each op is a small class that draws its own parameters from its columns of the uniform draws
(``sample``), applies itself to the batch in place (``apply_``) and encodes its ω (``omega``); the
ops run in the order ``params.order`` gives (like kornia's ``AugmentationSequential`` or
torchvision's v2 ``Compose``), then the views are normalised.  The official order (``datasets.py``
of github.com/hankook/AugSelf; solarize as its ``stl10_sol`` set, rotation as ``stl10_rot``)::

    random resized crop → horizontal flip → colour jitter (p) → solarize (p) → grayscale (p)
    → Gaussian blur (p) → rotation (p) → normalise

The crop must come first (it is the op that reads the source image; the others work on S×S views).
A flip that directly follows the crop is folded into the crop's sampling grid (the same pixels as
flipping afterwards, bit for bit, one pass fewer); anywhere else it flips in place.

Conventions of ω (float32, on the images' device; ``docs/architecture.md`` is the contract):

``crop`` ``(B, 4)``
    ``(top/H, left/W, height/H, width/W)`` of the integer source box, as the official
    ``RandomResizedCrop`` wrapper returns it.  The box is sampled like torchvision's
    ``RandomResizedCrop.get_params`` (area fraction uniform in ``crop_scale``, aspect ratio
    log-uniform in ``crop_ratio``, 10 tries, then the centre-crop fallback), vectorised over the
    batch.  The box is resized to S×S with bilinear interpolation without antialiasing, sampling
    only inside the box, exactly as ``torchvision.transforms.v2.functional.resized_crop(...,
    antialias=False)`` does (the official code resizes PIL images with antialiasing; on 32-96 px
    data the difference is a slight sharpness change, and it buys a batched, on-device crop).
``flip`` ``(B,)``
    1.0 where the view was mirrored horizontally.
``color`` ``(B, 4)``
    brightness, contrast, saturation as ``(factor − 1) / (2·strength)`` and hue as
    ``shift / (2·hue)``, so each lies in [−0.5, 0.5] (the official encoding: divide by the width of
    the sampling range), with the *effective* strengths (``augment.color_strength`` applied, see
    :meth:`pipeline.params.AugmentParams.jitter_strengths`).  All four are 0 for a view whose
    jitter was not applied, and a factor whose strength is 0 is 0 (its op is skipped).
``color_diff`` ``(B, 3)``
    per-channel mean of the view just before the colour jitter minus just after it, RGB in
    [0, 1]; 0 where the jitter was not applied.  CASSLE conditions its projector on it (the
    contract in ``/work/shared/DESIGN.md``, read from gmum/CASSLE ``cond_utils.py``: "per-channel
    mean of the image before minus after jitter, in [0,1] RGB, 0 if not applied"; that file was not
    in our reference corpus, so the definition follows the contract).  It measures the jitter
    alone: grayscale and solarize come after it.
``color_applied``, ``grayscale`` ``(B,)``
    1.0 where colour jitter / grayscale was applied.  Grayscale is not an AugSelf target.
``solarize`` ``(B,)``
    the threshold t ~ U(0, 1) (pixels ≥ t are inverted to 1 − x, as torchvision's and kornia's
    ``solarize``), 1.0 where solarize was not applied (the official ``_extract_w``).
``blur`` ``(B,)``
    σ / σ_max (``σ_max = blur_sigma[1]``), 0 where blur was not applied.  The official ω is σ itself;
    dividing by σ_max keeps "not applied" ≡ σ = 0 and the official ratios between views, while
    putting the target within tanh's (−1, 1).
``rotation`` ``(B,)``
    k ∈ {0, 1, 2, 3}: the view was rotated by k·90° (``torch.rot90(view, k, (H, W))``, counter-
    clockwise, as the official ``RandomRotation``); 0 where rotation was not applied.
``color_order`` ``(4,)`` long
    the permutation of (brightness, contrast, saturation, hue) used for the whole batch (one
    random order per batch, as kornia's ``ColorJitter`` in the official code).

Every key is present whatever is switched on (an op that is off gives its "not applied" value).

Colour ops follow ``torchvision.transforms.v2.functional.adjust_*`` on float images (blend with
black / the mean grey / the per-pixel grey with ITU-R 601 weights, clamp to [0, 1]; hue rotated in
HSV).  The official code takes saturation and hue from kornia, which scales S in HSV space instead
of blending with grey; we follow torchvision, the definition most SSL code (SimCLR, MoCo, BYOL)
uses, and a test checks each op against torchvision with the same factor.  The blur kernel has
size ⌊0.1·S⌋ rounded up to odd (9 for STL-10's 96 px and 23 for 224 px, the official presets; at
least 3), σ per sample, reflect padding, as the official ``GaussianBlur``.

Randomness: every random number comes from the ``generator`` passed in, as one ``torch.rand`` per
call laid out in fixed columns (:data:`CORE_COLUMNS`, then each optional op's ``columns``).  The core
block (crop, flip, colour, grayscale, blur) is drawn whatever the probabilities and strengths are,
so changing the jitter strength or switching blur on does not move the crops; its layout is the
one of the earlier single-class implementation, so the default pipeline draws bit-identical views
and ω to it (checked once when the ops were split out).  The optional ops (solarize, rotation, and any
op added since: the core block is frozen) draw their block after it, in the pipeline order of
:mod:`pipeline.augmentations`, *only when they are on*: drawing it always would shift the second view's
stream and change every existing result; switching one on therefore changes the second view of
each pair (the first keeps its crops).  Rotation's k is ⌊4u⌋, the threshold of solarize is u.
A CPU generator is the recommended choice even for CUDA images: the few kilobytes of parameters
are drawn on the host and copied asynchronously, the host-side plans (the batch-wide colour order,
the samples to rotate by each k) are known without a device sync, and the same seed gives the same
ω on every device.  A generator on the images' CUDA device also works, at the cost of small
device→host copies per call.  :func:`view_generator` derives the generator from
``(seed, epoch, step, rank)`` so that a resumed run draws the same views.

Cost: the crop is one ``grid_sample`` for the whole batch; every later op works in place on its
output, and on CPU the few full-size temporaries (uint8→float source, hue planes) live in a
workspace reused across calls, because on a small VM the page faults of fresh large allocations
cost more than the arithmetic.  Views come back in channels-last memory by default.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

import torch
import torch.nn.functional as F

from pipeline import augmentations as registry
from pipeline.params import AugmentParams

__all__ = ["BatchAugment", "view_generator", "blur_kernel_size", "COLOR_OPS", "GRAY_WEIGHTS", "CORE_COLUMNS"]

COLOR_OPS = ("brightness", "contrast", "saturation", "hue")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)   # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
_CROP_TRIES = 10                         # torchvision RandomResizedCrop.get_params

# Layout of the uniform draws.  Per batch first (the colour order), then per sample one row of
# (op, column, width) blocks.  CORE_COLUMNS is always drawn, in this (historical) order; an optional
# op's ``columns`` follow, in the pipeline order (pipeline.augmentations), only for the ones that are on.
BATCH_COLUMNS = (("color", "order", len(COLOR_OPS)),)
CORE_COLUMNS = (("crop", "scale", _CROP_TRIES), ("crop", "log_ratio", _CROP_TRIES), ("crop", "top", 1),
                ("crop", "left", 1), ("flip", "apply", 1), ("color", "apply", 1), ("grayscale", "apply", 1),
                ("blur", "apply", 1), ("blur", "sigma", 1), ("color", "factors", len(COLOR_OPS)))


def view_generator(seed: int, epoch: int, step: int, device: torch.device | str = "cpu",
                   rank: int = 0) -> torch.Generator:
    """A generator whose stream is a pure function of ``(seed, epoch, step, rank)``.

    Views are reproducible from these numbers alone, so a run resumed at ``(epoch, step)`` draws the
    same views as the uninterrupted one.  ``rank`` separates DDP processes.  Use ``device="cpu"``
    (the default) unless there is a reason not to: :class:`BatchAugment` accepts a CPU generator for
    images on any device and then needs no device sync (see the module docstring).
    """
    for name, v in (("seed", seed), ("epoch", epoch), ("step", step), ("rank", rank)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"view_generator: {name} must be a non-negative int, got {v!r}")
    digest = hashlib.blake2b(struct.pack("<4Q", seed, epoch, step, rank), digest_size=8).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


def blur_kernel_size(out_size: int) -> int:
    """⌊0.1·S⌋ made odd (rounded up), at least 3: 9 for 96 px, 23 for 224 px as the official presets."""
    k = max(3, int(0.1 * out_size))
    return k if k % 2 == 1 else k + 1


# ---------------------------------------------------------------------- the ops
class _Op:
    """One step of the view pipeline.

    ``sample(u, ctx)``: this op's decisions from its uniform columns ``u`` (``{column: (B, width)}``
    on the generator's device; ``ctx`` has ``batch, height, width``); a dict of per-sample tensors
    whose keys are unique across ops (they are packed into one host→device copy).
    ``plan(d)``: host-side Python values the op needs to run (read from the decisions before the
    copy to the device, so a CPU generator costs no sync); None by default.
    ``apply_(x, d, plan)``: the op on the float (B, 3, S, S) batch, in place where it can; returns
    the batch.  May store data-dependent ω in ``d``.  ``omega(d)``: its ω entries (the keys and widths of
    its record in :mod:`pipeline.augmentations`).
    """

    name = ""
    optional = False            # optional ops draw their columns only when on (see the module docstring)
    columns: tuple[tuple[str, int], ...] = ()   # an optional op's uniform columns: (column, width)

    def __init__(self, params: AugmentParams, out_size: int, ws: "_Workspace"):
        self.params, self.out_size, self.ws = params, out_size, ws

    @property
    def on(self) -> bool:
        return True

    def sample(self, u: dict[str, torch.Tensor], ctx: dict[str, int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def plan(self, d: dict[str, torch.Tensor]) -> Any:
        return None

    def apply_(self, x: torch.Tensor, d: dict[str, torch.Tensor], plan: Any) -> torch.Tensor:
        raise NotImplementedError

    def omega(self, d: dict[str, torch.Tensor], ctx: dict[str, int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class _ResizedCrop(_Op):
    """Random resized crop of the source (torchvision's box sampling), bilinear, flip optionally folded in."""

    name = "crop"

    def sample(self, u, ctx):
        p, height, width = self.params, ctx["height"], ctx["width"]
        # torchvision's rejection sampling, all tries of all samples at once.
        scale = p.crop_scale[0] + (p.crop_scale[1] - p.crop_scale[0]) * u["scale"]
        log_lo, log_hi = math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u["log_ratio"])
        target = float(height * width) * scale
        w_try = torch.round(torch.sqrt(target * ratio)).long()
        h_try = torch.round(torch.sqrt(target / ratio)).long()
        ok = (w_try > 0) & (w_try <= width) & (h_try > 0) & (h_try <= height)
        first = ok.long().argmax(dim=1, keepdim=True)          # the first try that fits
        found = ok.any(dim=1)
        # Centre-crop fallback when no try fits (torchvision's rule; host-side constants).
        in_ratio = width / height
        if in_ratio < p.crop_ratio[0]:
            fw, fh = width, int(round(width / p.crop_ratio[0]))
        elif in_ratio > p.crop_ratio[1]:
            fw, fh = int(round(height * p.crop_ratio[1])), height
        else:
            fw, fh = width, height
        w_box = torch.where(found, w_try.gather(1, first).squeeze(1), fw)
        h_box = torch.where(found, h_try.gather(1, first).squeeze(1), fh)
        top = torch.where(found, (u["top"][:, 0] * (height - h_box + 1)).long().minimum(height - h_box),
                          (height - fh) // 2)
        left = torch.where(found, (u["left"][:, 0] * (width - w_box + 1)).long().minimum(width - w_box),
                           (width - fw) // 2)
        return {"box": torch.stack([top, left, h_box, w_box], dim=1)}

    def crop(self, nhwc: torch.Tensor, box: torch.Tensor, mirror: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Bilinear resize of each box to S×S (align_corners=False, no antialias), ``mirror`` folded in.

        The sample positions are those ``F.interpolate`` uses on the cropped box,
        ``src = (dst + 0.5)·len/S − 0.5``, clamped to the box ``[0, len − 1]``; with positions clamped
        inside the box the bilinear taps never reach outside it, so one batched ``grid_sample``
        equals ``resized_crop(img, top, left, h, w, [S, S], antialias=False)`` image by image (up to
        float rounding).  Mirroring a view is the same sampling with its x positions reversed.
        """
        S = self.out_size
        batch, height, width, _ = nhwc.shape
        dev = nhwc.device
        pos = torch.arange(S, device=dev, dtype=torch.float32) + 0.5

        def axis(start: torch.Tensor, length: torch.Tensor, size: int) -> torch.Tensor:
            lf = length.float()[:, None]
            src = torch.minimum((pos * (lf / S) - 0.5).clamp_min(0), lf - 1) + start.float()[:, None]
            return (2 * src + 1) / size - 1                         # grid_sample's normalised coordinate

        top, left, h, w = box.unbind(1)
        gy = axis(top, h, height)
        gx = axis(left, w, width)
        if mirror is not None:
            gx = torch.where(mirror[:, None], gx.flip(1), gx)
        grid = torch.stack([gx[:, None, :].expand(batch, S, S), gy[:, :, None].expand(batch, S, S)], dim=-1,
                           out=self.ws("grid", (batch, S, S, 2), dev))
        src = nhwc.permute(0, 3, 1, 2)                              # NCHW view of the input
        if src.dtype != torch.float32:                              # uint8: one pass for dtype and layout
            src = self.ws("src", (batch, 3, height, width), dev).copy_(src)
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.mul_(scale) if scale != 1.0 else out

    def omega(self, d, ctx):
        box = d["box"].float()
        h, w = ctx["height"], ctx["width"]
        return {"crop": torch.stack([box[:, 0] / h, box[:, 1] / w, box[:, 2] / h, box[:, 3] / w], dim=1)}


class _HorizontalFlip(_Op):
    """Mirror the view with probability ``flip_p`` (folded into the crop when it directly follows it)."""

    name = "flip"

    @property
    def on(self) -> bool:
        return self.params.flip_p > 0

    def sample(self, u, ctx):
        return {"flip": u["apply"][:, 0] < self.params.flip_p}

    def apply_(self, x, d, plan):
        return _select_(x, x.flip(3), _as_weight(d["flip"]))

    def omega(self, d, ctx):
        return {"flip": d["flip"].float()}


class _ColorJitter(_Op):
    """The four torchvision colour ops with probability ``jitter_p``, one random order per batch."""

    name = "color"

    def __init__(self, params, out_size, ws):
        super().__init__(params, out_size, ws)
        self.strengths = params.jitter_strengths()

    @property
    def on(self) -> bool:
        return self.params.jitter_p > 0

    def sample(self, u, ctx):
        # factor − 1 uniform in [−s, s] (factor in [1 − s, 1 + s]), hue shift in [−h, h]
        strengths = torch.stack([torch.full_like(u["apply"][:, 0], s) for s in self.strengths], dim=1)
        return {"jitter": u["apply"][:, 0] < self.params.jitter_p,
                "offsets": (2 * u["factors"] - 1) * strengths,
                "order": torch.argsort(u["order"])}

    def plan(self, d):
        return d["order"].tolist()                              # a device sync only for a CUDA generator

    def apply_(self, x, d, order):
        """The ops in place, in the batch's order, each with its per-sample factor.

        Samples whose jitter is not applied get offset 0 (factor 1), which is exactly the identity for
        the three blends; the hue result is selected per sample because the HSV round trip is only
        identity up to float rounding.
        """
        applied = d["jitter"]
        before = x.mean(dim=(2, 3))
        # (4, B, 1, 1, 1), contiguous: a strided per-sample factor sends the CPU kernels down a slow path
        f = (d["offsets"] * applied[:, None]).t().contiguous().view(4, -1, 1, 1, 1)
        for op in order:
            if self.strengths[op] == 0:
                continue
            if op == 0:      # brightness: blend with black
                x.mul_(1 + f[0]).clamp_(0, 1)
            elif op == 1:    # contrast: blend with the mean grey level of the image
                mean = _grayscale(x, self.ws).mean(dim=(1, 2, 3), keepdim=True)
                x.mul_(1 + f[1]).sub_(mean * f[1]).clamp_(0, 1)
            elif op == 2:    # saturation: blend with the per-pixel grey level
                gray = _grayscale(x, self.ws).mul_(f[2])    # before x is scaled in place
                x.mul_(1 + f[2]).sub_(gray).clamp_(0, 1)
            else:            # hue: rotate H in HSV
                _select_(x, _adjust_hue(x, f[3].view(-1), self.ws), _as_weight(applied))
        d["color_diff"] = (before - x.mean(dim=(2, 3))) * applied.float()[:, None]
        return x

    def omega(self, d, ctx):
        applied = d["jitter"].float()
        color = torch.stack([d["offsets"][:, j] / (2 * st) if st > 0 else torch.zeros_like(applied)
                             for j, st in enumerate(self.strengths)], dim=1) * applied[:, None]
        diff = d.get("color_diff")
        return {"color": color, "color_applied": applied,
                "color_diff": diff if diff is not None else torch.zeros_like(color[:, :3]),
                "color_order": d["order"]}


class _Solarize(_Op):
    """Invert the pixels ≥ t (threshold t ~ U(0, 1)) with probability ``solarize_p`` (official: kornia's
    ``RandomSolarize(0.5, 0.0)``, i.e. thresholds 0.5 ± 0.5, no additions)."""

    name = "solarize"
    optional = True
    columns = (("apply", 1), ("threshold", 1))

    @property
    def on(self) -> bool:
        return self.params.solarize_p > 0

    def sample(self, u, ctx):
        return {"solarize": u["apply"][:, 0] < self.params.solarize_p, "solarize_threshold": u["threshold"][:, 0]}

    def apply_(self, x, d, plan):
        # Not applied: a threshold above 1 inverts nothing (t = 1 would still invert pixels equal to 1).
        t = torch.where(d["solarize"], d["solarize_threshold"], 2.0).view(-1, 1, 1, 1)
        inverted = torch.neg(x, out=self.ws("solarize", x.shape, x.device)).add_(1.0)   # 1 − x, exactly
        return torch.where(x >= t, inverted, x, out=x)

    def omega(self, d, ctx):
        return {"solarize": torch.where(d["solarize"], d["solarize_threshold"], 1.0)}


class _Grayscale(_Op):
    """Replace the view by its luma (3 equal channels) with probability ``grayscale_p`` (effective)."""

    name = "grayscale"

    def __init__(self, params, out_size, ws):
        super().__init__(params, out_size, ws)
        self.p = params.effective_grayscale_p()

    @property
    def on(self) -> bool:
        return self.p > 0

    def sample(self, u, ctx):
        return {"gray": u["apply"][:, 0] < self.p}

    def apply_(self, x, d, plan):
        return _select_(x, _grayscale(x, self.ws), _as_weight(d["gray"]))

    def omega(self, d, ctx):
        return {"grayscale": d["gray"].float()}


class _GaussianBlur(_Op):
    """Gaussian blur with σ ~ U(blur_sigma) with probability ``blur_p`` (the official kernel)."""

    name = "blur"

    @property
    def on(self) -> bool:
        return self.params.blur_p > 0

    def sample(self, u, ctx):
        sig_lo, sig_hi = self.params.blur_sigma
        return {"blur": u["apply"][:, 0] < self.params.blur_p, "sigma": sig_lo + (sig_hi - sig_lo) * u["sigma"][:, 0]}

    def apply_(self, x, d, plan):
        return _select_(x, _gaussian_blur(x, d["sigma"], blur_kernel_size(self.out_size)), _as_weight(d["blur"]))

    def omega(self, d, ctx):
        return {"blur": d["blur"].float() * d["sigma"] / self.params.blur_sigma[1]}


class _Rotation(_Op):
    """Rotate by k·90° (k uniform in {0, 1, 2, 3}) with probability ``rotation_p`` (official ``RandomRotation``).

    The samples to rotate by each k are read on the host (a plan), then each group is one
    ``index_select`` → ``rot90`` → ``index_copy_``: about two passes over the rotated part, and
    none over the views left as they are (k = 0 or not applied).
    """

    name = "rotation"
    optional = True
    columns = (("apply", 1), ("k", 1))

    @property
    def on(self) -> bool:
        return self.params.rotation_p > 0

    def sample(self, u, ctx):
        k = (u["k"][:, 0] * 4).long().clamp_(max=3)
        return {"rotation_k": torch.where(u["apply"][:, 0] < self.params.rotation_p, k, 0)}

    def plan(self, d):
        k = d["rotation_k"]
        return [(r, torch.nonzero(k == r).flatten()) for r in (1, 2, 3) if bool((k == r).any())]

    def apply_(self, x, d, groups):
        for r, index in groups:
            index = index.to(x.device, non_blocking=True)
            x.index_copy_(0, index, torch.rot90(x.index_select(0, index), r, (2, 3)))
        return x

    def omega(self, d, ctx):
        return {"rotation": d["rotation_k"].float()}


# The op of each augmentation of pipeline.augmentations, by name (a new op is optional: the core layout is frozen).
_OP_CLASSES: dict[str, type[_Op]] = {c.name: c for c in (_ResizedCrop, _HorizontalFlip, _ColorJitter, _Solarize,
                                                          _Grayscale, _GaussianBlur, _Rotation)}
assert sorted(_OP_CLASSES) == sorted(registry.names()), "pipeline.augmentations and the ops disagree"
assert {op for op, _, _ in CORE_COLUMNS} == {n for n, c in _OP_CLASSES.items() if not c.optional}


class BatchAugment:
    """Random views of a batch, with the parameters ω of each view (see the module docstring).

    ``BatchAugment(params, out_size)(images, generator) -> (views, omega)``: ``images`` is uint8
    ``(B, H, W, 3)`` (the prepared-data layout) or float ``(B, 3, H, W)`` in [0, 1], on any device;
    ``views`` is float32 ``(B, 3, S, S)`` normalised with ``params.mean/std`` on the same device, in
    channels-last memory (what ``channels_last`` backbones read without a copy) unless
    ``channels_last=False`` (contiguous NCHW).  ``sample()`` exposes the random decisions alone;
    ``ops`` lists the ops in the order they run.
    """

    def __init__(self, params: AugmentParams, out_size: int, channels_last: bool = True):
        if not isinstance(params, AugmentParams):
            raise TypeError(f"BatchAugment: params must be pipeline.params.AugmentParams, got {type(params).__name__}")
        if not isinstance(out_size, int) or out_size < 1:
            raise ValueError(f"BatchAugment: out_size must be a positive int (the view side S), got {out_size!r}")
        self.params = params
        self.out_size = out_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.blur_kernel = blur_kernel_size(out_size)
        self._ws = _Workspace()
        self.ops: list[_Op] = [_OP_CLASSES[name](params, out_size, self._ws) for name in params.order]
        self._by_name = {op.name: op for op in self.ops}
        # the flip is folded into the crop's grid when it runs right after it
        self._fold_flip = len(self.ops) > 1 and self.ops[1].name == "flip"
        self._optional = [name for name in registry.pipeline_order()
                          if self._by_name[name].optional and self._by_name[name].on]
        self._norm_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (f"BatchAugment(out_size={self.out_size}, ops={[op.name for op in self.ops if op.on]}, "
                f"blur_kernel={self.blur_kernel}, memory_format={self.memory_format}, params={self.params})")

    # ------------------------------------------------------------------ sampling
    def _uniforms(self, batch: int, generator: torch.Generator) -> dict[str, dict[str, torch.Tensor]]:
        """One ``torch.rand`` for the call, split into ``{op: {column: (B, width) or (width,)}}``."""
        blocks = [(op, col, n) for op, col, n in CORE_COLUMNS]
        blocks += [(op, col, n) for op in self._optional for col, n in self._by_name[op].columns]
        n_batch = sum(n for _, _, n in BATCH_COLUMNS)
        n_core = sum(n for _, _, n in CORE_COLUMNS)
        n_all = sum(n for _, _, n in blocks)
        u_all = torch.rand(n_batch + batch * n_all, generator=generator, device=generator.device)
        out: dict[str, dict[str, torch.Tensor]] = {op: {} for op in registry.pipeline_order()}
        i = 0
        for op, col, n in BATCH_COLUMNS:
            out[op][col] = u_all[i:i + n]
            i += n
        core = u_all[n_batch:n_batch + batch * n_core].view(batch, n_core)
        extra = u_all[n_batch + batch * n_core:].view(batch, n_all - n_core)
        j = 0
        for k, (op, col, n) in enumerate(blocks):
            if k == len(CORE_COLUMNS):
                j = 0
            out[op][col] = (core if k < len(CORE_COLUMNS) else extra)[:, j:j + n]
            j += n
        return out

    def sample(self, batch: int, height: int, width: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw every random decision of one call, on the generator's device.

        Returns one flat dict over the ops: ``box`` ``(B, 4)`` long (top, left, height, width of the
        source box), the masks ``flip, jitter, gray, blur`` ``(B,)`` bool, ``offsets`` ``(B, 4)``
        (brightness, contrast and saturation factor − 1, hue shift; 0 where a strength is 0),
        ``sigma`` ``(B,)``, ``order`` ``(4,)`` long, and for the optional ops that are on
        ``solarize`` (bool), ``solarize_threshold`` ``(B,)``, ``rotation_k`` ``(B,)`` long (0 where
        not rotated).  Only Python scalars enter the arithmetic, so nothing here waits on a device.
        """
        u = self._uniforms(batch, generator)
        ctx = {"batch": batch, "height": height, "width": width}
        s: dict[str, torch.Tensor] = {}
        for name in registry.pipeline_order():  # layout order, so the dict is the same whatever params.order is
            op = self._by_name[name]
            if op.optional and not op.on:
                continue
            for key, value in op.sample(u[name], ctx).items():
                assert key not in s, f"two ops sample {key!r}"
                s[key] = value
        return s

    # ------------------------------------------------------------------ call
    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nhwc, scale = self._as_nhwc(images)
        batch, height, width, _ = nhwc.shape
        dev = images.device
        if generator.device.type != "cpu" and generator.device != dev:
            raise ValueError(f"BatchAugment: generator is on {generator.device} but images are on {dev}; "
                             f"use a CPU generator (recommended) or one on {dev}")
        ctx = {"batch": batch, "height": height, "width": width}
        s = self.sample(batch, height, width, generator)
        plans = {op.name: op.plan(s) for op in self.ops if op.on}   # host-side, before the copy
        s = _to_device(s, dev)

        # Every op works in place on x where it can, which the crop allocated: on CPU, fresh
        # full-size temporaries (page faults of large allocations) cost more than the arithmetic.
        crop, rest = self.ops[0], self.ops[1:]
        mirror = s["flip"] if self._fold_flip else None
        x = crop.crop(nhwc, s["box"], mirror, scale)                # (B, 3, S, S) float32 in [0, 1]
        for op in rest[1:] if self._fold_flip else rest:
            if op.on:
                x = op.apply_(x, s, plans[op.name])
        inv_std, shift = self._norm(dev)
        views = x.mul_(inv_std).add_(shift).contiguous(memory_format=self.memory_format)   # (x − mean) / std
        return views, self._omega(s, ctx, batch, dev)

    def _omega(self, s: dict[str, torch.Tensor], ctx: dict[str, int], batch: int,
               dev: torch.device) -> dict[str, torch.Tensor]:
        """ω of every op, in a fixed key order (the core ops, then the optional ones, each in the pipeline
        order, then the batch's colour order); an optional op that is off gives its record's ``off`` value."""
        omega: dict[str, torch.Tensor] = {}
        order = [self._by_name[name] for name in registry.pipeline_order()]
        for op in order:
            if not op.optional:
                omega.update(op.omega(s, ctx))
        color_order = omega.pop("color_order")
        for op in order:
            if op.optional:
                omega.update(op.omega(s, ctx) if op.on else self._off(op.name, batch, dev))
        omega["color_order"] = color_order
        return omega

    @staticmethod
    def _off(name: str, batch: int, dev: torch.device) -> dict[str, torch.Tensor]:
        """ω of an op that changed no view: its record's ``off`` value in each of its keys."""
        rec = registry.get(name)
        return {key: torch.full((batch,) if width == 1 else (batch, width), rec.off, device=dev)
                for key, width in rec.omega}

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _as_nhwc(images: torch.Tensor) -> tuple[torch.Tensor, float]:
        """An NHWC view of the input (no copy) and the factor that maps its values to [0, 1]."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError("BatchAugment: images must be a 4-d tensor, uint8 (B, H, W, 3) or float (B, 3, H, W); "
                             f"got {getattr(images, 'shape', type(images).__name__)}")
        if images.dtype == torch.uint8:
            if images.shape[-1] != 3:
                raise ValueError(f"BatchAugment: uint8 images must be NHWC (B, H, W, 3), got shape {tuple(images.shape)}")
            return images, 1.0 / 255.0
        if images.is_floating_point():
            if images.shape[1] != 3:
                raise ValueError(f"BatchAugment: float images must be NCHW (B, 3, H, W) in [0, 1], "
                                 f"got shape {tuple(images.shape)}")
            return images.permute(0, 2, 3, 1), 1.0
        raise ValueError(f"BatchAugment: images must be uint8 or floating point, got {images.dtype}")

    def _norm(self, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(1/std, −mean/std) as (1, 3, 1, 1) tensors on ``dev``, cached per device."""
        if dev not in self._norm_cache:
            mean = torch.tensor(self.params.mean, dtype=torch.float64).view(1, 3, 1, 1)
            std = torch.tensor(self.params.std, dtype=torch.float64).view(1, 3, 1, 1)
            self._norm_cache[dev] = ((1 / std).float().to(dev), (-mean / std).float().to(dev))
        return self._norm_cache[dev]


# ---------------------------------------------------------------------- batched image ops
class _Workspace:
    """Scratch buffers reused from call to call on CPU, where fresh large allocations are expensive.

    glibc returns freed large blocks to the kernel, so every new full-size temporary page-faults on
    first touch; on a small VM that costs more than the arithmetic.  On other devices it hands out
    fresh tensors: the CUDA caching allocator already reuses memory.  The buffers are internal to one
    call (never returned to the caller), so one BatchAugment must not be called from two threads at
    once.
    """

    def __init__(self, reuse: bool = True):
        self.reuse = reuse
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        shape = tuple(shape)
        if not self.reuse or device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype)
        return buf


_FRESH = _Workspace(reuse=False)


def _to_device(s: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    """Move the sampled decisions to ``dev``: one pinned, asynchronous host→device copy for CUDA."""
    if all(t.device == dev for t in s.values()):
        return s
    packed, order = _pack(s), s["order"]
    if dev.type == "cuda" and packed.device.type == "cpu":
        packed, order = packed.pin_memory(), order.pin_memory()
    return _unpack(packed.to(dev, non_blocking=True), order.to(dev, non_blocking=True), s)


def _pack(s: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-sample decisions as one float32 (B, K) tensor (ints < 2**24 and bools are exact)."""
    return torch.cat([s[k].float().view(len(s[k]), -1) for k in s if k != "order"], dim=1)


def _unpack(packed: torch.Tensor, order: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`_pack`, with the shapes and dtypes of ``like``."""
    out, i = {}, 0
    for k, ref in like.items():
        if k == "order":
            out[k] = order
            continue
        n = ref[0].numel() if ref.ndim == 2 else 1
        v = packed[:, i:i + n]
        i += n
        v = v.reshape(ref.shape)
        out[k] = v.to(ref.dtype) if ref.dtype != torch.float32 else v.contiguous()
    return out


def _as_weight(mask: torch.Tensor) -> torch.Tensor:
    """(B,) bool → (B, 1, 1, 1) float 0/1."""
    return mask.to(torch.float32).view(-1, 1, 1, 1)


def _select_(x: torch.Tensor, new: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """In place, per sample: ``x ← new`` where ``weight`` is 1 and unchanged where it is 0 (exact).

    ``x·(1 − w) + new·w`` with w ∈ {0, 1}: two in-place passes, cheaper on CPU than ``torch.where``
    with a broadcast mask.  ``new`` may be overwritten.
    """
    return x.mul_(1 - weight).add_(new.mul_(weight) if new.shape == x.shape else new * weight)


def _grayscale(x: torch.Tensor, ws: _Workspace | None = None) -> torch.Tensor:
    """(B, 3, H, W) → (B, 1, H, W) luma with torchvision's weights."""
    ws = ws or _FRESH
    r, g, b = x.unbind(dim=1)
    gray = torch.mul(r, GRAY_WEIGHTS[0], out=ws("gray", r.shape, x.device))
    return gray.add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor, ws: _Workspace | None = None) -> torch.Tensor:
    """Rotate the HSV hue of each image by ``shift[b]`` (a fraction of a turn), as torchvision's adjust_hue.

    Same maths as torchvision's ``_rgb_to_hsv`` → ``h + shift mod 1`` → ``_hsv_to_rgb``, with fewer
    passes: the hue is kept in sextants (h6 = 6H ∈ [0, 6)) and the way back is the closed form
    ``R = min + C·clamp(|h6 − 3| − 1, 0, 1)``, ``G = min + C·clamp(2 − |h6 − 2|, 0, 1)``,
    ``B = min + C·clamp(2 − |h6 − 4|, 0, 1)`` with chroma ``C = max − min`` (no table gather).
    Agrees with torchvision to float rounding (a test checks it).  Returns a new tensor (or the
    workspace's ``hue`` buffer).
    """
    ws = ws or _FRESH
    dev, plane = x.device, x[:, 0].shape
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(r, g, out=ws("maxc", plane, dev))
    torch.maximum(maxc, b, out=maxc)
    minc = torch.minimum(r, g, out=ws("minc", plane, dev))
    torch.minimum(minc, b, out=minc)
    chroma = torch.sub(maxc, minc, out=ws("chroma", plane, dev))
    # 6H·C per sector, with torchvision's priority when channels tie (red, then green, then blue):
    # start from the blue sector, then take green where g is the max, then red where r is.  The
    # selection is a blend with the float mask "channel is not the max" = clamp((max − c)·1e30, 0, 1),
    # exactly 0/1 except for differences below 1e-30, where the neighbouring sector formulas agree
    # (hue is continuous away from grey); on CPU this is several times cheaper than bool masks + where.
    h6 = torch.sub(r, g, out=ws("h6", plane, dev)).add_(chroma, alpha=4)
    tmp = torch.sub(b, r, out=ws("tmp", plane, dev)).add_(chroma, alpha=2)
    not_max = torch.sub(maxc, g, out=ws("not_max", plane, dev)).mul_(1e30).clamp_(0, 1)
    h6.sub_(tmp).mul_(not_max).add_(tmp)
    torch.sub(g, b, out=tmp)
    torch.sub(maxc, r, out=not_max).mul_(1e30).clamp_(0, 1)
    h6.sub_(tmp).mul_(not_max).add_(tmp)
    # grey pixels give 0/0: any hue will do, their chroma is 0
    h6.div_(chroma).nan_to_num_(0.0).add_(6.0 * shift.view(-1, 1, 1))
    h6.sub_(torch.mul(h6, 1 / 6, out=tmp).floor_().mul_(6.0))       # mod 6 (cheaper than remainder_ on CPU)
    out = ws("hue", x.shape, dev)
    torch.sub(h6, 3.0, out=tmp).abs_().sub_(1.0).clamp_(0, 1)                  # R: clamp(|h6 − 3| − 1)
    torch.addcmul(minc, chroma, tmp, out=out[:, 0])
    torch.sub(h6, 2.0, out=tmp).abs_().neg_().add_(2.0).clamp_(0, 1)          # G: clamp(2 − |h6 − 2|)
    torch.addcmul(minc, chroma, tmp, out=out[:, 1])
    h6.sub_(4.0).abs_().neg_().add_(2.0).clamp_(0, 1)                          # B: clamp(2 − |h6 − 4|)
    torch.addcmul(minc, chroma, h6, out=out[:, 2])
    return out


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-image σ and reflect padding (the official kernel).

    The kernel is the official (and torchvision's) ``exp(−t²/2σ²)`` on ``t = −k//2 … k//2``,
    normalised; applied as two depthwise convolutions with one group per (image, channel).
    Returns a new tensor.
    """
    batch, channels, height, width = x.shape
    half = kernel_size // 2
    t = torch.arange(kernel_size, device=x.device, dtype=x.dtype) - half
    kernel = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)   # (B·C, k)
    xp = F.pad(x, (half, half, half, half), mode="reflect").view(1, batch * channels, height + 2 * half,
                                                                  width + 2 * half)
    out = F.conv2d(xp, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)
    out = F.conv2d(out, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return out.view(batch, channels, height, width)

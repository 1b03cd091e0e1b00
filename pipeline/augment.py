"""Batched view augmentations on the training device that return their parameters ω.

One call of :class:`BatchAugment` turns a batch of source images into one augmented view per image
and the per-sample parameters ω that produced it.  The two views of SSL are two calls with the same
generator (the second call continues its stream).  All arithmetic is batched tensor code: there is
no Python loop over the images, and no host synchronisation when the generator lives on the CPU
(see *Randomness* below).

Pipeline (the official AugSelf order, ``datasets.py`` of github.com/hankook/AugSelf)::

    random resized crop → horizontal flip → colour jitter (p) → grayscale (p) → Gaussian blur (p)
    → normalise

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
    1.0 where the view was mirrored horizontally (after the crop).
``color`` ``(B, 4)``
    brightness, contrast, saturation as ``(factor − 1) / (2·strength)`` and hue as
    ``shift / (2·hue)``, so each lies in [−0.5, 0.5] (the official encoding: divide by the width of
    the sampling range).  All four are 0 for a view whose jitter was not applied, and a factor whose
    strength is 0 is 0 (its op is skipped).
``color_applied``, ``grayscale`` ``(B,)``
    1.0 where colour jitter / grayscale was applied.  Grayscale is not an AugSelf target.
``blur`` ``(B,)``
    σ / σ_max (``σ_max = blur_sigma[1]``), 0 where blur was not applied.  The official ω is σ itself;
    dividing by σ_max keeps "not applied" ≡ σ = 0 and the official ratios between views, while
    putting the target within tanh's (−1, 1).
``color_order`` ``(4,)`` long
    the permutation of (brightness, contrast, saturation, hue) used for the whole batch (one
    random order per batch, as kornia's ``ColorJitter`` in the official code).

Colour ops follow ``torchvision.transforms.v2.functional.adjust_*`` on float images (blend with
black / the mean grey / the per-pixel grey with ITU-R 601 weights, clamp to [0, 1]; hue rotated in
HSV).  The official code takes saturation and hue from kornia, which scales S in HSV space instead
of blending with grey; we follow torchvision, the definition most SSL code (SimCLR, MoCo, BYOL)
uses, and a test checks each op against torchvision with the same factor.  The blur kernel has
size ⌊0.1·S⌋ rounded up to odd (9 for STL-10's 96 px and 23 for 224 px, the official presets; at
least 3), σ per sample, reflect padding, as the official ``GaussianBlur``.

Randomness: every random number comes from the ``generator`` passed in, drawn in one fixed layout
whatever the probabilities and strengths are (changing the jitter strength does not move the
crops).  A CPU generator is the recommended choice even for CUDA images: the few kilobytes of
parameters are drawn on the host and copied asynchronously, the batch-wide colour order is known on
the host without a device sync, and the same seed gives the same ω on every device.  A generator on
the images' CUDA device also works, at the cost of one small device→host copy per call (the colour
order).  :func:`view_generator` derives the generator from ``(seed, epoch, step, rank)`` so that a
resumed run draws the same views.

Cost: the crop is one ``grid_sample`` for the whole batch; every later op works in place on its
output, and on CPU the few full-size temporaries (uint8→float source, hue planes) live in a
workspace reused across calls, because on a small VM the page faults of fresh large allocations
cost more than the arithmetic.  Views come back in channels-last memory by default.
"""

from __future__ import annotations

import hashlib
import math
import struct

import torch
import torch.nn.functional as F

from pipeline.params import AugmentParams

__all__ = ["BatchAugment", "view_generator", "blur_kernel_size", "COLOR_OPS", "GRAY_WEIGHTS"]

COLOR_OPS = ("brightness", "contrast", "saturation", "hue")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)   # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
_CROP_TRIES = 10                         # torchvision RandomResizedCrop.get_params

# Layout of the uniform draws per sample: one column block per random decision.
_COL_SCALE = slice(0, _CROP_TRIES)
_COL_LOGRATIO = slice(_CROP_TRIES, 2 * _CROP_TRIES)
_COL_TOP, _COL_LEFT, _COL_FLIP, _COL_JITTER, _COL_GRAY, _COL_BLUR, _COL_SIGMA = range(2 * _CROP_TRIES,
                                                                                  2 * _CROP_TRIES + 7)
_COL_FACTORS = slice(2 * _CROP_TRIES + 7, 2 * _CROP_TRIES + 11)
_N_COLS = 2 * _CROP_TRIES + 11


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


class BatchAugment:
    """Random views of a batch, with the parameters ω of each view (see the module docstring).

    ``BatchAugment(params, out_size)(images, generator) -> (views, omega)``: ``images`` is uint8
    ``(B, H, W, 3)`` (the prepared-data layout) or float ``(B, 3, H, W)`` in [0, 1], on any device;
    ``views`` is float32 ``(B, 3, S, S)`` normalised with ``params.mean/std`` on the same device, in
    channels-last memory (what ``channels_last`` backbones read without a copy) unless
    ``channels_last=False`` (contiguous NCHW).  ``sample()`` exposes the random decisions alone.
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
        self._strengths = (params.brightness, params.contrast, params.saturation, params.hue)
        self._norm_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ws = _Workspace()

    def __repr__(self) -> str:
        return (f"BatchAugment(out_size={self.out_size}, blur_kernel={self.blur_kernel}, "
                f"memory_format={self.memory_format}, params={self.params})")

    # ------------------------------------------------------------------ sampling
    def sample(self, batch: int, height: int, width: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw every random decision of one call, on the generator's device.

        Returns ``box`` ``(B, 4)`` long (top, left, height, width of the source box), the masks
        ``flip, jitter, gray, blur`` ``(B,)`` bool, ``offsets`` ``(B, 4)`` (brightness, contrast and
        saturation factor − 1, hue shift; 0 where a strength is 0), ``sigma`` ``(B,)`` and ``order``
        ``(4,)`` long.  Only Python scalars enter the arithmetic, so nothing here waits on a device.
        """
        p = self.params
        dev = generator.device
        u_all = torch.rand(batch * _N_COLS + len(COLOR_OPS), generator=generator, device=dev)
        order = torch.argsort(u_all[:len(COLOR_OPS)])
        u = u_all[len(COLOR_OPS):].view(batch, _N_COLS)

        # Random resized crop: torchvision's rejection sampling, all tries of all samples at once.
        scale = p.crop_scale[0] + (p.crop_scale[1] - p.crop_scale[0]) * u[:, _COL_SCALE]
        log_lo, log_hi = math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, _COL_LOGRATIO])
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
        top = torch.where(found, (u[:, _COL_TOP] * (height - h_box + 1)).long().minimum(height - h_box),
                          (height - fh) // 2)
        left = torch.where(found, (u[:, _COL_LEFT] * (width - w_box + 1)).long().minimum(width - w_box),
                           (width - fw) // 2)

        # Colour: factor − 1 uniform in [−s, s] (factor in [1 − s, 1 + s]), hue shift in [−h, h].
        offsets = (2 * u[:, _COL_FACTORS] - 1) * torch.stack(
            [torch.full_like(u[:, 0], s) for s in self._strengths], dim=1)

        sig_lo, sig_hi = p.blur_sigma
        return {
            "box": torch.stack([top, left, h_box, w_box], dim=1),
            "flip": u[:, _COL_FLIP] < p.flip_p,
            "jitter": u[:, _COL_JITTER] < p.jitter_p,
            "gray": u[:, _COL_GRAY] < p.grayscale_p,
            "blur": u[:, _COL_BLUR] < p.blur_p,
            "offsets": offsets,
            "sigma": sig_lo + (sig_hi - sig_lo) * u[:, _COL_SIGMA],
            "order": order,
        }

    # ------------------------------------------------------------------ call
    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nhwc, scale = self._as_nhwc(images)
        batch, height, width, _ = nhwc.shape
        dev = images.device
        if generator.device.type != "cpu" and generator.device != dev:
            raise ValueError(f"BatchAugment: generator is on {generator.device} but images are on {dev}; "
                             f"use a CPU generator (recommended) or one on {dev}")
        s = self.sample(batch, height, width, generator)
        order = s["order"].tolist()                            # a device sync only for a CUDA generator
        s = _to_device(s, dev)

        # Every op below works in place on x, which the crop allocated: on CPU, fresh full-size
        # temporaries (page faults of large allocations) cost more than the arithmetic.
        x = self._resized_crop(nhwc, s["box"], s["flip"], scale)   # (B, 3, S, S) float32 in [0, 1]
        p = self.params
        if p.jitter_p > 0:
            self._color_jitter_(x, s["offsets"], s["jitter"], order)
        if p.grayscale_p > 0:
            _select_(x, _grayscale(x, self._ws), _as_weight(s["gray"]))
        if p.blur_p > 0:
            _select_(x, _gaussian_blur(x, s["sigma"], self.blur_kernel), _as_weight(s["blur"]))
        inv_std, shift = self._norm(dev)
        views = x.mul_(inv_std).add_(shift).contiguous(memory_format=self.memory_format)   # (x − mean) / std
        return views, self._omega(s, height, width)

    def _omega(self, s: dict[str, torch.Tensor], height: int, width: int) -> dict[str, torch.Tensor]:
        """ω from the sampled decisions (see the module docstring for the encodings)."""
        box = s["box"].float()
        crop = torch.stack([box[:, 0] / height, box[:, 1] / width, box[:, 2] / height, box[:, 3] / width], dim=1)
        applied = s["jitter"].float()
        color = torch.stack([s["offsets"][:, j] / (2 * st) if st > 0 else torch.zeros_like(applied)
                             for j, st in enumerate(self._strengths)], dim=1) * applied[:, None]
        return {
            "crop": crop,
            "flip": s["flip"].float(),
            "color": color,
            "color_applied": applied,
            "grayscale": s["gray"].float(),
            "blur": s["blur"].float() * s["sigma"] / self.params.blur_sigma[1],
            "color_order": s["order"],
        }

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

    def _resized_crop(self, nhwc: torch.Tensor, box: torch.Tensor, flip: torch.Tensor, scale: float) -> torch.Tensor:
        """Bilinear resize of each box to S×S (align_corners=False, no antialias), flip folded in.

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
        gx = torch.where(flip[:, None], gx.flip(1), gx)
        grid = torch.stack([gx[:, None, :].expand(batch, S, S), gy[:, :, None].expand(batch, S, S)], dim=-1,
                           out=self._ws("grid", (batch, S, S, 2), dev))
        src = nhwc.permute(0, 3, 1, 2)                              # NCHW view of the input
        if src.dtype != torch.float32:                              # uint8: one pass for dtype and layout
            src = self._ws("src", (batch, 3, height, width), dev).copy_(src)
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.mul_(scale) if scale != 1.0 else out

    def _color_jitter_(self, x: torch.Tensor, offsets: torch.Tensor, applied: torch.Tensor,
                       order: list[int]) -> None:
        """The four torchvision ops, in place, in the batch's order, each with its per-sample factor.

        Samples whose jitter is not applied get offset 0 (factor 1), which is exactly the identity for
        the three blends; the hue result is selected per sample because the HSV round trip is only
        identity up to float rounding.
        """
        # (4, B, 1, 1, 1), contiguous: a strided per-sample factor sends the CPU kernels down a slow path
        d = (offsets * applied[:, None]).t().contiguous().view(4, -1, 1, 1, 1)
        for op in order:
            if self._strengths[op] == 0:
                continue
            if op == 0:      # brightness: blend with black
                x.mul_(1 + d[0]).clamp_(0, 1)
            elif op == 1:    # contrast: blend with the mean grey level of the image
                mean = _grayscale(x, self._ws).mean(dim=(1, 2, 3), keepdim=True)
                x.mul_(1 + d[1]).sub_(mean * d[1]).clamp_(0, 1)
            elif op == 2:    # saturation: blend with the per-pixel grey level
                gray = _grayscale(x, self._ws).mul_(d[2])    # before x is scaled in place
                x.mul_(1 + d[2]).sub_(gray).clamp_(0, 1)
            else:            # hue: rotate H in HSV
                _select_(x, _adjust_hue(x, d[3].view(-1), self._ws), _as_weight(applied))

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

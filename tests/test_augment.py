"""BatchAugment: each ω encoding is checked against the image it describes (CPU, tiny shapes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pipeline.augment import COLOR_OPS, BatchAugment, blur_kernel_size, view_generator
from pipeline.params import AugmentParams, Params

B, H, W, S = 12, 20, 24, 16           # non-square source, upscaling and downscaling boxes both occur

PLAIN = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def params(**kw) -> AugmentParams:
    return AugmentParams(**{**PLAIN, **kw})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Float (B, 3, H, W) in [0, 1], with colour structure (not only noise) so every op changes it."""
    g = torch.Generator().manual_seed(123)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    base = torch.stack([yy, xx, 1 - yy * xx])[None].expand(B, 3, H, W)
    return (0.6 * base + 0.4 * torch.rand(B, 3, H, W, generator=g)).clamp(0, 1).contiguous()


def boxes(omega: dict, height: int = H, width: int = W) -> list[tuple[int, int, int, int]]:
    """Integer (top, left, h, w) back from the normalised ω crop."""
    scale = torch.tensor([height, width, height, width], dtype=torch.float64)
    return [tuple(int(v) for v in row) for row in (omega["crop"].double() * scale).round().long()]


def reference_crop(img: torch.Tensor, box, flip: bool) -> torch.Tensor:
    top, left, h, w = box
    out = TF.resized_crop(img, top, left, h, w, [S, S], antialias=False)
    return TF.horizontal_flip(out) if flip else out


# --------------------------------------------------------------------------- crop and flip
@pytest.mark.parametrize("flip_p", [0.0, 0.5, 1.0])
def test_crop_box_and_flip_reproduce_the_view(images, flip_p):
    views, omega = BatchAugment(params(flip_p=flip_p), S)(images, gen(1))
    assert views.shape == (B, 3, S, S) and views.dtype == torch.float32
    if flip_p == 1.0:
        assert bool((omega["flip"] == 1).all())
    if flip_p == 0.0:
        assert bool((omega["flip"] == 0).all())
    for b, box in enumerate(boxes(omega)):
        ref = reference_crop(images[b], box, bool(omega["flip"][b]))
        torch.testing.assert_close(views[b], ref, atol=2e-6, rtol=0)
        if omega["flip"][b]:   # and it is not the unflipped crop (the images are not symmetric)
            assert (views[b] - reference_crop(images[b], box, False)).abs().max() > 1e-2


def test_crop_boxes_follow_scale_and_ratio_ranges(images):
    p = params(crop_scale=(0.3, 0.6), crop_ratio=(0.5, 2.0))
    x = torch.rand(256, 3, 40, 40, generator=gen(5))
    _, omega = BatchAugment(p, S)(x, gen(2))
    top, left, h, w = omega["crop"].unbind(1)
    assert bool((top >= 0).all() and (left >= 0).all() and (top + h <= 1 + 1e-6).all() and (left + w <= 1 + 1e-6).all())
    area = h * w
    # integer rounding of the side lengths moves the area by at most ~1/40 per side
    assert area.min() > 0.3 - 0.05 and area.max() < 0.6 + 0.05
    ratio = w / h
    assert ratio.min() > 0.5 * 0.9 and ratio.max() < 2.0 * 1.1
    assert area.std() > 0.05 and len(set(top.tolist())) > 5     # boxes vary across the batch


def test_crop_falls_back_to_centre_crop_when_no_try_fits():
    # Areas of 0.016-0.032 px on a 4x4 image round to 0-pixel sides: every try fails.
    x = torch.rand(6, 3, 4, 4, generator=gen(0))
    _, omega = BatchAugment(params(crop_scale=(0.001, 0.002)), 4)(x, gen(3))
    torch.testing.assert_close(omega["crop"], torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(6, 4))
    # Wide image, ratio range [0.75, 4/3]: torchvision's fallback is the centred box of ratio 4/3.
    wide = torch.rand(3, 3, 4, 40, generator=gen(0))
    _, omega = BatchAugment(params(crop_scale=(0.0001, 0.0002)), 4)(wide, gen(3))
    top, left, h, w = boxes(omega, 4, 40)[0]
    assert (top, h, w) == (0, 4, 5) and left == (40 - 5) // 2


# --------------------------------------------------------------------------- colour jitter
def base_views(images, p: AugmentParams, seed: int, size: int = S) -> torch.Tensor:
    """The same crops and flips without any colour op: the random draws use a fixed layout."""
    plain = dataclasses.replace(p, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, rotation_p=0.0)
    return BatchAugment(plain, size)(images, gen(seed))[0]


def test_color_omega_maps_back_into_sampling_ranges_and_is_zero_when_not_applied(images):
    p = params(jitter_p=0.5, brightness=0.4, contrast=0.2, saturation=0.0, hue=0.1)
    x = torch.rand(400, 3, 6, 6, generator=gen(0))
    views, omega = BatchAugment(p, 6)(x, gen(4))
    applied = omega["color_applied"].bool()
    assert 0.35 < applied.float().mean() < 0.65
    color = omega["color"]
    assert bool((color[~applied] == 0).all())                   # identity when not applied
    assert bool((color[:, 2] == 0).all())                       # zero strength → zero ω
    assert bool((color.abs() <= 0.5 + 1e-6).all())
    for j, s in ((0, 0.4), (1, 0.2)):
        factor = 1 + 2 * s * color[applied, j]
        assert factor.min() >= 1 - s - 1e-6 and factor.max() <= 1 + s + 1e-6
        assert factor.min() < 1 - 0.8 * s and factor.max() > 1 + 0.8 * s   # spread over the range
    shift = 2 * 0.1 * color[applied, 3]
    assert shift.abs().max() <= 0.1 + 1e-6 and shift.min() < -0.08 and shift.max() > 0.08
    # views whose jitter was not applied equal the plain crop
    base = base_views(x, p, 4, size=6)
    torch.testing.assert_close(views[~applied], base[~applied], atol=0, rtol=0)
    assert sorted(omega["color_order"].tolist()) == [0, 1, 2, 3]


def _adjust(img: torch.Tensor, op: str, value: float) -> torch.Tensor:
    fn = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
          "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}[op]
    return fn(img, value)


def _recover(omega_color: torch.Tensor, op: int, p: AugmentParams) -> float:
    strength = (p.brightness, p.contrast, p.saturation, p.hue)[op]
    w = float(omega_color[op]) * 2 * strength
    return w if op == 3 else 1 + w


@pytest.mark.parametrize("op", range(4), ids=COLOR_OPS)
def test_single_color_op_matches_torchvision(images, op):
    strengths = dict.fromkeys(COLOR_OPS, 0.0)
    strengths[COLOR_OPS[op]] = (0.8, 0.8, 0.8, 0.4)[op]
    p = params(jitter_p=1.0, flip_p=0.5, **strengths)
    views, omega = BatchAugment(p, S)(images, gen(7))
    base = base_views(images, p, 7)
    assert (views - base).abs().max() > 1e-2                     # the op did something
    for b in range(B):
        value = _recover(omega["color"][b], op, p)
        ref = _adjust(base[b], COLOR_OPS[op], value)
        torch.testing.assert_close(views[b], ref, atol=1e-5, rtol=0)


def test_all_color_ops_match_torchvision_in_the_recorded_order(images):
    p = params(jitter_p=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    for seed in (8, 9):
        views, omega = BatchAugment(p, S)(images, gen(seed))
        base = base_views(images, p, seed)
        order = omega["color_order"].tolist()
        for b in range(B):
            ref = base[b]
            for op in order:
                ref = _adjust(ref, COLOR_OPS[op], _recover(omega["color"][b], op, p))
            torch.testing.assert_close(views[b], ref, atol=1e-5, rtol=0)


def test_hue_handles_grey_and_tied_pixels():
    x = torch.rand(4, 3, 8, 8, generator=gen(0))
    x[0] = 0.5                                  # grey: hue undefined, must stay grey
    x[1, 1] = x[1, 0]                           # red == green everywhere
    x[2] = (x[2] * 3).round() / 3               # many ties between channels
    p = params(jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.5, crop_scale=(1.0, 1.0),
               crop_ratio=(1.0, 1.0))
    views, omega = BatchAugment(p, 8)(x, gen(1))
    for b in range(4):
        ref = TF.adjust_hue(x[b], float(omega["color"][b, 3]) * 2 * 0.5)
        torch.testing.assert_close(views[b], ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- grayscale, blur, normalise
def test_grayscale_views_have_equal_channels(images):
    p = params(grayscale_p=0.5)
    x = images.repeat(4, 1, 1, 1)
    views, omega = BatchAugment(p, S)(x, gen(3))
    gray = omega["grayscale"].bool()
    assert 0 < gray.sum() < len(gray)
    spread = views.amax(dim=1) - views.amin(dim=1)
    assert bool((spread[gray] == 0).all())
    assert bool((spread[~gray].flatten(1).amax(1) > 1e-2).all())
    base = base_views(x, p, 3)
    torch.testing.assert_close(views[gray], TF.rgb_to_grayscale(base[gray], num_output_channels=3), atol=1e-6, rtol=0)


def test_blur_sigma_omega_reproduces_the_blur(images):
    p = params(blur_p=0.5, blur_sigma=(0.3, 1.5))
    x = images.repeat(3, 1, 1, 1)
    views, omega = BatchAugment(p, S)(x, gen(6))
    blurred = omega["blur"] > 0
    assert 0 < blurred.sum() < len(blurred)
    assert omega["blur"][blurred].min() >= 0.3 / 1.5 - 1e-6 and omega["blur"].max() <= 1 + 1e-6
    base = base_views(x, p, 6)
    k = blur_kernel_size(S)
    for b in range(len(x)):
        if blurred[b]:
            sigma = float(omega["blur"][b]) * 1.5
            ref = TF.gaussian_blur(base[b], [k, k], [sigma, sigma])
            torch.testing.assert_close(views[b], ref, atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(views[b], base[b], atol=0, rtol=0)


def test_blur_off_gives_zero_omega_and_kernel_sizes_follow_the_official_presets(images):
    _, omega = BatchAugment(params(), S)(images, gen(0))
    assert bool((omega["blur"] == 0).all())
    assert [blur_kernel_size(s) for s in (96, 224, 32, 28, 8)] == [9, 23, 3, 3, 3]


def test_normalisation_uses_mean_and_std(images):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    views, _ = BatchAugment(params(mean=mean, std=std), S)(images, gen(2))
    base = base_views(images, params(), 2)
    ref = (base - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(views, ref, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- rotation, solarize, colour strength
def test_rotated_views_are_rot90_of_the_unrotated_views(images):
    p = params(rotation_p=0.5, flip_p=0.5)
    x = images.repeat(6, 1, 1, 1)
    views, omega = BatchAugment(p, S)(x, gen(4))
    base = base_views(x, p, 4)              # the optional block comes after the core one: same crops
    k = omega["rotation"]
    assert set(k.tolist()) == {0.0, 1.0, 2.0, 3.0} and 0.25 < (k == 0).float().mean() < 0.85
    for b in range(len(x)):
        torch.testing.assert_close(views[b], torch.rot90(base[b], int(k[b]), (1, 2)), atol=0, rtol=0)
    # k = ⌊4u⌋ over the applied ones: each k ≠ 0 about 1/8 of all views, in the stream of 2000 views
    _, omega = BatchAugment(p, 4)(torch.rand(2000, 3, 4, 4, generator=gen(0)), gen(1))
    for r in (1, 2, 3):
        assert abs((omega["rotation"] == r).float().mean().item() - 0.125) < 0.03, r


def test_solarized_views_match_torchvision_and_omega_is_one_when_not_applied(images):
    p = params(solarize_p=0.5, jitter_p=1.0, hue=0.0)        # after the jitter, as the official stl10_sol
    x = images.repeat(4, 1, 1, 1)
    views, omega = BatchAugment(p, S)(x, gen(5))
    no_sol, _ = BatchAugment(dataclasses.replace(p, solarize_p=0.0), S)(x, gen(5))
    t = omega["solarize"]
    applied = t < 1
    assert 0.25 < applied.float().mean() < 0.75 and bool((t[applied] > 0).all())
    for b in range(len(x)):
        ref = TF.solarize(no_sol[b], float(t[b])) if applied[b] else no_sol[b]
        torch.testing.assert_close(views[b], ref, atol=0, rtol=0)
    assert (views[applied] - no_sol[applied]).abs().max() > 0.1


def test_optional_ops_off_give_not_applied_omega_and_do_not_move_the_default_stream(images):
    aug = BatchAugment(AugmentParams(), S)
    g = gen(0)
    (v1, o1), (v2, o2) = aug(images, g), aug(images, g)
    assert bool((o1["rotation"] == 0).all()) and bool((o1["solarize"] == 1).all())
    # Zero-probability optional ops draw nothing: the second call continues the same stream as the
    # core layout alone (one uniform row of 31 per image after 4 per-batch numbers).
    u = torch.rand(2 * (4 + B * 31), generator=gen(0))
    assert torch.equal(o2["color_order"], torch.argsort(u[4 + B * 31: 8 + B * 31]))
    on = BatchAugment(AugmentParams(rotation_p=0.5), S)
    g = gen(0)
    (w1, p1), (w2, p2) = on(images, g), on(images, g)
    assert torch.equal(p1["crop"], o1["crop"]) and not torch.equal(p2["crop"], o2["crop"])


def test_flip_anywhere_in_the_order_equals_the_flip_folded_into_the_crop(images):
    p = params(flip_p=0.5, jitter_p=0.8, grayscale_p=0.3, blur_p=0.5)
    folded = BatchAugment(p, S)(images, gen(3))
    late = dataclasses.replace(p, order=["crop", "color", "solarize", "grayscale", "blur", "flip", "rotation"])
    aug = BatchAugment(late, S)
    assert not aug._fold_flip and BatchAugment(p, S)._fold_flip
    views, omega = aug(images, gen(3))
    assert bool(omega["flip"].any())
    for k in omega:     # the same decisions; color_diff's mean sums the mirrored pixels in another order
        torch.testing.assert_close(omega[k], folded[1][k], atol=1e-6 if k == "color_diff" else 0, rtol=0)
    torch.testing.assert_close(views, folded[0], atol=1e-6, rtol=0)   # flip commutes with these ops


def test_the_premise_strengths_are_the_color_strength_setting():
    """The study's premise curves scale the default strengths by hand (pipeline/study/premise.py): each
    of its strengths must be the augmentation ``augment.color_strength`` names, caps included."""
    from pipeline.study.premise import strength_overrides

    base = Params(augment=AugmentParams(brightness=0.7, hue=0.3, grayscale_p=0.6))   # caps bind at strong
    for strength in ("weak", "default", "strong"):
        over = {k.removeprefix("augment."): v for k, v in strength_overrides(base, strength).items()}
        by_hand = AugmentParams(**{**dataclasses.asdict(base.augment), **over})
        named = AugmentParams(**{**dataclasses.asdict(base.augment), "color_strength": strength})
        assert by_hand.jitter_strengths() == named.jitter_strengths(), strength
        assert by_hand.effective_grayscale_p() == named.effective_grayscale_p(), strength


def test_color_strength_scales_jitter_and_grayscale_as_the_official_color_aug():
    assert AugmentParams(color_strength="strong").jitter_strengths() == pytest.approx((0.8, 0.8, 0.8, 0.2))
    assert AugmentParams(color_strength="weak").jitter_strengths() == pytest.approx((0.2, 0.2, 0.2, 0.05))
    assert AugmentParams(color_strength="strong").effective_grayscale_p() == pytest.approx(0.4)
    assert AugmentParams(color_strength="weak").effective_grayscale_p() == pytest.approx(0.1)
    capped = AugmentParams(brightness=0.7, hue=0.3, grayscale_p=0.6, color_strength="strong")
    assert capped.jitter_strengths() == pytest.approx((1.0, 0.8, 0.8, 0.5)) and capped.effective_grayscale_p() == 1.0
    # the views use the effective strengths, and ω is normalised by them
    p = params(jitter_p=1.0, brightness=0.4, contrast=0.0, saturation=0.0, hue=0.0, color_strength="strong")
    x = torch.rand(400, 3, 6, 6, generator=gen(0))
    views, omega = BatchAugment(p, 6)(x, gen(2))
    factor = 1 + 2 * 0.8 * omega["color"][:, 0]
    assert factor.min() < 1 - 0.7 and factor.max() > 1 + 0.7 and omega["color"].abs().max() <= 0.5
    base = base_views(x, p, 2, size=6)
    for b in range(0, 400, 37):
        torch.testing.assert_close(views[b], TF.adjust_brightness(base[b], float(factor[b])), atol=1e-5, rtol=0)
    _, omega = BatchAugment(AugmentParams(color_strength="strong"), 4)(x, gen(1))
    assert abs(omega["grayscale"].mean().item() - 0.4) < 0.06


def test_color_diff_is_the_channel_mean_before_minus_after_the_jitter(images):
    p = params(jitter_p=0.5, solarize_p=0.5, grayscale_p=0.5)      # ops after the jitter do not enter it
    x = images.repeat(4, 1, 1, 1)
    _, omega = BatchAugment(p, S)(x, gen(8))
    jittered, _ = BatchAugment(dataclasses.replace(p, solarize_p=0.0, grayscale_p=0.0), S)(x, gen(8))
    base = base_views(x, p, 8)
    applied = omega["color_applied"].bool()
    assert 0 < applied.sum() < len(x)
    want = base.mean(dim=(2, 3)) - jittered.mean(dim=(2, 3))
    torch.testing.assert_close(omega["color_diff"], want * applied[:, None].float(), atol=1e-6, rtol=0)
    assert bool((omega["color_diff"][~applied] == 0).all()) and omega["color_diff"][applied].abs().max() > 1e-2
    _, off = BatchAugment(params(jitter_p=0.0), S)(x, gen(8))
    assert bool((off["color_diff"] == 0).all())


# --------------------------------------------------------------------------- inputs, randomness, ω format
def test_uint8_nhwc_and_float_nchw_inputs_give_the_same_views():
    u8 = torch.randint(0, 256, (B, H, W, 3), generator=gen(0), dtype=torch.uint8)
    f32 = u8.permute(0, 3, 1, 2).float() / 255
    aug = BatchAugment(AugmentParams(blur_p=0.5), S)
    v_u8, o_u8 = aug(u8, gen(11))
    v_f32, o_f32 = aug(f32, gen(11))
    torch.testing.assert_close(v_u8, v_f32, atol=2e-5, rtol=0)
    for k in o_u8:
        torch.testing.assert_close(o_u8[k], o_f32[k])


def test_same_seed_same_output_different_seed_different_output(images):
    aug = BatchAugment(AugmentParams(blur_p=0.5), S)
    v1, o1 = aug(images, view_generator(0, 2, 5))
    v2, o2 = aug(images, view_generator(0, 2, 5))
    assert torch.equal(v1, v2) and all(torch.equal(o1[k], o2[k]) for k in o1)
    v3, o3 = aug(images, view_generator(0, 2, 6))
    assert not torch.equal(v1, v3) and not torch.equal(o1["crop"], o3["crop"])
    g = view_generator(0, 2, 5)                     # two views from one generator differ
    (va, oa), (vb, ob) = aug(images, g), aug(images, g)
    assert torch.equal(va, v1) and not torch.equal(va, vb) and not torch.equal(oa["crop"], ob["crop"])


def test_view_generator_depends_on_every_argument_and_validates():
    def draw(*args, **kw):
        return torch.rand(4, generator=view_generator(*args, **kw))
    ref = draw(1, 2, 3)
    assert torch.equal(ref, draw(1, 2, 3))
    for other in (draw(0, 2, 3), draw(1, 1, 3), draw(1, 2, 4), draw(1, 2, 3, rank=1), draw(3, 2, 1)):
        assert not torch.equal(ref, other)
    with pytest.raises(ValueError, match="epoch"):
        view_generator(0, -1, 0)


def test_omega_format(images):
    views, omega = BatchAugment(AugmentParams(blur_p=0.5), S)(images, gen(0))
    shapes = {"crop": (B, 4), "flip": (B,), "color": (B, 4), "color_applied": (B,), "color_diff": (B, 3),
              "grayscale": (B,), "blur": (B,), "solarize": (B,), "rotation": (B,), "color_order": (4,)}
    assert {k: tuple(v.shape) for k, v in omega.items()} == shapes
    for k, v in omega.items():
        assert v.device == images.device
        assert v.dtype == (torch.long if k == "color_order" else torch.float32), k
    for k in ("flip", "color_applied", "grayscale"):
        assert set(omega[k].tolist()) <= {0.0, 1.0}


def test_bad_inputs_raise_clear_errors(images):
    aug = BatchAugment(params(), S)
    with pytest.raises(ValueError, match="NHWC"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), gen())
    with pytest.raises(ValueError, match="NCHW"):
        aug(torch.zeros(2, 8, 8, 3), gen())
    with pytest.raises(ValueError, match="4-d"):
        aug(torch.zeros(3, 8, 8), gen())
    with pytest.raises(ValueError, match="out_size"):
        BatchAugment(params(), 0)
    with pytest.raises(TypeError, match="AugmentParams"):
        BatchAugment({"flip_p": 0.5}, S)


def test_probabilities_are_respected():
    x = torch.rand(2000, 3, 4, 4, generator=gen(0))
    p = AugmentParams(flip_p=0.3, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    _, omega = BatchAugment(p, 4)(x, gen(1))
    for key, rate in (("flip", 0.3), ("color_applied", 0.8), ("grayscale", 0.2)):
        assert abs(omega[key].mean().item() - rate) < 0.04, key
    assert abs((omega["blur"] > 0).float().mean().item() - 0.5) < 0.04


def test_sampled_decisions_survive_the_packed_device_transfer():
    from pipeline.augment import _pack, _unpack
    for p in (AugmentParams(blur_p=0.5), AugmentParams(blur_p=0.5, rotation_p=0.5, solarize_p=0.5)):
        s = BatchAugment(p, S).sample(7, H, W, gen(0))
        back = _unpack(_pack(s), s["order"], s)
        assert list(back) == list(s)
        for k in s:
            assert back[k].dtype == s[k].dtype and torch.equal(back[k], s[k]), k
    assert {"rotation_k", "solarize", "solarize_threshold"} <= set(s) and s["rotation_k"].dtype == torch.long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_images_with_a_cpu_generator_match_cpu(images):
    aug = BatchAugment(AugmentParams(blur_p=0.5), S)
    v_cpu, o_cpu = aug(images, gen(3))
    v_gpu, o_gpu = aug(images.cuda(), gen(3))
    assert v_gpu.device.type == "cuda" and all(v.device.type == "cuda" for v in o_gpu.values())
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, atol=1e-4, rtol=0)
    for k in o_cpu:
        torch.testing.assert_close(o_gpu[k].cpu(), o_cpu[k])
    g = torch.Generator(device="cuda").manual_seed(3)         # a generator on the device also works
    v1, _ = aug(images.cuda(), g)
    v2, _ = aug(images.cuda(), torch.Generator(device="cuda").manual_seed(3))
    assert torch.equal(v1, v2)


def test_views_memory_format(images):
    views, _ = BatchAugment(params(), S)(images, gen(0))
    assert views.is_contiguous(memory_format=torch.channels_last)
    nchw, _ = BatchAugment(params(), S, channels_last=False)(images, gen(0))
    assert nchw.is_contiguous() and torch.equal(nchw, views)


def test_color_strength_none_is_the_premise_control_bit_for_bit_and_never_divides_by_zero():
    """``augment.color_strength: none`` (issue 24: the study's no-jitter control) must draw exactly the views of
    the premise module's control (``jitter_p: 0, grayscale_p: 0``, pipeline/study/premise.py), its colour ω must
    be 0 (finite: the ω normalisation divides by the jitter range, 0 here), and AugSelf's colour target is off."""
    from pipeline.study.premise import strength_overrides

    base = AugmentParams()                                   # params.yaml's jitter_p 0.8, grayscale_p 0.2
    none = dataclasses.replace(base, color_strength="none")
    control = dataclasses.replace(base, jitter_p=0.0, grayscale_p=0.0)
    x = torch.rand(64, 3, 12, 12, generator=gen(0))
    views, omega = BatchAugment(none, 8)(x, gen(5))
    ref, ref_omega = BatchAugment(control, 8)(x, gen(5))
    assert torch.equal(views, ref)                           # bit-identical views
    assert torch.equal(omega["crop"], ref_omega["crop"]) and torch.equal(omega["flip"], ref_omega["flip"])
    assert torch.isfinite(omega["color"]).all() and not omega["color"].any() and not omega["color_diff"].any()
    assert not omega["grayscale"].any()
    assert none.jitter_strengths() == (0.0, 0.0, 0.0, 0.0) and none.effective_grayscale_p() == 0.0
    assert none.probability("color") == 0.0
    o = strength_overrides(Params(), "none")                 # the control, and no target/condition left on colour
    assert {k: v for k, v in o.items() if k.startswith("augment.")} == {"augment.jitter_p": 0.0, "augment.grayscale_p": 0.0}
    assert "color" not in o["augself.augmentations"] and not {"color", "color_diff", "grayscale"} & set(o["cassle.conditions"])
    # the official strengths are untouched by the new name
    assert dataclasses.replace(base, color_strength="strong").jitter_strengths() == pytest.approx((0.8, 0.8, 0.8, 0.2))

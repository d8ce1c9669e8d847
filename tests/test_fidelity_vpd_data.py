"""VPD's data and optimisation steps against literal ports of the released code, value for value.

Upstream: github.com/wl-zhao/VPD @ 92095ab; its libraries as VPD pins them: albumentations 1.x
(``augmentations/functional.py``, ``core/composition.py``), mmsegmentation 0.30
(``mmseg/datasets/pipelines/transforms.py``, ``loading.py``), mmcv 1.x (``image/geometric.py``,
``image/colorspace.py``, ``runner/optimizer/default_constructor.py``), torchvision (refer). OpenCV's
8-bit colour conversions are ported per pixel from ``modules/imgproc/src/color_hsv.simd.hpp``
(``RGB2HSV_b``; ``HSV2RGB_b``: vector loop of 32 pixels per row with fused multiply-adds and
truncation, scalar tail rounding); diffperc's vectorised copy was also checked once against
opencv-python 4.10 on all 180 x 256 x 256 HSV triples (identical). ``cv2.resize`` is ported from
``modules/imgproc/src/resize.cpp`` (INTER_LINEAR's 11-bit fixed point, INTER_NEAREST); diffperc's
vectorised copy equals opencv-python 4.10 on 400 random up/down scalings (checked once). Random numbers: each port draws from a seeded generator of the
type the library uses (Python ``random`` for GLPDepth/albumentations, ``numpy.random`` for mmseg),
diffperc from a generator seeded the same way.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from dense_formats import make_ade20k, make_nyu, make_refcoco
from PIL import Image

from diffperc.data.ade20k import ADE20KDataset
from diffperc.data.nyu import NYUv2Dataset
from diffperc.data.refcoco import RefCOCODataset
from diffperc.metrics import DepthMetrics, SegMetrics
from diffperc.tasks.depth import DepthTask
from diffperc.tasks.refseg import RefSegTask
from diffperc.tasks.semseg import SemSegTask


# ================================================================ OpenCV 8-bit HSV, per pixel
def cv2_rgb2hsv(img: np.ndarray, bidx: int = 2) -> np.ndarray:
    """RGB2HSV_b::operator() (hsv_shift 12, hrange 180); ``bidx`` 0 for BGR input (COLOR_BGR2HSV)."""
    out = np.zeros_like(img)
    for y in range(img.shape[0]):
        for x in range(img.shape[1]):
            b, g, r = (int(c) for c in (img[y, x, bidx], img[y, x, 1], img[y, x, bidx ^ 2]))
            v, vmin = max(b, g, r), min(b, g, r)
            diff = v - vmin
            sdiv = round((255 << 12) / v) if v else 0  # saturate_cast<int>(double): round half to even
            hdiv = round((180 << 12) / (6.0 * diff)) if diff else 0
            s = (diff * sdiv + (1 << 11)) >> 12
            h = (g - b) if v == r else ((b - r + 2 * diff) if v == g else (r - g + 4 * diff))
            h = (h * hdiv + (1 << 11)) >> 12  # >> on a negative int: floor, as C++
            out[y, x] = (h + 180 if h < 0 else h, s, v)
    return out


_SECTOR = ((1, 3, 0), (1, 0, 2), (3, 0, 1), (0, 2, 1), (0, 1, 3), (2, 1, 0))


def cv2_hsv2rgb(hsv: np.ndarray, bidx: int = 2) -> np.ndarray:
    """HSV2RGB_b::operator(): HSV2RGB_simd for the first W - W % 32 pixels of a row, HSV2RGB_native after."""
    f32 = np.float32
    out = np.zeros_like(hsv)
    vector_end = hsv.shape[1] - hsv.shape[1] % 32
    for y in range(hsv.shape[0]):
        for x in range(hsv.shape[1]):
            h = f32(hsv[y, x, 0]) * f32(6.0 / 180)
            s, v = f32(hsv[y, x, 1]) * f32(1.0 / 255), f32(hsv[y, x, 2]) * f32(1.0 / 255)
            pre = f32(math.floor(h))
            hf = f32(h - pre)
            fma = lambda a, b: f32(1.0 - float(a) * float(b))  # noqa: E731  (one rounding: v_fma)
            tab = (v, v * f32(f32(1) - s), v * fma(s, hf), v * fma(s, f32(f32(1) - hf)))
            sector = int(pre) % 6
            bgr = [tab[i] for i in _SECTOR[sector]]
            if x < vector_end:
                vals = [math.trunc(float(c * f32(255))) for c in bgr]  # v_trunc
            else:
                bgr = [v, v, v] if s == 0 else bgr
                vals = [round(float(c * f32(255))) for c in bgr]  # saturate_cast<uchar>(float)
            vals = [min(max(c, 0), 255) for c in vals]
            out[y, x, bidx], out[y, x, 1], out[y, x, bidx ^ 2] = vals
    return out


# ================================================================ NYUv2: GLPDepth / VPD + albumentations 1.x
class PortNYUAugment:
    """depth/dataset/base_dataset.py:24-72 ``BaseDataset`` with albumentations 1.x's Compose of
    HorizontalFlip, RandomCrop, RandomBrightnessContrast, RandomGamma, HueSaturationValue."""

    def __init__(self, crop_size: tuple[int, int], rnd: random.Random) -> None:
        self.count, self.crop, self.random = 0, crop_size, rnd

    def augment_training_data(self, image: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        H, W, C = image.shape
        if self.count % 4 == 0:  # base_dataset.py:48-58 CutDepth
            alpha, beta, p = self.random.random(), self.random.random(), 0.75
            l = int(alpha * W)  # noqa: E741
            w = int(max((W - alpha * W) * beta * p, 1))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy warns on the float -> uint8 cast VPD relies on
                image[:, l : l + w, 0] = depth[:, l : l + w]
                image[:, l : l + w, 1] = depth[:, l : l + w]
                image[:, l : l + w, 2] = depth[:, l : l + w]
        image, depth = self.compose(image, depth)
        self.count += 1
        return image, depth

    def compose(self, image: np.ndarray, depth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rnd = self.random
        rnd.random()  # composition.py Compose.__call__: need_to_run = random.random() < self.p
        if rnd.random() < 0.5:  # HorizontalFlip: F.hflip = np.ascontiguousarray(img[:, ::-1, ...])
            image, depth = np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(depth[:, ::-1])
        rnd.random()  # RandomCrop(p=1.0)
        h_start, w_start = rnd.random(), rnd.random()  # get_params
        y1 = int((image.shape[0] - self.crop[0] + 1) * h_start)  # get_random_crop_coords
        x1 = int((image.shape[1] - self.crop[1] + 1) * w_start)
        image = image[y1 : y1 + self.crop[0], x1 : x1 + self.crop[1]]
        depth = depth[y1 : y1 + self.crop[0], x1 : x1 + self.crop[1]]
        if rnd.random() < 0.5:  # RandomBrightnessContrast(0.2, 0.2, brightness_by_max=True)
            alpha = 1.0 + rnd.uniform(-0.2, 0.2)
            beta = 0.0 + rnd.uniform(-0.2, 0.2)
            lut = np.arange(0, 256).astype("float32")  # _brightness_contrast_adjust_uint
            if alpha != 1:
                lut *= alpha
            if beta != 0:
                lut += beta * 255
            image = np.clip(lut, 0, 255).astype(np.uint8)[image]  # cv2.LUT
        if rnd.random() < 0.5:  # RandomGamma((80, 120)): gamma_transform
            gamma = rnd.uniform(80, 120) / 100.0
            table = (np.arange(0, 256.0 / 255, 1.0 / 255) ** gamma) * 255
            image = table.astype(np.uint8)[image]
        if rnd.random() < 0.5:  # HueSaturationValue(20, 30, 20): _shift_hsv_uint8
            hue_shift, sat_shift, val_shift = rnd.uniform(-20, 20), rnd.uniform(-30, 30), rnd.uniform(-20, 20)
            hsv = cv2_rgb2hsv(image)
            hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
            lut_hue = np.mod(np.arange(0, 256, dtype=np.int16) + hue_shift, 180).astype(np.uint8)
            lut_sat = np.clip(np.arange(0, 256, dtype=np.int16) + sat_shift, 0, 255).astype(np.uint8)
            lut_val = np.clip(np.arange(0, 256, dtype=np.int16) + val_shift, 0, 255).astype(np.uint8)
            image = cv2_hsv2rgb(np.stack([lut_hue[hue], lut_sat[sat], lut_val[val]], axis=-1))
        return image, depth


def test_nyu_training_items_follow_vpd(tmp_path):
    root = make_nyu(tmp_path, n_train=5)
    split = root / "nyudepthv2_train_files_with_gt.txt"
    ds = NYUv2Dataset(split, root / "sync", train=True, crop_size=(32, 48), rng=random.Random(0))
    port = PortNYUAugment((32, 48), random.Random(0))
    lines = [line.split() for line in split.read_text().splitlines()]
    cut = 0
    for idx in list(range(5)) + [0, 1, 2]:  # the count runs on across epochs: CutDepth on items 0, 4 and 8
        rgb, gt = (root / "sync" / lines[idx][0].lstrip("/")), (root / "sync" / lines[idx][1].lstrip("/"))
        image = np.array(Image.open(rgb).convert("RGB"))  # nyudepthv2.py:61-63 (cv2.imread + BGR2RGB)
        depth = np.array(Image.open(gt), dtype=np.float32)  # cv2.IMREAD_UNCHANGED .astype('float32')
        image, depth = port.augment_training_data(image, depth)
        cut += port.count % 4 == 1
        item = ds[idx]
        assert torch.equal(item["image"], torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255)  # ToTensor
        assert torch.equal(item["depth"][0], torch.from_numpy(depth / 1000.0))  # nyudepthv2.py:78
    assert cut == 2
    wrapped = np.array([1000.7, 300.2, 255.9, 9999.0], np.float32)  # the CutDepth strip: mm cast to uint8
    strip = np.zeros(4, np.uint8)
    strip[:] = wrapped
    assert strip.tolist() == [232, 44, 255, 15]  # trunc(mm) mod 256, as diffperc writes it explicitly


# ================================================================ ADE20K: mmseg 0.30 pipelines
def port_imresize(img: np.ndarray, size_wh: tuple[int, int], interpolation: str) -> np.ndarray:
    """mmcv.imresize -> cv2.resize (imgproc/src/resize.cpp) on uint8: INTER_NEAREST, or INTER_LINEAR's fixed point
    (resizeGeneric_: xofs/ialpha with the fraction zeroed at the borders, yofs/beta with rows clipped;
    HResizeLinear into int; VResizeLinearVec_32s8u's vertical combination)."""
    w_out, h_out = size_wh
    h_in, w_in = img.shape[:2]
    if interpolation == "nearest":  # resizeNN: sx = floor(dx * ifx), ifx = 1 / inv_scale_x
        ys = [min(math.floor(dy * (1.0 / (h_out / h_in))), h_in - 1) for dy in range(h_out)]
        xs = [min(math.floor(dx * (1.0 / (w_out / w_in))), w_in - 1) for dx in range(w_out)]
        return img[ys][:, xs]
    scale_x, scale_y = 1.0 / (w_out / w_in), 1.0 / (h_out / h_in)
    xofs, ialpha = [], []
    for dx in range(w_out):
        fx = float(np.float32((dx + 0.5) * scale_x - 0.5))
        sx = math.floor(fx)
        fx -= sx
        if sx < 0:
            fx, sx = 0.0, 0
        if sx >= w_in - 1:
            fx, sx = 0.0, w_in - 1
        xofs.append(sx)
        ialpha.append((round(float(np.float32(1.0 - fx)) * 2048), round(fx * 2048)))
    out = np.zeros((h_out, w_out, img.shape[2]), np.uint8)
    src = img.astype(np.int64)
    for dy in range(h_out):
        fy = float(np.float32((dy + 0.5) * scale_y - 0.5))
        sy = math.floor(fy)
        fy -= sy
        beta = (round(float(np.float32(1.0 - fy)) * 2048), round(fy * 2048))
        rows = []
        for k in (0, 1):
            s_row = src[min(max(sy + k, 0), h_in - 1)]
            rows.append([[s_row[sx, c] * a0 + s_row[min(sx + 1, w_in - 1), c] * a1 for c in range(img.shape[2])]
                         for sx, (a0, a1) in zip(xofs, ialpha, strict=True)])
        for dx in range(w_out):
            for c in range(img.shape[2]):
                v = (((rows[0][dx][c] >> 4) * beta[0]) >> 16) + (((rows[1][dx][c] >> 4) * beta[1]) >> 16)
                out[dy, dx, c] = min(max((v + 2) >> 2, 0), 255)
    return out


def port_imrescale(img: np.ndarray, scale: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """mmcv.imrescale: rescale_size (keep ratio, long <= max(scale), short <= min(scale)), _scale_size rounding."""
    h, w = img.shape[:2]
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return port_imresize(img, (int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)), interpolation)


def port_photo_metric_distortion(img: np.ndarray, random: np.random.RandomState) -> np.ndarray:
    """transforms.py PhotoMetricDistortion.__call__ (on the BGR image mmseg loads; mmcv.bgr2hsv = COLOR_BGR2HSV)."""

    def convert(x: np.ndarray, alpha: float = 1, beta: float = 0) -> np.ndarray:
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(x: np.ndarray) -> np.ndarray:
        return convert(x, alpha=random.uniform(0.5, 1.5)) if random.randint(2) else x

    if random.randint(2):  # brightness
        img = convert(img, beta=random.uniform(-32, 32))
    mode = random.randint(2)
    if mode == 1:
        img = contrast(img)
    if random.randint(2):  # saturation
        hsv = cv2_rgb2hsv(img, bidx=0)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=random.uniform(0.5, 1.5))
        img = cv2_hsv2rgb(hsv, bidx=0)
    if random.randint(2):  # hue
        hsv = cv2_rgb2hsv(img, bidx=0)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + random.randint(-18, 18)) % 180
        img = cv2_hsv2rgb(hsv, bidx=0)
    if mode == 0:
        img = contrast(img)
    return img


def port_ade_train(img_bgr: np.ndarray, seg: np.ndarray, random: np.random.RandomState, crop: tuple[int, int],
                   img_scale: tuple[int, int] = (2048, 512)) -> tuple[np.ndarray, np.ndarray]:
    """ade20k_vpd.py:11-22 train_pipeline: Resize(ratio) -> RandomCrop(cat 0.75) -> RandomFlip -> PMD -> Normalize -> Pad."""
    ratio = random.random_sample() * (2.0 - 0.5) + 0.5  # Resize.random_sample_ratio
    scale = int(img_scale[0] * ratio), int(img_scale[1] * ratio)
    img_bgr, seg = port_imrescale(img_bgr, scale), port_imrescale(seg, scale, "nearest")

    def bbox() -> tuple[int, int, int, int]:  # RandomCrop.get_crop_bbox
        off_h = random.randint(0, max(img_bgr.shape[0] - crop[0], 0) + 1)
        off_w = random.randint(0, max(img_bgr.shape[1] - crop[1], 0) + 1)
        return off_h, off_h + crop[0], off_w, off_w + crop[1]

    box = bbox()
    for _ in range(10):  # RandomCrop.__call__, cat_max_ratio 0.75
        labels, cnt = np.unique(seg[box[0] : box[1], box[2] : box[3]], return_counts=True)
        cnt = cnt[labels != 255]
        if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < 0.75:
            break
        box = bbox()
    img_bgr, seg = img_bgr[box[0] : box[1], box[2] : box[3]], seg[box[0] : box[1], box[2] : box[3]]
    if random.rand() < 0.5:  # RandomFlip(prob=0.5): mmcv.imflip horizontal
        img_bgr, seg = np.flip(img_bgr, axis=1), np.flip(seg, axis=1).copy()
    img_bgr = port_photo_metric_distortion(np.ascontiguousarray(img_bgr), random)
    img = (img_bgr[..., ::-1].astype(np.float32) - np.float32(127.5)) / np.float32(127.5)  # imnormalize, to_rgb
    padded = np.zeros((*crop, 3), np.float32)  # Pad(size=crop, pad_val=0, seg_pad_val=255)
    padded[: img.shape[0], : img.shape[1]] = img
    seg_padded = np.full(crop, 255, seg.dtype)
    seg_padded[: seg.shape[0], : seg.shape[1]] = seg
    return padded, seg_padded


def port_reduce_zero_label(gt: np.ndarray) -> np.ndarray:
    """loading.py LoadAnnotations(reduce_zero_label=True) on the uint8 map."""
    gt = gt.copy()
    gt[gt == 0] = 255
    gt = gt - 1
    gt[gt == 254] = 255
    return gt


def test_ade20k_items_follow_mmseg(tmp_path):
    root = make_ade20k(tmp_path)
    ds = ADE20KDataset(root, "train", train=True, crop_size=(64, 80), scale=(128, 32), ratio_range=(0.5, 2.0),
                       rng=np.random.RandomState(0))
    port_rng = np.random.RandomState(0)
    val = ADE20KDataset(root, "val", scale=(128, 32))
    for i in list(range(len(ds))) * 3:  # 12 draws: every PhotoMetricDistortion branch occurs
        img_path, ann_path = ds.samples[i]
        rgb = np.array(Image.open(img_path).convert("RGB"))
        gt = port_reduce_zero_label(np.array(Image.open(ann_path)))
        want_img, want_seg = port_ade_train(rgb[..., ::-1].copy(), gt, port_rng, (64, 80), (128, 32))  # BGR
        item = ds[i]
        torch.testing.assert_close(item["image"] * 2 - 1, torch.from_numpy(want_img).permute(2, 0, 1),
                                   rtol=0, atol=1e-6)
        assert torch.equal(item["mask"], torch.from_numpy(want_seg.astype(np.int64)))
    # test_pipeline: Resize(keep_ratio) of the image; the label map stays at its original size
    for i in range(len(val)):
        img_path, ann_path = val.samples[i]
        rgb = np.array(Image.open(img_path).convert("RGB"))
        item = val[i]
        want = port_imrescale(rgb[..., ::-1], (128, 32))[..., ::-1]
        assert torch.equal(item["image"], torch.from_numpy(want.copy()).permute(2, 0, 1).float() / 255)
        assert torch.equal(item["mask"], torch.from_numpy(port_reduce_zero_label(np.array(Image.open(ann_path)))
                                                          .astype(np.int64)))


# ================================================================ RefCOCO: dataset_refer_clip.py
def test_refcoco_items_follow_vpd(tmp_path):
    from pycocotools import mask as coco_mask
    from torchvision.transforms import functional as TF

    root = make_refcoco(tmp_path)
    instances = root / "refcoco" / "instances.json"
    coco = json.loads(instances.read_text())
    ann = next(a for a in coco["annotations"] if isinstance(a["segmentation"], list))
    x0, y0, w, h = ann["bbox"]
    ann["segmentation"].append([x0 + 4, y0 + 4, x0 + w + 8, y0 + 4, x0 + w + 8, y0 + h - 4, x0 + 4, y0 + h - 4])
    instances.write_text(json.dumps(coco))  # a second, overlapping polygon
    ds = RefCOCODataset(root, "refcoco", "unc", "train", image_size=32)
    images = {im["id"]: im for im in coco["images"]}
    anns = {a["id"]: a for a in coco["annotations"]}
    for index, (ref_idx, sent_idx) in enumerate(ds.items):
        ref = ds.refs[ref_idx]
        info, a = images[ref["image_id"]], anns[ref["ann_id"]]
        img = Image.open(root / "images" / "train2014" / info["file_name"]).convert("RGB")
        if isinstance(a["segmentation"], list):  # refer/refer/refer.py:282-289 getMask
            rle = coco_mask.frPyObjects(a["segmentation"], info["height"], info["width"])
            m = np.sum(coco_mask.decode(rle), axis=2).astype(np.uint8)
        else:  # VPD's getMask cannot index an RLE dict; an RLE object is its decoded mask
            m = coco_mask.decode(coco_mask.frPyObjects(a["segmentation"], info["height"], info["width"]))
        annot = np.zeros(m.shape)
        annot[m == 1] = 1  # dataset_refer_clip.py:91-95
        target = Image.fromarray(annot.astype(np.uint8), mode="P")
        img, target = TF.resize(img, (32, 32)), TF.resize(target, (32, 32))  # transforms.py:36-44
        img = TF.to_tensor(img)  # transforms.py ToTensor
        target = torch.as_tensor(np.asarray(target).copy(), dtype=torch.int64)
        item = ds[index]
        assert torch.equal(item["image"], img) and torch.equal(item["mask"], target)
        assert item["sentence"] == ref["sentences"][sent_idx]["sent"]  # dataset_refer_clip.py:61
        if a is ann:
            assert (m == 2).any() and target.sum() > 0  # the overlap dropped, as VPD


# ================================================================ optimiser groups (LDM names)
def ldm_name(diffusers_name: str) -> str:
    """A diffusers UNet parameter name in CompVis LDM's UNetModel naming (SD layout, 2 layers per block)."""
    parts = diffusers_name.split(".")
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for k, v in top.items():
        if diffusers_name.startswith(k + "."):
            return v + diffusers_name[len(k):]
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        block = f"middle_block.{1 if kind == 'attentions' else 2 * j}"
    else:
        i, kind = int(parts[1]), parts[2]
        if kind in ("downsamplers", "upsamplers"):
            idx = 3 * (i + 1) if kind == "downsamplers" else 3 * i + 2
            sub = "0.op" if kind == "downsamplers" else ("1" if i == 0 else "2") + ".conv"
            return f"{'input' if kind == 'downsamplers' else 'output'}_blocks.{idx}.{sub}.{parts[-1]}"
        j, rest = int(parts[3]), parts[4:]
        idx = 3 * i + j + 1 if parts[0] == "down_blocks" else 3 * i + j
        block = f"{'input' if parts[0] == 'down_blocks' else 'output'}_blocks.{idx}.{1 if kind == 'attentions' else 0}"
    if kind == "resnets":
        rest = resnet[rest[0]].split(".") + rest[1:]
    return ".".join([block, *rest])


def test_ldm_names_of_the_norms():
    assert ldm_name("down_blocks.1.resnets.0.norm1.weight") == "input_blocks.4.0.in_layers.0.weight"
    assert ldm_name("up_blocks.2.attentions.1.norm.bias") == "output_blocks.7.1.norm.bias"
    assert ldm_name("mid_block.attentions.0.transformer_blocks.0.norm2.weight") == \
        "middle_block.1.transformer_blocks.0.norm2.weight"
    assert ldm_name("up_blocks.0.upsamplers.0.conv.weight") == "output_blocks.2.1.conv.weight"
    assert ldm_name("conv_norm_out.weight") == "out.0.weight"


def _vpd_depth_groups(name: str, param: torch.Tensor, base_lr: float, wd: float) -> tuple[float, float]:
    """depth/models_depth/optimizer.py:54-92 (LDMOptimizerConstructor) + train.py:219-220 (lr_scale)."""
    no_decay = len(param.shape) == 1 or name.endswith(".bias")
    scale = 0.01 if ("unet" in name or "cond_stage_model" in name) else 1.0
    return base_lr * scale, 0.0 if no_decay else wd


def _vpd_seg_groups(name: str, param: torch.Tensor, base_lr: float, wd: float) -> tuple[float, float]:
    """fpn_vpd_sd1-5_512x512_gpu8x2.py:27-31 through mmcv DefaultOptimizerConstructor.add_params custom_keys."""
    custom_keys = {"unet": dict(lr_mult=0.1), "encoder_vq": dict(lr_mult=0.0), "text_encoder": dict(lr_mult=0.0),
                   "norm": dict(decay_mult=0.0)}
    for key in sorted(sorted(custom_keys.keys()), key=len, reverse=True):
        if key in name:
            return base_lr * custom_keys[key].get("lr_mult", 1.0), wd * custom_keys[key].get("decay_mult", 1.0)
    return base_lr, wd  # bias_lr_mult, bias_decay_mult, norm_decay_mult all default to 1


def _vpd_refer_groups(name: str, param: torch.Tensor, base_lr: float, wd: float) -> tuple[float, float]:
    """refer/train.py:207-237: lr_scale is ignored by torch AdamW + LambdaLR, so every group runs at args.lr."""
    if "unet" in name and "norm" in name:
        return base_lr, 0.0
    if "unet" in name or "encoder_vq" in name:
        return base_lr, wd
    if "norm" in name:
        return base_lr, 0.0
    return base_lr, wd


def _vpd_name(task_name: str, prefix: str) -> str:
    """The VPD model's name of a diffperc task parameter: the UNet in LDM names, the rest without 'unet'/'norm'."""
    if task_name.startswith("backbone.unet."):
        return prefix + ldm_name(task_name[len("backbone.unet."):])
    assert "unet" not in task_name and "norm" not in task_name  # VPD's head / adapter names have neither
    return task_name.replace("adapter.gamma", "gamma").replace("adapter.mlp", "text_adapter.fc")


@pytest.mark.parametrize("kind", ["depth", "semseg", "refseg"])
def test_optimizer_groups_follow_vpd(kind):
    lr, wd = 1e-3, 0.1
    opt = lambda groups: torch.optim.AdamW(groups, lr=lr, weight_decay=wd)  # noqa: E731
    small = {"backbone": "test_sd"}
    if kind == "depth":
        task = DepthTask(**small, neck_channels=16, deconv_channels=8, decoder_channels=8, scene_names=["room"],
                         optimizer=opt)  # backbone_lr_mult 0.01, as VPD
        rule, prefix = _vpd_depth_groups, "encoder.unet.unet.diffusion_model."
    elif kind == "semseg":
        task = SemSegTask(**small, num_classes=3, class_names=["a", "b", "c"], fpn_channels=8, optimizer=opt)
        rule, prefix = _vpd_seg_groups, "unet.unet.diffusion_model."
    else:
        task = RefSegTask(**small, max_tokens=8, optimizer=opt)
        rule, prefix = _vpd_refer_groups, "unet.unet.diffusion_model."
    conf = task.configure_optimizers()
    got = {id(p): (g["initial_lr"], g["weight_decay"]) for g in conf["optimizer"].param_groups for p in g["params"]}
    named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    assert len(got) == len(named) and any(n.startswith("backbone.unet.") for n, _ in named)
    seen = set()
    for n, p in named:
        want = rule(_vpd_name(n, prefix), p, lr, wd)
        assert got[id(p)] == pytest.approx(want), n
        seen.add(want)
    assert len(seen) >= (2 if kind == "refseg" else 3)  # the rules really split the parameters


# ================================================================ metrics
def test_depth_and_seg_metrics_follow_vpd_and_mmseg():
    torch.manual_seed(0)
    pred, gt = torch.rand(3, 1, 480, 640) * 9 + 0.5, torch.rand(3, 1, 480, 640) * 12
    metrics = DepthMetrics(1e-3, 10.0, "eigen")
    metrics.update(pred, gt)
    sums = {}
    for p, t in zip(pred[:, 0], gt[:, 0], strict=True):  # utils_depth/metrics.py:35-77 cropping_img, 9-32 eval_depth
        valid = torch.logical_and(t > 1e-3, t < 10.0)
        eval_mask = torch.zeros(valid.shape)
        eval_mask[45:471, 41:601] = 1
        valid = torch.logical_and(valid, eval_mask)
        p, t = p[valid], t[valid]
        thresh = torch.max((t / p), (p / t))
        diff, diff_log = p - t, torch.log(p) - torch.log(t)
        res = {"d1": (torch.sum(thresh < 1.25).float() / len(thresh)).item(),
               "abs_rel": torch.mean(torch.abs(diff) / t).item(), "sq_rel": torch.mean(torch.pow(diff, 2) / t).item(),
               "rmse": torch.sqrt(torch.mean(torch.pow(diff, 2))).item(),
               "rmse_log": torch.sqrt(torch.mean(torch.pow(diff_log, 2))).item(),
               "log10": torch.mean(torch.abs(torch.log10(p) - torch.log10(t))).item(),
               "silog": torch.sqrt(torch.pow(diff_log, 2).mean() - 0.5 * torch.pow(diff_log.mean(), 2)).item()}
        for k, v in res.items():
            sums[k] = sums.get(k, 0.0) + v  # train.py: Python floats averaged over images
    got = metrics.compute()
    for k, v in sums.items():
        assert got[k].item() == pytest.approx(v / 3, rel=1e-5), k
    # mmseg 0.30 evaluation: total intersect / union per class, IoU = I / U, mIoU = nanmean
    labels, preds = torch.randint(0, 4, (2, 30, 40)), torch.randint(0, 4, (2, 30, 40))
    labels[:, :3] = 255
    preds[preds == 3] = 2  # class 3: in the labels, never predicted
    seg = SegMetrics(4, 255)
    seg.update(preds, labels)
    keep = labels != 255
    inter = torch.histc(preds[keep][preds[keep] == labels[keep]].float(), bins=4, min=0, max=3)
    area_p = torch.histc(preds[keep].float(), bins=4, min=0, max=3)
    area_l = torch.histc(labels[keep].float(), bins=4, min=0, max=3)
    iou = inter / (area_p + area_l - inter)
    assert seg.compute()["miou"].item() == pytest.approx(np.nanmean(iou.numpy()), rel=1e-6)
    assert seg.compute()["pixel_acc"].item() == pytest.approx((inter.sum() / area_l.sum()).item(), rel=1e-6)


def test_semseg_loss_is_mmseg_mean_over_all_pixels():
    """mmseg 0.30 CrossEntropyLoss(avg_non_ignore=False): the per-pixel CE (0 at ignored pixels) averaged over all."""
    task = SemSegTask(backbone="test_sd", num_classes=3, class_names=["a", "b", "c"], fpn_channels=8)
    torch.manual_seed(0)
    logits, mask = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    mask[:, :4] = 255
    per_pixel = torch.nn.functional.cross_entropy(logits, mask, ignore_index=255, reduction="none")
    assert task.loss(logits, mask).item() == pytest.approx(per_pixel.sum().item() / mask.numel())
    task.loss_avg_non_ignore = True
    assert task.loss(logits, mask).item() == pytest.approx(per_pixel.sum().item() / (mask != 255).sum().item())


def test_vpd_class_embedding_files_load(tmp_path):
    """class_embeddings_path: a (K, D) table like VPD's class_embeddings.pth replaces the computed one."""
    table = torch.randn(3, 8)
    torch.save(table, tmp_path / "class_embeddings.pth")
    task = SemSegTask(backbone="test_sd", num_classes=3, class_names=["a", "b", "c"], fpn_channels=8,
                      class_embeddings_path=str(tmp_path / "class_embeddings.pth")).eval()
    with torch.no_grad():
        torch.testing.assert_close(task.class_prompts(2)[1], task.adapter(table))
    torch.save(torch.randn(4, 8), tmp_path / "bad.pth")
    bad = SemSegTask(backbone="test_sd", num_classes=3, class_names=["a", "b", "c"], fpn_channels=8,
                     class_embeddings_path=str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match=r"\(4, 8\) table; expected \(3, 8\)"):
        bad.class_prompts(1)
    with pytest.raises(FileNotFoundError, match="class_embeddings.pth"):
        SemSegTask(backbone="test_sd", num_classes=3, class_names=["a", "b", "c"], fpn_channels=8,
                   class_embeddings_path=str(Path(tmp_path) / "missing.pth")).class_prompts(1)

#!/usr/bin/python3
"""Oracle for dptrain's image folders: torchvision's ImageFolder listing and Pillow/torchvision's
pixels, written for tests/test_images.cpp to compare against (Debian's python3-torchvision and
python3-pil, run with /usr/bin/python3).

  image_oracle.py make OUT    writes OUT/index (a tree to list), OUT/pixels (a tree of real images),
                              OUT/oracle.json and the expected pixels as raw uint8 HWC files.
  image_oracle.py bench OUT N writes N 500x375 JPEGs in 10 classes under OUT (for benchmarks).
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision import datasets, transforms


def smooth_image(rng, h, w, channels=3):
    """Smooth random content (a few octaves of upsampled noise): compresses like a photograph."""
    out = np.zeros((h, w, channels), np.float64)
    for cells, amp in ((4, 120.0), (16, 60.0), (64, 25.0)):
        small = rng.uniform(-1, 1, (cells, cells, channels))
        ys = np.linspace(0, cells - 1, h)
        xs = np.linspace(0, cells - 1, w)
        y0 = np.floor(ys).astype(int)
        x0 = np.floor(xs).astype(int)
        y1 = np.minimum(y0 + 1, cells - 1)
        x1 = np.minimum(x0 + 1, cells - 1)
        fy = (ys - y0)[:, None, None]
        fx = (xs - x0)[None, :, None]
        a = small[y0][:, x0] * (1 - fx) + small[y0][:, x1] * fx
        b = small[y1][:, x0] * (1 - fx) + small[y1][:, x1] * fx
        out += amp * (a * (1 - fy) + b * fy)
    out += rng.normal(0, 6, out.shape)
    return np.clip(out + 128, 0, 255).astype(np.uint8)


def make_index_tree(root):
    """Names that exercise torchvision's ordering: case, spaces, digits, nesting, extensions."""
    files = [
        "cat/b.JPG", "cat/a.jpeg", "cat/10.jpg", "cat/9.jpg", "cat/notes.txt", "cat/.hidden.png",
        "cat/x.webp", "cat/y.Tiff", "cat/sub/z.png", "cat/sub dir/w.png", "cat/sub-a/v.bmp",
        "Dog/1.png", "Dog/deep/er/2.jpg", "Dog/deep/3.jpg", "Dog/README", "a b/img.ppm",
        "a b/img.pgm", "zebra/x/y/q.jpg", "zebra/x y/r.jpg", "zebra/x.jpg.bak", "zebra/x.jpg",
    ]
    for f in files:
        path = os.path.join(root, f)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()
    open(os.path.join(root, "loose-file.jpg"), "wb").close()  # not in a class folder: ignored
    ds = datasets.ImageFolder(root)
    return {"classes": ds.classes,
            "samples": [[os.path.relpath(p, root), c] for p, c in ds.samples]}


def save_images(root, rng):
    """Real images in every variant the decoders handle; returns {relative path: PIL image}."""
    made = {}

    def put(rel, img, **kw):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        img.save(path, **kw)
        made[rel] = path

    put("jpeg/rgb420.jpg", Image.fromarray(smooth_image(rng, 375, 500)), quality=90)
    put("jpeg/rgb444.jpg", Image.fromarray(smooth_image(rng, 97, 123)), quality=95, subsampling=0)
    put("jpeg/rgb422.jpg", Image.fromarray(smooth_image(rng, 150, 201)), quality=85, subsampling=1)
    put("jpeg/progressive.jpg", Image.fromarray(smooth_image(rng, 120, 161)), quality=80,
        progressive=True)
    put("jpeg/gray.jpg", Image.fromarray(smooth_image(rng, 130, 90, 1)[:, :, 0], "L"), quality=90)
    put("jpeg/cmyk.jpg", Image.fromarray(smooth_image(rng, 48, 64, 4), "CMYK"), quality=90)
    put("png/rgb.png", Image.fromarray(smooth_image(rng, 70, 90)))
    rgba = smooth_image(rng, 66, 80, 4)
    put("png/rgba.png", Image.fromarray(rgba, "RGBA"))
    pal = Image.fromarray(smooth_image(rng, 60, 75)).quantize(64)
    put("png/palette.png", pal, transparency=3)
    put("png/gray.png", Image.fromarray(smooth_image(rng, 50, 77, 1)[:, :, 0], "L"))
    g16 = (smooth_image(rng, 40, 52, 1)[:, :, 0].astype(np.uint16) * 3).astype(np.uint16)
    put("png/gray16.png", Image.fromarray(g16, "I;16"))
    put("png/bilevel.png", Image.fromarray(smooth_image(rng, 33, 45, 1)[:, :, 0] > 128))
    return made


def raw(out, name, arr):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    arr.tofile(os.path.join(out, name))
    return name


def make(out):
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(7)
    oracle = {"index": make_index_tree(os.path.join(out, "index"))}
    made = save_images(os.path.join(out, "pixels"), rng)
    torch.manual_seed(3)
    images, crops, evals = [], [], []
    for k, (rel, path) in enumerate(sorted(made.items())):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        stem = rel.replace("/", "_")
        images.append({"file": rel, "height": h, "width": w,
                       "expect": raw(out, stem + ".full", np.array(img))})
        params = [transforms.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
                  for _ in range(3)]
        params += [(h - 7, w - 5, 7, 5), (0, 0, h, w), (1, 2, h - 1, w - 2)]
        for n, (i, j, ch, cw) in enumerate(params):
            size = [224, 64, 19, 32, 13, 40][n]
            flip = n % 2 == 1
            o = F.resized_crop(img, i, j, ch, cw, [size, size])
            if flip:
                o = F.hflip(o)
            crops.append({"file": rel, "top": i, "left": j, "height": ch, "width": cw,
                          "size": size, "flip": flip,
                          "expect": raw(out, "%s.crop%d" % (stem, n), np.array(o))})
        for resize, crop in ((256, 224), (64, 56), (33, 33), (min(h, w) * 2, 17)):
            o = F.center_crop(F.resize(img, resize), crop)
            evals.append({"file": rel, "resize": resize, "crop": crop,
                          "expect": raw(out, "%s.eval%d_%d" % (stem, resize, crop), np.array(o))})
    oracle.update(images=images, crops=crops, evals=evals)

    # Statistics of torchvision's crop parameters, for sizes with and without fallbacks.
    stats = []
    for h, w in ((375, 500), (500, 60), (224, 224)):
        img = Image.new("RGB", (w, h))
        area, lr, tops, fallback = [], [], [], 0
        for _ in range(20000):
            i, j, ch, cw = transforms.RandomResizedCrop.get_params(img, [0.08, 1.0],
                                                                   [3 / 4, 4 / 3])
            area.append(ch * cw / (h * w))
            lr.append(math.log(cw / ch))
            tops.append((i + 0.5) / (h - ch + 1))
        stats.append({"height": h, "width": w, "area_mean": float(np.mean(area)),
                      "area_std": float(np.std(area)), "log_ratio_mean": float(np.mean(lr)),
                      "log_ratio_std": float(np.std(lr)), "top_mean": float(np.mean(tops))})
    oracle["crop_stats"] = stats
    with open(os.path.join(out, "oracle.json"), "w") as f:
        json.dump(oracle, f, indent=1)


def bench_tree(out, n):
    rng = np.random.default_rng(11)
    for k in range(n):
        d = os.path.join(out, "class%02d" % (k % 10))
        os.makedirs(d, exist_ok=True)
        Image.fromarray(smooth_image(rng, 375, 500)).save(os.path.join(d, "%05d.jpg" % k),
                                                          quality=90)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "bench":
        bench_tree(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)

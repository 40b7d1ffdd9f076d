#!/usr/bin/python3
"""Writes the fuzz seed corpora into tests/fuzz/corpus/<target>/: small valid inputs for each
loader, from torch (Debian's python3-torch), Pillow and dptrain itself.

  /usr/bin/python3 tests/fuzz/make_corpus.py [build/dptrain]
"""
import collections, gzip, json, os, struct, subprocess, sys, zipfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DPTRAIN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "build", "dptrain")


def out(target, name):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, name)


def main():
    torch.manual_seed(0)
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    dicts = {
        "plain": collections.OrderedDict(
            [("conv.weight", torch.randn(2, 1, 3, 3)), ("bn.running_mean", torch.zeros(2)),
             ("bn.num_batches_tracked", torch.tensor(3)), ("fc.bias", torch.randn(2).half())]),
        "module": collections.OrderedDict(
            [("module.fc.weight", torch.randn(2, 3).bfloat16()), ("module.fc.bias", torch.ones(2))]),
        "views": {"a": base, "b": base.t(), "c": base[1:, ::2], "d": base[2, 3]},
        "train": {"epoch": 2, "state_dict": {"w": torch.ones(2)}, "best": 0.5, "name": "x",
                  "flags": [True, None, (1, 2)]},
    }
    for name, obj in dicts.items():
        path = out("pth", f"torch_{name}.pth")
        torch.save(obj, path)
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
            with open(out("pickle", f"torch_{name}.pkl"), "wb") as f:
                f.write(z.read(pkl))
    # dptrain's own writers, from the plain dict.
    src = out("pth", "torch_plain.pth")
    for target, ext in (("pth", "pth"), ("safetensors", "safetensors"), ("checkpoint", "h5")):
        subprocess.run([DPTRAIN, "ckpt", "convert", src, out(target, f"dptrain_plain.{ext}")],
                       check=True, capture_output=True)
    subprocess.run([DPTRAIN, "ckpt", "convert", out("pth", "torch_module.pth"),
                    out("safetensors", "dptrain_module.safetensors")], check=True,
                   capture_output=True)
    # IDX: two 3x2 images and their labels, plain and gzip.
    images = struct.pack(">IIII", 0x803, 2, 3, 2) + bytes(range(12))
    labels = struct.pack(">II", 0x801, 2) + bytes([1, 7])
    for name, blob in (("images", images), ("labels", labels)):
        with open(out("idx", f"{name}.idx"), "wb") as f:
            f.write(blob)
        with open(out("idx", f"{name}.idx.gz"), "wb") as f:
            f.write(gzip.compress(blob, mtime=0))
    # Architecture descriptions.
    for i, (arch, classes, channels, stem) in enumerate(
            [("resnet18", 10, 1, "small"), ("resnet152", 1000, 3, "imagenet")]):
        spec = {"format": "dptrain-arch", "version": 1, "arch": arch, "num_classes": classes,
                "in_channels": channels, "stem": stem, "zero_init_residual": bool(i)}
        with open(out("arch", f"{arch}.json"), "w") as f:
            json.dump(spec, f)

    # Images: tiny JPEGs and PNGs in the variants the decoders handle.
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 17, 3), dtype=np.uint8))
    gray = rgb.convert("L")
    for name, img, kw in (("rgb420.jpg", rgb, {"quality": 75}),
                          ("rgb444.jpg", rgb, {"quality": 90, "subsampling": 0}),
                          ("progressive.jpg", rgb, {"progressive": True}),
                          ("gray.jpg", gray, {}), ("cmyk.jpg", rgb.convert("CMYK"), {}),
                          ("rgb.png", rgb, {}), ("rgba.png", rgb.convert("RGBA"), {}),
                          ("palette.png", rgb.quantize(16), {"transparency": 2}),
                          ("gray16.png", Image.fromarray(np.arange(204, dtype=np.uint16)
                                                         .reshape(12, 17) * 300, "I;16"), {}),
                          ("bilevel.png", gray.convert("1"), {})):
        img.save(out("image", name), **kw)


if __name__ == "__main__":
    main()

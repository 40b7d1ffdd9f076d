#!/usr/bin/python3
"""h5py as an independent reader of dptrain checkpoints (run with Debian's /usr/bin/python3).

  h5py_oracle.py check CKPT EXPECT.json EXPECT.bin
      CKPT's root attributes and every /model dataset (names, order, dtype, shape, bytes) must
      match what dptrain says it wrote: EXPECT.json lists [key, dtype, shape] in order and
      EXPECT.bin holds the tensors' raw bytes back to back.
  h5py_oracle.py corrupt MODE IN OUT
      OUT = IN changed the way a foreign tool or an attacker might (the user block is kept, so
      the test can re-seal the digest and reach dptrain's structural checks): dtype, shape,
      external, soft, extra, gzip.
"""
import json, shutil, sys

import h5py
import numpy as np

NUMPY = {"float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int64": "<i8"}


def check(path, expect_json, expect_bin):
    want = json.load(open(expect_json))
    raw = open(expect_bin, "rb").read()
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "dptrain-checkpoint", f.attrs["format"]
        assert int(f.attrs["format_version"]) == 1
        assert f.attrs["kind"] in ("full", "weights")
        assert f.userblock_size == 512, f.userblock_size
        keys = list(f["model"].keys())
        assert keys == [k for k, _, _ in want], (keys[:5], [k for k, _, _ in want][:5])
        at = 0
        for key, dtype, shape in want:
            ds = f["model"][key]
            assert ds.dtype == np.dtype(NUMPY[dtype]), (key, ds.dtype, dtype)
            assert list(ds.shape) == shape, (key, ds.shape, shape)
            assert ds.attrs["dtype"] == dtype
            data = ds[()].tobytes()
            assert data == raw[at:at + len(data)], f"{key}: values differ"
            at += len(data)
        assert at == len(raw), (at, len(raw))
    print(f"h5py {h5py.__version__}: {len(want)} tensors equal")


def corrupt(mode, src, dst):
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        m = f["model"]
        key = list(m.keys())[0]
        data = m[key][()]
        if mode == "dtype":  # float64 data under a float32 tag
            del m[key]
            m.create_dataset(key, data=data.astype(np.float64)).attrs["dtype"] = "float32"
        elif mode == "shape":
            del m[key]
            m.create_dataset(key, data=data.reshape(-1)[:-1].copy()).attrs["dtype"] = "float32"
        elif mode == "external":
            m["stolen"] = h5py.ExternalLink("/etc/passwd", "/x")
        elif mode == "soft":
            m["alias"] = h5py.SoftLink("/model/" + key)
        elif mode == "extra":
            f.create_group("payload")
        elif mode == "gzip":
            del m[key]
            m.create_dataset(key, data=data, compression="gzip").attrs["dtype"] = "float32"
        else:
            sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    if sys.argv[1] == "check":
        check(*sys.argv[2:5])
    else:
        corrupt(*sys.argv[2:5])

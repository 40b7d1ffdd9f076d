#!/usr/bin/python3
"""PyTorch as the oracle for dptrain's .pth and safetensors import and export.

Run it with Debian's /usr/bin/python3 (python3-torch 1.13, python3-torchvision, numpy).

  torch_oracle.py make OUTDIR --arch ARCH --num-classes N
      torch.manual_seed(0); torchvision.models.ARCH(num_classes=N) conditioned as the parity
      oracle conditions it (random BatchNorm parameters and statistics, damped residual
      branches, num_batches_tracked 7), in eval mode. Writes to
      OUTDIR:
        input.bin          float32 [2, 3, 64, 64] (torch.manual_seed(1) randn), raw little-endian
        logits.bin         float32 [2, N]: the model's eval-mode logits of input.bin
        plain.pth          torch.save(model.state_dict())
        module.pth         the nn.DataParallel state_dict (keys "module.*")
        orig_mod.pth       the state_dict as torch.compile saves it (keys "_orig_mod.*")
        train.pth          {epoch, arch, state_dict (module.*), best_acc1, optimizer} as the
                           pytorch/examples ImageNet script saves it; the optimizer is SGD with
                           momentum after one step, taken on a copy so the weights stay those
                           that produced logits.bin
        model.pth          {model (plain), optimizer, lr_scheduler (StepLR), epoch}
                           (torch 1.13's weights_only unpickler has no BINFLOAT: train.pth and
                           model.pth load only with weights_only=False)
        cuda3.pth          plain.pth with every storage tagged "cuda:3" instead of "cpu"
        plain.safetensors  the plain state_dict in the reference safetensors layout,
                           metadata {"format": "pt"}
        views.pth          tensors that are views of one storage (slices, a transpose, a strided
                           view, a 0-d element) plus float16, bfloat16, int64 and empty tensors
        views.json/.bin    what views.pth holds: [key, dtype, shape] in order, and the values
                           made contiguous, raw little-endian, back to back

  torch_oracle.py load PTH ARCH NUM_CLASSES INPUT LOGITS_OUT [--expect-layout plain|module]
      torch.load(PTH, weights_only=True) must succeed; the keys must all start with "module."
      (loaded through nn.DataParallel) or none may (loaded into the model itself), and with
      --expect-layout they must be the layout named. The state_dict is loaded with strict=True
      into torchvision.models.ARCH(num_classes=NUM_CLASSES); the eval-mode logits of INPUT
      (float32 [2, 3, 64, 64]) are written to LOGITS_OUT as raw float32.

  torch_oracle.py hostile OUTDIR MARKER
      Writes files that dptrain's readers must refuse. The hostile pickles would each create
      MARKER (an absolute path) if an unpickler executed them; all but nested_evil sit alone in a
      zip laid out as torch.save lays one out (archive/data.pkl, archive/version):
        os_system.pth, builtins_eval.pth, subprocess.pth   pickle.dumps of a call of
                           posix.system (os.system's real name), builtins.eval, subprocess.call
        reduce_class.pth   a call of __main__.create_marker, a function of this script
        inst_opcode.pth, obj_opcode.pth, stack_global.pth  hand-written pickles calling
                           os.system through the INST, OBJ and STACK_GLOBAL opcodes
        nested_evil.pth    torch.save of an OrderedDict: a real tensor and a posix.system call
      Malformed: truncated.pth (half a torch.save), bad_crc.pth (a data byte flipped, CRC kept),
      short_storage.pth (1000 floats over 16 bytes), absurd_size.pth ([2**40, 2**40] over 16
      bytes), legacy.pth (the pre-1.6 format), not_a_zip.pth, empty.pth, and
      bad_safetensors/<defect>.safetensors, one defect each; bad_safetensors/good.safetensors is
      a valid file.

  torch_oracle.py check-safetensors FILE EXPECT_JSON EXPECT_BIN
      FILE must pass the reference reader's validation, hold exactly the tensors EXPECT_JSON
      lists ([key, dtype, shape]; dtype float32, float16, bfloat16 or int64) with the bytes of
      EXPECT_BIN (their raw little-endian values back to back), and be byte for byte the file
      the reference writer makes of them (with FILE's own metadata).

Exit status 0 on success; 1 with one line on stderr when a check fails. check-safetensors needs
only the standard library: torch is imported only by the subcommands that use it.
"""
import argparse
import copy
import io
import json
import os
import pickle
import random
import shlex
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict

INPUT_SHAPE = (2, 3, 64, 64)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so that the zips written here do not follow the clock

# safetensors: the reference's dtype enum in its order (the writer sorts by it, descending)
ST_DTYPES = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
             "F32", "F64", "I64", "U64"]
ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
ST_NAME = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64"}
ST_MAX_HEADER = 100_000_000
U64_MAX = 2**64 - 1


class OracleError(Exception):
    """A failed check: reported as one line on stderr, exit status 1."""


# ---------------------------------------------------------------- safetensors (stdlib only)

def st_serialize(tensors, metadata):
    """The file the reference writer makes of tensors [(name, dtype, shape, raw bytes)]."""
    ordered = sorted(tensors, key=lambda t: (-ST_DTYPES.index(t[1]), t[0].encode()))
    header = {}
    if metadata is not None:
        header["__metadata__"] = dict(sorted(metadata.items()))
    at = 0
    for name, dtype, shape, raw in ordered:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [at, at + len(raw)]}
        at += len(raw)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(raw for _, _, _, raw in ordered)


def _pairs_without_duplicates(pairs):
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise OracleError(f"header names {duplicate!r} twice")
    return dict(pairs)


def _is_u64(value):
    return type(value) is int and 0 <= value <= U64_MAX


def _nbytes(name, dtype, shape):
    """prod(shape) * itemsize, refused where the reference's u64 arithmetic would overflow."""
    count = ST_ITEMSIZE[dtype]
    for extent in shape:
        count *= extent
        if count > U64_MAX:
            raise OracleError(f"{name}: byte size of shape {shape} overflows 64 bits")
    return count


def _tensor_entry(name, info):
    """(begin, end, name, dtype, shape) of one header entry, its fields checked."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise OracleError(f"{name}: entry is not {{dtype, shape, data_offsets}}: {info!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ST_ITEMSIZE:
        raise OracleError(f"{name}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_u64(extent) for extent in shape):
        raise OracleError(f"{name}: shape is not a list of non-negative integers: {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_u64, offsets)):
        raise OracleError(f"{name}: data_offsets is not [begin, end]: {offsets!r}")
    return offsets[0], offsets[1], name, dtype, shape


def st_parse(blob):
    """Validate a safetensors file as the reference reader does.

    Returns (metadata or None, [(name, dtype, shape, raw bytes)] in data order)."""
    if len(blob) < 8:
        raise OracleError(f"{len(blob)} bytes: no 8-byte header length")
    n = struct.unpack_from("<Q", blob)[0]
    if n > ST_MAX_HEADER:
        raise OracleError(f"header length {n} exceeds {ST_MAX_HEADER}")
    if n + 8 > len(blob):
        raise OracleError(f"header length {n} runs past the end of the {len(blob)}-byte file")
    try:
        text = blob[8:8 + n].decode("utf-8")
    except UnicodeDecodeError as error:
        raise OracleError(f"header is not UTF-8: {error}") from None
    if not text.startswith("{"):
        raise OracleError(f"header does not start with '{{': {text[:20]!r}")
    try:
        header = json.loads(text, object_pairs_hook=_pairs_without_duplicates)
    except json.JSONDecodeError as error:
        raise OracleError(f"header is not JSON: {error}") from None
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(v, str) for v in metadata.values())):
        raise OracleError(f"__metadata__ is not a map of strings: {metadata!r}")
    entries = sorted(_tensor_entry(name, info) for name, info in header.items())
    at = 0
    for begin, end, name, dtype, shape in entries:
        if begin != at or end < begin:
            raise OracleError(f"{name}: data_offsets [{begin}, {end}] do not start at {at}"
                              " (a gap or an overlap)")
        if end - begin != _nbytes(name, dtype, shape):
            raise OracleError(f"{name}: {end - begin} bytes for {dtype} {shape}")
        at = end
    if at != len(blob) - 8 - n:
        raise OracleError(f"tensors end at {at} but the data is {len(blob) - 8 - n} bytes")
    data = blob[8 + n:]
    return metadata, [(name, dtype, shape, data[begin:end])
                      for begin, end, name, dtype, shape in entries]


def read_expected(expect_json, expect_bin):
    """[(name, safetensors dtype, shape, raw bytes)] from an EXPECT_JSON / EXPECT_BIN pair."""
    with open(expect_json) as f:
        listing = json.load(f)
    with open(expect_bin, "rb") as f:
        raw = f.read()
    tensors, at = [], 0
    for name, dtype, shape in listing:
        if dtype not in ST_NAME:
            raise OracleError(f"{expect_json}: {name}: unsupported dtype {dtype!r}")
        size = _nbytes(name, ST_NAME[dtype], shape)
        tensors.append((name, ST_NAME[dtype], shape, raw[at:at + size]))
        at += size
    if at != len(raw):
        raise OracleError(f"{expect_bin}: {len(raw)} bytes, {expect_json} describes {at}")
    if len({name for name, _, _, _ in tensors}) != len(tensors):
        raise OracleError(f"{expect_json}: a key is listed twice")
    return tensors


def first_difference(got, want):
    """A one-line description of where two byte strings first differ."""
    at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    window = slice(max(0, at - 24), at + 24)
    return (f"first difference at byte {at} (file {len(got)} bytes, expected {len(want)}):"
            f" file {got[window]!r} expected {want[window]!r}")


def check_safetensors(path, expect_json, expect_bin):
    with open(path, "rb") as f:
        blob = f.read()
    metadata, found = st_parse(blob)
    expected = read_expected(expect_json, expect_bin)
    have = {name: (dtype, shape, raw) for name, dtype, shape, raw in found}
    want = {name: (dtype, shape, raw) for name, dtype, shape, raw in expected}
    if have.keys() != want.keys():
        raise OracleError(f"tensor names differ: missing {sorted(want.keys() - have.keys())[:5]},"
                          f" unexpected {sorted(have.keys() - want.keys())[:5]}")
    for name, (dtype, shape, raw) in want.items():
        if have[name][:2] != (dtype, shape):
            raise OracleError(f"{name}: file has {have[name][:2]}, expected {(dtype, shape)}")
        if have[name][2] != raw:
            raise OracleError(f"{name}: values differ, {first_difference(have[name][2], raw)}")
    rebuilt = st_serialize(expected, metadata)
    if blob != rebuilt:
        raise OracleError(f"not the reference layout: {first_difference(blob, rebuilt)}")
    print(f"{path}: {len(expected)} tensors, {len(blob)} bytes, as the reference writer's")


# ---------------------------------------------------------------- torch helpers

def build_model(arch, num_classes):
    import torchvision
    if not callable(getattr(torchvision.models, arch, None)):
        raise OracleError(f"torchvision.models has no {arch!r}")
    return getattr(torchvision.models, arch)(num_classes=num_classes)


def dtype_name(tensor):
    return str(tensor.dtype).removeprefix("torch.")


def tensor_bytes(tensor):
    """The tensor's values, contiguous, as raw little-endian bytes (16-bit floats as their bits)."""
    import torch
    tensor = tensor.detach().contiguous()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def save_with_location(obj, path, location):
    """torch.save with every storage tagged `location` (as if saved from that device)."""
    import torch
    original = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: location
    try:
        torch.save(obj, path)
    finally:
        torch.serialization.location_tag = original


def prefixed(state_dict, prefix):
    """state_dict as a wrapper module holding the model as submodule `prefix` would return it."""
    out = OrderedDict((prefix + key, value) for key, value in state_dict.items())
    out._metadata = OrderedDict([("", {"version": 1})])
    for key, value in state_dict._metadata.items():
        out._metadata[prefix + key if key else prefix.rstrip(".")] = value
    return out


# ---------------------------------------------------------------- make

def condition_model(model):
    """The parity oracle's conditioning (tests/parity/make_oracle.py): random BatchNorm
    parameters and running statistics, damped residual branches, num_batches_tracked 7.

    With torchvision's initialisation ResNet-152's eval-mode logits are so ill-conditioned that
    torch's own float32 logits are 2e-4 from its float64 ones; conditioned, 1e-6, so a 1e-5 bound
    on ours measures our arithmetic and not the model's."""
    import torch
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "parity"))
    from make_oracle import condition
    condition(model)
    for norm in model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.num_batches_tracked.fill_(7)


def optimizer_after_one_step(model, inputs, num_classes):
    """State dicts of SGD(momentum) and StepLR after one step, taken on a copy of model."""
    import torch
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30, gamma=0.1)
    targets = torch.arange(inputs.shape[0]) % num_classes
    torch.nn.functional.cross_entropy(twin(inputs), targets).backward()
    optimizer.step()
    scheduler.step()
    return optimizer.state_dict(), scheduler.state_dict()


def views_dict():
    """Tensors sharing one storage (views at offsets, with strides) and other dtypes."""
    import torch
    torch.manual_seed(2)
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {"whole": base, "rows": base[1:3], "col": base[:, 2], "tposed": base.t(),
            "step": base[::2, ::3], "scalar": base[3, 5], "half": torch.randn(3, 5).half(),
            "bf16": torch.randn(2, 3).bfloat16(), "long": torch.arange(5) * 1000000007,
            "empty": torch.zeros(0, 3)}


def make(outdir, arch, num_classes, only):
    import torch
    os.makedirs(outdir, exist_ok=True)
    out = lambda name: os.path.join(outdir, name)
    wanted = lambda name: not only or name.split(".")[0] in only
    torch.manual_seed(0)
    model = build_model(arch, num_classes)
    condition_model(model)
    model.eval()
    torch.manual_seed(1)
    inputs = torch.randn(*INPUT_SHAPE)
    with torch.no_grad():
        logits = model(inputs)
    write_bytes(out("input.bin"), tensor_bytes(inputs))
    write_bytes(out("logits.bin"), tensor_bytes(logits))

    plain = model.state_dict()
    module = torch.nn.DataParallel(model).state_dict()
    optimizer, scheduler = optimizer_after_one_step(model, inputs, num_classes)
    files = {
        "plain.pth": lambda path: torch.save(plain, path),
        "module.pth": lambda path: torch.save(module, path),
        "orig_mod.pth": lambda path: torch.save(prefixed(plain, "_orig_mod."), path),
        "train.pth": lambda path: torch.save(
            {"epoch": 3, "arch": arch, "state_dict": module, "best_acc1": torch.tensor(71.5),
             "optimizer": optimizer}, path),
        "model.pth": lambda path: torch.save(
            {"model": plain, "optimizer": optimizer, "lr_scheduler": scheduler, "epoch": 3}, path),
        "cuda3.pth": lambda path: save_with_location(plain, path, "cuda:3"),
        "plain.safetensors": lambda path: write_bytes(path, st_serialize(
            [(k, ST_NAME[dtype_name(v)], list(v.shape), tensor_bytes(v))
             for k, v in plain.items()], {"format": "pt"})),
    }
    for name, save in files.items():
        if wanted(name):
            save(out(name))

    if wanted("views"):
        views = views_dict()
        torch.save(views, out("views.pth"))
        with open(out("views.json"), "w") as f:
            json.dump([[k, dtype_name(v), list(v.shape)] for k, v in views.items()], f)
        write_bytes(out("views.bin"), b"".join(tensor_bytes(v) for v in views.values()))
    print(f"{outdir}: {arch}, {num_classes} classes, {len(plain)} state_dict entries")


# ---------------------------------------------------------------- load

def key_layout(state_dict):
    """"module" if every key starts with "module.", "plain" if none does."""
    if not isinstance(state_dict, dict) or not state_dict:
        raise OracleError(f"not a state_dict: {type(state_dict).__name__}")
    wrapped = [key.startswith("module.") for key in state_dict]
    if all(wrapped):
        return "module"
    if not any(wrapped):
        return "plain"
    raise OracleError(f"{sum(wrapped)} of {len(wrapped)} keys start with 'module.'")


def one_line(error):
    return " ".join(str(error).split())[:400]


def load(path, arch, num_classes, input_path, logits_out, expect_layout):
    import torch
    try:
        state_dict = torch.load(path, weights_only=True)
    except Exception as error:
        raise OracleError(f"torch.load(weights_only=True) refused {path}: {one_line(error)}")
    layout = key_layout(state_dict)
    if expect_layout and layout != expect_layout:
        raise OracleError(f"{path}: keys have the {layout} layout, expected {expect_layout}")
    model = build_model(arch, num_classes)
    target = torch.nn.DataParallel(model) if layout == "module" else model
    try:
        target.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise OracleError(f"{path}: {one_line(error)}")
    model.eval()
    with open(input_path, "rb") as f:
        raw = bytearray(f.read())
    if len(raw) != 4 * INPUT_SHAPE[0] * INPUT_SHAPE[1] * INPUT_SHAPE[2] * INPUT_SHAPE[3]:
        raise OracleError(f"{input_path}: {len(raw)} bytes is not float32 {list(INPUT_SHAPE)}")
    inputs = torch.frombuffer(raw, dtype=torch.float32).reshape(INPUT_SHAPE)
    with torch.no_grad():
        write_bytes(logits_out, tensor_bytes(model(inputs)))
    print(f"{path}: {len(state_dict)} entries ({layout}) loaded into {arch}, logits written")


# ---------------------------------------------------------------- hostile

class Reducer:
    """Pickles as the call func(*args): the shape of every malicious pickle payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def create_marker(path):
    """What reduce_class.pth would call: a function of this script, pickled by name."""
    open(path, "w").close()


class FakeStorage:
    """Stands in for a storage record; StoragePickler writes its persistent id."""

    def __init__(self, numel):
        self.numel = numel


class StoragePickler(pickle.Pickler):
    """Pickles FakeStorage as torch.save records a float storage: data/0 on the CPU."""

    def persistent_id(self, obj):
        import torch
        if isinstance(obj, FakeStorage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def fake_tensor_pickle(size, stride, storage_numel):
    """A pickled {'w': tensor} whose tensor record claims `size` over a storage of storage_numel."""
    import torch
    tensor = Reducer(torch._utils._rebuild_tensor_v2, FakeStorage(storage_numel), 0, size, stride,
                     False, OrderedDict())
    buffer = io.BytesIO()
    StoragePickler(buffer, protocol=2).dump({"w": tensor})
    return buffer.getvalue()


def write_torch_zip(path, pickle_bytes, storages=()):
    """A zip laid out as torch.save writes one: archive/data.pkl, archive/data/<key>, version."""
    records = [("data.pkl", pickle_bytes)]
    records += [(f"data/{key}", raw) for key, raw in storages]
    records.append(("version", b"3\n"))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records:
            archive.writestr(zipfile.ZipInfo("archive/" + name, ZIP_DATE), data)


def p0_string(text):
    """Protocol-0 UNICODE: V, the text, newline."""
    return b"V" + text.encode("raw_unicode_escape") + b"\n"


def p4_string(text):
    """Protocol-4 SHORT_BINUNICODE or BINUNICODE."""
    data = text.encode()
    if len(data) < 256:
        return b"\x8c" + bytes([len(data)]) + data
    return b"X" + struct.pack("<I", len(data)) + data


def hostile_pickles(marker):
    """{file stem: pickle bytes}, each creating marker if executed."""
    touch = "touch " + shlex.quote(marker)
    # fix_imports=False keeps the Python 3 names (builtins, subprocess) in the GLOBAL opcodes
    dumps = lambda func, *args: pickle.dumps(Reducer(func, *args), protocol=2, fix_imports=False)
    return {
        "os_system": dumps(os.system, touch),  # os.system is named posix.system on Linux
        "builtins_eval": dumps(eval, f"open({marker!r}, 'w').close()"),
        "subprocess": dumps(subprocess.call, ["touch", marker]),
        "reduce_class": dumps(create_marker, marker),
        # INST: MARK, the arguments, then `i module\nname\n` calls module.name(*arguments)
        "inst_opcode": b"(" + p0_string(touch) + b"ios\nsystem\n.",
        # OBJ: MARK, a callable from GLOBAL, the arguments, then `o` calls it
        "obj_opcode": b"(cos\nsystem\n" + p0_string(touch) + b"o.",
        # STACK_GLOBAL resolves the two strings below it; TUPLE1 and REDUCE call it
        "stack_global": (b"\x80\x04" + p4_string("os") + p4_string("system") + b"\x93" +
                         p4_string(touch) + b"\x85R."),
    }


def saved_bytes(obj, **options):
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer, **options)
    return buffer.getvalue()


def flip_first_data_byte(blob, member):
    """blob with the first byte of zip member `member`'s data inverted (its CRC left as it was)."""
    info = next(i for i in zipfile.ZipFile(io.BytesIO(blob)).infolist() if i.filename == member)
    name_length, extra_length = struct.unpack_from("<HH", blob, info.header_offset + 26)
    at = info.header_offset + 30 + name_length + extra_length
    return blob[:at] + bytes([blob[at] ^ 0xFF]) + blob[at + 1:]


def write_hostile_pth(outdir, marker):
    import torch
    out = lambda name: os.path.join(outdir, name)
    for stem, payload in hostile_pickles(marker).items():
        write_torch_zip(out(stem + ".pth"), payload)
    torch.manual_seed(3)
    touch = "touch " + shlex.quote(marker)
    torch.save(OrderedDict([("fc.weight", torch.randn(10, 4)),
                            ("fc.bias", Reducer(os.system, touch))]), out("nested_evil.pth"))
    small = saved_bytes({"w": torch.randn(64, 64)})
    write_bytes(out("truncated.pth"), small[:len(small) // 2])
    write_bytes(out("bad_crc.pth"), flip_first_data_byte(small, "archive/data/0"))
    write_torch_zip(out("short_storage.pth"), fake_tensor_pickle((1000,), (1,), 1000),
                    [("0", bytes(16))])
    write_torch_zip(out("absurd_size.pth"), fake_tensor_pickle((2**40, 2**40), (2**40, 1), 2**62),
                    [("0", bytes(16))])
    write_bytes(out("legacy.pth"), saved_bytes({"w": torch.randn(4)},
                                               _use_new_zipfile_serialization=False))
    write_bytes(out("not_a_zip.pth"), random.Random(0).randbytes(200))
    write_bytes(out("empty.pth"), b"")


def st_file(header, data, declared_length=None):
    """A safetensors file from a header (dict, or raw bytes) padded to 8 bytes and its data."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    length = len(header) if declared_length is None else declared_length
    return struct.pack("<Q", length) + header + data


def bad_safetensors():
    """{file stem: bytes}: one defect per file, and one valid file."""
    def entry(shape, begin, end, dtype="F32"):
        return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    one = {"a": entry([2], 0, 8)}
    data = struct.pack("<4f", 1, 2, 3, 4)
    return {
        "header_too_large": st_file(one, data[:8], declared_length=ST_MAX_HEADER + 1),
        "header_beyond_file": st_file(one, data[:8], declared_length=4096),
        "header_not_utf8": st_file(b'{"\xff\xfe":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
                                   data[:8]),
        "header_not_json": st_file(b'{"a":{"dtype":"F32",', data[:8]),
        "header_not_object": st_file(b"[1,2]", b""),
        "gap": st_file({"a": entry([1], 0, 4), "b": entry([1], 8, 12)}, data[:12]),
        "overlap": st_file({"a": entry([2], 0, 8), "b": entry([2], 4, 12)}, data[:12]),
        "trailing_bytes": st_file(one, data),
        "short_data": st_file({"a": entry([4], 0, 16)}, data[:8]),
        "size_mismatch": st_file({"a": entry([3], 0, 8)}, data[:8]),
        "duplicate_names": st_file(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                   b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
                                   data[:8]),
        "unknown_dtype": st_file({"a": entry([2], 0, 8, dtype="F99")}, data[:8]),
        "negative_shape": st_file({"a": entry([-2], 0, 8)}, data[:8]),
        "bad_offsets_type": st_file({"a": {"dtype": "F32", "shape": [2],
                                           "data_offsets": ["0", "8"]}}, data[:8]),
        "metadata_not_string": st_file({"__metadata__": {"a": 1}, **one}, data[:8]),
        "overflow_shape": st_file({"a": entry([2**40, 2**40, 2**40], 0, 8)}, data[:8]),
        "good": st_serialize([("a", "F32", [2], data[:8]), ("b", "F32", [2], data[8:])],
                             {"format": "pt"}),
    }


def hostile(outdir, marker):
    if not os.path.isabs(marker):
        raise OracleError(f"MARKER must be an absolute path: {marker!r}")
    os.makedirs(os.path.join(outdir, "bad_safetensors"), exist_ok=True)
    write_hostile_pth(outdir, marker)
    for stem, blob in bad_safetensors().items():
        write_bytes(os.path.join(outdir, "bad_safetensors", stem + ".safetensors"), blob)
    print(f"{outdir}: hostile and malformed files written")


# ---------------------------------------------------------------- command line

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("make", help="write a model's checkpoints in torch's formats")
    p.add_argument("outdir")
    p.add_argument("--arch", required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--only", default="",
                   help="comma-separated file stems to write (default all), e.g. plain,train")
    p.set_defaults(run=lambda a: make(a.outdir, a.arch, a.num_classes, set(filter(None, a.only.split(",")))))
    p = commands.add_parser("load", help="load a state_dict with torch and write its logits")
    p.add_argument("pth")
    p.add_argument("arch")
    p.add_argument("num_classes", type=int)
    p.add_argument("input")
    p.add_argument("logits_out")
    p.add_argument("--expect-layout", choices=("plain", "module"))
    p.set_defaults(run=lambda a: load(a.pth, a.arch, a.num_classes, a.input, a.logits_out,
                                      a.expect_layout))
    p = commands.add_parser("hostile", help="write hostile and malformed files")
    p.add_argument("outdir")
    p.add_argument("marker")
    p.set_defaults(run=lambda a: hostile(a.outdir, a.marker))
    p = commands.add_parser("check-safetensors", help="validate a safetensors file exactly")
    p.add_argument("file")
    p.add_argument("expect_json")
    p.add_argument("expect_bin")
    p.set_defaults(run=lambda a: check_safetensors(a.file, a.expect_json, a.expect_bin))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        args.run(args)
    except (OracleError, OSError) as error:
        print(f"torch_oracle.py {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

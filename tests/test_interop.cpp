// The pieces behind .pth and safetensors, without Python: the ZIP reader and writer, the
// restricted unpickler (hostile opcodes and globals refused, nothing built but data), round trips
// of every dtype through both formats, and damaged files (every truncation, flipped bytes) giving
// a FileError, never a crash. tests/test_interop_oracle.cpp checks the same files against torch.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "io/checkpoint.h"
#include "io/formats.h"
#include "io/pickle.h"
#include "io/zip.h"
#include "models/arch.h"

using namespace dpt;
using namespace std::string_literals;
namespace fs = std::filesystem;

namespace {

std::string tmp(const std::string& name) {
  return ::testing::TempDir() + "/interop-" + std::to_string(getpid()) + "-" + name;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

void spit(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

// A state dict with every dtype, a 0-d tensor, an empty one and a 5-d one.
Checkpoint sample() {
  Checkpoint c;
  std::vector<float> v(24);
  for (size_t i = 0; i < v.size(); ++i) v[i] = 0.25f * float(i) - 3;
  Tensor w = Tensor::from_vector({4, 6}, v);
  c.state.entries.emplace_back("layer.weight", w.clone());
  c.state.entries.emplace_back("layer.half", w.to(DType::F16));
  c.state.entries.emplace_back("layer.bf16", w.to(DType::BF16));
  Tensor n({3}, DType::I64);
  for (int i = 0; i < 3; ++i) n.data<int64_t>()[i] = int64_t(1) << (20 * i + 1);
  c.state.entries.emplace_back("layer.count", std::move(n));
  c.state.entries.emplace_back("scalar", Tensor::full({}, 1.5f));
  c.state.entries.emplace_back("empty", Tensor::zeros({0, 5}));
  c.state.entries.emplace_back("five", Tensor::from_vector({1, 2, 1, 3, 4}, v));
  return c;
}

void expect_same(const StateDict& a, const StateDict& b) {
  ASSERT_EQ(a.size(), b.size());
  for (auto& [k, t] : a.entries) {
    SCOPED_TRACE(k);
    const Tensor* u = b.find(k);
    ASSERT_NE(u, nullptr);
    EXPECT_EQ(u->dtype(), t.dtype());
    EXPECT_EQ(u->shape(), t.shape());
    if (t.nbytes() > 0) {
      EXPECT_EQ(std::memcmp(u->raw(), t.raw(), t.nbytes()), 0);
    }
  }
}

// The error a hand-written data.pkl gives (empty when it is accepted).
std::string pickle_error(const std::string& bytes) {
  try {
    unpickle(bytes, "test");
  } catch (const FileError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(Zip, RoundTripAlignedWithAndWithoutZip64) {
  for (bool zip64 : {false, true}) {
    const std::string path = tmp(zip64 ? "z64.zip" : "z.zip");
    {
      Fd f = create_file(path, path);
      ZipWriter w(f.fd, path, zip64);
      w.add("a/data.pkl", "hello", 5);
      w.add("a/empty", "", 0);
      std::string big(100000, 'x');
      w.add("a/data/0", big.data(), big.size());
      w.finish();
    }
    ReadFile rf(path);
    ZipReader z(rf);
    ASSERT_EQ(z.entries().size(), 3u);
    for (const ZipEntry& e : z.entries()) EXPECT_EQ(e.data_offset % 64, 0u) << e.name;
    EXPECT_EQ(z.read_string(*z.find("a/data.pkl"), 100), "hello");
    EXPECT_EQ(z.read_string(*z.find("a/empty"), 100), "");
    EXPECT_EQ(z.read_string(*z.find("a/data/0"), 1 << 20), std::string(100000, 'x'));
    EXPECT_THROW(z.read_string(*z.find("a/data/0"), 10), FileError);  // over the caller's limit
    fs::remove(path);
  }
}

TEST(Zip, EveryTruncationAndFlippedByteIsAFileError) {
  const std::string path = tmp("t.pth");
  Checkpoint c = sample();
  write_pth(c, path);
  const std::string good = slurp(path);
  const std::string bad = tmp("bad.pth");
  int refused = 0;
  for (size_t n = 0; n < good.size(); n += 7) {
    spit(bad, good.substr(0, n));
    EXPECT_THROW(read_pth(bad), FileError) << n;
    ++refused;
  }
  for (size_t i = 0; i < good.size(); i += 3) {
    std::string b = good;
    b[i] = char(b[i] ^ 0x5a);
    spit(bad, b);
    try {  // a flip in padding or an unused field may be harmless: then the values must be intact
      expect_same(read_pth(bad).state, c.state);
    } catch (const FileError&) {
      ++refused;
    } catch (const ConfigError&) {  // a flipped key can make the layouts disagree
      ++refused;
    }
  }
  EXPECT_GT(refused, int(good.size() / 7));
  std::printf("%zu truncations and %zu flipped bytes of a %zu-byte .pth, %d refused\n",
              (good.size() + 6) / 7, (good.size() + 2) / 3, good.size(), refused);
  fs::remove(path);
  fs::remove(bad);
}

TEST(Pickle, StateDictRoundTrip) {
  const std::string p = pickle_state_dict({{"a.weight", DType::F32, {2, 3}, "0"},
                                           {"a.n", DType::I64, {}, "1"},
                                           {"big", DType::F16, {70000, 1, 1, 2}, "2"}});
  Pickle pk = unpickle(p, "test");
  ASSERT_EQ(pk.root->kind, PyObj::Kind::Dict);
  ASSERT_EQ(pk.root->dict.size(), 3u);
  const PyObj* t = pk.root->dict[2].second;
  EXPECT_EQ(pk.root->dict[2].first->s, "big");
  ASSERT_EQ(t->kind, PyObj::Kind::Tensor);
  EXPECT_EQ(t->size, (Shape{70000, 1, 1, 2}));
  EXPECT_EQ(t->stride, (Shape{2, 2, 2, 1}));
  EXPECT_EQ(t->items[0]->storage_type, "HalfStorage");
  EXPECT_EQ(t->items[0]->i, 140000);
  EXPECT_EQ(pk.root->dict[1].second->size, Shape{});
}

TEST(Pickle, RefusesEveryGlobalAndOpcodeAStateDictDoesNotNeed) {
  const std::string refused[] = {
      "\x80\x02"
      "cos\nsystem\nX\x04\x00\x00\x00true\x85R."s,  // os.system('true')
      "\x80\x02"
      "cbuiltins\neval\nX\x01\x00\x00\x00"
      "1\x85R."s,  // builtins.eval
      "\x80\x02"
      "csubprocess\ncall\n)R."s,                      // subprocess.call
      "\x80\x04\x8c\x02os\x8c\x06system\x93."s,       // STACK_GLOBAL os.system
      "(S'true'\nios\nsystem\n."s,                    // INST (protocol 0)
      "\x80\x02(cos\nsystem\nX\x01\x00\x00\x00xo."s,  // OBJ
      "\x80\x02"
      "ccollections\nOrderedDict\n)\x81."s,  // NEWOBJ
      "\x80\x02\x82\x01."s,                  // EXT1
      "\x80\x02P0\n."s,                      // PERSID (text)
      "\x80\x02"
      "ctorch\nFloatStorage\n)R."s,  // a storage type called
      "\x80\x02"
      "ctorch._utils\n_rebuild_tensor\n)R."s,  // not v2
      "\x80\x02"
      "ctorch\nload\n)R."s,  // torch.load itself
  };
  for (const std::string& p : refused) {
    const std::string e = pickle_error(p);
    EXPECT_NE(e.find("nothing in it was executed"), std::string::npos)
        << "accepted or misreported: " << e;
  }
}

TEST(Pickle, MalformedInputIsAFileErrorNeverACrash) {
  const std::string bad[] = {
      ""s,                // empty
      "\x80\x02"s,        // no STOP
      "\x80\x02}}."s,     // two values left
      "\x80\x02s."s,      // SETITEM on an empty stack
      "\x80\x02h\x05."s,  // memo used before set
      "\x80\x02\x8a\x09"
      "123456789."s,                              // a 9-byte integer
      "\x80\x02X\xff\xff\xff\x7f."s,              // a string longer than the pickle
      "\x80\x09."s,                               // unknown protocol
      "\x80\x02]K\x01s."s,                        // SETITEM on a list
      "\x80\x02}]K\x01s."s,                       // a list as dict key
      "\x80\x02(K\x01K\x02t\x85\x85\x85\x85t."s,  // TUPLE without MARK left
  };
  for (const std::string& p : bad) EXPECT_NE(pickle_error(p), "") << "accepted";
  // A million nested lists and a list that contains itself cost nothing to free.
  std::string deep = "\x80\x02";
  for (int i = 0; i < 1000000; ++i) deep += "]";
  for (int i = 0; i < 999999; ++i) deep += "a";
  EXPECT_EQ(pickle_error(deep + "."), "");
  EXPECT_EQ(pickle_error("\x80\x02]q\x00h\x00"
                         "a."s),
            "");
  // Tensors must lie inside their storage, with sizes that do not overflow.
  auto tensor = [](const std::string& size, const std::string& stride, int offset, int numel) {
    std::string p =
        "\x80\x02"
        "ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
        "ctorch\nFloatStorage\nX\x01\x00\x00\x00"
        "0X\x03\x00\x00\x00"
        "cpuK"s;
    p += char(numel);
    p += "tQK";
    p += char(offset);
    p += size + stride + "\x89)tR.";
    return pickle_error(p);
  };
  EXPECT_EQ(tensor("K\x02K\x03\x86", "K\x03K\x01\x86", 0, 6), "");
  EXPECT_NE(tensor("K\x02K\x03\x86", "K\x03K\x01\x86", 1, 6), "");  // one element short
  EXPECT_NE(tensor("K\x02K\x03\x86", "K\x01K\x03\x86", 0, 6), "");  // transposed past the end
  EXPECT_EQ(tensor("K\x03K\x02\x86", "K\x01K\x03\x86", 0, 6), "");  // transposed inside
  EXPECT_NE(tensor("J\xff\xff\xff\x7fJ\xff\xff\xff\x7f\x86", "K\x01K\x01\x86", 0, 6), "");
  EXPECT_NE(tensor("K\x02\x85", "K\x01\x86", 0, 6), "");  // size and stride disagree
}

TEST(Pth, RoundTripEveryDtypeAndLayout) {
  Checkpoint c = sample();
  const std::string path = tmp("rt.pth");
  write_checkpoint(c, path);
  EXPECT_EQ(sniff_format(path), FileFormat::Pth);
  Checkpoint back = read_checkpoint(path);
  EXPECT_EQ(back.format, FileFormat::Pth);
  EXPECT_EQ(back.prefix, "");
  expect_same(back.state, c.state);
  c.state = with_prefix(c.state, "module.");
  write_checkpoint(c, path);
  back = read_checkpoint(path);
  EXPECT_EQ(back.prefix, "module.");
  expect_same(back.state, c.state);
  fs::remove(path);
}

TEST(Safetensors, RoundTripEveryDtypeWithArchitecture) {
  auto model = make_model(ArchSpec{}, 1);
  Checkpoint c = make_checkpoint(*model, CheckpointKind::Full);
  for (auto& e : sample().state.entries)
    c.state.entries.emplace_back("x." + e.first, e.second.share());
  const std::string path = tmp("rt.safetensors");
  write_checkpoint(c, path);
  EXPECT_EQ(sniff_format(path), FileFormat::Safetensors);
  Checkpoint back = read_checkpoint(path);
  EXPECT_EQ(back.kind, CheckpointKind::Full);
  EXPECT_EQ(back.arch->to_json(), c.arch->to_json());
  expect_same(back.state, c.state);
  // The data starts 8-byte aligned, the largest dtypes first.
  const std::string b = slurp(path);
  uint64_t n = 0;
  std::memcpy(&n, b.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  write_checkpoint(make_checkpoint(*model, CheckpointKind::Full), path);
  LoadedModel lm = load_model(path, {Device::cpu()});  // rebuilt from the metadata
  EXPECT_TRUE(lm.load.report.ok());
  fs::remove(path);
}

TEST(Safetensors, EveryTruncationAndHeaderFlipIsAFileError) {
  Checkpoint c = sample();
  const std::string path = tmp("t.safetensors"), bad = tmp("bad.safetensors");
  write_checkpoint(c, path);
  const std::string good = slurp(path);
  uint64_t n = 0;
  std::memcpy(&n, good.data(), 8);
  for (size_t k = 0; k < good.size(); ++k) {
    spit(bad, good.substr(0, k));
    EXPECT_THROW(read_safetensors(bad), FileError) << k;
  }
  for (size_t i = 0; i < 8 + n; ++i) {
    std::string b = good;
    b[i] = char(b[i] ^ 0x01);
    spit(bad, b);
    try {  // a flip inside a name or a metadata value can leave a valid file
      read_safetensors(bad);
    } catch (const FileError&) {
    } catch (const ConfigError&) {
    }
  }
  std::printf("%zu truncations and %zu header flips of a %zu-byte safetensors file\n", good.size(),
              size_t(8 + n), good.size());
  fs::remove(path);
  fs::remove(bad);
}

TEST(Formats, ByContentAndByExtension) {
  EXPECT_EQ(format_for_extension("a/b.PTH"), FileFormat::Pth);
  EXPECT_EQ(format_for_extension("b.pt"), FileFormat::Pth);
  EXPECT_EQ(format_for_extension("b.safetensors"), FileFormat::Safetensors);
  EXPECT_EQ(format_for_extension("b.h5"), FileFormat::Hdf5);
  EXPECT_EQ(format_for_extension("b.ckpt"), FileFormat::Hdf5);
  EXPECT_THROW(parse_file_format("onnx"), UsageError);
  // A .pth name holding HDF5 is read as what it is.
  auto model = make_model(ArchSpec{}, 1);
  const std::string path = tmp("really-h5.pth");
  write_checkpoint(make_checkpoint(*model, CheckpointKind::Full), path, FileFormat::Hdf5);
  EXPECT_EQ(read_checkpoint(path).format, FileFormat::Hdf5);
  spit(path, "0123456789abcdef");
  EXPECT_THROW(read_checkpoint(path), FileError);
  fs::remove(path);
}

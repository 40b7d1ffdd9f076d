// torch.save's zip format (PyTorch >= 1.6), read and written without Python (docs/interop.md).
// Reading: the zip is validated (io/zip.h), data.pkl is parsed by the restricted unpickler
// (io/pickle.h), the state dict is found in the top-level object, and only the storages its
// tensors use are read, each CRC-checked. Writing: an OrderedDict of contiguous tensors, one
// storage each, that torch.load(weights_only=True) accepts.
#include <algorithm>
#include <cstring>
#include <map>
#include <set>

#include "io/file.h"
#include "io/formats.h"
#include "io/pickle.h"
#include "io/zip.h"

namespace dpt {

namespace {

using K = PyObj::Kind;

constexpr uint64_t kMaxPickle = uint64_t(256) << 20;
// The legacy (pre-1.6) format starts with a pickled magic number.
constexpr unsigned char kLegacyMagic[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c,
                                          0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};
// Where training scripts put the model's state dict, in the order they are looked for.
const char* const kStateKeys[] = {"state_dict", "model_state_dict", "model", "net", "module"};

bool is_tensor_dict(const PyObj* o) {
  if (o->kind != K::Dict || o->dict.empty()) return false;
  for (auto& [k, v] : o->dict)
    if (k->kind != K::Str || v->kind != K::Tensor) return false;
  return true;
}

// The state dict in the file's top-level object, and the key it was found under ("" for the
// object itself).
std::pair<const PyObj*, std::string> find_state_dict(const PyObj* root, const std::string& path) {
  if (is_tensor_dict(root)) return {root, ""};
  DPT_CHECK(root->kind == K::Dict, FileError, path, " holds a ", kind_name(root->kind),
            ", not a state dict");
  for (const char* key : kStateKeys)
    for (auto& [k, v] : root->dict)
      if (k->kind == K::Str && k->s == key && is_tensor_dict(v)) return {v, key};
  std::string keys;
  for (auto& [k, v] : root->dict) {
    if (k->kind != K::Str) continue;
    keys += (keys.empty() ? "'" : ", '") + k->s + "' (" + kind_name(v->kind) + ")";
    if (keys.size() > 300) break;
  }
  DPT_THROW(FileError, path,
            " holds no state dict: expected a dict of tensors, or one under 'state_dict' or "
            "'model'; its keys are ",
            keys.empty() ? "none" : keys);
}

DType dtype_of_storage(const std::string& type, bool* from_double) {
  *from_double = type == "DoubleStorage";
  if (type == "FloatStorage" || *from_double) return DType::F32;
  if (type == "HalfStorage") return DType::F16;
  if (type == "BFloat16Storage") return DType::BF16;
  if (type == "LongStorage") return DType::I64;
  DPT_THROW(FileError, "holds ", type,
            " data, which dptrain does not load (float32, float64, "
            "float16, bfloat16 and int64 only)");
}

// Copies the strided elements of a storage into contiguous row-major memory.
void gather(const char* base, size_t es, int64_t offset, const Shape& size, const Shape& stride,
            char* dst) {
  const int64_t n = shape_numel(size);
  std::vector<int64_t> idx(size.size(), 0);
  int64_t src = offset;
  for (int64_t k = 0; k < n; ++k) {
    std::memcpy(dst + k * int64_t(es), base + src * int64_t(es), es);
    for (size_t d = size.size(); d-- > 0;) {
      if (++idx[d] < size[d]) {
        src += stride[d];
        break;
      }
      src -= stride[d] * (size[d] - 1);
      idx[d] = 0;
    }
  }
}

bool contiguous(const Shape& size, const Shape& stride) {
  int64_t expect = 1;
  for (size_t d = size.size(); d-- > 0;) {
    if (size[d] != 1 && stride[d] != expect) return false;
    expect *= size[d];
  }
  return true;
}

struct StorageJob {
  const ZipEntry* entry;
  Tensor buf;
  size_t es;
};

class PthReader {
 public:
  explicit PthReader(const std::string& path) : file_(path), path_(path) {}

  Checkpoint read() {
    legacy_check();
    ZipReader zip(file_);
    // torch.save puts every entry under one folder (the archive name).
    std::string archive;
    for (const ZipEntry& e : zip.entries()) {
      const size_t slash = e.name.find('/');
      if (slash != std::string::npos && e.name.substr(slash) == "/data.pkl") {
        DPT_CHECK(archive.empty(), FileError, path_, " holds more than one data.pkl");
        archive = e.name.substr(0, slash + 1);
      }
    }
    DPT_CHECK(!archive.empty(), FileError, path_,
              " is a ZIP archive but not a torch.save file (no <archive>/data.pkl)");
    if (const ZipEntry* v = zip.find(archive + "version")) {
      const std::string s = zip.read_string(*v, 16);
      const long version = std::atol(s.c_str());
      DPT_CHECK(version >= 1 && version <= 10, FileError, path_, ": torch.save format version '",
                s.substr(0, s.find('\n')), "' is not one dptrain reads (1 to 10)");
    }
    bool big_endian = false;
    if (const ZipEntry* b = zip.find(archive + "byteorder")) {
      const std::string s = zip.read_string(*b, 16);
      DPT_CHECK(s == "little" || s == "big", FileError, path_, ": unknown byte order '", s, "'");
      big_endian = s == "big";
    }
    const ZipEntry& pkl = *zip.find(archive + "data.pkl");
    Pickle p = unpickle(zip.read_string(pkl, kMaxPickle), path_ + " (data.pkl)");
    auto [sd, under] = find_state_dict(p.root, path_);
    Checkpoint c;
    c.format = FileFormat::Pth;
    c.kind = CheckpointKind::Weights;
    c.found_under = under;
    c.file_bytes = file_.size();
    c.version = "";
    c.saved_from.clear();
    // First every check and allocation, then the reads (in parallel), then the tensors.
    struct Pending {
      const std::string* key;
      const PyObj* tensor;
      size_t job, es;
      DType dt;
      bool from_double;
    };
    std::vector<StorageJob> jobs;
    std::map<std::string, size_t> job_of;  // storage key -> its job: each storage is read once
    std::vector<Pending> pending;
    std::set<std::string> names;
    for (auto& [k, t] : sd->dict) {
      DPT_CHECK(names.insert(k->s).second, FileError, path_, ": key ", k->s, " appears twice");
      const PyObj& st = *t->items[0];
      bool from_double = false;
      DType dt;
      try {
        dt = dtype_of_storage(st.storage_type, &from_double);
      } catch (const FileError& e) {
        DPT_THROW(FileError, path_, ": tensor ", k->s, " ", e.what());
      }
      const size_t es = storage_element_size(st.storage_type);
      auto it = job_of.find(st.s);
      if (it == job_of.end()) {
        const ZipEntry* e = zip.find(archive + "data/" + st.s);
        DPT_CHECK(e != nullptr, FileError, path_, ": storage ", st.s, " of tensor ", k->s,
                  " is missing from the archive");
        DPT_CHECK(e->size == uint64_t(st.i) * es, FileError, path_, ": storage ", st.s, " of ",
                  k->s, " holds ", e->size, " bytes, but its reference says ", st.i, " x ", es);
        const DType held = from_double ? DType::I64 : dt;  // float64 bytes, converted later
        jobs.push_back({e, Tensor({int64_t(e->size / dtype_size(held))}, held), es});
        it = job_of.emplace(st.s, jobs.size() - 1).first;
        if (std::find(c.saved_from.begin(), c.saved_from.end(), st.location) == c.saved_from.end())
          c.saved_from.push_back(st.location);
      } else {
        DPT_CHECK(uint64_t(jobs[it->second].buf.nbytes()) == uint64_t(st.i) * es, FileError, path_,
                  ": storage ", st.s, " is referenced with two different sizes");
      }
      pending.push_back({&k->s, t, it->second, es, dt, from_double});
    }
    parallel_for(jobs.size(), [&](size_t i) {  // read and CRC-check every storage
      zip.read(*jobs[i].entry, jobs[i].buf.raw());
      char* bytes = static_cast<char*>(jobs[i].buf.raw());
      for (uint64_t at = 0; big_endian && at + jobs[i].es <= jobs[i].entry->size; at += jobs[i].es)
        std::reverse(bytes + at, bytes + at + jobs[i].es);
    });
    for (const Pending& q : pending)
      c.state.entries.emplace_back(
          *q.key, tensor_of(jobs[q.job].buf, *q.tensor, q.es, q.dt, q.from_double));
    c.prefix = wrapper_prefix(keys_of(c.state));
    return c;
  }

 private:
  void legacy_check() {
    unsigned char head[sizeof kLegacyMagic] = {};
    DPT_CHECK(file_.size() > 0, FileError, path_, " is empty");
    file_.read(0, head, uint64_t(std::min<int64_t>(file_.size(), sizeof head)), "its header");
    const bool legacy =
        file_.size() >= int64_t(sizeof head) && std::memcmp(head, kLegacyMagic, sizeof head) == 0;
    DPT_CHECK(!legacy, FileError, path_,
              " is in PyTorch's legacy (pre-1.6) format, which dptrain does not read: re-save it "
              "with a recent PyTorch, e.g. torch.save(torch.load(f), 'new.pth')");
    DPT_CHECK(head[0] != 0x80, FileError, path_,
              " is a bare pickle, not a torch.save zip file: re-save it with torch.save");
  }

  Tensor tensor_of(const Tensor& storage, const PyObj& t, size_t es, DType dt, bool from_double) {
    if (!from_double && contiguous(t.size, t.stride)) return storage.view(t.i, t.size);
    std::vector<char> tmp(size_t(shape_numel(t.size)) * es);
    gather(static_cast<const char*>(storage.raw()), es, t.i, t.size, t.stride, tmp.data());
    Tensor out(t.size, dt);
    if (from_double) {
      float* o = out.data<float>();
      for (int64_t i = 0; i < out.numel(); ++i) {
        double v;
        std::memcpy(&v, tmp.data() + i * 8, 8);
        o[i] = float(v);
      }
    } else {
      if (!tmp.empty()) std::memcpy(out.raw(), tmp.data(), tmp.size());
    }
    return out;
  }

  ReadFile file_;
  std::string path_;
};

}  // namespace

Checkpoint read_pth(const std::string& path) {
  return PthReader(path).read();
}

void write_pth(const Checkpoint& c, const std::string& path, bool force_zip64) {
  std::vector<Tensor> hosts;
  std::vector<PickledTensor> entries;
  uint64_t bytes = 1 << 20;
  for (auto& [k, t] : c.state.entries) {
    hosts.push_back(t.device().is_cpu() ? t.share() : t.to(Device::cpu()));
    entries.push_back({k, t.dtype(), t.shape(), std::to_string(entries.size())});
    bytes += t.nbytes() + 256;
  }
  const std::string pkl = pickle_state_dict(entries);
  atomic_save(path, bytes + pkl.size(), [&](const std::string& tmp) {
    Fd f = create_file(tmp, path);
    ZipWriter zip(f.fd, path, force_zip64);
    zip.add("archive/data.pkl", pkl.data(), pkl.size());
    zip.add("archive/byteorder", "little", 6);
    for (size_t i = 0; i < hosts.size(); ++i)
      zip.add("archive/data/" + entries[i].storage, hosts[i].raw(), hosts[i].nbytes());
    zip.add("archive/version", "3\n", 2);
    zip.finish();
    sync_file(f.fd, path);
  });
}

}  // namespace dpt

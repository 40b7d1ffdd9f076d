#include "io/checkpoint.h"

#include "io/file.h"
#include "io/formats.h"

#include <H5PLpublic.h>
#include <fcntl.h>
#include <hdf5.h>
#include <openssl/evp.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <functional>
#include <optional>
#include <set>

namespace dpt {

namespace {

namespace fs = std::filesystem;

constexpr const char* kFormat = "dptrain-checkpoint";
constexpr int64_t kFormatVersion = 1;
constexpr size_t kUserBlock = 512;
constexpr char kMagic[16] = {'D', 'P', 'T', 'R', 'A', 'I', 'N', '-',
                             'C', 'K', 'P', 'T', '-', 'V', '2', '\n'};
constexpr char kMagicV1[16] = {'D', 'P', 'T', 'R', 'A', 'I', 'N', '-',
                               'C', 'K', 'P', 'T', '-', 'V', '1', '\n'};
constexpr size_t kDigestAt = 24, kSizeAt = 16;
constexpr size_t kMaxAttribute = 16 << 20;  // JSON attributes are a few KB

// ---- the integrity header: size and digest of the whole file ---------------------------------

// Header versions: V2 (written) keeps an XXH3-128 digest, V1 (read) a SHA-256. Both are computed
// over the whole file with the 32-byte digest field taken as zeros.
enum class Digest { Sha256, Xxh3 };

std::optional<Digest> header_digest(const unsigned char* header) {
  if (std::memcmp(header, kMagic, sizeof kMagic) == 0) return Digest::Xxh3;
  if (std::memcmp(header, kMagicV1, sizeof kMagicV1) == 0) return Digest::Sha256;
  return std::nullopt;
}

// One of the two digests, fed in order.
class Hasher {
 public:
  explicit Hasher(Digest d)
      : kind_(d), xxh_(nullptr, XXH3_freeState), sha_(nullptr, EVP_MD_CTX_free) {
    if (d == Digest::Xxh3) {
      xxh_.reset(XXH3_createState());
      DPT_CHECK(xxh_ && XXH3_128bits_reset(xxh_.get()) == XXH_OK, InternalError,
                "XXH3 is unavailable");
      return;
    }
    sha_.reset(EVP_MD_CTX_new());
    DPT_CHECK(sha_ && EVP_DigestInit_ex(sha_.get(), EVP_sha256(), nullptr) == 1, InternalError,
              "OpenSSL SHA-256 is unavailable");
  }
  void update(const void* p, size_t n) {
    if (kind_ == Digest::Xxh3)
      XXH3_128bits_update(xxh_.get(), p, n);
    else
      EVP_DigestUpdate(sha_.get(), p, n);
  }
  std::array<unsigned char, 32> final() {
    std::array<unsigned char, 32> out{};
    if (kind_ == Digest::Xxh3) {
      XXH128_canonical_t c;
      XXH128_canonicalFromHash(&c, XXH3_128bits_digest(xxh_.get()));
      std::memcpy(out.data(), c.digest, sizeof c.digest);
    } else {
      unsigned int len = 0;
      EVP_DigestFinal_ex(sha_.get(), out.data(), &len);
    }
    return out;
  }

 private:
  Digest kind_;
  std::unique_ptr<XXH3_state_t, XXH_errorcode (*)(XXH3_state_t*)> xxh_;
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> sha_;
};

// Digest of the file's bytes in order, the header's digest field taken as zeros.
std::array<unsigned char, 32> file_digest(Digest kind, int fd, int64_t size,
                                          const std::string& path) {
  Hasher h(kind);
  std::vector<unsigned char> buf(size_t(4) << 20);
  for (int64_t at = 0; at < size;) {
    const ssize_t n =
        pread(fd, buf.data(), size_t(std::min<int64_t>(int64_t(buf.size()), size - at)), at);
    DPT_CHECK(n > 0, FileError, "cannot read ", path, ": ",
              n == 0 ? "unexpected end" : errno_str());
    if (at == 0) std::memset(buf.data() + kDigestAt, 0, 32);  // reads start at 0 in one piece
    h.update(buf.data(), size_t(n));
    at += n;
  }
  return h.final();
}

// Writes the header of a `size`-byte file with its digest field zero.
void write_header(int fd, int64_t size, const std::string& path) {
  DPT_CHECK(size > int64_t(kUserBlock), FileError, path, " is too small to be a checkpoint");
  std::array<unsigned char, kUserBlock> header{};
  std::memcpy(header.data(), kMagic, sizeof kMagic);
  const uint64_t bytes = uint64_t(size);
  std::memcpy(header.data() + kSizeAt, &bytes, 8);  // little-endian hosts only (x86-64, arm64)
  write_at(fd, header.data(), header.size(), 0, path);
}

// Fills in the digest and flushes the file to disk.
void finish_seal(int fd, const std::array<unsigned char, 32>& digest, const std::string& path) {
  write_at(fd, digest.data(), digest.size(), kDigestAt, path);
  DPT_CHECK(fsync(fd) == 0, FileError, "cannot flush ", path, " to disk: ", errno_str());
}

// (Re)writes the header of a complete file, its digest computed from the file.
void seal_fd(int fd, const std::string& path) {
  struct stat st {};
  DPT_CHECK(fstat(fd, &st) == 0, FileError, "cannot stat ", path, ": ", errno_str());
  write_header(fd, st.st_size, path);
  finish_seal(fd, file_digest(Digest::Xxh3, fd, st.st_size, path), path);
}

// Checks magic, recorded size and digest; returns the file's status for a later unchanged check.
struct stat verify_fd(int fd, const std::string& path) {
  struct stat st {};
  DPT_CHECK(fstat(fd, &st) == 0 && S_ISREG(st.st_mode), FileError, path, " is not a regular file");
  std::array<unsigned char, kUserBlock> header{};
  const ssize_t n = st.st_size > int64_t(kUserBlock) ? pread(fd, header.data(), kUserBlock, 0) : 0;
  const std::optional<Digest> kind =
      n == ssize_t(kUserBlock) ? header_digest(header.data()) : std::nullopt;
  DPT_CHECK(kind.has_value(), FileError, path,
            " is not a dptrain checkpoint (no dptrain header; .pth and .safetensors files are "
            "read by dptrain ckpt convert)");
  uint64_t size = 0;
  std::memcpy(&size, header.data() + kSizeAt, 8);
  DPT_CHECK(size == uint64_t(st.st_size), FileError, path,
            " is truncated or extended: the header records ", size, " bytes, the file has ",
            st.st_size);
  auto digest = file_digest(*kind, fd, st.st_size, path);
  DPT_CHECK(std::memcmp(digest.data(), header.data() + kDigestAt, digest.size()) == 0, FileError,
            path, " is corrupt: its digest does not match the one recorded when it was saved");
  return st;
}

// ---- HDF5 handles and checks -------------------------------------------------------------------

// Process-wide libhdf5 settings, applied before every use (idempotent, no state of ours): no
// automatic error-stack printing (we throw with our own message) and no filter plugins.
void hdf5_settings() {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  H5PLset_loading_state(0);
}

class H5 {
 public:
  H5() = default;
  H5(hid_t id, herr_t (*closer)(hid_t)) : id_(id), close_(closer) {}
  H5(H5&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = -1; }
  H5& operator=(H5&& o) noexcept {
    std::swap(id_, o.id_);
    std::swap(close_, o.close_);
    return *this;
  }
  H5(const H5&) = delete;
  ~H5() {
    if (id_ >= 0) close_(id_);
  }
  hid_t get() const { return id_; }
  operator hid_t() const { return id_; }  // NOLINT: handles are passed straight to H5* calls
  // Closes now and reports failure (H5Fclose is where buffered writes reach the disk).
  herr_t close() {
    herr_t r = id_ >= 0 ? close_(id_) : 0;
    id_ = -1;
    return r;
  }

 private:
  hid_t id_ = -1;
  herr_t (*close_)(hid_t) = nullptr;
};

#define DPT_H5(call, path, ...)                                                     \
  [&] {                                                                             \
    auto dpt_h5_r = (call);                                                         \
    DPT_CHECK(dpt_h5_r >= 0, FileError, path, ": ", __VA_ARGS__, " (", #call, ")"); \
    return dpt_h5_r;                                                                \
  }()

H5 half_type() {
  H5 t(H5Tcopy(H5T_IEEE_F32LE), H5Tclose);
  H5Tset_fields(t, 15, 10, 5, 0, 10);
  H5Tset_size(t, 2);
  H5Tset_ebias(t, 15);
  return t;
}

H5 file_type(DType d) {
  switch (d) {
    case DType::F32:
      return H5(H5Tcopy(H5T_IEEE_F32LE), H5Tclose);
    case DType::F16:
      return half_type();
    case DType::BF16:
      return H5(H5Tcopy(H5T_STD_U16LE), H5Tclose);  // + attribute dtype = "bfloat16"
    case DType::I64:
      return H5(H5Tcopy(H5T_STD_I64LE), H5Tclose);
  }
  DPT_THROW(InternalError, "unknown dtype");
}

// ---- writing -------------------------------------------------------------------------------

void write_string_attr(hid_t obj, const char* name, const std::string& value,
                       const std::string& path) {
  H5 type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type, H5T_VARIABLE);
  H5Tset_cset(type, H5T_CSET_UTF8);
  H5 space(H5Screate(H5S_SCALAR), H5Sclose);
  H5 attr(DPT_H5(H5Acreate2(obj, name, type, space, H5P_DEFAULT, H5P_DEFAULT), path,
                 "cannot write attribute ", name),
          H5Aclose);
  const char* p = value.c_str();
  DPT_H5(H5Awrite(attr, type, &p), path, "cannot write attribute ", name);
}

void write_int_attr(hid_t obj, const char* name, int64_t value, const std::string& path) {
  H5 space(H5Screate(H5S_SCALAR), H5Sclose);
  H5 attr(DPT_H5(H5Acreate2(obj, name, H5T_STD_I64LE, space, H5P_DEFAULT, H5P_DEFAULT), path,
                 "cannot write attribute ", name),
          H5Aclose);
  DPT_H5(H5Awrite(attr, H5T_NATIVE_INT64, &value), path, "cannot write attribute ", name);
}

H5 ordered_group(hid_t parent, const char* name, const std::string& path) {
  H5 gcpl(H5Pcreate(H5P_GROUP_CREATE), H5Pclose);
  H5Pset_link_creation_order(gcpl, H5P_CRT_ORDER_TRACKED | H5P_CRT_ORDER_INDEXED);
  return H5(DPT_H5(H5Gcreate2(parent, name, H5P_DEFAULT, gcpl, H5P_DEFAULT), path,
                   "cannot create group ", name),
            H5Gclose);
}

// Where each tensor's bytes go in the file: libhdf5 lays out the datasets (allocated early, never
// filled), and we write the data ourselves, straight from the tensors.
struct Placement {
  haddr_t offset;
  const Tensor* tensor;
};

void create_datasets(hid_t group, const StateDict& sd, const std::string& path,
                     std::vector<std::pair<hid_t, const Tensor*>>& out, std::vector<H5>& keep) {
  H5 dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  H5Pset_layout(dcpl, H5D_CONTIGUOUS);
  H5Pset_alloc_time(dcpl, H5D_ALLOC_TIME_EARLY);
  H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER);
  for (auto& entry : sd.entries) {  // not a structured binding: DPT_H5's lambda captures them
    const std::string& key = entry.first;
    const Tensor& t = entry.second;
    DPT_CHECK(!key.empty() && key.find('/') == std::string::npos && key != ".", ConfigError,
              "cannot save state dict key '", key, "': keys must be non-empty and contain no '/'");
    std::vector<hsize_t> dims(t.shape().begin(), t.shape().end());
    H5 space(t.ndim() == 0 ? H5Screate(H5S_SCALAR)
                           : H5Screate_simple(int(dims.size()), dims.data(), nullptr),
             H5Sclose);
    H5 type = file_type(t.dtype());
    H5 ds(DPT_H5(H5Dcreate2(group, key.c_str(), type, space, H5P_DEFAULT,
                            t.numel() > 0 ? dcpl.get() : H5P_DEFAULT, H5P_DEFAULT),
                 path, "cannot create dataset ", key),
          H5Dclose);
    write_string_attr(ds, "dtype", std::string(dtype_name(t.dtype())), path);
    if (t.numel() > 0) out.emplace_back(ds.get(), &t);
    keep.push_back(std::move(ds));
  }
}

std::string now_utc() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (auto& x : v) s += (s.empty() ? "" : ",") + x;
  return s;
}

// Writes the HDF5 structure (attributes, groups, datasets with their space reserved) to `file`
// and returns where each tensor's bytes belong.
std::vector<Placement> write_structure(const Checkpoint& c, const std::string& file,
                                       const std::string& path) {
  H5 fcpl(H5Pcreate(H5P_FILE_CREATE), H5Pclose);
  H5Pset_userblock(fcpl, kUserBlock);
  H5Pset_link_creation_order(fcpl, H5P_CRT_ORDER_TRACKED | H5P_CRT_ORDER_INDEXED);
  H5 f(DPT_H5(H5Fcreate(file.c_str(), H5F_ACC_EXCL, fcpl, H5P_DEFAULT), path,
              "cannot create the temporary file ", file),
       H5Fclose);
  write_string_attr(f, "format", kFormat, path);
  write_int_attr(f, "format_version", kFormatVersion, path);
  write_string_attr(f, "kind", kind_name(c.kind), path);
  write_string_attr(f, "layout", c.layout(), path);
  write_string_attr(f, "prefix", c.prefix, path);
  write_string_attr(f, "dptrain_version", c.version.empty() ? "0.1.0" : c.version, path);
  write_string_attr(f, "saved_at", c.saved_at.empty() ? now_utc() : c.saved_at, path);
  write_string_attr(f, "saved_from", join(c.saved_from), path);
  write_int_attr(f, "world_size", c.world_size, path);
  if (c.kind == CheckpointKind::Full) {
    DPT_CHECK(c.arch.has_value(), ConfigError,
              "a full checkpoint needs the model's architecture description; this model has "
              "none, so save --save-kind weights");
    write_string_attr(f, "architecture", c.arch->to_json().dump(), path);
  }
  std::vector<std::pair<hid_t, const Tensor*>> datasets;
  std::vector<H5> keep;
  create_datasets(ordered_group(f, "model", path), c.state, path, datasets, keep);
  if (!c.optimizer.is_null()) {
    H5 g = ordered_group(f, "optimizer", path);
    write_string_attr(g, "hyperparameters", c.optimizer.dump(), path);
    create_datasets(ordered_group(g, "momentum", path), c.momentum, path, datasets, keep);
  }
  if (!c.trainer.is_null())
    write_string_attr(ordered_group(f, "trainer", path), "state", c.trainer.dump(), path);
  std::vector<Placement> out;
  for (auto& [ds, t] : datasets) {
    const haddr_t at = H5Dget_offset(ds);
    DPT_CHECK(at != HADDR_UNDEF, InternalError, "no storage reserved for a dataset");
    out.push_back({at, t});
  }
  keep.clear();
  DPT_CHECK(f.close() >= 0, FileError, path, ": writing the checkpoint structure failed");
  return out;
}

// ---- reading -------------------------------------------------------------------------------

std::string read_string_attr(hid_t obj, const char* name, const std::string& path) {
  H5 attr(DPT_H5(H5Aopen(obj, name, H5P_DEFAULT), path, "missing attribute '", name, "'"),
          H5Aclose);
  H5 type(H5Aget_type(attr), H5Tclose);
  H5 space(H5Aget_space(attr), H5Sclose);
  DPT_CHECK(H5Tget_class(type) == H5T_STRING && H5Tis_variable_str(type) > 0 &&
                H5Sget_simple_extent_type(space) == H5S_SCALAR,
            FileError, path, ": attribute '", name, "' is not a string");
  H5 mem(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(mem, H5T_VARIABLE);
  H5Tset_cset(mem, H5Tget_cset(type));
  char* p = nullptr;
  DPT_H5(H5Aread(attr, mem, &p), path, "cannot read attribute '", name, "'");
  std::string out = p ? std::string(p, strnlen(p, kMaxAttribute + 1)) : "";
  H5free_memory(p);
  DPT_CHECK(out.size() <= kMaxAttribute, FileError, path, ": attribute '", name, "' is too long");
  return out;
}

int64_t read_int_attr(hid_t obj, const char* name, const std::string& path) {
  H5 attr(DPT_H5(H5Aopen(obj, name, H5P_DEFAULT), path, "missing attribute '", name, "'"),
          H5Aclose);
  H5 type(H5Aget_type(attr), H5Tclose);
  H5 space(H5Aget_space(attr), H5Sclose);
  DPT_CHECK(H5Tget_class(type) == H5T_INTEGER && H5Sget_simple_extent_type(space) == H5S_SCALAR,
            FileError, path, ": attribute '", name, "' is not an integer");
  int64_t v = 0;
  DPT_H5(H5Aread(attr, H5T_NATIVE_INT64, &v), path, "cannot read attribute '", name, "'");
  return v;
}

nlohmann::json parse_json_attr(hid_t obj, const char* name, const std::string& path) {
  const std::string s = read_string_attr(obj, name, path);
  nlohmann::json j = nlohmann::json::parse(s, nullptr, false);
  DPT_CHECK(!j.is_discarded() && j.is_object(), FileError, path, ": attribute '", name,
            "' is not a JSON object");
  return j;
}

// The names of a group's links in creation order; every one must be a hard link.
std::vector<std::string> hard_links(hid_t group, const std::string& where,
                                    const std::string& path) {
  struct Ctx {
    std::vector<std::string> names;
    std::string bad;
  } ctx;
#if H5_VERSION_GE(1, 12, 0)
  auto cb = [](hid_t, const char* name, const H5L_info2_t* info, void* data) -> herr_t {
#else
  auto cb = [](hid_t, const char* name, const H5L_info_t* info, void* data) -> herr_t {
#endif
    auto* c = static_cast<Ctx*>(data);
    if (info->type != H5L_TYPE_HARD) {
      c->bad = name;
      return 1;  // stop
    }
    c->names.emplace_back(name);
    return 0;
  };
  hsize_t idx = 0;
#if H5_VERSION_GE(1, 12, 0)
  DPT_H5(H5Literate2(group, H5_INDEX_CRT_ORDER, H5_ITER_INC, &idx, cb, &ctx), path, "cannot list ",
         where, " (links not in creation order: not written by dptrain?)");
#else
  DPT_H5(H5Literate(group, H5_INDEX_CRT_ORDER, H5_ITER_INC, &idx, cb, &ctx), path, "cannot list ",
         where, " (links not in creation order: not written by dptrain?)");
#endif
  DPT_CHECK(ctx.bad.empty(), FileError, path, ": '", where, "/", ctx.bad,
            "' is a soft or external link; checkpoints hold only their own data");
  return ctx.names;
}

H5 open_group(hid_t parent, const char* name, const std::string& path) {
  H5 obj(DPT_H5(H5Oopen(parent, name, H5P_DEFAULT), path, "cannot open '", name, "'"), H5Oclose);
  DPT_CHECK(H5Iget_type(obj) == H5I_GROUP, FileError, path, ": '", name, "' is not a group");
  return obj;
}

DType dataset_dtype(hid_t ds, hid_t type, const std::string& key, const std::string& path) {
  const std::string tag = read_string_attr(ds, "dtype", path);
  DType want;
  if (tag == "float32")
    want = DType::F32;
  else if (tag == "float16")
    want = DType::F16;
  else if (tag == "bfloat16")
    want = DType::BF16;
  else if (tag == "int64")
    want = DType::I64;
  else
    DPT_THROW(FileError, path, ": '", key, "' has unknown dtype '", tag, "'");
  H5 expect = file_type(want);
  DPT_CHECK(H5Tequal(type, expect) > 0, FileError, path, ": '", key,
            "' is stored with a type that does not match its dtype '", tag, "'");
  return want;
}

StateDict read_tensors(hid_t group, const std::string& where, int64_t file_bytes,
                       const std::string& path) {
  StateDict sd;
  int64_t total = 0;
  for (const std::string& key : hard_links(group, where, path)) {
    H5 ds(DPT_H5(H5Oopen(group, key.c_str(), H5P_DEFAULT), path, "cannot open '", key, "'"),
          H5Oclose);
    DPT_CHECK(H5Iget_type(ds) == H5I_DATASET, FileError, path, ": '", where, "/", key,
              "' is not a dataset");
    H5 type(H5Dget_type(ds), H5Tclose);
    const DType dt = dataset_dtype(ds, type, key, path);
    H5 space(H5Dget_space(ds), H5Sclose);
    const H5S_class_t cls = H5Sget_simple_extent_type(space);
    DPT_CHECK(cls == H5S_SCALAR || cls == H5S_SIMPLE, FileError, path, ": '", key,
              "' has an unsupported dataspace");
    const int rank = H5Sget_simple_extent_ndims(space);
    DPT_CHECK(rank >= 0 && rank <= 8, FileError, path, ": '", key, "' has rank ", rank);
    std::vector<hsize_t> dims(static_cast<size_t>(rank));
    if (rank > 0) H5Sget_simple_extent_dims(space, dims.data(), nullptr);
    Shape shape;
    for (hsize_t d : dims) {
      DPT_CHECK(d <= hsize_t(1) << 40, FileError, path, ": '", key, "' has a dimension of ", d);
      shape.push_back(int64_t(d));
    }
    const int64_t numel = shape_numel(shape);  // overflow-checked
    const int64_t bytes = numel * int64_t(dtype_size(dt));
    DPT_CHECK(bytes <= file_bytes && total + bytes <= file_bytes, FileError, path, ": '", key,
              "' claims ", bytes, " bytes, more than the file holds");
    H5 dcpl(H5Dget_create_plist(ds), H5Pclose);
    DPT_CHECK(H5Pget_nfilters(dcpl) == 0, FileError, path, ": '", key,
              "' is compressed or filtered; dptrain checkpoints store raw data");
    const H5D_layout_t layout = H5Pget_layout(dcpl);
    DPT_CHECK(layout == H5D_CONTIGUOUS || layout == H5D_COMPACT, FileError, path, ": '", key,
              "' has an unsupported storage layout");
    DPT_CHECK(numel == 0 || int64_t(H5Dget_storage_size(ds)) == bytes, FileError, path, ": '", key,
              "' stores ", H5Dget_storage_size(ds), " bytes for ", bytes, " bytes of data");
    total += bytes;
    Tensor t(shape, dt, Device::cpu());
    if (numel > 0) {
      H5 mem = file_type(dt);
      DPT_H5(H5Dread(ds, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.raw()), path, "cannot read '", key,
             "'");
    }
    sd.entries.emplace_back(key, std::move(t));
  }
  return sd;
}

}  // namespace

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at <= s.size()) {
    size_t next = s.find(',', at);
    if (next == std::string::npos) next = s.size();
    if (next > at) out.push_back(s.substr(at, next - at));
    at = next + 1;
  }
  return out;
}

CheckpointKind parse_checkpoint_kind(const std::string& s) {
  if (s == "full") return CheckpointKind::Full;
  if (s == "weights") return CheckpointKind::Weights;
  DPT_THROW(UsageError, "unknown checkpoint kind '", s, "': expected full or weights");
}

const char* kind_name(CheckpointKind k) {
  return k == CheckpointKind::Full ? "full" : "weights";
}

void seal_checkpoint(const std::string& path) {
  Fd f(open(path.c_str(), O_RDWR | O_CLOEXEC));
  DPT_CHECK(f.fd >= 0, FileError, "cannot open ", path, ": ", errno_str());
  seal_fd(f.fd, path);
}

void verify_checkpoint(const std::string& path) {
  if (sniff_format(path) != FileFormat::Hdf5) {
    read_checkpoint(path);
    return;
  }
  Fd f(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  DPT_CHECK(f.fd >= 0, FileError, "cannot open checkpoint ", path, ": ", errno_str());
  verify_fd(f.fd, path);
}

FileFormat parse_file_format(const std::string& s) {
  if (s == "auto") return FileFormat::Auto;
  if (s == "h5" || s == "hdf5") return FileFormat::Hdf5;
  if (s == "pth" || s == "pt") return FileFormat::Pth;
  if (s == "safetensors") return FileFormat::Safetensors;
  DPT_THROW(UsageError, "unknown format '", s, "': expected auto, h5, pth or safetensors");
}

const char* format_name(FileFormat f) {
  switch (f) {
    case FileFormat::Auto:
      return "auto";
    case FileFormat::Hdf5:
      return "h5";
    case FileFormat::Pth:
      return "pth";
    case FileFormat::Safetensors:
      return "safetensors";
  }
  return "?";
}

FileFormat sniff_format(const std::string& path) {
  ReadFile f(path);
  DPT_CHECK(f.size() > 0, FileError, path, " is empty");
  unsigned char b[16] = {};
  f.read(0, b, uint64_t(std::min<int64_t>(f.size(), 16)), "its first bytes");
  if (f.size() >= 16 && header_digest(b)) return FileFormat::Hdf5;
  if (f.size() >= 8 && std::memcmp(b, "\x89HDF\r\n\x1a\n", 8) == 0) return FileFormat::Hdf5;
  if (f.size() >= 4 && b[0] == 'P' && b[1] == 'K') return FileFormat::Pth;
  if (f.size() >= 9 && b[8] == '{') return FileFormat::Safetensors;
  if (b[0] == 0x80) return FileFormat::Pth;  // a bare pickle: read_pth explains
  // Damaged beyond recognition: the extension says which reader explains the problem.
  if (format_for_extension(path) != FileFormat::Hdf5) return format_for_extension(path);
  DPT_THROW(FileError, path,
            " is neither a dptrain checkpoint (HDF5), a torch.save file (.pth) nor a "
            "safetensors file");
}

FileFormat format_for_extension(const std::string& path) {
  std::string ext = fs::path(path).extension().string();
  for (char& ch : ext) ch = char(std::tolower(static_cast<unsigned char>(ch)));
  if (ext == ".pt" || ext == ".pth" || ext == ".pkl" || ext == ".bin") return FileFormat::Pth;
  if (ext == ".safetensors") return FileFormat::Safetensors;
  return FileFormat::Hdf5;
}

Checkpoint read_checkpoint(const std::string& path, FileFormat format) {
  switch (format == FileFormat::Auto ? sniff_format(path) : format) {
    case FileFormat::Pth:
      return read_pth(path);
    case FileFormat::Safetensors:
      return read_safetensors(path);
    default:
      return read_hdf5(path);
  }
}

void write_checkpoint(const Checkpoint& c, const std::string& path, FileFormat format) {
  switch (format == FileFormat::Auto ? format_for_extension(path) : format) {
    case FileFormat::Pth:
      return write_pth(c, path);
    case FileFormat::Safetensors:
      return write_safetensors(c, path);
    default:
      return write_hdf5(c, path);
  }
}

void write_hdf5(const Checkpoint& c, const std::string& path) {
  hdf5_settings();
  uint64_t bytes = 1 << 20;
  for (const StateDict* sd : {&c.state, &c.momentum})
    for (auto& [k, t] : sd->entries) bytes += t.nbytes() + 4096;
  atomic_save(path, bytes, [&](const std::string& tmp) {
    const std::vector<Placement> places = write_structure(c, tmp, path);
    Fd f(open(tmp.c_str(), O_RDWR | O_CLOEXEC));
    struct stat st {};
    DPT_CHECK(f.fd >= 0 && fstat(f.fd, &st) == 0, FileError, "cannot save ", path, ": ",
              errno_str());
    std::vector<Tensor> hosts;  // cpu copies of device tensors, alive until sealed
    std::vector<Span> spans;
    for (const Placement& p : places) {
      hosts.push_back(p.tensor->device().is_cpu() ? p.tensor->share()
                                                  : p.tensor->to(Device::cpu()));
      spans.push_back({uint64_t(p.offset), hosts.back().raw(), hosts.back().nbytes()});
    }
    std::sort(spans.begin(), spans.end(),
              [](const Span& a, const Span& b) { return a.offset < b.offset; });
    write_header(f.fd, st.st_size, path);
    Hasher digest(Digest::Xxh3);
    write_streamed(
        f.fd, tmp, st.st_size, spans, [&](const void* p, size_t n) { digest.update(p, n); }, path);
    finish_seal(f.fd, digest.final(), path);
  });
}

Checkpoint read_hdf5(const std::string& path) {
  Fd fd(open(path.c_str(), O_RDONLY | O_CLOEXEC));
  DPT_CHECK(fd.fd >= 0, FileError, "cannot open checkpoint ", path, ": ", errno_str());
  const struct stat before = verify_fd(fd.fd, path);
  hdf5_settings();
  Checkpoint c;
  c.file_bytes = int64_t(before.st_size);
  H5 f(DPT_H5(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), path, "libhdf5 cannot open it"),
       H5Fclose);
  const std::string format = read_string_attr(f, "format", path);
  DPT_CHECK(format == kFormat, FileError, path, ": format '", format, "' is not ", kFormat);
  const int64_t version = read_int_attr(f, "format_version", path);
  DPT_CHECK(version >= 1 && version <= kFormatVersion, FileError, path, ": format version ",
            version, " is newer than this dptrain reads (", kFormatVersion, "); upgrade dptrain");
  const std::string kind = read_string_attr(f, "kind", path);
  DPT_CHECK(kind == "full" || kind == "weights", FileError, path, ": unknown kind '", kind, "'");
  c.kind = kind == "full" ? CheckpointKind::Full : CheckpointKind::Weights;
  c.prefix = read_string_attr(f, "prefix", path);
  c.version = read_string_attr(f, "dptrain_version", path);
  c.saved_at = read_string_attr(f, "saved_at", path);
  c.saved_from = split_commas(read_string_attr(f, "saved_from", path));
  c.world_size = read_int_attr(f, "world_size", path);
  if (c.kind == CheckpointKind::Full) {
    try {
      c.arch = ArchSpec::from_json(parse_json_attr(f, "architecture", path));
    } catch (const ConfigError& e) {
      DPT_THROW(FileError, path, ": bad architecture description: ", e.what());
    }
  }
  std::set<std::string> seen;
  for (const std::string& name : hard_links(f, "", path)) {
    seen.insert(name);
    if (name == "model") {
      c.state = read_tensors(open_group(f, "model", path), "model", c.file_bytes, path);
    } else if (name == "optimizer") {
      H5 g = open_group(f, "optimizer", path);
      c.optimizer = parse_json_attr(g, "hyperparameters", path);
      for (const std::string& sub : hard_links(g, "optimizer", path))
        DPT_CHECK(sub == "momentum", FileError, path, ": unexpected 'optimizer/", sub, "'");
      c.momentum =
          read_tensors(open_group(g, "momentum", path), "optimizer/momentum", c.file_bytes, path);
    } else if (name == "trainer") {
      H5 g = open_group(f, "trainer", path);
      DPT_CHECK(hard_links(g, "trainer", path).empty(), FileError, path,
                ": unexpected objects in 'trainer'");
      c.trainer = parse_json_attr(g, "state", path);
    } else {
      DPT_THROW(FileError, path, ": unexpected object '", name, "' at the root");
    }
  }
  DPT_CHECK(seen.count("model"), FileError, path, ": no 'model' group");
  // libhdf5 opened the file by name: it must still be the file whose digest was checked.
  struct stat after {};
  DPT_CHECK(fstat(fd.fd, &after) == 0 && stat(path.c_str(), &after) == 0 &&
                after.st_ino == before.st_ino && after.st_size == before.st_size &&
                after.st_mtim.tv_sec == before.st_mtim.tv_sec &&
                after.st_mtim.tv_nsec == before.st_mtim.tv_nsec,
            FileError, path, " changed while it was being read");
  const std::string prefix = wrapper_prefix(keys_of(c.state));
  DPT_CHECK(prefix == c.prefix, FileError, path, ": keys carry prefix '", prefix,
            "' but the file records '", c.prefix, "'");
  return c;
}

Checkpoint make_checkpoint(Module& model, CheckpointKind kind) {
  Checkpoint c;
  c.kind = kind;
  c.state = model.state_dict();
  c.prefix = wrapper_prefix(keys_of(c.state));
  if (kind == CheckpointKind::Full) {
    DPT_CHECK(model.arch() != nullptr, ConfigError,
              "this model has no architecture description, so only its weights can be saved "
              "(kind weights)");
    c.arch = *model.arch();
  }
  c.saved_from = {model.device().str()};
  return c;
}

void save(Module& model, const std::string& path, CheckpointKind kind) {
  write_checkpoint(make_checkpoint(model, kind), path);
}

LoadedModel load_model(const std::string& path, const std::vector<Device>& devices,
                       const ModelWrapper& wrap) {
  DPT_CHECK(!devices.empty(), UsageError, "load_model needs at least one device");
  LoadedModel out;
  out.checkpoint = read_checkpoint(path);
  DPT_CHECK(out.checkpoint.kind == CheckpointKind::Full && out.checkpoint.arch, ConfigError, path,
            " holds weights only, without an architecture: define the model (--model and its "
            "options) and load the weights into it");
  std::unique_ptr<Module> m = make_model(*out.checkpoint.arch, 0);
  m->to(devices[0]);
  out.load = load_normalized(*m, out.checkpoint.state, true);
  if (devices.size() > 1) {
    DPT_CHECK(wrap != nullptr, UsageError, "loading onto ", devices.size(),
              " devices needs a data-parallel wrapper");
    m = wrap(std::move(m), *out.checkpoint.arch, devices);
  }
  out.model = std::move(m);
  return out;
}

StateDict load_state_dict(const std::string& path) {
  return read_checkpoint(path).state;
}

}  // namespace dpt

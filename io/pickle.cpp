#include "io/pickle.h"

#include <cstring>
#include <map>
#include <unordered_map>

#include "core/error.h"

namespace dpt {

namespace {

using K = PyObj::Kind;

constexpr size_t kMaxDims = 16;
constexpr size_t kMaxGlobal = 256;

// Opcodes this reader refuses, named for the error message.
const char* refused_name(unsigned char op) {
  switch (op) {
    case 'i':
      return "INST";
    case 'o':
      return "OBJ";
    case 0x81:
      return "NEWOBJ";
    case 0x92:
      return "NEWOBJ_EX";
    case 0x82:
      return "EXT1";
    case 0x83:
      return "EXT2";
    case 0x84:
      return "EXT4";
    case 'P':
      return "PERSID";
    case 'I':
      return "INT";
    case 'L':
      return "LONG";
    case 0x8b:
      return "LONG4";
    case 'S':
      return "STRING";
    case 'V':
      return "UNICODE";
    case 'F':
      return "FLOAT";
    case 'T':
      return "BINSTRING";
    case 'U':
      return "SHORT_BINSTRING";
    case 'g':
      return "GET";
    case 'p':
      return "PUT";
    case '0':
      return "POP";
    case '1':
      return "POP_MARK";
    case '2':
      return "DUP";
    case 0x8f:
      return "EMPTY_SET";
    case 0x90:
      return "ADDITEMS";
    case 0x91:
      return "FROZENSET";
    case 0x96:
      return "BYTEARRAY8";
    case 0x97:
      return "NEXT_BUFFER";
    case 0x98:
      return "READONLY_BUFFER";
    default:
      return "unknown";
  }
}

// Storage types: name, bytes per element.
const std::map<std::string, size_t>& storage_types() {
  static const std::map<std::string, size_t> m{
      {"FloatStorage", 4},  {"HalfStorage", 2}, {"BFloat16Storage", 2}, {"LongStorage", 8},
      {"DoubleStorage", 8}, {"IntStorage", 4},  {"ShortStorage", 2},    {"CharStorage", 1},
      {"ByteStorage", 1},   {"BoolStorage", 1}};
  return m;
}

bool allowed_global(const std::string& name) {
  if (name == "collections.OrderedDict" || name == "torch._utils._rebuild_tensor_v2" ||
      name == "torch._utils._rebuild_parameter")
    return true;
  return name.rfind("torch.", 0) == 0 && storage_types().count(name.substr(6)) > 0;
}

class Unpickler {
 public:
  Unpickler(const std::string& b, const std::string& where, Pickle& out)
      : b_(b), where_(where), out_(out) {}

  PyObj* run() {
    while (true) {
      DPT_CHECK(pos_ < b_.size(), FileError, where_, ": the pickle ends without STOP");
      const size_t at = pos_;
      const unsigned char op = byte();
      switch (op) {
        case 0x80: {  // PROTO
          const int v = byte();
          DPT_CHECK(v <= 5, FileError, where_, ": pickle protocol ", v, " is unknown");
          break;
        }
        case 0x95:  // FRAME: a length hint only
          take(8);
          break;
        case '.':  // STOP
          DPT_CHECK(stack_.size() == 1 && marks_.empty(), FileError, where_,
                    ": the pickle stops with ", stack_.size(), " values on its stack");
          return stack_.back();
        case '(':
          marks_.push_back(stack_.size());
          break;
        case '}':
          push(make(K::Dict));
          break;
        case ']':
          push(make(K::List));
          break;
        case ')':
          push(make(K::Tuple));
          break;
        case 'N':
          push(make(K::None));
          break;
        case 0x88:
        case 0x89: {
          PyObj* o = make(K::Bool);
          o->i = op == 0x88;
          push(o);
          break;
        }
        case 'J':
          push_int(int32_t(le(4)));
          break;
        case 'K':
          push_int(int64_t(le(1)));
          break;
        case 'M':
          push_int(int64_t(le(2)));
          break;
        case 0x8a: {  // LONG1: little-endian two's complement of n bytes
          const size_t n = byte();
          DPT_CHECK(n <= 8, FileError, where_, ": integer of ", n, " bytes at byte ", at,
                    " is too large for a state dict");
          uint64_t v = n ? le(n) : 0;
          if (n > 0 && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t(0) << (8 * n);
          push_int(int64_t(v));
          break;
        }
        case 'G': {  // BINFLOAT: big-endian double
          uint64_t v = 0;
          for (unsigned char c : take(8)) v = (v << 8) | c;
          PyObj* o = make(K::Float);
          std::memcpy(&o->f, &v, 8);
          push(o);
          break;
        }
        case 'X':
          push_str(K::Str, le(4));
          break;
        case 0x8c:
          push_str(K::Str, le(1));
          break;
        case 0x8d:
          push_str(K::Str, le(8));
          break;
        case 'B':
          push_str(K::Bytes, le(4));
          break;
        case 'C':
          push_str(K::Bytes, le(1));
          break;
        case 0x8e:
          push_str(K::Bytes, le(8));
          break;
        case 't': {
          PyObj* o = make(K::Tuple);
          o->items = pop_mark();
          push(o);
          break;
        }
        case 0x85:
        case 0x86:
        case 0x87: {
          const size_t n = size_t(op - 0x84);
          need(n);
          PyObj* o = make(K::Tuple);
          o->items.assign(stack_.end() - long(n), stack_.end());
          stack_.resize(stack_.size() - n);
          push(o);
          break;
        }
        case 'l': {
          PyObj* o = make(K::List);
          o->items = pop_mark();
          push(o);
          break;
        }
        case 'd': {
          std::vector<PyObj*> kv = pop_mark();
          PyObj* o = make(K::Dict);
          set_items(o, kv);
          push(o);
          break;
        }
        case 'a': {
          need(2);
          PyObj* v = pop();
          container(K::List, "APPEND")->items.push_back(v);
          break;
        }
        case 'e': {
          std::vector<PyObj*> vs = pop_mark();
          PyObj* l = container(K::List, "APPENDS");
          l->items.insert(l->items.end(), vs.begin(), vs.end());
          break;
        }
        case 's': {
          need(3);
          PyObj* v = pop();
          PyObj* k = pop();
          std::vector<PyObj*> kv{k, v};
          set_items(container(K::Dict, "SETITEM"), kv);
          break;
        }
        case 'u': {
          std::vector<PyObj*> kv = pop_mark();
          set_items(container(K::Dict, "SETITEMS"), kv);
          break;
        }
        case 'q':
          put(le(1));
          break;
        case 'r':
          put(le(4));
          break;
        case 0x94:
          put(memo_.size());
          break;
        case 'h':
          get(le(1));
          break;
        case 'j':
          get(le(4));
          break;
        case 'c': {  // GLOBAL module\nname\n
          std::string module = line(), name = line();
          push(global(module + "." + name));
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          need(2);
          PyObj* name = pop();
          PyObj* module = pop();
          DPT_CHECK(module->kind == K::Str && name->kind == K::Str, FileError, where_,
                    ": STACK_GLOBAL at byte ", at, " names a non-string");
          push(global(module->s + "." + name->s));
          break;
        }
        case 'Q':  // BINPERSID
          need(1);
          push(storage(pop()));
          break;
        case 'R': {  // REDUCE
          need(2);
          PyObj* args = pop();
          PyObj* fn = pop();
          push(reduce(fn, args));
          break;
        }
        case 'b': {  // BUILD: only the attributes of an OrderedDict (e.g. _metadata), ignored
          need(2);
          PyObj* state = pop();
          DPT_CHECK(
              stack_.back()->kind == K::Dict && (state->kind == K::Dict || state->kind == K::None),
              FileError, where_, ": BUILD at byte ", at, " sets the state of a ",
              kind_name(stack_.back()->kind), "; only dict attributes are allowed");
          break;
        }
        default:
          DPT_THROW(FileError, where_, ": refused pickle opcode ", refused_name(op), " (0x",
                    "0123456789abcdef"[op >> 4], "0123456789abcdef"[op & 15], ") at byte ", at,
                    ": a state dict never needs it, so the file is refused and nothing in it "
                    "was executed");
      }
    }
  }

 private:
  unsigned char byte() {
    DPT_CHECK(pos_ < b_.size(), FileError, where_, ": the pickle is truncated");
    return static_cast<unsigned char>(b_[pos_++]);
  }
  std::string_view take(uint64_t n) {
    DPT_CHECK(n <= b_.size() - pos_, FileError, where_, ": the pickle is truncated (", n,
              " bytes wanted at byte ", pos_, ")");
    std::string_view v(b_.data() + pos_, size_t(n));
    pos_ += size_t(n);
    return v;
  }
  uint64_t le(size_t n) {
    uint64_t v = 0;
    std::string_view s = take(n);
    for (size_t i = n; i-- > 0;) v = (v << 8) | static_cast<unsigned char>(s[i]);
    return v;
  }
  std::string line() {
    const size_t end = b_.find('\n', pos_);
    DPT_CHECK(end != std::string::npos && end - pos_ <= kMaxGlobal, FileError, where_,
              ": malformed GLOBAL at byte ", pos_);
    std::string s = b_.substr(pos_, end - pos_);
    pos_ = end + 1;
    return s;
  }
  PyObj* make(K k) {
    out_.arena.push_back(std::make_unique<PyObj>());
    out_.arena.back()->kind = k;
    return out_.arena.back().get();
  }
  void push(PyObj* o) { stack_.push_back(o); }
  void push_int(int64_t v) {
    PyObj* o = make(K::Int);
    o->i = v;
    push(o);
  }
  void push_str(K k, uint64_t n) {
    PyObj* o = make(k);
    o->s = std::string(take(n));
    push(o);
  }
  void need(size_t n) {
    const size_t floor = marks_.empty() ? 0 : marks_.back();
    DPT_CHECK(stack_.size() >= floor + n, FileError, where_, ": pickle stack underflow at byte ",
              pos_ - 1);
  }
  PyObj* pop() {
    PyObj* o = stack_.back();
    stack_.pop_back();
    return o;
  }
  std::vector<PyObj*> pop_mark() {
    DPT_CHECK(!marks_.empty(), FileError, where_, ": pickle MARK missing at byte ", pos_ - 1);
    const size_t m = marks_.back();
    marks_.pop_back();
    std::vector<PyObj*> v(stack_.begin() + long(m), stack_.end());
    stack_.resize(m);
    return v;
  }
  PyObj* container(K k, const char* op) {
    need(1);
    PyObj* c = stack_.back();
    DPT_CHECK(c->kind == k, FileError, where_, ": ", op, " at byte ", pos_ - 1, " on a ",
              kind_name(c->kind));
    return c;
  }
  void set_items(PyObj* d, const std::vector<PyObj*>& kv) {
    DPT_CHECK(kv.size() % 2 == 0, FileError, where_, ": odd number of dict items");
    for (size_t i = 0; i < kv.size(); i += 2) {
      const K kk = kv[i]->kind;
      DPT_CHECK(kk == K::Str || kk == K::Int || kk == K::Bool || kk == K::None || kk == K::Float,
                FileError, where_, ": dict key of type ", kind_name(kk), " is not supported");
      bool replaced = false;
      for (auto& [k, v] : d->dict)
        if (k->kind == kk && k->s == kv[i]->s && k->i == kv[i]->i && k->f == kv[i]->f) {
          v = kv[i + 1];
          replaced = true;
        }
      if (!replaced) d->dict.emplace_back(kv[i], kv[i + 1]);
    }
  }
  void put(uint64_t idx) {
    need(1);
    memo_[idx] = stack_.back();
  }
  void get(uint64_t idx) {
    auto it = memo_.find(idx);
    DPT_CHECK(it != memo_.end(), FileError, where_, ": memo entry ", idx, " used before set");
    push(it->second);
  }
  PyObj* global(const std::string& name) {
    DPT_CHECK(allowed_global(name), FileError, where_, ": refused global '", name,
              "': a state dict needs only tensors, dicts, lists, tuples, strings and numbers, "
              "so the file is refused and nothing in it was executed");
    PyObj* o = make(K::Global);
    o->s = name;
    return o;
  }
  int64_t int_of(const PyObj* o, const char* what) {
    DPT_CHECK(o->kind == K::Int, FileError, where_, ": ", what, " is a ", kind_name(o->kind),
              ", not an integer");
    return o->i;
  }
  // ('storage', torch.<Type>Storage, key, location, numel)
  PyObj* storage(PyObj* pid) {
    const auto& t = pid->items;
    DPT_CHECK(pid->kind == K::Tuple && t.size() == 5 && t[0]->kind == K::Str &&
                  t[0]->s == "storage" && t[1]->kind == K::Global && t[2]->kind == K::Str &&
                  t[3]->kind == K::Str,
              FileError, where_, ": malformed storage reference");
    DPT_CHECK(t[1]->s.rfind("torch.", 0) == 0 && storage_types().count(t[1]->s.substr(6)),
              FileError, where_, ": '", t[1]->s, "' is not a storage type");
    const std::string& key = t[2]->s;
    DPT_CHECK(!key.empty() && key.size() <= 64 && key.find('/') == std::string::npos &&
                  key != "." && key != "..",
              FileError, where_, ": bad storage key '", key, "'");
    PyObj* o = make(K::Storage);
    o->storage_type = t[1]->s.substr(6);
    o->s = key;
    o->location = t[3]->s;
    o->i = int_of(t[4], "a storage's element count");
    DPT_CHECK(o->i >= 0 && uint64_t(o->i) <= (uint64_t(1) << 60), FileError, where_, ": storage ",
              key, " claims ", o->i, " elements");
    return o;
  }
  PyObj* reduce(PyObj* fn, PyObj* args) {
    DPT_CHECK(fn->kind == K::Global && args->kind == K::Tuple, FileError, where_,
              ": REDUCE at byte ", pos_ - 1, " calls a ", kind_name(fn->kind));
    const auto& a = args->items;
    if (fn->s == "collections.OrderedDict") {
      PyObj* d = make(K::Dict);
      DPT_CHECK(a.empty(), FileError, where_, ": OrderedDict built from arguments");
      return d;
    }
    if (fn->s == "torch._utils._rebuild_parameter") {
      DPT_CHECK(a.size() == 3 && a[0]->kind == K::Tensor, FileError, where_,
                ": malformed _rebuild_parameter");
      return a[0];
    }
    if (fn->s == "torch._utils._rebuild_tensor_v2") return tensor(a);
    DPT_THROW(FileError, where_, ": '", fn->s,
              "' may only name a storage type, not be called: the file is refused and nothing in "
              "it was executed");
  }
  // _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])
  PyObj* tensor(const std::vector<PyObj*>& a) {
    DPT_CHECK((a.size() == 6 || a.size() == 7) && a[0]->kind == K::Storage &&
                  a[2]->kind == K::Tuple && a[3]->kind == K::Tuple &&
                  a[2]->items.size() == a[3]->items.size() && a[2]->items.size() <= kMaxDims,
              FileError, where_, ": malformed _rebuild_tensor_v2 arguments");
    PyObj* o = make(K::Tensor);
    o->items = {a[0]};
    o->i = int_of(a[1], "a tensor's storage offset");
    // The highest element index is offset + sum((size - 1) * stride); all of it must exist.
    uint64_t last = uint64_t(std::max<int64_t>(o->i, 0)), numel = 1, span = 0;
    bool overflow = o->i < 0;
    for (size_t d = 0; d < a[2]->items.size(); ++d) {
      const int64_t n = int_of(a[2]->items[d], "a tensor size"),
                    s = int_of(a[3]->items[d], "a tensor stride");
      o->size.push_back(n);
      o->stride.push_back(s);
      overflow |= n < 0 || s < 0;
      if (overflow) continue;
      overflow |= __builtin_mul_overflow(numel, uint64_t(n), &numel) || numel > (1ull << 60);
      if (n > 0)
        overflow |= __builtin_mul_overflow(uint64_t(n - 1), uint64_t(s), &span) ||
                    __builtin_add_overflow(last, span, &last);
    }
    DPT_CHECK(!overflow, FileError, where_, ": a tensor of size ", shape_str(o->size),
              " and stride ", shape_str(o->stride), " is impossible");
    DPT_CHECK(numel == 0 || last < uint64_t(a[0]->i), FileError, where_, ": a tensor of size ",
              shape_str(o->size), " at offset ", o->i, " needs more than the ", a[0]->i,
              " elements of storage ", a[0]->s);
    return o;
  }

  const std::string& b_;
  const std::string& where_;
  Pickle& out_;
  size_t pos_ = 0;
  std::vector<PyObj*> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, PyObj*> memo_;
};

// ---- writing -----------------------------------------------------------------------------

void op_int(std::string& p, int64_t v) {
  if (v >= 0 && v < 256) {
    p += 'K';
    p += char(v);
  } else if (v >= 0 && v < 65536) {
    p += 'M';
    p += char(v & 0xff);
    p += char(v >> 8);
  } else if (v >= INT32_MIN && v <= INT32_MAX) {
    p += 'J';
    for (int i = 0; i < 4; ++i) p += char((uint32_t(v) >> (8 * i)) & 0xff);
  } else {
    p += char(0x8a);
    p += char(8);
    for (int i = 0; i < 8; ++i) p += char((uint64_t(v) >> (8 * i)) & 0xff);
  }
}

void op_str(std::string& p, const std::string& s) {
  p += 'X';
  for (int i = 0; i < 4; ++i) p += char((uint32_t(s.size()) >> (8 * i)) & 0xff);
  p += s;
}

void op_tuple(std::string& p, const std::vector<int64_t>& v) {
  if (v.empty()) {
    p += ')';
    return;
  }
  if (v.size() > 3) p += '(';
  for (int64_t x : v) op_int(p, x);
  p += v.size() > 3 ? 't' : char(0x84 + v.size());
}

}  // namespace

const char* kind_name(PyObj::Kind k) {
  switch (k) {
    case K::None:
      return "None";
    case K::Bool:
      return "bool";
    case K::Int:
      return "int";
    case K::Float:
      return "float";
    case K::Str:
      return "str";
    case K::Bytes:
      return "bytes";
    case K::Tuple:
      return "tuple";
    case K::List:
      return "list";
    case K::Dict:
      return "dict";
    case K::Global:
      return "global";
    case K::Storage:
      return "storage";
    case K::Tensor:
      return "tensor";
  }
  return "?";
}

Pickle unpickle(const std::string& bytes, const std::string& where) {
  Pickle p;
  p.root = Unpickler(bytes, where, p).run();
  return p;
}

size_t storage_element_size(const std::string& storage_type) {
  auto it = storage_types().find(storage_type);
  return it == storage_types().end() ? 0 : it->second;
}

const char* storage_type_of(DType t) {
  switch (t) {
    case DType::F32:
      return "FloatStorage";
    case DType::F16:
      return "HalfStorage";
    case DType::BF16:
      return "BFloat16Storage";
    case DType::I64:
      return "LongStorage";
  }
  DPT_THROW(InternalError, "unknown dtype");
}

std::string pickle_state_dict(const std::vector<PickledTensor>& tensors) {
  std::string p = "\x80\x02";
  p += "ccollections\nOrderedDict\n)R";
  if (!tensors.empty()) p += '(';
  for (const PickledTensor& t : tensors) {
    op_str(p, t.key);
    p += "ctorch._utils\n_rebuild_tensor_v2\n(";
    // Persistent id: ('storage', torch.<Type>Storage, key, 'cpu', numel)
    p += '(';
    op_str(p, "storage");
    p += std::string("ctorch\n") + storage_type_of(t.dtype) + "\n";
    op_str(p, t.storage);
    op_str(p, "cpu");
    op_int(p, shape_numel(t.shape));
    p += "tQ";
    op_int(p, 0);  // storage offset
    op_tuple(p, t.shape);
    std::vector<int64_t> stride(t.shape.size());
    int64_t s = 1;
    for (size_t d = t.shape.size(); d-- > 0;) {
      stride[d] = s;
      s *= std::max<int64_t>(t.shape[d], 1);
    }
    op_tuple(p, stride);
    p += char(0x89);                       // requires_grad False
    p += "ccollections\nOrderedDict\n)R";  // backward hooks
    p += "tR";
  }
  if (!tensors.empty()) p += 'u';
  p += '.';
  return p;
}

}  // namespace dpt

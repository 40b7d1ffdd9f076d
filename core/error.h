// Typed errors and the two kinds of check.
//
// DPT_CHECK(cond, Kind, msg) is for anything a user, a file or a config can get wrong: it throws
// dpt::Kind (a dpt::Error) whose what() is "msg (file:line)". DPT_ASSERT(cond, msg) is for internal
// invariants: it throws dpt::InternalError, never aborts, so a bug still ends with one clear line.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace dpt {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// Bad flags or arguments: the CLI exits with code 2 and the usage line.
class UsageError : public Error {
  using Error::Error;
};
// Missing, unreadable or malformed files (data, checkpoints).
class FileError : public Error {
  using Error::Error;
};
// Inconsistent configuration: shapes, architecture descriptions, devices.
class ConfigError : public Error {
  using Error::Error;
};
// A device that does not exist or is unavailable here.
class DeviceError : public Error {
  using Error::Error;
};
// Numerical failure during training (NaN/Inf loss).
class NumericError : public Error {
  using Error::Error;
};
// A broken internal invariant: a bug in dptrain.
class InternalError : public Error {
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
template <typename E, typename... Args>
[[noreturn]] void fail(const char* file, int line, const Args&... args) {
  const char* base = file;
  for (const char* p = file; *p; ++p)
    if (*p == '/') base = p + 1;
  throw E(concat(args..., " (", base, ":", line, ")"));
}
}  // namespace detail

}  // namespace dpt

#define DPT_THROW(Kind, ...) ::dpt::detail::fail<::dpt::Kind>(__FILE__, __LINE__, __VA_ARGS__)
#define DPT_CHECK(cond, Kind, ...)             \
  do {                                         \
    if (!(cond)) DPT_THROW(Kind, __VA_ARGS__); \
  } while (0)
#define DPT_ASSERT(cond, ...)                                                                   \
  do {                                                                                          \
    if (!(cond)) DPT_THROW(InternalError, "internal error: ", #cond, " failed. ", __VA_ARGS__); \
  } while (0)

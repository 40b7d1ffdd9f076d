#include "apps/metrics.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace dpt {

MetricsWriter::MetricsWriter(const std::string& path) : path_(path) {
  if (path.empty()) return;
  csv_ = path.size() >= 4 && path.substr(path.size() - 4) == ".csv";
  out_.open(path, std::ios::trunc);
  DPT_CHECK(out_.good(), FileError, "cannot write metrics file ", path,
            ": check that its directory exists and is writable");
  if (csv_) out_ << "kind,step,epoch,loss,accuracy,lr,images_per_second,elapsed\n";
}

void MetricsWriter::add(const MetricRecord& r) {
  records_.push_back(r);
  if (!out_.is_open()) return;
  if (csv_) {
    out_ << r.kind << ',' << r.step << ',' << r.epoch << ',' << r.loss << ',';
    if (r.accuracy >= 0) out_ << r.accuracy;
    out_ << ',' << r.lr << ',' << r.images_per_second << ',' << r.elapsed << '\n';
  } else {
    nlohmann::json j{{"kind", r.kind},      {"step", r.step},
                     {"epoch", r.epoch},    {"loss", r.loss},
                     {"lr", r.lr},          {"images_per_second", r.images_per_second},
                     {"elapsed", r.elapsed}};
    if (r.accuracy >= 0) j["accuracy"] = r.accuracy;
    out_ << j.dump() << '\n';
  }
  out_.flush();
  DPT_CHECK(out_.good(), FileError, "writing metrics file ", path_, " failed (disk full?)");
}

std::string MetricsWriter::write_svg() const {
  if (path_.empty()) return "";
  std::string svg_path = path_.substr(0, path_.find_last_of('.')) + ".svg";
  if (svg_path == path_) svg_path += ".svg";
  std::ofstream f(svg_path, std::ios::trunc);
  f << learning_curve_svg(records_);
  DPT_CHECK(f.good(), FileError, "cannot write learning curve ", svg_path);
  return svg_path;
}

std::string learning_curve_svg(const std::vector<MetricRecord>& records) {
  const double W = 720, H = 420, L = 70, R = 70, T = 40, B = 50;
  double max_step = 1, max_loss = 1e-9;
  for (auto& r : records) {
    max_step = std::max(max_step, double(r.step));
    if (std::isfinite(r.loss)) max_loss = std::max(max_loss, r.loss);
  }
  auto x = [&](double s) { return L + (W - L - R) * s / max_step; };
  auto y_loss = [&](double v) { return T + (H - T - B) * (1 - v / max_loss); };
  auto y_acc = [&](double a) { return T + (H - T - B) * (1 - a); };
  std::ostringstream o;
  o << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H
    << "' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' "
       "fill='white'/>\n"
    << "<text x='" << W / 2
    << "' y='22' text-anchor='middle' font-size='15'>dptrain learning curve</text>\n";
  // Axes, ticks and labels.
  o << "<line x1='" << L << "' y1='" << H - B << "' x2='" << W - R << "' y2='" << H - B
    << "' stroke='black'/>\n"
    << "<line x1='" << L << "' y1='" << T << "' x2='" << L << "' y2='" << H - B
    << "' stroke='black'/>\n"
    << "<line x1='" << W - R << "' y1='" << T << "' x2='" << W - R << "' y2='" << H - B
    << "' stroke='black'/>\n";
  for (int i = 0; i <= 4; ++i) {
    double f = i / 4.0;
    o << "<text x='" << L - 6 << "' y='" << y_loss(f * max_loss) + 4 << "' text-anchor='end'>"
      << std::round(f * max_loss * 100) / 100 << "</text>\n"
      << "<text x='" << W - R + 6 << "' y='" << y_acc(f) + 4 << "'>" << int(f * 100) << "%</text>\n"
      << "<text x='" << x(f * max_step) << "' y='" << H - B + 18 << "' text-anchor='middle'>"
      << int64_t(f * max_step) << "</text>\n";
  }
  o << "<text x='" << W / 2 << "' y='" << H - 10 << "' text-anchor='middle'>step</text>\n"
    << "<text x='18' y='" << H / 2 << "' transform='rotate(-90 18 " << H / 2
    << ")' text-anchor='middle' fill='#1f77b4'>train loss</text>\n"
    << "<text x='" << W - 16 << "' y='" << H / 2 << "' transform='rotate(90 " << W - 16 << " "
    << H / 2 << ")' text-anchor='middle' fill='#d62728'>test accuracy</text>\n";
  auto polyline = [&](const char* kind, const char* colour, bool acc) {
    o << "<polyline fill='none' stroke='" << colour << "' stroke-width='2' points='";
    for (auto& r : records) {
      if (r.kind != kind || (acc && r.accuracy < 0) || !std::isfinite(r.loss)) continue;
      o << x(double(r.step)) << ',' << (acc ? y_acc(r.accuracy) : y_loss(r.loss)) << ' ';
    }
    o << "'/>\n";
    if (acc)
      for (auto& r : records)
        if (r.kind == kind && r.accuracy >= 0)
          o << "<circle cx='" << x(double(r.step)) << "' cy='" << y_acc(r.accuracy)
            << "' r='4' fill='" << colour << "'/>\n";
  };
  polyline("train", "#1f77b4", false);
  polyline("test", "#d62728", true);
  o << "</svg>\n";
  return o.str();
}

}  // namespace dpt

// Training metrics: one record per logged step or evaluation, written as JSONL or CSV (by the
// file's extension) as training goes, plus a learning-curve SVG beside it (loss and accuracy).
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

namespace dpt {

struct MetricRecord {
  std::string kind;  // "train" or "test"
  int64_t step = 0;
  double epoch = 0;  // fractional epoch
  double loss = 0;
  double accuracy = -1;  // test records only
  double lr = 0;
  double images_per_second = 0;
  double elapsed = 0;  // seconds since training started
};

class MetricsWriter {
 public:
  // path empty: records are only kept in memory. Throws FileError if the file cannot be written.
  explicit MetricsWriter(const std::string& path);
  void add(const MetricRecord& r);
  // Writes <path without extension>.svg; returns its path ("" without a metrics path).
  std::string write_svg() const;
  const std::vector<MetricRecord>& records() const { return records_; }

 private:
  std::string path_;
  bool csv_ = false;
  std::ofstream out_;
  std::vector<MetricRecord> records_;
};

// The SVG itself: train loss (left axis) and test accuracy (right axis) against steps.
std::string learning_curve_svg(const std::vector<MetricRecord>& records);

}  // namespace dpt

// The reading half of scheduler/adapters/extproc/usage.py's ResponseUsageReader, chunk by chunk
// as the response streams past: it keeps the one SSE ``data:`` line that holds a usage object, or
// a JSON body (whole up to the cap, else its tail), and hands that to Python once, at the end of
// the response, where usage_from_capture() interprets it. Same rules, same limits.
#include <cstring>

#include "transport.h"

namespace kvsched {

namespace {
constexpr size_t kTailBytes = 64 * 1024;
constexpr size_t kMaxSseLineBytes = 8 * 1024 * 1024;

// Python's bytes.isspace() set, which both \s in a bytes regex and bytes.lstrip() use.
bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

bool StartsWith(const std::string& text, size_t at, const char* prefix) {
  size_t n = std::strlen(prefix);
  return text.size() - at >= n && text.compare(at, n, prefix) == 0;
}
}  // namespace

// usage.py's _USAGE_OBJECT: "usage"\s*:\s*\{ (a usage object, not "usage": null).
bool HasUsageObject(const char* data, size_t size) {
  static const char kKey[] = "\"usage\"";
  const size_t key_size = sizeof kKey - 1;
  const char* end = data + size;
  const char* at = data;
  while (static_cast<size_t>(end - at) >= key_size) {
    const void* found = memmem(at, end - at, kKey, key_size);
    if (found == nullptr) return false;
    const char* p = static_cast<const char*>(found) + key_size;
    while (p < end && IsSpace(*p)) ++p;
    if (p < end && *p == ':') {
      ++p;
      while (p < end && IsSpace(*p)) ++p;
      if (p < end && *p == '{') return true;
    }
    at = static_cast<const char*>(found) + 1;
  }
  return false;
}

UsageCapture::UsageCapture(const std::string* content_type, size_t max_json_bytes)
    : max_json_bytes_(max_json_bytes) {
  if (content_type != nullptr && !content_type->empty()) {
    std::string lower = *content_type;
    for (char& c : lower) {
      if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    }
    sse_ = lower.find("text/event-stream") != std::string::npos ? 1 : 0;
  }
}

void UsageCapture::Feed(const std::string& chunk) {
  if (chunk.empty()) return;
  if (sse_ < 0) {
    // No content-type: an SSE stream starts with a field name, JSON with a brace.
    size_t at = 0;
    while (at < chunk.size() && IsSpace(chunk[at])) ++at;
    sse_ = StartsWith(chunk, at, "data:") || StartsWith(chunk, at, "event:") || StartsWith(chunk, at, "id:") ||
                   StartsWith(chunk, at, ":")
               ? 1
               : 0;
  }
  if (sse_ == 1) {
    FeedSse(chunk);
  } else {
    FeedJson(chunk);
  }
}

void UsageCapture::FeedJson(const std::string& chunk) {
  size_ += chunk.size();
  if (size_ <= max_json_bytes_) {
    chunks_.push_back(chunk);
    return;
  }
  if (!chunks_.empty()) {
    std::string joined;
    for (const auto& piece : chunks_) joined += piece;
    joined += chunk;
    tail_ = joined.size() > kTailBytes ? joined.substr(joined.size() - kTailBytes) : joined;
    chunks_.clear();
  } else {
    tail_ += chunk;
    if (tail_.size() > kTailBytes) tail_.erase(0, tail_.size() - kTailBytes);
  }
}

void UsageCapture::FeedSse(const std::string& chunk) {
  size_t start = 0;
  while (true) {
    size_t newline = chunk.find('\n', start);
    if (newline == std::string::npos) {
      if (start < chunk.size()) {
        if (pending_.size() + (chunk.size() - start) > kMaxSseLineBytes) {
          // Not a plausible event line; drop it rather than hold it all.
          pending_.clear();
          has_pending_ = false;
        } else {
          pending_.append(chunk, start, std::string::npos);
          has_pending_ = true;
        }
      }
      return;
    }
    std::string line = chunk.substr(start, newline - start);
    if (has_pending_) {
      pending_ += line;
      line.swap(pending_);
      pending_.clear();
      has_pending_ = false;
    }
    Line(std::move(line));
    start = newline + 1;
  }
}

void UsageCapture::Line(std::string line) {
  if (StartsWith(line, 0, "data:") && HasUsageObject(line.data(), line.size())) usage_line_ = std::move(line);
}

std::pair<UsageCapture::Kind, std::string> UsageCapture::Finish() {
  if (sse_ == 1) {
    if (has_pending_) {
      Line(std::move(pending_));
      pending_.clear();
      has_pending_ = false;
    }
    if (!usage_line_) return {kNone, ""};
    return {kSseLine, std::move(*usage_line_)};
  }
  if (!chunks_.empty()) {
    std::string joined;
    joined.reserve(size_);
    for (const auto& piece : chunks_) joined += piece;
    chunks_.clear();
    return {kJson, std::move(joined)};
  }
  if (!tail_.empty()) return {kTail, std::move(tail_)};
  return {kNone, ""};
}

}  // namespace kvsched

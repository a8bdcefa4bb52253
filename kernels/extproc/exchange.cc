// One ext_proc stream: the GIE Endpoint Picker protocol with FULL_DUPLEX_STREAMED bodies, as
// scheduler/adapters/extproc/servicer.py speaks it (message order and fallbacks are documented
// there), and the protocol-only floor the benchmark compares it with.
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>

#include "transport.h"

namespace kvsched {

namespace core = envoy::config::core::v3;
using ext_proc::ProcessingRequest;
using ext_proc::ProcessingResponse;

double MonotonicNow() {
  // The clock Python's time.monotonic() reads on Linux.
  timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<double>(now.tv_sec) + static_cast<double>(now.tv_nsec) * 1e-9;
}

// --- EventQueue ---------------------------------------------------------------------------

EventQueue::EventQueue()
    : fd_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)), timer_fd_(timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)) {}

EventQueue::~EventQueue() {
  if (fd_ >= 0) close(fd_);
  if (timer_fd_ >= 0) close(timer_fd_);
}

namespace {

bool Urgent(Event::Kind kind) {
  // Someone waits on Python's answer to these; the rest is bookkeeping that can ride along.
  return kind == Event::kDecide || kind == Event::kHealthCheck || kind == Event::kUnary;
}

void ArmTimer(int fd, double after_s) {
  itimerspec when{};
  auto ns = static_cast<long long>(after_s * 1e9);
  when.it_value.tv_sec = static_cast<time_t>(ns / 1000000000);
  when.it_value.tv_nsec = static_cast<long>(ns % 1000000000);
  timerfd_settime(fd, 0, &when, nullptr);
}

void ClearCounter(int fd) {
  uint64_t count;
  ssize_t got;
  do {
    got = read(fd, &count, sizeof count);
  } while (got < 0 && errno == EINTR);
}

}  // namespace

void EventQueue::Push(Event&& event) {
  event.at = MonotonicNow();
  bool wake = false, arm = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(std::move(event));
    if (Urgent(events_.back().kind)) {
      wake = !woken_;
      woken_ = true;
    } else if (!woken_ && !timer_armed_) {
      arm = timer_armed_ = true;
    }
  }
  // One wake-up per batch: the first urgent event writes the eventfd; bookkeeping events
  // (first bytes, ends, closes) arm the timer instead, so that those of one request, and of
  // requests close together, reach Python in one turn of its loop rather than one each.
  if (wake) {
    uint64_t one = 1;
    ssize_t written;
    do {
      written = write(fd_, &one, sizeof one);
    } while (written < 0 && errno == EINTR);
  } else if (arm) {
    ArmTimer(timer_fd_, kLazyWakeS);
  }
}

std::vector<Event> EventQueue::Take() {
  // Both counters are cleared before the queue is swapped, so an event pushed in between
  // still finds a wake-up.
  ClearCounter(fd_);
  ClearCounter(timer_fd_);
  std::vector<Event> taken;
  bool disarm;
  {
    std::lock_guard<std::mutex> lock(mu_);
    taken.swap(events_);
    woken_ = false;
    disarm = timer_armed_;
    timer_armed_ = false;
  }
  // A timer still running would only cost an empty turn; stopping it is one call.
  if (disarm) ArmTimer(timer_fd_, 0.0);
  return taken;
}

// --- AnswerQueue ---------------------------------------------------------------------------

AnswerQueue::AnswerQueue() : thread_([this] { Run(); }) {
  // Named, so per-thread CPU (benchmarks, top -H) tells it from Python's threads.
  pthread_setname_np(thread_.native_handle(), "kvsched-answers");
}

AnswerQueue::~AnswerQueue() { Stop(); }

void AnswerQueue::Post(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return;
    jobs_.push_back(std::move(job));
  }
  wake_.notify_one();
}

void AnswerQueue::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
  }
  wake_.notify_one();
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

void AnswerQueue::Run() {
  while (true) {
    std::deque<std::function<void()>> batch;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [this] { return stopping_ || !jobs_.empty(); });
      if (jobs_.empty()) return;
      batch.swap(jobs_);
    }
    for (auto& job : batch) job();
  }
}

// --- answers ------------------------------------------------------------------------------

std::string HeaderSafe(const std::string& value) {
  // Envoy rejects a mutation whose value holds control characters (and fails the request).
  // Byte-wise is the same as responses.py's character-wise rule: in UTF-8 no byte of a
  // multi-byte character is below 0x80.
  std::string clean = value;
  for (char& c : clean) {
    auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f) c = ' ';
  }
  return clean;
}

static void SetHeader(ext_proc::HeaderMutation* mutation, const std::string& key, const std::string& value) {
  core::HeaderValueOption* option = mutation->add_set_headers();
  option->mutable_header()->set_key(key);
  option->mutable_header()->set_raw_value(HeaderSafe(value));
  // Replace a client-sent value: a request must not pick its own pod.
  option->set_append_action(core::HeaderValueOption::OVERWRITE_IF_EXISTS_OR_ADD);
}

ProcessingResponse RouteHeadersResponse(const std::string& destination, std::optional<size_t> content_length,
                                        const HeaderList& extra, const ScoreList& scores) {
  ProcessingResponse response;
  ext_proc::CommonResponse* common = response.mutable_request_headers()->mutable_response();
  ext_proc::HeaderMutation* mutation = common->mutable_header_mutation();
  SetHeader(mutation, kDestinationHeader, destination);
  if (content_length) SetHeader(mutation, "content-length", std::to_string(*content_length));
  for (const auto& [key, value] : extra) SetHeader(mutation, key, value);
  common->set_clear_route_cache(true);
  // The header and the envoy.lb metadata carry the same value (GIE protocol).
  auto& namespaces = *response.mutable_dynamic_metadata()->mutable_fields();
  auto& fields = *namespaces[kDestinationNamespace].mutable_struct_value()->mutable_fields();
  fields[kDestinationHeader].set_string_value(destination);
  if (!scores.empty()) {
    auto& scored = *fields[kScoresKey].mutable_struct_value()->mutable_fields();
    for (const auto& [address, score] : scores) scored[address].set_number_value(score);
  }
  return response;
}

static ProcessingResponse BodyChunk(const char* data, size_t size, bool end_of_stream, bool request) {
  ProcessingResponse response;
  ext_proc::BodyResponse* body = request ? response.mutable_request_body() : response.mutable_response_body();
  ext_proc::StreamedBodyResponse* streamed =
      body->mutable_response()->mutable_body_mutation()->mutable_streamed_response();
  streamed->set_body(data, size);
  streamed->set_end_of_stream(end_of_stream);
  return response;
}

void AppendBodyChunks(std::deque<ProcessingResponse>* out, const std::string& body, size_t chunk_bytes,
                      bool end_of_stream, bool request) {
  if (body.empty()) {
    out->push_back(BodyChunk("", 0, end_of_stream, request));
    return;
  }
  for (size_t start = 0; start < body.size(); start += chunk_bytes) {
    size_t stop = std::min(start + chunk_bytes, body.size());
    out->push_back(BodyChunk(body.data() + start, stop - start, end_of_stream && stop == body.size(), request));
  }
}

static ProcessingResponse RequestBodyContinue() {
  ProcessingResponse response;
  response.mutable_request_body();
  return response;
}

static ProcessingResponse ResponseBodyContinue() {
  ProcessingResponse response;
  response.mutable_response_body();
  return response;
}

static ProcessingResponse ResponseHeadersContinue() {
  ProcessingResponse response;
  response.mutable_response_headers();
  return response;
}

static ProcessingResponse RequestTrailersContinue() {
  ProcessingResponse response;
  response.mutable_request_trailers();
  return response;
}

static ProcessingResponse ResponseTrailersContinue() {
  ProcessingResponse response;
  response.mutable_response_trailers();
  return response;
}

// --- metadata and headers -----------------------------------------------------------------

// headers.py's _addresses: a list of strings, or one comma-separated string; blanks dropped.
static std::vector<std::string> Addresses(const google::protobuf::Value& value) {
  std::vector<std::string> items;
  auto add = [&items](const std::string& raw) {
    size_t begin = raw.find_first_not_of(" \t\r\n\v\f");
    if (begin == std::string::npos) return;
    size_t end = raw.find_last_not_of(" \t\r\n\v\f");
    items.push_back(raw.substr(begin, end - begin + 1));
  };
  if (value.kind_case() == google::protobuf::Value::kListValue) {
    for (const auto& item : value.list_value().values()) {
      if (item.kind_case() == google::protobuf::Value::kStringValue) add(item.string_value());
    }
  } else if (value.kind_case() == google::protobuf::Value::kStringValue) {
    const std::string& joined = value.string_value();
    size_t start = 0;
    while (true) {
      size_t comma = joined.find(',', start);
      add(joined.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  return items;
}

static const google::protobuf::Value* MetadataValue(const core::Metadata& metadata, const char* space,
                                                    const char* key) {
  auto found = metadata.filter_metadata().find(space);
  if (found == metadata.filter_metadata().end()) return nullptr;
  auto field = found->second.fields().find(key);
  return field == found->second.fields().end() ? nullptr : &field->second;
}

static std::string Lower(const std::string& key) {
  std::string lower = key;
  for (char& c : lower) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return lower;
}

// headers.py's header_dict, restricted to ``wanted``: raw_value when set (Envoy's), else value;
// a repeated name's values joined with commas.
static void CollectHeaders(const core::HeaderMap& map, const std::unordered_set<std::string>& wanted,
                           HeaderList* out) {
  for (const core::HeaderValue& header : map.headers()) {
    std::string key = Lower(header.key());
    if (!wanted.count(key)) continue;
    const std::string& value = header.raw_value().empty() ? header.value() : header.raw_value();
    bool merged = false;
    for (auto& [seen, joined] : *out) {
      if (seen == key) {
        joined += ',';
        joined += value;
        merged = true;
        break;
      }
    }
    if (!merged) out->emplace_back(std::move(key), value);
  }
}

// --- OrderedStream -------------------------------------------------------------------------

void OrderedStream::Pump() {
  while (true) {
    ProcessingResponse* next = nullptr;
    bool finish = false;
    grpc::Status status;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_ || writing_) return;
      if (!outbox_.empty()) {
        writing_ = true;
        next = &outbox_.front();
      } else if (finish_when_drained_) {
        finished_ = true;
        finish = true;
        status = final_status_;
      } else {
        return;
      }
    }
    if (next != nullptr) {
      StartWrite(next);
      return;
    }
    if (finish) {
      Finish(status);
      return;
    }
  }
}

void OrderedStream::OnWriteDone(bool ok) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    outbox_.pop_front();
    if (!ok) {
      // The stream broke (cancelled, peer gone): nothing more can be written.
      outbox_.clear();
      finish_when_drained_ = true;
    }
  }
  Pump();
}

// --- Exchange (kvsched) --------------------------------------------------------------------

Exchange::Exchange(Transport* transport, uint64_t id) : transport_(transport), id_(id) {}

void Exchange::Start() { StartRead(&request_); }

void Exchange::Count(const char* outcome) {
  Event event{Event::kCount, id_};
  event.text = outcome;
  transport_->events().Push(std::move(event));
}

void Exchange::Queue(ProcessingResponse&& response) {
  if (!observing_) outbox_.push_back(std::move(response));
}

void Exchange::OnReadDone(bool ok) {
  // Pump() may finish the stream and OnDone() drop the registry's reference: hold one here.
  std::shared_ptr<Exchange> self = shared_from_this();
  if (!ok) {
    // The gateway half-closed (or the stream broke): finish once the answers owed are out,
    // and, when Python is deciding, once it has answered.
    {
      std::lock_guard<std::mutex> lock(mu_);
      read_closed_ = true;
      if (!asked_ || answered_) finish_when_drained_ = true;
    }
    Pump();
    return;
  }
  Handle();
  Pump();
  bool more;
  {
    std::lock_guard<std::mutex> lock(mu_);
    more = !finished_ && !finish_when_drained_;
  }
  if (more) StartRead(&request_);
}

void Exchange::Handle() {
  const ProcessingRequest& message = request_;
  std::lock_guard<std::mutex> lock(mu_);
  if (finished_ || finish_when_drained_) return;
  if (message.has_protocol_config()) {
    // Envoy >= 1.33 states its body modes; outside FULL_DUPLEX_STREAMED the request is routed on
    // its headers and bodies get a plain continue (servicer.py's module docstring).
    const auto& config = message.protocol_config();
    duplex_request_ = config.request_body_mode() == envoy::extensions::filters::http::ext_proc::v3::
                                                        ProcessingMode::FULL_DUPLEX_STREAMED;
    duplex_response_ = config.response_body_mode() == envoy::extensions::filters::http::ext_proc::v3::
                                                          ProcessingMode::FULL_DUPLEX_STREAMED;
    response_elsewhere_ =
        config.response_body_mode() == envoy::extensions::filters::http::ext_proc::v3::ProcessingMode::NONE;
  }
  if (message.observability_mode() && !observing_) {
    // Nothing is decided on an observation stream: its end needs no release unless the
    // request headers named a routed request (OBSERVE), which Python then tracks by stream.
    // (A refused request's local reply reaches it as response headers alone.)
    observing_ = true;
    asked_ = answered_ = true;
  }
  if (message.has_metadata_context()) ReadMetadata(message.metadata_context());
  switch (message.request_case()) {
    case ProcessingRequest::kRequestHeaders:
      RequestHeaders(message.request_headers());
      break;
    case ProcessingRequest::kRequestBody:
      RequestBody(message.request_body());
      break;
    case ProcessingRequest::kRequestTrailers:
      if (!asked_) {
        body_end_ = false;
        AskPython(false);
      }
      if (asked_ && !answered_) {
        after_answer_.push_back(RequestTrailersContinue());
      } else if (!python_done_ || routed_) {
        Queue(RequestTrailersContinue());
      }
      break;
    case ProcessingRequest::kResponseHeaders:
      response_seen_ = true;
      ResponseHeaders(message.response_headers());
      break;
    case ProcessingRequest::kResponseBody:
      response_seen_ = true;
      ResponseBody(message.response_body());
      break;
    case ProcessingRequest::kResponseTrailers:
      response_seen_ = true;
      Complete();
      Queue(ResponseTrailersContinue());
      break;
    default:
      Count("unexpected_message");
  }
}

void Exchange::ReadMetadata(const core::Metadata& metadata) {
  if (!asked_) {
    if (const auto* value = MetadataValue(metadata, kSubsetNamespace, kSubsetKey)) subset_ = Addresses(*value);
  } else if (const auto* value = MetadataValue(metadata, kDestinationNamespace, kServedKey)) {
    std::vector<std::string> addresses = Addresses(*value);
    if (!addresses.empty()) served_ = addresses.front();
  }
}

void Exchange::RequestHeaders(const ext_proc::HttpHeaders& headers) {
  headers_seen_ = true;
  headers_at_ = MonotonicNow();
  hint_headers_.clear();
  CollectHeaders(headers.headers(), transport_->options().hint_headers, &hint_headers_);
  if (observing_) {
    // The response phase of a request routed on another stream: Python finds it by this id,
    // and everything after is reported as for a request routed here.
    Event event{Event::kObserve, id_};
    for (const auto& [key, value] : hint_headers_) {
      if (key == kRoutedHeader && !value.empty()) {
        event.text = value;
        event.flag = true;
      }
    }
    routed_ = true;
    transport_->events().Push(std::move(event));
    return;
  }
  if (headers.end_of_stream() || !duplex_request_) AskPython(false);
}

void Exchange::RequestBody(const ext_proc::HttpBody& body) {
  if (too_large_) return;  // the rest of a body being refused (413) is not kept
  if (asked_) {
    if (duplex_request_) {
      // Body after the end of the body (or after a refusal): a protocol slip, counted.
      Count("unexpected_message");
    } else if (!answered_) {
      after_answer_.push_back(RequestBodyContinue());
    } else {
      Queue(RequestBodyContinue());
    }
    return;
  }
  ++body_messages_;
  const std::string& chunk = body.body();
  if (!chunk.empty()) {
    if (body_.size() + chunk.size() > transport_->options().max_request_body_bytes) {
      too_large_ = true;
      body_.clear();
      body_.shrink_to_fit();
      AskPython(true);
      return;
    }
    body_ += chunk;
  }
  if (body.end_of_stream()) AskPython(false);
}

void Exchange::AskPython(bool too_large) {
  asked_ = true;
  if (!headers_seen_) headers_at_ = MonotonicNow();
  Event event{Event::kDecide, id_};
  event.decide = std::make_unique<DecideRequest>();
  DecideRequest& ask = *event.decide;
  ask.headers = hint_headers_;
  ask.subset = subset_;
  ask.headers_at = headers_at_;
  ask.too_large = too_large;
  ask.has_body = !too_large && !body_.empty();
  const Options& options = transport_->options();
  if (ask.has_body && options.parse_bodies && body_.size() <= options.max_parse_bytes) {
    const std::string* path = nullptr;
    for (const auto& [key, value] : hint_headers_) {
      if (key == ":path") path = &value;
    }
    ask.parsed = ParseOpenAIBody(body_, path);
  }
  // The body stays here for the answer; Python gets its own copy only when it must parse it.
  if (ask.has_body && !ask.parsed) ask.body = body_;
  ask.asked_at = MonotonicNow();
  transport_->events().Push(std::move(event));
}

bool Exchange::Route(const std::string& destination, const HeaderList& extra, const ScoreList& scores,
                     const std::string* body) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_ || !asked_ || answered_) return false;
    answered_ = true;
    routed_ = true;
    bool has_body = body_messages_ > 0 && duplex_request_;
    if (has_body && body != nullptr) body_ = *body;
    Queue(RouteHeadersResponse(destination, has_body ? std::optional<size_t>(body_.size()) : std::nullopt, extra,
                               scores));
    if (has_body) {
      AppendBodyChunks(&outbox_, body_, transport_->options().max_body_chunk_bytes, body_end_, true);
    }
    body_.clear();
    body_.shrink_to_fit();
    for (auto& answer : after_answer_) Queue(std::move(answer));
    after_answer_.clear();
    if (read_closed_) finish_when_drained_ = true;
  }
  Pump();
  return true;
}

bool Exchange::Respond(ProcessingResponse&& response) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Python has closed its books on this request, whether or not the answer still goes out.
    python_done_ = true;
    if (finished_ || finish_when_drained_) return false;
    answered_ = true;
    after_answer_.clear();
    Queue(std::move(response));
    // A refused request's stream ends with its immediate response.
    finish_when_drained_ = true;
    final_status_ = grpc::Status::OK;
  }
  Pump();
  return true;
}

bool Exchange::Abort(const std::string& message) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    python_done_ = true;
    if (finished_) return false;
    answered_ = true;
    after_answer_.clear();
    // Unsent answers are dropped: the gateway's failure mode decides from here.
    while (outbox_.size() > (writing_ ? 1u : 0u)) outbox_.pop_back();
    finish_when_drained_ = true;
    final_status_ = grpc::Status(grpc::StatusCode::INTERNAL, message);
  }
  Pump();
  return true;
}

void Exchange::ResponseHeaders(const ext_proc::HttpHeaders& headers) {
  static const std::unordered_set<std::string> wanted{":status", "content-type"};
  HeaderList values;
  CollectHeaders(headers.headers(), wanted, &values);
  status_ = 200;  // servicer.py: a response without :status counts as 200
  std::optional<std::string> content_type;
  for (const auto& [key, value] : values) {
    if (key == ":status") {
      // Python's int(): optional sign, digits, surrounding whitespace; anything else unknown.
      size_t begin = value.find_first_not_of(" \t\r\n\v\f");
      size_t end = value.find_last_not_of(" \t\r\n\v\f");
      int parsed = -1;
      if (begin != std::string::npos) {
        const char* first = value.data() + begin + (value[begin] == '+' ? 1 : 0);
        const char* last = value.data() + end + 1;
        auto [ptr, error] = std::from_chars(first, last, parsed);
        if (error != std::errc() || ptr != last || first == last) parsed = -1;
      }
      status_ = parsed;
    } else {
      content_type = value;
    }
  }
  usage_.emplace(content_type ? &*content_type : nullptr, transport_->options().max_response_parse_bytes);
  Queue(ResponseHeadersContinue());
  if (headers.end_of_stream()) Complete();
}

void Exchange::ResponseBody(const ext_proc::HttpBody& body) {
  const std::string& chunk = body.body();
  if (!chunk.empty()) {
    if (!first_byte_) {
      first_byte_ = true;
      first_byte_unreported_ = routed_;
    }
    if (!usage_) usage_.emplace(nullptr, transport_->options().max_response_parse_bytes);
    usage_->Feed(chunk);
  }
  if (duplex_response_) {
    ProcessingResponse echo;
    auto* streamed =
        echo.mutable_response_body()->mutable_response()->mutable_body_mutation()->mutable_streamed_response();
    streamed->set_body(chunk);
    streamed->set_end_of_stream(body.end_of_stream());
    Queue(std::move(echo));
  } else {
    Queue(ResponseBodyContinue());
  }
  if (body.end_of_stream() && routed_ && !completed_) {
    // One event for a response whose first byte and end arrive together.
    Complete();
    return;
  }
  if (first_byte_unreported_) {
    first_byte_unreported_ = false;
    transport_->events().Push(Event{Event::kFirstByte, id_});
  }
}

void Exchange::Complete() {
  if (completed_ || !routed_) return;
  completed_ = true;
  python_done_ = true;
  Event event{Event::kResponseEnd, id_};
  event.end = std::make_unique<ResponseEnd>();
  ResponseEnd& end = *event.end;
  end.status = status_;
  end.served = served_;
  // The first body byte arrived in the message that ended the response.
  end.first_byte = first_byte_unreported_;
  first_byte_unreported_ = false;
  if (usage_) {
    auto [kind, data] = usage_->Finish();
    end.usage_kind = kind;
    end.usage_data = std::move(data);
  }
  transport_->events().Push(std::move(event));
}

void Exchange::OnCancel() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Nothing more can be written; Finish is still owed for OnDone to come.
    while (outbox_.size() > (writing_ ? 1u : 0u)) outbox_.pop_back();
    finish_when_drained_ = true;
  }
  Pump();
}

void Exchange::OnDone() {
  bool tell_python;
  bool asked;
  bool handed_off;
  {
    std::lock_guard<std::mutex> lock(mu_);
    finished_ = true;
    tell_python = !python_done_;
    asked = asked_;
    handed_off = routed_ && !observing_ && response_elsewhere_ && !response_seen_;
  }
  if (tell_python) {
    // A stream that ended before its response did: Python releases the request, unless its
    // response phase goes to an observation stream.
    Event event{Event::kClosed, id_};
    event.flag = asked;
    if (handed_off) event.text = "observed";
    transport_->events().Push(std::move(event));
  }
  transport_->Forget(id_);  // may destroy this
}

// --- FloorExchange (protocol only) -----------------------------------------------------------

FloorExchange::FloorExchange(const Transport* transport) : transport_(transport) { StartRead(&request_); }

void FloorExchange::Route(bool end_of_stream) {
  decided_ = true;
  // A pick that costs nothing and places as a round-robin gateway does, so that a benchmark
  // row of this floor differs from Envoy's own ROUND_ROBIN row by the protocol alone. (It was
  // a hash of the first 256 body bytes, which sent every prompt sharing its opening to one
  // worker.)
  const auto& endpoints = transport_->options().floor_endpoints;
  const std::string& destination = endpoints[transport_->NextFloorTurn() % endpoints.size()];
  outbox_.push_back(RouteHeadersResponse(destination, has_body_ ? std::optional<size_t>(body_.size()) : std::nullopt, {}));
  if (has_body_) AppendBodyChunks(&outbox_, body_, transport_->options().max_body_chunk_bytes, end_of_stream, true);
  body_.clear();
}

void FloorExchange::OnReadDone(bool ok) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!ok) {
      finish_when_drained_ = true;
    } else {
      switch (request_.request_case()) {
        case ProcessingRequest::kRequestHeaders:
          if (request_.request_headers().end_of_stream()) Route(true);
          break;
        case ProcessingRequest::kRequestBody:
          has_body_ = true;
          body_ += request_.request_body().body();
          if (request_.request_body().end_of_stream()) Route(true);
          break;
        case ProcessingRequest::kRequestTrailers:
          if (!decided_) Route(false);
          outbox_.push_back(RequestTrailersContinue());
          break;
        case ProcessingRequest::kResponseHeaders:
          outbox_.push_back(ResponseHeadersContinue());
          break;
        case ProcessingRequest::kResponseBody:
          outbox_.push_back(BodyChunk(request_.response_body().body().data(), request_.response_body().body().size(),
                                      request_.response_body().end_of_stream(), false));
          break;
        case ProcessingRequest::kResponseTrailers:
          outbox_.push_back(ResponseTrailersContinue());
          break;
        default:
          break;
      }
    }
  }
  Pump();
  if (ok) StartRead(&request_);
}

}  // namespace kvsched

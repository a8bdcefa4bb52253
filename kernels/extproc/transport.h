// The native ext_proc transport: Envoy's ExternalProcessor stream and grpc.health.v1 served by
// the gRPC C++ library on its own threads, with Python asked once per request.
//
//   gRPC threads                               Python (the asyncio loop's thread)
//   Exchange (one per ext_proc stream)  --->   EventQueue  --eventfd-->  take(): decide, learn
//   holds headers + body, parses the body      route() / respond() / abort()  <---  the answer
//   passes the response through, captures usage
//
// Nothing here decides where a request goes: kvsched's Python core does, through the same
// PickRunner the Python transport uses. This side only speaks the protocol (the Python twin is
// scheduler/adapters/extproc/servicer.py) and reduces each request to what the decision reads.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <thread>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "envoy/service/ext_proc/v3/external_processor.grpc.pb.h"

namespace kvsched {

namespace ext_proc = envoy::service::ext_proc::v3;
using HeaderList = std::vector<std::pair<std::string, std::string>>;
// (ip:port, score) of the endpoints a decision scored, for the proposed scores metadata.
using ScoreList = std::vector<std::pair<std::string, double>>;

// The request header naming a routed request (scheduler/adapters/extproc/observed.py).
inline constexpr const char* kRoutedHeader = "x-kvsched-routed";
// GIE Endpoint Picker protocol names (scheduler/adapters/extproc/config.py).
inline constexpr const char* kDestinationHeader = "x-gateway-destination-endpoint";
inline constexpr const char* kDestinationNamespace = "envoy.lb";
inline constexpr const char* kSubsetNamespace = "envoy.lb.subset_hint";
inline constexpr const char* kSubsetKey = "x-gateway-destination-endpoint-subset";
inline constexpr const char* kServedKey = "x-gateway-destination-endpoint-served";
// Proposed GIE Endpoint Picker protocol v1.1 (gateway-api-inference-extension issue #2985).
inline constexpr const char* kScoresKey = "x-gateway-destination-endpoint-scores";

double MonotonicNow();

// --- the request body, reduced to what routing reads (codec/openai.py's InferenceRequestBody) ---

struct ParsedBody {
  enum Api { kCompletions, kChat, kOther };
  Api api = kOther;
  std::optional<std::string> model;
  std::optional<uint64_t> max_tokens;
  bool stream = false;
  bool has_token_ids = false;
  std::vector<uint64_t> token_ids;
  bool has_text = false;
  std::string text;
  std::vector<std::pair<std::string, std::string>> messages;  // chat: (role, content)
};

// The body parsed as codec/openai.py's parse_request_body would, or nullopt when that function
// might answer differently (an error, a duplicate key, a number beyond 64 bits, ...): the caller
// then hands the raw bytes to Python, whose answer is the reference.
std::optional<ParsedBody> ParseOpenAIBody(const std::string& body, const std::string* path);

// --- response usage (adapters/extproc/usage.py's ResponseUsageReader, reading half) ---

class UsageCapture {
 public:
  enum Kind { kNone = 0, kSseLine = 1, kJson = 2, kTail = 3 };
  UsageCapture(const std::string* content_type, size_t max_json_bytes);
  void Feed(const std::string& chunk);
  // What usage.py's usage_from_capture(kind, data) interprets.
  std::pair<Kind, std::string> Finish();

 private:
  void FeedSse(const std::string& chunk);
  void FeedJson(const std::string& chunk);
  void Line(std::string line);
  int sse_ = -1;  // -1: not known until the first non-empty chunk
  size_t max_json_bytes_;
  std::vector<std::string> chunks_;
  size_t size_ = 0;
  std::string tail_;
  std::string pending_;
  bool has_pending_ = false;
  std::optional<std::string> usage_line_;
};

bool HasUsageObject(const char* data, size_t size);

// --- events for Python ---------------------------------------------------------------------

struct DecideRequest {
  HeaderList headers;  // the hint headers only, lower-case names, repeated values comma-joined
  std::string body;    // the whole request body (kept raw for Python when parsing fell back)
  bool has_body = false;
  std::optional<ParsedBody> parsed;
  std::optional<std::vector<std::string>> subset;
  double headers_at = 0.0;
  double asked_at = 0.0;  // when the request was complete and Python was asked
  bool too_large = false;
};

struct ResponseEnd {
  int status = -1;  // -1: no parsable :status
  std::string served;
  bool first_byte = false;  // the first body byte arrived with the end (one event, not two)
  UsageCapture::Kind usage_kind = UsageCapture::kNone;
  std::string usage_data;
};

struct Event {
  enum Kind {
    kDecide = 1,
    kFirstByte = 2,
    kResponseEnd = 3,
    kClosed = 4,
    kHealthCheck = 5,
    kUnary = 6,
    kCount = 7,
    kObserve = 8,
  };
  Kind kind;
  uint64_t id = 0;
  std::unique_ptr<DecideRequest> decide;
  std::unique_ptr<ResponseEnd> end;
  // health: the service; unary: the method; count: the outcome name; observe: the routed id;
  // closed: non-empty when the routed request's response phase is sent on another stream
  std::string text;
  std::string payload;  // unary: the request message
  bool flag = false;    // closed: whether a decision had been asked for; observe: an id was sent
  double at = 0.0;      // MonotonicNow() when it was pushed
};

// gRPC threads push, Python takes everything at once when the eventfd (an event someone waits
// on) or the timer (bookkeeping, at most kLazyWakeS after it was pushed) becomes readable.
class EventQueue {
 public:
  // Python's accounting of first bytes and ends may lag by this much; every event carries the
  // time it happened, so nothing it measures moves.
  static constexpr double kLazyWakeS = 0.002;
  EventQueue();
  ~EventQueue();
  int fd() const { return fd_; }
  int timer_fd() const { return timer_fd_; }
  void Push(Event&& event);
  std::vector<Event> Take();

 private:
  std::mutex mu_;
  std::vector<Event> events_;
  bool woken_ = false;        // the eventfd was written since the last Take
  bool timer_armed_ = false;  // the timer runs for events pushed since the last Take
  int fd_;
  int timer_fd_;
};

// Python's answers, carried out on a thread of their own. Starting a gRPC write from Python's
// thread runs the write there, and with it whatever else is queued on the connection: measured
// through Envoy at 50 req/s with 54 KB bodies, route() held the event loop 0.41 ms at p50 and
// 4.3 ms at p99. Handing it over costs Python one lock and a wake-up.
class AnswerQueue {
 public:
  AnswerQueue();
  ~AnswerQueue();
  void Post(std::function<void()> job);
  // Runs what is queued, then ends the thread; later posts are dropped.
  void Stop();

 private:
  void Run();
  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  std::thread thread_;
};

// --- settings ------------------------------------------------------------------------------

struct TlsOptions {
  enum Mode { kPlaintext, kPem, kFiles } mode = kPlaintext;
  std::string cert_pem, key_pem;    // kPem
  std::string cert_file, key_file;  // kFiles: re-read every refresh_s, for rotated Secrets
  int refresh_s = 5;
};

struct Options {
  bool floor = false;  // protocol only: pick the next endpoint in turn, never ask Python
  std::vector<std::string> floor_endpoints;
  std::string host = "127.0.0.1";
  int port = 0;
  std::string health_host = "127.0.0.1";
  int health_port = -1;  // -1: no health server
  TlsOptions tls;
  std::unordered_set<std::string> hint_headers;
  size_t max_body_chunk_bytes = 62000;
  size_t max_request_body_bytes = 64u << 20;
  size_t max_response_parse_bytes = 16u << 20;
  // Larger bodies go to Python: a simdjson parser keeps buffers of about 6x the largest document
  // it has read, one parser per gRPC thread.
  size_t max_parse_bytes = 1u << 20;
  int max_message_bytes = 64 << 20;
  bool parse_bodies = true;
  std::string passthrough_prefix;  // e.g. "/kvsched.v1.EndpointPicker/": unary calls for Python
  std::vector<std::string> readiness_services;
};

// --- answers (the twin of adapters/extproc/responses.py) -------------------------------------

ext_proc::ProcessingResponse RouteHeadersResponse(const std::string& destination,
                                                  std::optional<size_t> content_length,
                                                  const HeaderList& extra, const ScoreList& scores = {});
void AppendBodyChunks(std::deque<ext_proc::ProcessingResponse>* out, const std::string& body,
                      size_t chunk_bytes, bool end_of_stream, bool request);
std::string HeaderSafe(const std::string& value);

class Transport;

// --- one ext_proc stream ----------------------------------------------------------------------

// The write side every reactor shares: answers go out in order, one write in flight at a time,
// and Finish once everything queued has been written. gRPC calls are never made with mu_ held:
// a write can complete inline and re-enter OnWriteDone.
class OrderedStream : public grpc::ServerBidiReactor<ext_proc::ProcessingRequest, ext_proc::ProcessingResponse> {
 public:
  void OnWriteDone(bool ok) override;

 protected:
  void Pump();
  std::mutex mu_;
  std::deque<ext_proc::ProcessingResponse> outbox_;
  bool writing_ = false;
  bool finish_when_drained_ = false;
  bool finished_ = false;
  grpc::Status final_status_;
};

class Exchange : public OrderedStream, public std::enable_shared_from_this<Exchange> {
 public:
  Exchange(Transport* transport, uint64_t id);
  void Start();
  void OnReadDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;
  // Python's answers; false when the stream is already gone.
  // ``body``: sent on instead of the client's (a rewritten model name); null keeps it.
  bool Route(const std::string& destination, const HeaderList& extra, const ScoreList& scores,
             const std::string* body);
  bool Respond(ext_proc::ProcessingResponse&& response);
  bool Abort(const std::string& message);

 private:
  void Handle();  // the message in request_
  void RequestHeaders(const ext_proc::HttpHeaders& headers);
  void RequestBody(const ext_proc::HttpBody& body);
  void ResponseHeaders(const ext_proc::HttpHeaders& headers);
  void ResponseBody(const ext_proc::HttpBody& body);
  void ReadMetadata(const envoy::config::core::v3::Metadata& metadata);
  void AskPython(bool too_large);
  void Complete();
  void Queue(ext_proc::ProcessingResponse&& response);
  void Count(const char* outcome);

  Transport* transport_;
  uint64_t id_;
  ext_proc::ProcessingRequest request_;
  bool duplex_request_ = true;
  bool duplex_response_ = true;
  bool read_closed_ = false;
  // Two-filter layout (observed.py): this decision stream carries no response phase ...
  bool response_elsewhere_ = false;
  bool response_seen_ = false;
  // ... and this is an observation stream: copies Envoy does not await, never answered.
  bool observing_ = false;
  // Request side.
  HeaderList hint_headers_;
  double headers_at_ = 0.0;
  bool headers_seen_ = false;
  std::string body_;
  size_t body_messages_ = 0;
  bool body_end_ = true;  // whether the held body ends the request (no trailers follow)
  std::optional<std::vector<std::string>> subset_;
  bool too_large_ = false;  // the body passed max_request_body_bytes
  bool asked_ = false;      // Python was asked for a decision
  bool answered_ = false;   // ... and answered it
  bool routed_ = false;
  bool python_done_ = false;  // Python has closed its books on this request
  std::vector<ext_proc::ProcessingResponse> after_answer_;  // answers that must follow it
  // Response side.
  int status_ = -1;
  std::string served_;
  std::optional<UsageCapture> usage_;
  bool first_byte_ = false;
  bool first_byte_unreported_ = false;
  bool completed_ = false;
};

class FloorExchange : public OrderedStream {
 public:
  explicit FloorExchange(const Transport* transport);
  void OnReadDone(bool ok) override;
  void OnDone() override { delete this; }

 private:
  void Route(bool end_of_stream);
  const Transport* transport_;
  ext_proc::ProcessingRequest request_;
  std::string body_;
  bool has_body_ = false;
  bool decided_ = false;
};

// --- the server -----------------------------------------------------------------------------

class HealthService;
class Passthrough;
struct ServiceDeleter {
  void operator()(HealthService* health) const;
  void operator()(Passthrough* passthrough) const;
};

class Transport final : public ext_proc::ExternalProcessor::CallbackService {
 public:
  explicit Transport(Options options);
  ~Transport() override;
  // Binds and starts both servers; returns false with error() set when a port cannot be bound.
  bool Start();
  void Shutdown(double grace_s);
  const std::string& error() const { return error_; }
  int port() const { return port_; }
  int health_port() const { return health_port_; }
  EventQueue& events() { return events_; }
  AnswerQueue& answers() { return answers_; }
  const Options& options() const { return options_; }

  grpc::ServerBidiReactor<ext_proc::ProcessingRequest, ext_proc::ProcessingResponse>* Process(
      grpc::CallbackServerContext* context) override;

  std::shared_ptr<Exchange> Find(uint64_t id);
  void Forget(uint64_t id);

  // Health, from Python.
  void HealthReply(uint64_t call, bool ready);
  void SetReady(bool ready);
  // kvsched.v1 unary calls, from Python.
  bool UnaryReply(uint64_t call, const std::string& payload, int code, const std::string& details);

  uint64_t NextId() { return next_id_.fetch_add(1, std::memory_order_relaxed); }
  // The floor's pick: the next endpoint in turn, over every stream.
  size_t NextFloorTurn() const { return floor_turn_.fetch_add(1, std::memory_order_relaxed); }

 private:
  Options options_;
  EventQueue events_;
  AnswerQueue answers_;
  std::atomic<uint64_t> next_id_{1};
  mutable std::atomic<size_t> floor_turn_{0};
  std::mutex registry_mu_;
  std::unordered_map<uint64_t, std::shared_ptr<Exchange>> registry_;
  std::unique_ptr<HealthService, ServiceDeleter> health_;
  std::unique_ptr<Passthrough, ServiceDeleter> passthrough_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<grpc::Server> health_server_;
  std::string error_;
  int port_ = 0;
  int health_port_ = -1;
  bool shut_down_ = false;
};

}  // namespace kvsched

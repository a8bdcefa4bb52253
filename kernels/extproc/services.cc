// grpc.health.v1 (see services.h) and the unary passthrough for kvsched.v1.
#include "services.h"

namespace kvsched {

// --- health -----------------------------------------------------------------------------------

class HealthService::Watcher final : public grpc::ServerWriteReactor<health::HealthCheckResponse> {
 public:
  explicit Watcher(HealthService* owner) : owner_(owner) {}

  // Only the newest status is written, one write at a time; gRPC is never called with mu_ held
  // (a write can complete inline and re-enter OnWriteDone).
  void Offer(Status status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (done_) return;
      next_ = status;
      if (writing_ || !TakeNext()) return;
    }
    StartWrite(&response_);
  }

  void OnWriteDone(bool ok) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      writing_ = false;
      if (!ok || done_ || !TakeNext()) return;
    }
    StartWrite(&response_);
  }

  void OnCancel() override {
    {
      std::lock_guard<std::mutex> owner_lock(owner_->mu_);
      owner_->watchers_.erase(this);
    }
    End(grpc::Status::CANCELLED);
  }

  void OnDone() override { delete this; }

  void End(const grpc::Status& status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (done_) return;
      done_ = true;
    }
    Finish(status);
  }

 private:
  bool TakeNext() {
    if (!next_ || (last_ && *last_ == *next_)) {
      next_.reset();
      return false;
    }
    last_ = *next_;
    next_.reset();
    response_.set_status(*last_);
    writing_ = true;
    return true;
  }
  HealthService* owner_;
  std::mutex mu_;
  std::optional<Status> last_;
  std::optional<Status> next_;
  bool writing_ = false;
  bool done_ = false;
  health::HealthCheckResponse response_;
};

HealthService::HealthService(Transport* transport, bool ask_python)
    : transport_(transport), ask_python_(ask_python) {
  for (const auto& service : transport->options().readiness_services) readiness_.insert(service);
  // The floor has no Python to ask: it is ready as soon as it serves.
  if (!ask_python) ready_ = true;
}

std::optional<HealthService::Status> HealthService::StatusOf(const std::string& service) {
  if (service == "liveness") return shut_down_ ? health::HealthCheckResponse::NOT_SERVING : health::HealthCheckResponse::SERVING;
  if (!readiness_.count(service)) return std::nullopt;
  return ready_ && !shut_down_ ? health::HealthCheckResponse::SERVING : health::HealthCheckResponse::NOT_SERVING;
}

grpc::ServerUnaryReactor* HealthService::Check(grpc::CallbackServerContext* context,
                                              const health::HealthCheckRequest* request,
                                              health::HealthCheckResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  std::unique_lock<std::mutex> lock(mu_);
  std::optional<Status> status = StatusOf(request->service());
  if (!status) {
    lock.unlock();
    reactor->Finish(grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service"));
    return reactor;
  }
  if (ask_python_ && !shut_down_ && request->service() != "liveness") {
    // Readiness as it is now: Python evaluates ready() and answers through Reply().
    uint64_t call = transport_->NextId();
    pending_[call] = PendingCheck{reactor, response};
    lock.unlock();
    Event event{Event::kHealthCheck, call};
    event.text = request->service();
    transport_->events().Push(std::move(event));
    return reactor;
  }
  response->set_status(*status);
  lock.unlock();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* HealthService::List(grpc::CallbackServerContext* context,
                                             const health::HealthListRequest*,
                                             health::HealthListResponse* response) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> services(readiness_.begin(), readiness_.end());
    services.push_back("liveness");
    for (const auto& service : services) {
      (*response->mutable_statuses())[service].set_status(*StatusOf(service));
    }
  }
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerWriteReactor<health::HealthCheckResponse>* HealthService::Watch(
    grpc::CallbackServerContext*, const health::HealthCheckRequest* request) {
  auto* watcher = new Watcher(this);
  std::lock_guard<std::mutex> lock(mu_);
  std::optional<Status> status = StatusOf(request->service());
  watchers_.insert(watcher);
  watcher->Offer(status ? *status : health::HealthCheckResponse::SERVICE_UNKNOWN);
  return watcher;
}

void HealthService::SetReady(bool ready) {
  std::lock_guard<std::mutex> lock(mu_);
  if (ready_ == ready || shut_down_) return;
  ready_ = ready;
  Notify();
}

void HealthService::Notify() {
  // mu_ held by the caller: watchers cannot come or go meanwhile.
  for (Watcher* watcher : watchers_) watcher->Offer(ready_ && !shut_down_ ? health::HealthCheckResponse::SERVING : health::HealthCheckResponse::NOT_SERVING);
}

void HealthService::Reply(uint64_t call, bool ready) {
  PendingCheck check;
  Status status;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto found = pending_.find(call);
    if (found == pending_.end()) return;
    check = found->second;
    pending_.erase(found);
    if (!shut_down_ && ready_ != ready) {
      ready_ = ready;
      Notify();
    }
    status = ready_ && !shut_down_ ? health::HealthCheckResponse::SERVING : health::HealthCheckResponse::NOT_SERVING;
  }
  check.response->set_status(status);
  check.reactor->Finish(grpc::Status::OK);
}

void HealthService::Shutdown() {
  std::map<uint64_t, PendingCheck> pending;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (shut_down_) return;
    shut_down_ = true;
    Notify();
    pending.swap(pending_);
  }
  for (auto& [_, check] : pending) {
    check.response->set_status(health::HealthCheckResponse::NOT_SERVING);
    check.reactor->Finish(grpc::Status::OK);
  }
}

void HealthService::EndWatches() {
  std::set<Watcher*> watchers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    watchers.swap(watchers_);
  }
  for (Watcher* watcher : watchers) watcher->End(grpc::Status::OK);
}

// --- passthrough --------------------------------------------------------------------------------

class Passthrough::Call final : public grpc::ServerGenericBidiReactor {
 public:
  Call(Passthrough* owner, uint64_t id, std::string method) : owner_(owner), id_(id), method_(std::move(method)) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      Fail(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message"));
      return;
    }
    std::vector<grpc::Slice> slices;
    std::string payload;
    if (request_.Dump(&slices).ok()) {
      for (const auto& slice : slices) payload.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    }
    Event event{Event::kUnary, id_};
    event.text = method_;
    event.payload = std::move(payload);
    owner_->transport_->events().Push(std::move(event));
  }

  void Reply(const std::string& payload, int code, const std::string& details) {
    if (code != 0) {
      Fail(grpc::Status(static_cast<grpc::StatusCode>(code), details));
      return;
    }
    grpc::Slice slice(payload);
    response_ = grpc::ByteBuffer(&slice, 1);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (done_) return;
      done_ = true;
    }
    StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
  }

  void Fail(const grpc::Status& status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (done_) return;
      done_ = true;
    }
    Finish(status);
  }

  void OnDone() override {
    owner_->Forget(id_);
    delete this;
  }

 private:
  Passthrough* owner_;
  uint64_t id_;
  std::string method_;
  grpc::ByteBuffer request_;
  grpc::ByteBuffer response_;
  std::mutex mu_;
  bool done_ = false;
};

grpc::ServerGenericBidiReactor* Passthrough::CreateReactor(grpc::GenericCallbackServerContext* context) {
  const std::string& prefix = transport_->options().passthrough_prefix;
  std::lock_guard<std::mutex> lock(mu_);
  if (prefix.empty() || shut_down_ || context->method().compare(0, prefix.size(), prefix) != 0) {
    class Unimplemented final : public grpc::ServerGenericBidiReactor {
     public:
      Unimplemented() { Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "")); }
      void OnDone() override { delete this; }
    };
    return new Unimplemented;
  }
  uint64_t id = transport_->NextId();
  auto* call = new Call(this, id, context->method());
  calls_[id] = call;
  return call;
}

bool Passthrough::Reply(uint64_t call, const std::string& payload, int code, const std::string& details) {
  Call* found;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = calls_.find(call);
    if (it == calls_.end()) return false;
    found = it->second;
    calls_.erase(it);
  }
  found->Reply(payload, code, details);
  return true;
}

void Passthrough::Forget(uint64_t call) {
  std::lock_guard<std::mutex> lock(mu_);
  calls_.erase(call);
}

void Passthrough::Shutdown() {
  std::map<uint64_t, Call*> calls;
  {
    std::lock_guard<std::mutex> lock(mu_);
    shut_down_ = true;
    calls.swap(calls_);
  }
  for (auto& [_, call] : calls) call->Fail(grpc::Status(grpc::StatusCode::UNAVAILABLE, "shutting down"));
}

}  // namespace kvsched

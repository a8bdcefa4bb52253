// The two gRPC servers: ext_proc (and the kvsched.v1 passthrough) on one port with TLS as
// configured, grpc.health.v1 in plaintext on another (GIE: 9002 and 9003). Two servers because a
// gRPC server offers every service on every port, and ext_proc must not be reachable in plaintext.
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include <chrono>

#include "services.h"

namespace kvsched {

void ServiceDeleter::operator()(HealthService* health) const { delete health; }
void ServiceDeleter::operator()(Passthrough* passthrough) const { delete passthrough; }

Transport::Transport(Options options) : options_(std::move(options)) {}

Transport::~Transport() { Shutdown(0.0); }

static std::shared_ptr<grpc::ServerCredentials> Credentials(const TlsOptions& tls) {
  switch (tls.mode) {
    case TlsOptions::kPlaintext:
      return grpc::InsecureServerCredentials();
    case TlsOptions::kPem: {
      grpc::SslServerCredentialsOptions ssl;
      ssl.pem_key_cert_pairs.push_back({tls.key_pem, tls.cert_pem});
      return grpc::SslServerCredentials(ssl);
    }
    case TlsOptions::kFiles: {
      // Re-read on a period, so a rotated Kubernetes Secret is picked up without a restart.
      auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
          tls.key_file, tls.cert_file, tls.refresh_s);
      grpc::experimental::TlsServerCredentialsOptions options(provider);
      options.watch_identity_key_cert_pairs();
      options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
      return grpc::experimental::TlsServerCredentials(options);
    }
  }
  return nullptr;
}

bool Transport::Start() {
  const bool kvsched = !options_.floor;
  health_.reset(new HealthService(this, kvsched));
  passthrough_.reset(new Passthrough(this));
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options_.host + ":" + std::to_string(options_.port), Credentials(options_.tls), &port_);
  builder.RegisterService(this);
  builder.RegisterCallbackGenericService(passthrough_.get());
  builder.SetMaxReceiveMessageSize(options_.max_message_bytes);
  builder.SetMaxSendMessageSize(options_.max_message_bytes);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    error_ = "cannot bind the Endpoint Picker gRPC port " + options_.host + ":" + std::to_string(options_.port);
    server_.reset();
    return false;
  }
  if (options_.health_port >= 0) {
    grpc::ServerBuilder health_builder;
    health_builder.AddListeningPort(options_.health_host + ":" + std::to_string(options_.health_port),
                                    grpc::InsecureServerCredentials(), &health_port_);
    health_builder.RegisterService(health_.get());
    health_server_ = health_builder.BuildAndStart();
    if (health_server_ == nullptr || health_port_ == 0) {
      error_ = "cannot bind the health port " + options_.health_host + ":" + std::to_string(options_.health_port);
      health_server_.reset();
      server_->Shutdown();
      server_.reset();
      return false;
    }
  }
  return true;
}

void Transport::Shutdown(double grace_s) {
  if (shut_down_) return;
  shut_down_ = true;
  if (health_) health_->Shutdown();
  if (server_) {
    // Streams in flight get ``grace_s`` to finish, then are cancelled.
    auto deadline = std::chrono::system_clock::now() +
                    std::chrono::microseconds(static_cast<int64_t>(std::max(grace_s, 0.0) * 1e6));
    if (passthrough_) passthrough_->Shutdown();
    server_->Shutdown(deadline);
    server_->Wait();
  }
  if (health_server_) {
    health_->EndWatches();
    health_server_->Shutdown(std::chrono::system_clock::now());
    health_server_->Wait();
  }
  // Only now: streams draining above still took answers.
  answers_.Stop();
}

grpc::ServerBidiReactor<ext_proc::ProcessingRequest, ext_proc::ProcessingResponse>* Transport::Process(
    grpc::CallbackServerContext*) {
  if (options_.floor) return new FloorExchange(this);
  uint64_t id = NextId();
  auto exchange = std::make_shared<Exchange>(this, id);
  {
    std::lock_guard<std::mutex> lock(registry_mu_);
    registry_[id] = exchange;
  }
  exchange->Start();
  return exchange.get();
}

std::shared_ptr<Exchange> Transport::Find(uint64_t id) {
  std::lock_guard<std::mutex> lock(registry_mu_);
  auto found = registry_.find(id);
  return found == registry_.end() ? nullptr : found->second;
}

void Transport::Forget(uint64_t id) {
  std::shared_ptr<Exchange> last;
  {
    std::lock_guard<std::mutex> lock(registry_mu_);
    auto found = registry_.find(id);
    if (found == registry_.end()) return;
    last = std::move(found->second);
    registry_.erase(found);
  }
  // ``last`` may be the final reference: the Exchange goes with it, outside the lock.
}

void Transport::HealthReply(uint64_t call, bool ready) {
  if (health_) health_->Reply(call, ready);
}

void Transport::SetReady(bool ready) {
  if (health_) health_->SetReady(ready);
}

bool Transport::UnaryReply(uint64_t call, const std::string& payload, int code, const std::string& details) {
  return passthrough_ && passthrough_->Reply(call, payload, code, details);
}

}  // namespace kvsched

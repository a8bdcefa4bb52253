// grpc.health.v1 and the unary passthrough (kvsched.v1) beside the ext_proc service.
#pragma once

#include <grpcpp/generic/async_generic_service.h>

#include <map>
#include <set>

#include "grpc_health/v1/health.grpc.pb.h"
#include "transport.h"

namespace kvsched {

namespace health = grpc::health::v1;

// grpc.health.v1 on its own plaintext port (GIE: 9003), as adapters/extproc/health.py serves it:
// ``liveness`` is SERVING while the process serves; the readiness services (``readiness``, the
// ext_proc service name, ``kvsched.v1.EndpointPicker`` and ``""``) follow Python's ``ready()``.
// A Check of a readiness service asks Python at that moment (one event), so a probe sees
// readiness as it is, not as of the last refresh; Watch streams get every change Python pushes.
class HealthService final : public health::Health::CallbackService {
 public:
  HealthService(Transport* transport, bool ask_python);
  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* context,
                                  const health::HealthCheckRequest* request,
                                  health::HealthCheckResponse* response) override;
  grpc::ServerUnaryReactor* List(grpc::CallbackServerContext* context,
                                 const health::HealthListRequest* request,
                                 health::HealthListResponse* response) override;
  grpc::ServerWriteReactor<health::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* context, const health::HealthCheckRequest* request) override;

  void SetReady(bool ready);
  void Reply(uint64_t call, bool ready);
  // NOT_SERVING everywhere from now on, whatever Python says (graceful shutdown).
  void Shutdown();
  // Ends the Watch streams (before the server's own shutdown, which waits for them).
  void EndWatches();

  class Watcher;

 private:
  using Status = health::HealthCheckResponse::ServingStatus;
  std::optional<Status> StatusOf(const std::string& service);  // mu_ held
  void Notify();                                               // mu_ not held
  Transport* transport_;
  bool ask_python_;
  std::mutex mu_;
  bool ready_ = false;
  bool shut_down_ = false;
  std::set<std::string> readiness_;
  struct PendingCheck {
    grpc::ServerUnaryReactor* reactor;
    health::HealthCheckResponse* response;
  };
  std::map<uint64_t, PendingCheck> pending_;
  std::set<Watcher*> watchers_;
};

// Unary calls under one method prefix handed to Python as bytes (kvsched.v1.EndpointPicker, whose
// servicer stays in Python); anything else is UNIMPLEMENTED.
class Passthrough final : public grpc::CallbackGenericService {
 public:
  explicit Passthrough(Transport* transport) : transport_(transport) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* context) override;
  bool Reply(uint64_t call, const std::string& payload, int code, const std::string& details);
  void Shutdown();

  class Call;
  void Forget(uint64_t call);

 private:
  Transport* transport_;
  std::mutex mu_;
  std::map<uint64_t, Call*> calls_;
  bool shut_down_ = false;
};

}  // namespace kvsched

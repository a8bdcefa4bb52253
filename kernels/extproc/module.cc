// scheduler._native.extproc: the native ext_proc transport as a Python extension module.
//
// Transport(options) runs the gRPC servers on gRPC's own threads; Python watches fileno() (an
// eventfd) from its event loop and calls take() for the events that came in, then answers with
// route()/respond()/abort(), which only queue the answer for the transport's answer thread.
// Every other call that can block or touch gRPC releases the GIL.
// The interface is described for Python in scheduler/adapters/extproc/native.py.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <absl/synchronization/mutex.h>

#include "transport.h"

namespace {

using kvsched::Event;
using kvsched::HeaderList;
using kvsched::ParsedBody;
using kvsched::ScoreList;

PyObject* g_array_type = nullptr;  // array.array

// --- Python -> C++ ----------------------------------------------------------------------------

bool GetString(PyObject* dict, const char* key, std::string* out) {
  PyObject* value = PyDict_GetItemString(dict, key);  // borrowed
  if (value == nullptr || value == Py_None) return true;
  Py_ssize_t size;
  const char* data;
  if (PyBytes_Check(value)) {
    data = PyBytes_AS_STRING(value);
    size = PyBytes_GET_SIZE(value);
  } else {
    data = PyUnicode_AsUTF8AndSize(value, &size);
    if (data == nullptr) return false;
  }
  out->assign(data, size);
  return true;
}

template <typename Number>
bool GetNumber(PyObject* dict, const char* key, Number* out) {
  PyObject* value = PyDict_GetItemString(dict, key);
  if (value == nullptr || value == Py_None) return true;
  long long number = PyLong_AsLongLong(value);
  if (number == -1 && PyErr_Occurred()) return false;
  *out = static_cast<Number>(number);
  return true;
}

bool GetBool(PyObject* dict, const char* key, bool* out) {
  PyObject* value = PyDict_GetItemString(dict, key);
  if (value == nullptr || value == Py_None) return true;
  int truth = PyObject_IsTrue(value);
  if (truth < 0) return false;
  *out = truth != 0;
  return true;
}

bool GetStrings(PyObject* dict, const char* key, std::vector<std::string>* out) {
  PyObject* value = PyDict_GetItemString(dict, key);
  if (value == nullptr || value == Py_None) return true;
  PyObject* items = PySequence_Fast(value, "expected a sequence of str");
  if (items == nullptr) return false;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(items); ++i) {
    Py_ssize_t size;
    const char* data = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(items, i), &size);
    if (data == nullptr) {
      Py_DECREF(items);
      return false;
    }
    out->emplace_back(data, size);
  }
  Py_DECREF(items);
  return true;
}

bool ReadOptions(PyObject* dict, kvsched::Options* options) {
  if (!PyDict_Check(dict)) {
    PyErr_SetString(PyExc_TypeError, "options must be a dict");
    return false;
  }
  std::string tls_mode = "plaintext";
  std::vector<std::string> hint_headers;
  bool ok = GetBool(dict, "floor", &options->floor) && GetStrings(dict, "floor_endpoints", &options->floor_endpoints) &&
            GetString(dict, "host", &options->host) && GetNumber(dict, "port", &options->port) &&
            GetString(dict, "health_host", &options->health_host) &&
            GetNumber(dict, "health_port", &options->health_port) && GetString(dict, "tls_mode", &tls_mode) &&
            GetString(dict, "cert_pem", &options->tls.cert_pem) && GetString(dict, "key_pem", &options->tls.key_pem) &&
            GetString(dict, "cert_file", &options->tls.cert_file) &&
            GetString(dict, "key_file", &options->tls.key_file) &&
            GetNumber(dict, "tls_refresh_s", &options->tls.refresh_s) &&
            GetStrings(dict, "hint_headers", &hint_headers) &&
            GetNumber(dict, "max_body_chunk_bytes", &options->max_body_chunk_bytes) &&
            GetNumber(dict, "max_request_body_bytes", &options->max_request_body_bytes) &&
            GetNumber(dict, "max_response_parse_bytes", &options->max_response_parse_bytes) &&
            GetNumber(dict, "max_parse_bytes", &options->max_parse_bytes) &&
            GetNumber(dict, "max_message_bytes", &options->max_message_bytes) &&
            GetBool(dict, "parse_bodies", &options->parse_bodies) &&
            GetString(dict, "passthrough_prefix", &options->passthrough_prefix) &&
            GetStrings(dict, "readiness_services", &options->readiness_services);
  if (!ok) return false;
  for (auto& name : hint_headers) options->hint_headers.insert(name);
  if (tls_mode == "plaintext") {
    options->tls.mode = kvsched::TlsOptions::kPlaintext;
  } else if (tls_mode == "pem") {
    options->tls.mode = kvsched::TlsOptions::kPem;
  } else if (tls_mode == "files") {
    options->tls.mode = kvsched::TlsOptions::kFiles;
  } else {
    PyErr_Format(PyExc_ValueError, "unknown tls_mode %s", tls_mode.c_str());
    return false;
  }
  if (options->max_body_chunk_bytes == 0) {
    PyErr_SetString(PyExc_ValueError, "max_body_chunk_bytes must be positive");
    return false;
  }
  if (options->floor && options->floor_endpoints.empty()) {
    PyErr_SetString(PyExc_ValueError, "the floor needs floor_endpoints");
    return false;
  }
  return true;
}

bool ReadHeaderPairs(PyObject* value, HeaderList* out) {
  PyObject* items = PySequence_Fast(value, "expected a sequence of (name, value) pairs");
  if (items == nullptr) return false;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(items); ++i) {
    const char *key, *text;
    Py_ssize_t key_size, text_size;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(items, i), "s#s#", &key, &key_size, &text, &text_size)) {
      Py_DECREF(items);
      return false;
    }
    out->emplace_back(std::string(key, key_size), std::string(text, text_size));
  }
  Py_DECREF(items);
  return true;
}

// None, or a sequence of (address, score) pairs.
bool ReadScorePairs(PyObject* value, ScoreList* out) {
  if (value == nullptr || value == Py_None) return true;
  PyObject* items = PySequence_Fast(value, "expected a sequence of (address, score) pairs");
  if (items == nullptr) return false;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(items); ++i) {
    const char* address;
    Py_ssize_t size;
    double score;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(items, i), "s#d", &address, &size, &score)) {
      Py_DECREF(items);
      return false;
    }
    out->emplace_back(std::string(address, size), score);
  }
  Py_DECREF(items);
  return true;
}

// --- C++ -> Python ----------------------------------------------------------------------------

PyObject* Text(const std::string& value) {
  // simdjson and Envoy hand over valid UTF-8; "replace" is what headers.py does with raw bytes.
  return PyUnicode_DecodeUTF8(value.data(), static_cast<Py_ssize_t>(value.size()), "replace");
}

PyObject* OptionalText(const std::optional<std::string>& value) {
  if (!value) Py_RETURN_NONE;
  return Text(*value);
}

const char* ApiName(ParsedBody::Api api) {
  switch (api) {
    case ParsedBody::kCompletions:
      return "completions";
    case ParsedBody::kChat:
      return "chat";
    default:
      return "other";
  }
}

// (api, model, max_tokens, stream, token_ids: array('Q') | None, text | None, messages | None)
PyObject* ParsedTuple(const ParsedBody& parsed) {
  PyObject* token_ids;
  if (parsed.has_token_ids) {
    // One copy into an array of native uint64: the index hashes such a buffer in place.
    token_ids = PyObject_CallFunction(g_array_type, "sy#", "Q", reinterpret_cast<const char*>(parsed.token_ids.data()),
                                      static_cast<Py_ssize_t>(parsed.token_ids.size() * sizeof(uint64_t)));
    if (token_ids == nullptr) return nullptr;
  } else {
    token_ids = Py_NewRef(Py_None);
  }
  PyObject* messages;
  if (parsed.api == ParsedBody::kChat) {
    messages = PyTuple_New(static_cast<Py_ssize_t>(parsed.messages.size()));
    if (messages == nullptr) {
      Py_DECREF(token_ids);
      return nullptr;
    }
    for (size_t i = 0; i < parsed.messages.size(); ++i) {
      PyObject* pair = Py_BuildValue("(NN)", Text(parsed.messages[i].first), Text(parsed.messages[i].second));
      if (pair == nullptr) {
        Py_DECREF(token_ids);
        Py_DECREF(messages);
        return nullptr;
      }
      PyTuple_SET_ITEM(messages, static_cast<Py_ssize_t>(i), pair);
    }
  } else {
    messages = Py_NewRef(Py_None);
  }
  PyObject* max_tokens = parsed.max_tokens ? PyLong_FromUnsignedLongLong(*parsed.max_tokens) : Py_NewRef(Py_None);
  PyObject* text = parsed.has_text ? Text(parsed.text) : Py_NewRef(Py_None);
  return Py_BuildValue("(sNNONNN)", ApiName(parsed.api), OptionalText(parsed.model), max_tokens,
                       parsed.stream ? Py_True : Py_False, token_ids, text, messages);
}

PyObject* HeadersDict(const HeaderList& headers) {
  PyObject* dict = PyDict_New();
  if (dict == nullptr) return nullptr;
  for (const auto& [key, value] : headers) {
    PyObject* k = Text(key);
    PyObject* v = Text(value);
    if (k == nullptr || v == nullptr || PyDict_SetItem(dict, k, v) < 0) {
      Py_XDECREF(k);
      Py_XDECREF(v);
      Py_DECREF(dict);
      return nullptr;
    }
    Py_DECREF(k);
    Py_DECREF(v);
  }
  return dict;
}

PyObject* StringTuple(const std::vector<std::string>& items) {
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(items.size()));
  if (tuple == nullptr) return nullptr;
  for (size_t i = 0; i < items.size(); ++i) {
    PyObject* item = Text(items[i]);
    if (item == nullptr) {
      Py_DECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), item);
  }
  return tuple;
}

PyObject* Bytes(const std::string& value) {
  return PyBytes_FromStringAndSize(value.data(), static_cast<Py_ssize_t>(value.size()));
}

PyObject* EventTuple(Event& event, double now) {
  unsigned long long id = event.id;
  switch (event.kind) {
    case Event::kDecide: {
      kvsched::DecideRequest& ask = *event.decide;
      PyObject* body = ask.has_body && !ask.parsed ? Bytes(ask.body) : Py_NewRef(Py_None);
      PyObject* parsed = ask.parsed ? ParsedTuple(*ask.parsed) : Py_NewRef(Py_None);
      PyObject* subset = ask.subset ? StringTuple(*ask.subset) : Py_NewRef(Py_None);
      // How long ago the request headers came (Python anchors it on its own clock), and how long
      // the complete request waited for Python to take it.
      return Py_BuildValue("(iKNNNNddO)", static_cast<int>(event.kind), id, HeadersDict(ask.headers), body, parsed,
                           subset, now - ask.headers_at, now - ask.asked_at, ask.too_large ? Py_True : Py_False);
    }
    case Event::kResponseEnd: {
      kvsched::ResponseEnd& end = *event.end;
      PyObject* status = end.status >= 0 ? PyLong_FromLong(end.status) : Py_NewRef(Py_None);
      PyObject* served = end.served.empty() ? Py_NewRef(Py_None) : Text(end.served);
      // How long ago the response ended: Python's accounting may take it up to a lazy wake later.
      return Py_BuildValue("(iKNNOiNd)", static_cast<int>(event.kind), id, status, served,
                           end.first_byte ? Py_True : Py_False, static_cast<int>(end.usage_kind),
                           Bytes(end.usage_data), now - event.at);
    }
    case Event::kFirstByte:
      return Py_BuildValue("(iKd)", static_cast<int>(event.kind), id, now - event.at);
    case Event::kClosed:
      return Py_BuildValue("(iKOO)", static_cast<int>(event.kind), id, event.flag ? Py_True : Py_False,
                           event.text.empty() ? Py_False : Py_True);
    case Event::kObserve:
      return Py_BuildValue("(iKN)", static_cast<int>(event.kind), id,
                           event.flag ? Text(event.text) : Py_NewRef(Py_None));
    case Event::kHealthCheck:
    case Event::kCount:
      return Py_BuildValue("(iKN)", static_cast<int>(event.kind), id, Text(event.text));
    case Event::kUnary:
      return Py_BuildValue("(iKNN)", static_cast<int>(event.kind), id, Text(event.text), Bytes(event.payload));
    default:
      return Py_BuildValue("(iK)", static_cast<int>(event.kind), id);
  }
}

// --- the Transport type -----------------------------------------------------------------------

struct TransportObject {
  PyObject_HEAD
  kvsched::Transport* transport;
  bool started;
};

int Transport_init(TransportObject* self, PyObject* args, PyObject*) {
  PyObject* dict;
  if (!PyArg_ParseTuple(args, "O!", &PyDict_Type, &dict)) return -1;
  kvsched::Options options;
  if (!ReadOptions(dict, &options)) return -1;
  delete self->transport;
  self->transport = new kvsched::Transport(std::move(options));
  self->started = false;
  return 0;
}

void Transport_dealloc(TransportObject* self) {
  if (self->transport != nullptr) {
    kvsched::Transport* transport = self->transport;
    self->transport = nullptr;
    Py_BEGIN_ALLOW_THREADS
    delete transport;
    Py_END_ALLOW_THREADS
  }
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

bool Ready(TransportObject* self) {
  if (self->transport == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "transport not initialised");
    return false;
  }
  return true;
}

PyObject* Transport_start(TransportObject* self, PyObject*) {
  if (!Ready(self)) return nullptr;
  if (self->started) {
    PyErr_SetString(PyExc_RuntimeError, "already started");
    return nullptr;
  }
  bool ok;
  Py_BEGIN_ALLOW_THREADS
  ok = self->transport->Start();
  Py_END_ALLOW_THREADS
  if (!ok) {
    PyErr_SetString(PyExc_OSError, self->transport->error().c_str());
    return nullptr;
  }
  self->started = true;
  return Py_BuildValue("(ii)", self->transport->port(), self->transport->health_port());
}

PyObject* Transport_fileno(TransportObject* self, PyObject*) {
  if (!Ready(self)) return nullptr;
  return PyLong_FromLong(self->transport->events().fd());
}

PyObject* Transport_timer_fileno(TransportObject* self, PyObject*) {
  if (!Ready(self)) return nullptr;
  return PyLong_FromLong(self->transport->events().timer_fd());
}

PyObject* Transport_take(TransportObject* self, PyObject*) {
  if (!Ready(self)) return nullptr;
  std::vector<Event> events = self->transport->events().Take();
  double now = kvsched::MonotonicNow();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(events.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < events.size(); ++i) {
    PyObject* item = EventTuple(events[i], now);
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

PyObject* Transport_route(TransportObject* self, PyObject* args) {
  unsigned long long id;
  const char* destination;
  Py_ssize_t destination_size;
  PyObject* extra;
  PyObject* score_pairs = nullptr;
  PyObject* replacement = nullptr;
  if (!Ready(self) || !PyArg_ParseTuple(args, "Ks#O|OO", &id, &destination, &destination_size, &extra,
                                        &score_pairs, &replacement))
    return nullptr;
  HeaderList headers;
  if (!ReadHeaderPairs(extra, &headers)) return nullptr;
  ScoreList scores;
  if (!ReadScorePairs(score_pairs, &scores)) return nullptr;
  std::optional<std::string> body;
  if (replacement != nullptr && replacement != Py_None) {
    char* data;
    Py_ssize_t size;
    if (PyBytes_AsStringAndSize(replacement, &data, &size) != 0) return nullptr;
    body.emplace(data, static_cast<size_t>(size));
  }
  kvsched::Transport* transport = self->transport;
  transport->answers().Post([transport, id, target = std::string(destination, destination_size),
                             headers = std::move(headers), scores = std::move(scores), body = std::move(body)] {
    if (auto exchange = transport->Find(id)) exchange->Route(target, headers, scores, body ? &*body : nullptr);
  });
  Py_RETURN_NONE;
}

PyObject* Transport_respond(TransportObject* self, PyObject* args) {
  unsigned long long id;
  const char* data;
  Py_ssize_t size;
  if (!Ready(self) || !PyArg_ParseTuple(args, "Ky#", &id, &data, &size)) return nullptr;
  auto response = std::make_shared<kvsched::ext_proc::ProcessingResponse>();
  if (!response->ParseFromArray(data, static_cast<int>(size))) {
    PyErr_SetString(PyExc_ValueError, "not a serialized ProcessingResponse");
    return nullptr;
  }
  kvsched::Transport* transport = self->transport;
  transport->answers().Post([transport, id, response] {
    if (auto exchange = transport->Find(id)) exchange->Respond(std::move(*response));
  });
  Py_RETURN_NONE;
}

PyObject* Transport_abort(TransportObject* self, PyObject* args) {
  unsigned long long id;
  const char* message;
  Py_ssize_t size;
  if (!Ready(self) || !PyArg_ParseTuple(args, "Ks#", &id, &message, &size)) return nullptr;
  kvsched::Transport* transport = self->transport;
  transport->answers().Post([transport, id, text = std::string(message, size)] {
    if (auto exchange = transport->Find(id)) exchange->Abort(text);
  });
  Py_RETURN_NONE;
}

PyObject* Transport_health_reply(TransportObject* self, PyObject* args) {
  unsigned long long call;
  int ready;
  if (!Ready(self) || !PyArg_ParseTuple(args, "Kp", &call, &ready)) return nullptr;
  kvsched::Transport* transport = self->transport;
  transport->answers().Post([transport, call, ready] { transport->HealthReply(call, ready != 0); });
  Py_RETURN_NONE;
}

PyObject* Transport_set_ready(TransportObject* self, PyObject* args) {
  int ready;
  if (!Ready(self) || !PyArg_ParseTuple(args, "p", &ready)) return nullptr;
  kvsched::Transport* transport = self->transport;
  transport->answers().Post([transport, ready] { transport->SetReady(ready != 0); });
  Py_RETURN_NONE;
}

PyObject* Transport_unary_reply(TransportObject* self, PyObject* args) {
  unsigned long long call;
  const char* payload;
  Py_ssize_t payload_size;
  int code;
  const char* details;
  Py_ssize_t details_size;
  if (!Ready(self) ||
      !PyArg_ParseTuple(args, "Ky#is#", &call, &payload, &payload_size, &code, &details, &details_size))
    return nullptr;
  kvsched::Transport* transport = self->transport;
  transport->answers().Post([transport, call, message = std::string(payload, payload_size), code,
                             text = std::string(details, details_size)] {
    transport->UnaryReply(call, message, code, text);
  });
  Py_RETURN_NONE;
}

PyObject* Transport_shutdown(TransportObject* self, PyObject* args) {
  double grace_s;
  if (!Ready(self) || !PyArg_ParseTuple(args, "d", &grace_s)) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  self->transport->Shutdown(grace_s);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef kTransportMethods[] = {
    {"start", reinterpret_cast<PyCFunction>(Transport_start), METH_NOARGS,
     "Bind and serve; returns (port, health_port), health_port -1 when there is none."},
    {"fileno", reinterpret_cast<PyCFunction>(Transport_fileno), METH_NOARGS,
     "The eventfd that becomes readable when events are waiting."},
    {"timer_fileno", reinterpret_cast<PyCFunction>(Transport_timer_fileno), METH_NOARGS,
     "A descriptor that turns readable when bookkeeping events have waited their lazy wake-up."},
    {"take", reinterpret_cast<PyCFunction>(Transport_take), METH_NOARGS, "Every waiting event, oldest first."},
    {"route", reinterpret_cast<PyCFunction>(Transport_route), METH_VARARGS,
     "route(stream, destination, extra_headers, scores=None, body=None): answer a decision with a "
     "destination (and the body to send on instead of the client's)."},
    {"respond", reinterpret_cast<PyCFunction>(Transport_respond), METH_VARARGS,
     "respond(stream, serialized ProcessingResponse): answer with it and end the stream."},
    {"abort", reinterpret_cast<PyCFunction>(Transport_abort), METH_VARARGS,
     "abort(stream, message): end the stream with gRPC INTERNAL."},
    {"health_reply", reinterpret_cast<PyCFunction>(Transport_health_reply), METH_VARARGS,
     "health_reply(call, ready): answer a readiness Check."},
    {"set_ready", reinterpret_cast<PyCFunction>(Transport_set_ready), METH_VARARGS,
     "set_ready(ready): readiness for Check and Watch."},
    {"unary_reply", reinterpret_cast<PyCFunction>(Transport_unary_reply), METH_VARARGS,
     "unary_reply(call, payload, code, details): answer a passthrough call (code 0: OK)."},
    {"shutdown", reinterpret_cast<PyCFunction>(Transport_shutdown), METH_VARARGS,
     "shutdown(grace_s): NOT_SERVING, streams get grace_s to finish, then both servers stop."},
    {nullptr, nullptr, 0, nullptr},
};

PyTypeObject TransportType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// --- test hooks: the two halves the Python twins are held against ------------------------------

PyObject* parse_body(PyObject*, PyObject* args) {
  const char* data;
  Py_ssize_t size;
  const char* path = nullptr;
  Py_ssize_t path_size = 0;
  if (!PyArg_ParseTuple(args, "y#z#", &data, &size, &path, &path_size)) return nullptr;
  std::string body(data, size);
  std::string route = path ? std::string(path, path_size) : std::string();
  std::optional<ParsedBody> parsed;
  Py_BEGIN_ALLOW_THREADS
  parsed = kvsched::ParseOpenAIBody(body, path ? &route : nullptr);
  Py_END_ALLOW_THREADS
  if (!parsed) Py_RETURN_NONE;
  return ParsedTuple(*parsed);
}

PyObject* capture_usage(PyObject*, PyObject* args) {
  const char* content_type = nullptr;
  Py_ssize_t content_type_size = 0;
  PyObject* chunks;
  Py_ssize_t max_json;
  if (!PyArg_ParseTuple(args, "z#On", &content_type, &content_type_size, &chunks, &max_json)) return nullptr;
  std::string type = content_type ? std::string(content_type, content_type_size) : std::string();
  kvsched::UsageCapture capture(content_type ? &type : nullptr, static_cast<size_t>(max_json));
  PyObject* items = PySequence_Fast(chunks, "chunks must be a sequence of bytes");
  if (items == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(items); ++i) {
    char* data;
    Py_ssize_t size;
    if (PyBytes_AsStringAndSize(PySequence_Fast_GET_ITEM(items, i), &data, &size) < 0) {
      Py_DECREF(items);
      return nullptr;
    }
    capture.Feed(std::string(data, size));
  }
  Py_DECREF(items);
  auto [kind, captured] = capture.Finish();
  return Py_BuildValue("(iN)", static_cast<int>(kind), Bytes(captured));
}

PyObject* route_response(PyObject*, PyObject* args) {
  const char* destination;
  Py_ssize_t size;
  PyObject* content_length;
  PyObject* extra;
  PyObject* score_pairs = nullptr;
  if (!PyArg_ParseTuple(args, "s#OO|O", &destination, &size, &content_length, &extra, &score_pairs)) return nullptr;
  HeaderList headers;
  if (!ReadHeaderPairs(extra, &headers)) return nullptr;
  ScoreList scores;
  if (!ReadScorePairs(score_pairs, &scores)) return nullptr;
  std::optional<size_t> length;
  if (content_length != Py_None) {
    length = PyLong_AsSize_t(content_length);
    if (PyErr_Occurred()) return nullptr;
  }
  auto response = kvsched::RouteHeadersResponse(std::string(destination, size), length, headers, scores);
  return Bytes(response.SerializeAsString());
}

PyObject* body_chunks(PyObject*, PyObject* args) {
  const char* data;
  Py_ssize_t size;
  Py_ssize_t chunk_bytes;
  int end_of_stream;
  if (!PyArg_ParseTuple(args, "y#np", &data, &size, &chunk_bytes, &end_of_stream)) return nullptr;
  if (chunk_bytes <= 0) {
    PyErr_SetString(PyExc_ValueError, "chunk_bytes must be positive");
    return nullptr;
  }
  std::deque<kvsched::ext_proc::ProcessingResponse> chunks;
  kvsched::AppendBodyChunks(&chunks, std::string(data, size), static_cast<size_t>(chunk_bytes), end_of_stream != 0,
                            true);
  PyObject* list = PyList_New(0);
  for (const auto& chunk : chunks) {
    PyObject* item = Bytes(chunk.SerializeAsString());
    if (item == nullptr || PyList_Append(list, item) < 0) {
      Py_XDECREF(item);
      Py_DECREF(list);
      return nullptr;
    }
    Py_DECREF(item);
  }
  return list;
}

PyMethodDef kModuleMethods[] = {
    {"parse_body", parse_body, METH_VARARGS,
     "parse_body(body, path) -> the parsed tuple a decide event carries, or None (Python parses it)."},
    {"capture_usage", capture_usage, METH_VARARGS,
     "capture_usage(content_type, chunks, max_json_bytes) -> (kind, data) for usage_from_capture."},
    {"route_response", route_response, METH_VARARGS,
     "route_response(destination, content_length, extra_headers, scores=None) -> serialized ProcessingResponse."},
    {"body_chunks", body_chunks, METH_VARARGS,
     "body_chunks(body, chunk_bytes, end_of_stream) -> serialized streamed_response answers."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "extproc",
                       "The native ext_proc transport (gRPC C++); see scheduler/adapters/extproc/native.py.", -1,
                       kModuleMethods};

}  // namespace

PyMODINIT_FUNC PyInit_extproc(void) {
  // Debian builds Abseil without NDEBUG, so every absl::Mutex gRPC takes also updated a
  // lock-order graph for deadlock detection: 2-3% of the gRPC threads' samples under load
  // (perf over `kvsched bench epp --stream-tokens 64`, GraphCycles::GetId and its callers).
  // The check is a debugging aid for Abseil's own users; a served process does not want it.
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  TransportType.tp_name = "scheduler._native.extproc.Transport";
  TransportType.tp_basicsize = sizeof(TransportObject);
  TransportType.tp_flags = Py_TPFLAGS_DEFAULT;
  TransportType.tp_new = PyType_GenericNew;
  TransportType.tp_init = reinterpret_cast<initproc>(Transport_init);
  TransportType.tp_dealloc = reinterpret_cast<destructor>(Transport_dealloc);
  TransportType.tp_methods = kTransportMethods;
  TransportType.tp_doc = "Transport(options): the ext_proc and health servers; see native.py.";
  if (PyType_Ready(&TransportType) < 0) return nullptr;
  PyObject* array_module = PyImport_ImportModule("array");
  if (array_module == nullptr) return nullptr;
  g_array_type = PyObject_GetAttrString(array_module, "array");
  Py_DECREF(array_module);
  if (g_array_type == nullptr) return nullptr;
  PyObject* module = PyModule_Create(&kModule);
  if (module == nullptr) return nullptr;
  Py_INCREF(&TransportType);
  if (PyModule_AddObject(module, "Transport", reinterpret_cast<PyObject*>(&TransportType)) < 0) {
    Py_DECREF(&TransportType);
    Py_DECREF(module);
    return nullptr;
  }
  PyModule_AddIntConstant(module, "DECIDE", Event::kDecide);
  PyModule_AddIntConstant(module, "FIRST_BYTE", Event::kFirstByte);
  PyModule_AddIntConstant(module, "RESPONSE_END", Event::kResponseEnd);
  PyModule_AddIntConstant(module, "CLOSED", Event::kClosed);
  PyModule_AddIntConstant(module, "HEALTH_CHECK", Event::kHealthCheck);
  PyModule_AddIntConstant(module, "UNARY", Event::kUnary);
  PyModule_AddIntConstant(module, "COUNT", Event::kCount);
  PyModule_AddIntConstant(module, "OBSERVE", Event::kObserve);
  return module;
}

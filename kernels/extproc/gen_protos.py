"""C++ for the native ext_proc transport, generated from the descriptors the Python wheels carry.

The ``xds-protos`` wheel holds Envoy's exact ``FileDescriptorProto`` for
``envoy/service/ext_proc/v3/external_processor.proto`` and everything it imports (24 files:
``base.proto`` alone pulls in addresses, socket options, backoff, xds context params and the
validate/udpa annotation files); ``grpcio-health-checking`` holds ``grpc.health.v1``.
Rather than vendor .proto files, this module prunes those descriptors to what the two
services reach (the messages and enums transitively used by ``ExternalProcessor`` and
``Health``) and drops every custom option (validate rules, udpa/xds annotations: they change
no wire byte). Names, field numbers, types and the options that shape the wire (map entries,
packing) stay Envoy's. protoc then generates 4 of Envoy's files instead of 17, plus
health.proto (the google/protobuf ones come with libprotobuf).

Used by setup.py: ``generate(out_dir, protoc, grpc_plugin)`` writes ``*.pb.{h,cc}`` and
``*.grpc.pb.{h,cc}`` under ``out_dir`` and returns the .cc files to compile.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT_SERVICES = ("envoy.service.ext_proc.v3.ExternalProcessor", "grpc.health.v1.Health")
# Compiled into libprotobuf already: referenced, never generated.
WELL_KNOWN_PREFIX = "google/protobuf/"


def _root_files() -> list[Any]:
    from envoy.service.ext_proc.v3 import external_processor_pb2
    from grpc_health.v1 import health_pb2

    return [external_processor_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR]


def _closure(files: Iterable[Any]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    stack = list(files)
    while stack:
        descriptor = stack.pop()
        if descriptor.name in seen:
            continue
        seen[descriptor.name] = descriptor
        stack.extend(descriptor.dependencies)
    return seen


def _protos(files: dict[str, Any]) -> dict[str, Any]:
    from google.protobuf import descriptor_pb2

    protos = {}
    for name, descriptor in files.items():
        proto = descriptor_pb2.FileDescriptorProto()
        descriptor.CopyToProto(proto)
        protos[name] = proto
    return protos


def _type_index(protos: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Fully qualified type name ('.pkg.Msg.Nested') -> (file name, its top-level DescriptorProto/Enum)."""
    index: dict[str, tuple[str, Any]] = {}

    def add_message(file_name: str, prefix: str, message: Any, top: Any) -> None:
        full = f"{prefix}.{message.name}"
        index[full] = (file_name, top)
        for nested in message.nested_type:
            add_message(file_name, full, nested, top)
        for enum in message.enum_type:
            index[f"{full}.{enum.name}"] = (file_name, top)

    for file_name, proto in protos.items():
        prefix = f".{proto.package}" if proto.package else ""
        for message in proto.message_type:
            add_message(file_name, prefix, message, message)
        for enum in proto.enum_type:
            index[f"{prefix}.{enum.name}"] = (file_name, enum)
    return index


def _reachable(protos: dict[str, Any], index: dict[str, tuple[str, Any]]) -> set[int]:
    """ids of the top-level messages/enums the root services use, directly or through fields."""
    kept: set[int] = set()
    stack: list[str] = []
    for proto in protos.values():
        for service in proto.service:
            if f"{proto.package}.{service.name}" in ROOT_SERVICES:
                for method in service.method:
                    stack += [method.input_type, method.output_type]

    def fields_of(message: Any) -> Iterable[str]:
        for field in message.field:
            if field.type_name:
                yield field.type_name
        for nested in message.nested_type:
            yield from fields_of(nested)

    while stack:
        _, top = index[stack.pop()]
        if id(top) in kept:
            continue
        kept.add(id(top))
        if hasattr(top, "field"):
            stack.extend(fields_of(top))
    return kept


def _strip_options(message: Any) -> None:
    # Two options shape the wire and the generated API, and stay: map_entry (a map<,> field is
    # a repeated entry message underneath) and an explicit packed.
    map_entry = message.options.map_entry
    message.ClearField("options")
    if map_entry:
        message.options.map_entry = True
    for field in message.field:
        packed = field.options.packed if field.options.HasField("packed") else None
        field.ClearField("options")
        if packed is not None:
            field.options.packed = packed
        field.ClearField("json_name")
    for oneof in message.oneof_decl:
        oneof.ClearField("options")
    for enum in message.enum_type:
        _strip_enum(enum)
    for nested in message.nested_type:
        _strip_options(nested)


def _strip_enum(enum: Any) -> None:
    enum.ClearField("options")
    for value in enum.value:
        value.ClearField("options")


def pruned_descriptor_set() -> tuple[bytes, list[str], list[str]]:
    """A serialized FileDescriptorSet, the files to generate (dependency order), those with services."""
    from google.protobuf import descriptor_pb2

    protos = _protos(_closure(_root_files()))
    index = _type_index(protos)
    kept = _reachable(protos, index)
    generated: list[str] = []
    with_services: list[str] = []
    result = descriptor_pb2.FileDescriptorSet()
    for name, proto in protos.items():
        if name.startswith(WELL_KNOWN_PREFIX):
            continue
        messages = [m for m in proto.message_type if id(m) in kept]
        enums = [e for e in proto.enum_type if id(e) in kept]
        services = [s for s in proto.service if f"{proto.package}.{s.name}" in ROOT_SERVICES]
        if not (messages or enums or services):
            continue
        pruned = descriptor_pb2.FileDescriptorProto(
            name=proto.name, package=proto.package, syntax=proto.syntax or "proto3"
        )
        pruned.message_type.extend(messages)
        pruned.enum_type.extend(enums)
        pruned.service.extend(services)
        for message in pruned.message_type:
            _strip_options(message)
        for enum in pruned.enum_type:
            _strip_enum(enum)
        for service in pruned.service:
            service.ClearField("options")
            for method in service.method:
                method.ClearField("options")
        generated.append(name)
        if services:
            with_services.append(name)
        result.file.append(pruned)
    # Imports: exactly the files whose types the pruned messages reference.
    by_name = {proto.name: proto for proto in result.file}
    wanted: set[str] = set()
    for proto in result.file:
        deps: list[str] = []
        for type_name in _references(proto):
            file_name, _ = index[type_name]
            if file_name != proto.name and file_name not in deps:
                deps.append(file_name)
        proto.ClearField("dependency")
        proto.dependency.extend(sorted(deps))
        wanted.update(deps)
    for name in sorted(wanted - set(by_name)):
        assert name.startswith(WELL_KNOWN_PREFIX), name
        result.file.append(protos[name])
    return result.SerializeToString(), _dependency_order(result, generated), with_services


def _references(proto: Any) -> Iterable[str]:
    def walk(message: Any) -> Iterable[str]:
        for field in message.field:
            if field.type_name:
                yield field.type_name
        for nested in message.nested_type:
            yield from walk(nested)

    for message in proto.message_type:
        yield from walk(message)
    for service in proto.service:
        for method in service.method:
            yield method.input_type
            yield method.output_type


def _dependency_order(descriptor_set: Any, names: list[str]) -> list[str]:
    deps = {proto.name: list(proto.dependency) for proto in descriptor_set.file}
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered or name not in names:
            return
        for dep in deps[name]:
            visit(dep)
        ordered.append(name)

    for name in names:
        visit(name)
    return ordered


def generate(out_dir: Path, protoc: str, grpc_plugin: str) -> list[Path]:
    """Write the C++ for the pruned files under ``out_dir``; return the .cc files to compile."""
    serialized, names, with_services = pruned_descriptor_set()
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = out_dir / "descriptors.bin"
    sources = [out_dir / name.replace(".proto", ".pb.cc") for name in names]
    sources += [out_dir / name.replace(".proto", ".grpc.pb.cc") for name in with_services]
    if stamp.exists() and stamp.read_bytes() == serialized and all(path.exists() for path in sources):
        return sources
    with tempfile.TemporaryDirectory() as scratch:
        descriptor_file = Path(scratch) / "ext_proc.desc"
        descriptor_file.write_bytes(serialized)
        subprocess.run(
            [
                protoc,
                f"--descriptor_set_in={descriptor_file}",
                f"--cpp_out={out_dir}",
                f"--grpc_out={out_dir}",
                f"--plugin=protoc-gen-grpc={grpc_plugin}",
                *names,
            ],
            check=True,
        )
    stamp.write_bytes(serialized)
    return sources

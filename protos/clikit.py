"""What every walle command line shares, cloud and device alike: one error wrapper that turns
`walle.protos.errors` (and gRPC failures) into the documented exit codes, `--json` output with
numbers as JSON numbers, and errors as JSON objects under `--json`.

Exit codes: 0 ok, 1 internal, 2 invalid input, 3 not found, 4 exists, 5 refused in state,
6 unauthenticated/not allowed, 7 over quota, 8 unreachable. It lives beside the errors because the
codes are part of the contract: the device host (which knows only walle.protos) uses it too."""
from __future__ import annotations

import json
import sys

import click
import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf import json_format

from . import errors

JSON_KEY = "walle.json"  # in click's ctx.meta, which every context of one invocation shares

_INT64 = {_descriptor.FieldDescriptor.TYPE_INT64, _descriptor.FieldDescriptor.TYPE_UINT64,
          _descriptor.FieldDescriptor.TYPE_SINT64, _descriptor.FieldDescriptor.TYPE_FIXED64,
          _descriptor.FieldDescriptor.TYPE_SFIXED64}


def error_from_rpc(e: grpc.RpcError) -> errors.WalleError:
    """A failed gRPC call as the error class of its status code (so it exits with the same code)."""
    return errors.from_status(e.code().name if e.code() else "UNKNOWN", e.details() or "")


# -- JSON -------------------------------------------------------------------------------------------
def _int64_as_numbers(desc, d: dict) -> dict:
    # protobuf's JSON mapping writes int64 as strings (for JavaScript); scripts want numbers.
    for field in desc.fields:
        if field.name not in d:
            continue
        value = d[field.name]
        if field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                vfield = field.message_type.fields_by_name["value"]
                if vfield.message_type is not None:
                    d[field.name] = {k: _int64_as_numbers(vfield.message_type, v) for k, v in value.items()}
                elif vfield.type in _INT64:
                    d[field.name] = {k: int(v) for k, v in value.items()}
            elif field.message_type.full_name.startswith("google.protobuf."):
                continue
            elif isinstance(value, list):
                d[field.name] = [_int64_as_numbers(field.message_type, v) for v in value]
            else:
                d[field.name] = _int64_as_numbers(field.message_type, value)
        elif field.type in _INT64:
            d[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return d


def to_jsonable(data):
    """A protobuf message as a dict (field names as in the .proto, every field present even when zero,
    int64 as numbers); anything else as is."""
    if hasattr(data, "DESCRIPTOR"):
        return _int64_as_numbers(data.DESCRIPTOR, json_format.MessageToDict(
            data, preserving_proto_field_name=True, always_print_fields_with_no_presence=True))
    return data


def print_json(data) -> None:
    click.echo(json.dumps(to_jsonable(data), indent=2, sort_keys=True, default=str))


def want_json(ctx: click.Context | None = None) -> bool:
    ctx = ctx or click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(JSON_KEY))


def json_option(f):
    """`--json` on any command (also accepted on the root group): machine-readable output."""
    def cb(ctx, _param, value):
        if value:
            ctx.meta[JSON_KEY] = True
        return value
    return click.option("--json", "json_", is_flag=True, expose_value=False, is_eager=True, callback=cb,
                        help="Print machine-readable JSON (errors too, as {\"error\": {...}}).")(f)


# -- errors -----------------------------------------------------------------------------------------
def error_payload(e: errors.WalleError) -> dict:
    return {"error": {"code": e.grpc_code, "message": e.message, "exit_code": e.exit_code}}


def report(ctx: click.Context | None, e: errors.WalleError) -> None:
    """Print an error (a JSON object on stdout under --json, else one line on stderr) and exit with its code."""
    if want_json(ctx):
        click.echo(json.dumps(error_payload(e), sort_keys=True))
    else:
        click.secho("error: ", fg="red", err=True, nl=False)
        click.echo(e.message, err=True)
    sys.exit(e.exit_code)


class _Wrapped:
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except errors.WalleError as e:
            report(ctx, e)
        except grpc.RpcError as e:
            report(ctx, error_from_rpc(e))


class WalleCommand(_Wrapped, click.Command):
    """A command whose errors exit with the documented codes."""


class WalleGroup(_Wrapped, click.Group):
    """A group whose commands (and subgroups) share the error wrapper; `lazy` maps command names to
    "module:attr" so heavy or optional modules load only when their command is asked for."""

    command_class = WalleCommand
    group_class = type  # subgroups are WalleGroups too

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy and name not in self.commands:
            import importlib
            module, _, attr = self.lazy[name].partition(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EmitRequest(_message.Message):
    __slots__ = ("name", "payload_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    payload_json: str
    def __init__(self, name: _Optional[str] = ..., payload_json: _Optional[str] = ...) -> None: ...

class EmitReply(_message.Message):
    __slots__ = ("tasks", "seq")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedScalarFieldContainer[str]
    seq: int
    def __init__(self, tasks: _Optional[_Iterable[str]] = ..., seq: _Optional[int] = ...) -> None: ...

class AskRequest(_message.Message):
    __slots__ = ("event", "payload_json", "task", "timeout_s")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    event: str
    payload_json: str
    task: str
    timeout_s: float
    def __init__(self, event: _Optional[str] = ..., payload_json: _Optional[str] = ..., task: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class AskReply(_message.Message):
    __slots__ = ("task", "version", "status", "result_json", "error", "duration_s")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    task: str
    version: str
    status: str
    result_json: str
    error: str
    duration_s: float
    def __init__(self, task: _Optional[str] = ..., version: _Optional[str] = ..., status: _Optional[str] = ..., result_json: _Optional[str] = ..., error: _Optional[str] = ..., duration_s: _Optional[float] = ...) -> None: ...

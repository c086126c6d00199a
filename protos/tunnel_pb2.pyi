from walle.protos import device_pb2 as _device_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpRecord(_message.Message):
    __slots__ = ("seq", "topic", "ts_ms", "payload")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    TS_MS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    seq: int
    topic: str
    ts_ms: int
    payload: bytes
    def __init__(self, seq: _Optional[int] = ..., topic: _Optional[str] = ..., ts_ms: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class UpRecords(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[UpRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[UpRecord, _Mapping]]] = ...) -> None: ...

class UpBatch(_message.Message):
    __slots__ = ("zlib_records", "count", "epoch")
    ZLIB_RECORDS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    zlib_records: bytes
    count: int
    epoch: int
    def __init__(self, zlib_records: _Optional[bytes] = ..., count: _Optional[int] = ..., epoch: _Optional[int] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("accepted", "duplicates", "max_seq")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    max_seq: int
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., max_seq: _Optional[int] = ...) -> None: ...

class RunReport(_message.Message):
    __slots__ = ("task", "version", "release_id", "status", "duration_s", "peak_memory_kb", "error", "trigger")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_KB_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    task: str
    version: str
    release_id: str
    status: str
    duration_s: float
    peak_memory_kb: int
    error: str
    trigger: str
    def __init__(self, task: _Optional[str] = ..., version: _Optional[str] = ..., release_id: _Optional[str] = ..., status: _Optional[str] = ..., duration_s: _Optional[float] = ..., peak_memory_kb: _Optional[int] = ..., error: _Optional[str] = ..., trigger: _Optional[str] = ...) -> None: ...

class DeliveryReport(_message.Message):
    __slots__ = ("task", "version", "release_id", "status", "error")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    task: str
    version: str
    release_id: str
    status: str
    error: str
    def __init__(self, task: _Optional[str] = ..., version: _Optional[str] = ..., release_id: _Optional[str] = ..., status: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ResourceRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ResourceInfo(_message.Message):
    __slots__ = ("name", "version", "digest", "size", "metadata_json", "blob_url_base", "blob_url_wants_credential")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    BLOB_URL_BASE_FIELD_NUMBER: _ClassVar[int]
    BLOB_URL_WANTS_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    size: int
    metadata_json: str
    blob_url_base: str
    blob_url_wants_credential: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ..., metadata_json: _Optional[str] = ..., blob_url_base: _Optional[str] = ..., blob_url_wants_credential: _Optional[bool] = ...) -> None: ...

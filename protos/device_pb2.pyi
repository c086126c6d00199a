from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeviceInfo(_message.Message):
    __slots__ = ("device_id", "user_id", "app_version", "os", "os_version", "device_model", "region", "network", "tags", "host_version", "channel", "installed")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    APP_VERSION_FIELD_NUMBER: _ClassVar[int]
    OS_FIELD_NUMBER: _ClassVar[int]
    OS_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MODEL_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    HOST_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    INSTALLED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    user_id: str
    app_version: str
    os: str
    os_version: str
    device_model: str
    region: str
    network: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    host_version: str
    channel: str
    installed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, device_id: _Optional[str] = ..., user_id: _Optional[str] = ..., app_version: _Optional[str] = ..., os: _Optional[str] = ..., os_version: _Optional[str] = ..., device_model: _Optional[str] = ..., region: _Optional[str] = ..., network: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., host_version: _Optional[str] = ..., channel: _Optional[str] = ..., installed: _Optional[_Iterable[str]] = ...) -> None: ...

class Trigger(_message.Message):
    __slots__ = ("kind", "event", "table", "min_rows", "every_seconds")
    KIND_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    TABLE_FIELD_NUMBER: _ClassVar[int]
    MIN_ROWS_FIELD_NUMBER: _ClassVar[int]
    EVERY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    event: str
    table: str
    min_rows: int
    every_seconds: float
    def __init__(self, kind: _Optional[str] = ..., event: _Optional[str] = ..., table: _Optional[str] = ..., min_rows: _Optional[int] = ..., every_seconds: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("memory_mb", "cpu_seconds", "wall_seconds")
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WALL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    memory_mb: int
    cpu_seconds: float
    wall_seconds: float
    def __init__(self, memory_mb: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., wall_seconds: _Optional[float] = ...) -> None: ...

class ConfigParam(_message.Message):
    __slots__ = ("name", "type", "default_json", "min_json", "max_json", "choices_json", "help")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_JSON_FIELD_NUMBER: _ClassVar[int]
    MIN_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_JSON_FIELD_NUMBER: _ClassVar[int]
    CHOICES_JSON_FIELD_NUMBER: _ClassVar[int]
    HELP_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    default_json: str
    min_json: str
    max_json: str
    choices_json: _containers.RepeatedScalarFieldContainer[str]
    help: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., default_json: _Optional[str] = ..., min_json: _Optional[str] = ..., max_json: _Optional[str] = ..., choices_json: _Optional[_Iterable[str]] = ..., help: _Optional[str] = ...) -> None: ...

class TaskManifest(_message.Message):
    __slots__ = ("name", "entry", "description", "triggers", "limits", "apis", "min_host_version", "namespace", "libraries", "config", "namespace_members")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TRIGGERS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    APIS_FIELD_NUMBER: _ClassVar[int]
    MIN_HOST_VERSION_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LIBRARIES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    entry: str
    description: str
    triggers: _containers.RepeatedCompositeFieldContainer[Trigger]
    limits: Limits
    apis: _containers.RepeatedScalarFieldContainer[str]
    min_host_version: str
    namespace: str
    libraries: _containers.RepeatedScalarFieldContainer[str]
    config: _containers.RepeatedCompositeFieldContainer[ConfigParam]
    namespace_members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., entry: _Optional[str] = ..., description: _Optional[str] = ..., triggers: _Optional[_Iterable[_Union[Trigger, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., apis: _Optional[_Iterable[str]] = ..., min_host_version: _Optional[str] = ..., namespace: _Optional[str] = ..., libraries: _Optional[_Iterable[str]] = ..., config: _Optional[_Iterable[_Union[ConfigParam, _Mapping]]] = ..., namespace_members: _Optional[_Iterable[str]] = ...) -> None: ...

class ActiveTask(_message.Message):
    __slots__ = ("name", "version", "bundle_digest", "bundle_size", "manifest", "release_id", "signature", "config_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    bundle_digest: str
    bundle_size: int
    manifest: TaskManifest
    release_id: str
    signature: bytes
    config_json: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., bundle_digest: _Optional[str] = ..., bundle_size: _Optional[int] = ..., manifest: _Optional[_Union[TaskManifest, _Mapping]] = ..., release_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., config_json: _Optional[str] = ...) -> None: ...

class ActiveTasks(_message.Message):
    __slots__ = ("tasks", "revision", "poll_after_seconds", "blob_url_base", "blob_url_wants_credential")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    POLL_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BLOB_URL_BASE_FIELD_NUMBER: _ClassVar[int]
    BLOB_URL_WANTS_CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[ActiveTask]
    revision: str
    poll_after_seconds: int
    blob_url_base: str
    blob_url_wants_credential: bool
    def __init__(self, tasks: _Optional[_Iterable[_Union[ActiveTask, _Mapping]]] = ..., revision: _Optional[str] = ..., poll_after_seconds: _Optional[int] = ..., blob_url_base: _Optional[str] = ..., blob_url_wants_credential: _Optional[bool] = ...) -> None: ...

class FetchBundleRequest(_message.Message):
    __slots__ = ("digest",)
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: str
    def __init__(self, digest: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "total_size", "digest")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_size: int
    digest: str
    def __init__(self, data: _Optional[bytes] = ..., total_size: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("device", "known_revision")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    KNOWN_REVISION_FIELD_NUMBER: _ClassVar[int]
    device: DeviceInfo
    known_revision: str
    def __init__(self, device: _Optional[_Union[DeviceInfo, _Mapping]] = ..., known_revision: _Optional[str] = ...) -> None: ...

class ListChanged(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: str
    def __init__(self, revision: _Optional[str] = ...) -> None: ...

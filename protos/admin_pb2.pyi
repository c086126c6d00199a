from walle.protos import device_pb2 as _device_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskVersion(_message.Message):
    __slots__ = ("name", "version", "message", "author", "created_at", "bundle_digest", "bundle_size", "manifest", "created")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    message: str
    author: str
    created_at: int
    bundle_digest: str
    bundle_size: int
    manifest: _device_pb2.TaskManifest
    created: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., message: _Optional[str] = ..., author: _Optional[str] = ..., created_at: _Optional[int] = ..., bundle_digest: _Optional[str] = ..., bundle_size: _Optional[int] = ..., manifest: _Optional[_Union[_device_pb2.TaskManifest, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class SubmitTaskRequest(_message.Message):
    __slots__ = ("archive", "message", "author")
    ARCHIVE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    AUTHOR_FIELD_NUMBER: _ClassVar[int]
    archive: bytes
    message: str
    author: str
    def __init__(self, archive: _Optional[bytes] = ..., message: _Optional[str] = ..., author: _Optional[str] = ...) -> None: ...

class TaskRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class TaskList(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskVersion]
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskVersion, _Mapping]]] = ...) -> None: ...

class TaskHistory(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[TaskVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[TaskVersion, _Mapping]]] = ...) -> None: ...

class DiffRequest(_message.Message):
    __slots__ = ("name", "v1", "v2")
    NAME_FIELD_NUMBER: _ClassVar[int]
    V1_FIELD_NUMBER: _ClassVar[int]
    V2_FIELD_NUMBER: _ClassVar[int]
    name: str
    v1: str
    v2: str
    def __init__(self, name: _Optional[str] = ..., v1: _Optional[str] = ..., v2: _Optional[str] = ...) -> None: ...

class DiffReply(_message.Message):
    __slots__ = ("unified_diff",)
    UNIFIED_DIFF_FIELD_NUMBER: _ClassVar[int]
    unified_diff: str
    def __init__(self, unified_diff: _Optional[str] = ...) -> None: ...

class TaskFiles(_message.Message):
    __slots__ = ("version", "files", "digests")
    class FilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class DigestsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    version: TaskVersion
    files: _containers.ScalarMap[str, str]
    digests: _containers.ScalarMap[str, str]
    def __init__(self, version: _Optional[_Union[TaskVersion, _Mapping]] = ..., files: _Optional[_Mapping[str, str]] = ..., digests: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReleaseStats(_message.Message):
    __slots__ = ("delivered", "ran", "runs", "failed", "p50_duration_s", "rejected", "rolled_back")
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    RAN_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    P50_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    delivered: int
    ran: int
    runs: int
    failed: int
    p50_duration_s: float
    rejected: int
    rolled_back: int
    def __init__(self, delivered: _Optional[int] = ..., ran: _Optional[int] = ..., runs: _Optional[int] = ..., failed: _Optional[int] = ..., p50_duration_s: _Optional[float] = ..., rejected: _Optional[int] = ..., rolled_back: _Optional[int] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("id", "task", "version", "rule", "rollout", "stage", "channel", "state", "created_at", "created_by", "note", "bundle_digest", "allow", "deny", "stats", "salt", "config_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    DENY_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    task: str
    version: str
    rule: str
    rollout: float
    stage: str
    channel: str
    state: str
    created_at: int
    created_by: str
    note: str
    bundle_digest: str
    allow: _containers.RepeatedScalarFieldContainer[str]
    deny: _containers.RepeatedScalarFieldContainer[str]
    stats: ReleaseStats
    salt: str
    config_json: str
    def __init__(self, id: _Optional[str] = ..., task: _Optional[str] = ..., version: _Optional[str] = ..., rule: _Optional[str] = ..., rollout: _Optional[float] = ..., stage: _Optional[str] = ..., channel: _Optional[str] = ..., state: _Optional[str] = ..., created_at: _Optional[int] = ..., created_by: _Optional[str] = ..., note: _Optional[str] = ..., bundle_digest: _Optional[str] = ..., allow: _Optional[_Iterable[str]] = ..., deny: _Optional[_Iterable[str]] = ..., stats: _Optional[_Union[ReleaseStats, _Mapping]] = ..., salt: _Optional[str] = ..., config_json: _Optional[str] = ...) -> None: ...

class CreateReleaseRequest(_message.Message):
    __slots__ = ("task", "version", "rule", "rollout", "stage", "channel", "allow", "deny", "actor", "has_rollout", "config")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    DENY_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    HAS_ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    task: str
    version: str
    rule: str
    rollout: float
    stage: str
    channel: str
    allow: _containers.RepeatedScalarFieldContainer[str]
    deny: _containers.RepeatedScalarFieldContainer[str]
    actor: str
    has_rollout: bool
    config: _containers.ScalarMap[str, str]
    def __init__(self, task: _Optional[str] = ..., version: _Optional[str] = ..., rule: _Optional[str] = ..., rollout: _Optional[float] = ..., stage: _Optional[str] = ..., channel: _Optional[str] = ..., allow: _Optional[_Iterable[str]] = ..., deny: _Optional[_Iterable[str]] = ..., actor: _Optional[str] = ..., has_rollout: _Optional[bool] = ..., config: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ReleaseRef(_message.Message):
    __slots__ = ("id", "actor")
    ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    actor: str
    def __init__(self, id: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class ReleaseFilter(_message.Message):
    __slots__ = ("task", "channel", "active_only")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ONLY_FIELD_NUMBER: _ClassVar[int]
    task: str
    channel: str
    active_only: bool
    def __init__(self, task: _Optional[str] = ..., channel: _Optional[str] = ..., active_only: _Optional[bool] = ...) -> None: ...

class ReleaseList(_message.Message):
    __slots__ = ("releases",)
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    releases: _containers.RepeatedCompositeFieldContainer[Release]
    def __init__(self, releases: _Optional[_Iterable[_Union[Release, _Mapping]]] = ...) -> None: ...

class SetRolloutRequest(_message.Message):
    __slots__ = ("id", "rollout", "stage", "actor")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    rollout: float
    stage: str
    actor: str
    def __init__(self, id: _Optional[str] = ..., rollout: _Optional[float] = ..., stage: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("task", "to_version", "channel", "actor")
    TASK_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    task: str
    to_version: str
    channel: str
    actor: str
    def __init__(self, task: _Optional[str] = ..., to_version: _Optional[str] = ..., channel: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("device_id", "actor", "ttl_seconds", "user_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    actor: str
    ttl_seconds: int
    user_id: str
    def __init__(self, device_id: _Optional[str] = ..., actor: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., user_id: _Optional[str] = ...) -> None: ...

class EnrollReply(_message.Message):
    __slots__ = ("device_id", "token", "platform_ca_pem", "bundle_public_key", "user_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_CA_PEM_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    token: str
    platform_ca_pem: str
    bundle_public_key: bytes
    user_id: str
    def __init__(self, device_id: _Optional[str] = ..., token: _Optional[str] = ..., platform_ca_pem: _Optional[str] = ..., bundle_public_key: _Optional[bytes] = ..., user_id: _Optional[str] = ...) -> None: ...

class DeviceRef(_message.Message):
    __slots__ = ("device_id", "actor")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    actor: str
    def __init__(self, device_id: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("device_id", "enrolled_at", "revoked", "last_seen", "app_version", "attrs_json", "user_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    APP_VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTRS_JSON_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    enrolled_at: int
    revoked: bool
    last_seen: int
    app_version: str
    attrs_json: str
    user_id: str
    def __init__(self, device_id: _Optional[str] = ..., enrolled_at: _Optional[int] = ..., revoked: _Optional[bool] = ..., last_seen: _Optional[int] = ..., app_version: _Optional[str] = ..., attrs_json: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class DeviceList(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    def __init__(self, devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ...) -> None: ...

class PreviewReply(_message.Message):
    __slots__ = ("tasks", "explanation")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[_device_pb2.ActiveTask]
    explanation: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tasks: _Optional[_Iterable[_Union[_device_pb2.ActiveTask, _Mapping]]] = ..., explanation: _Optional[_Iterable[str]] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("ts", "actor", "action", "target", "detail")
    TS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    ts: int
    actor: str
    action: str
    target: str
    detail: str
    def __init__(self, ts: _Optional[int] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("limit", "action", "actor", "since", "target", "exclude_action")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_ACTION_FIELD_NUMBER: _ClassVar[int]
    limit: int
    action: str
    actor: str
    since: int
    target: str
    exclude_action: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, limit: _Optional[int] = ..., action: _Optional[str] = ..., actor: _Optional[str] = ..., since: _Optional[int] = ..., target: _Optional[str] = ..., exclude_action: _Optional[_Iterable[str]] = ...) -> None: ...

class AuditLog(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class PublishResourceRequest(_message.Message):
    __slots__ = ("name", "data", "metadata_json", "actor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    metadata_json: str
    actor: str
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ..., metadata_json: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LogRequest(_message.Message):
    __slots__ = ("release_id", "task", "device_id", "status", "since", "limit", "after", "kind")
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    release_id: str
    task: str
    device_id: str
    status: str
    since: int
    limit: int
    after: str
    kind: str
    def __init__(self, release_id: _Optional[str] = ..., task: _Optional[str] = ..., device_id: _Optional[str] = ..., status: _Optional[str] = ..., since: _Optional[int] = ..., limit: _Optional[int] = ..., after: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class LogEntry(_message.Message):
    __slots__ = ("ts", "device_id", "kind", "task", "version", "release_id", "status", "duration_s", "error", "lines", "trigger", "peak_memory_kb")
    TS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_KB_FIELD_NUMBER: _ClassVar[int]
    ts: int
    device_id: str
    kind: str
    task: str
    version: str
    release_id: str
    status: str
    duration_s: float
    error: str
    lines: _containers.RepeatedScalarFieldContainer[str]
    trigger: str
    peak_memory_kb: int
    def __init__(self, ts: _Optional[int] = ..., device_id: _Optional[str] = ..., kind: _Optional[str] = ..., task: _Optional[str] = ..., version: _Optional[str] = ..., release_id: _Optional[str] = ..., status: _Optional[str] = ..., duration_s: _Optional[float] = ..., error: _Optional[str] = ..., lines: _Optional[_Iterable[str]] = ..., trigger: _Optional[str] = ..., peak_memory_kb: _Optional[int] = ...) -> None: ...

class LogReply(_message.Message):
    __slots__ = ("entries", "cursor")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[LogEntry]
    cursor: str
    def __init__(self, entries: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ..., cursor: _Optional[str] = ...) -> None: ...

class ErrorCount(_message.Message):
    __slots__ = ("error", "runs", "devices", "example", "example_device")
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_DEVICE_FIELD_NUMBER: _ClassVar[int]
    error: str
    runs: int
    devices: int
    example: str
    example_device: str
    def __init__(self, error: _Optional[str] = ..., runs: _Optional[int] = ..., devices: _Optional[int] = ..., example: _Optional[str] = ..., example_device: _Optional[str] = ...) -> None: ...

class ReleaseHealth(_message.Message):
    __slots__ = ("release", "targeted", "failed_devices", "top_errors", "changes", "p99_duration_s")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    TARGETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_DEVICES_FIELD_NUMBER: _ClassVar[int]
    TOP_ERRORS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    P99_DURATION_S_FIELD_NUMBER: _ClassVar[int]
    release: Release
    targeted: int
    failed_devices: int
    top_errors: _containers.RepeatedCompositeFieldContainer[ErrorCount]
    changes: _containers.RepeatedScalarFieldContainer[str]
    p99_duration_s: float
    def __init__(self, release: _Optional[_Union[Release, _Mapping]] = ..., targeted: _Optional[int] = ..., failed_devices: _Optional[int] = ..., top_errors: _Optional[_Iterable[_Union[ErrorCount, _Mapping]]] = ..., changes: _Optional[_Iterable[str]] = ..., p99_duration_s: _Optional[float] = ...) -> None: ...

class InstalledVersion(_message.Message):
    __slots__ = ("task", "version", "release_id", "status", "ts", "error")
    TASK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    task: str
    version: str
    release_id: str
    status: str
    ts: int
    error: str
    def __init__(self, task: _Optional[str] = ..., version: _Optional[str] = ..., release_id: _Optional[str] = ..., status: _Optional[str] = ..., ts: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class DeviceDetail(_message.Message):
    __slots__ = ("device", "user_id", "installed", "last_runs", "errors")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    INSTALLED_FIELD_NUMBER: _ClassVar[int]
    LAST_RUNS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    device: Device
    user_id: str
    installed: _containers.RepeatedCompositeFieldContainer[InstalledVersion]
    last_runs: _containers.RepeatedCompositeFieldContainer[LogEntry]
    errors: _containers.RepeatedCompositeFieldContainer[LogEntry]
    def __init__(self, device: _Optional[_Union[Device, _Mapping]] = ..., user_id: _Optional[str] = ..., installed: _Optional[_Iterable[_Union[InstalledVersion, _Mapping]]] = ..., last_runs: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[LogEntry, _Mapping]]] = ...) -> None: ...

class OperatorInfo(_message.Message):
    __slots__ = ("name", "created_at", "revoked")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    name: str
    created_at: int
    revoked: bool
    def __init__(self, name: _Optional[str] = ..., created_at: _Optional[int] = ..., revoked: _Optional[bool] = ...) -> None: ...

class OperatorList(_message.Message):
    __slots__ = ("operators",)
    OPERATORS_FIELD_NUMBER: _ClassVar[int]
    operators: _containers.RepeatedCompositeFieldContainer[OperatorInfo]
    def __init__(self, operators: _Optional[_Iterable[_Union[OperatorInfo, _Mapping]]] = ...) -> None: ...

class ReleaseGuard(_message.Message):
    __slots__ = ("release_id", "max_failure_rate", "min_runs", "max_p99_seconds", "on_trip", "actor", "status", "trip_detail", "tripped_at", "action_release_id")
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_FAILURE_RATE_FIELD_NUMBER: _ClassVar[int]
    MIN_RUNS_FIELD_NUMBER: _ClassVar[int]
    MAX_P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ON_TRIP_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TRIP_DETAIL_FIELD_NUMBER: _ClassVar[int]
    TRIPPED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTION_RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    release_id: str
    max_failure_rate: float
    min_runs: int
    max_p99_seconds: float
    on_trip: str
    actor: str
    status: str
    trip_detail: str
    tripped_at: int
    action_release_id: str
    def __init__(self, release_id: _Optional[str] = ..., max_failure_rate: _Optional[float] = ..., min_runs: _Optional[int] = ..., max_p99_seconds: _Optional[float] = ..., on_trip: _Optional[str] = ..., actor: _Optional[str] = ..., status: _Optional[str] = ..., trip_detail: _Optional[str] = ..., tripped_at: _Optional[int] = ..., action_release_id: _Optional[str] = ...) -> None: ...

class ResourceInfoRef(_message.Message):
    __slots__ = ("name", "version", "digest", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    digest: str
    size: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., digest: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BehaviorLog(_message.Message):
    __slots__ = ("ts", "item_id", "event", "value")
    TS_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ts: int
    item_id: int
    event: str
    value: float
    def __init__(self, ts: _Optional[int] = ..., item_id: _Optional[int] = ..., event: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("sample_id", "user", "ts", "day", "label", "item_id", "item_cats", "hist_items", "hist_cats", "profile")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    TS_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_CATS_FIELD_NUMBER: _ClassVar[int]
    HIST_ITEMS_FIELD_NUMBER: _ClassVar[int]
    HIST_CATS_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    user: str
    ts: int
    day: int
    label: float
    item_id: int
    item_cats: _containers.RepeatedScalarFieldContainer[int]
    hist_items: _containers.RepeatedScalarFieldContainer[int]
    hist_cats: _containers.RepeatedScalarFieldContainer[int]
    profile: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, sample_id: _Optional[str] = ..., user: _Optional[str] = ..., ts: _Optional[int] = ..., day: _Optional[int] = ..., label: _Optional[float] = ..., item_id: _Optional[int] = ..., item_cats: _Optional[_Iterable[int]] = ..., hist_items: _Optional[_Iterable[int]] = ..., hist_cats: _Optional[_Iterable[int]] = ..., profile: _Optional[_Iterable[float]] = ...) -> None: ...

class BehaviorBatch(_message.Message):
    __slots__ = ("first_seq", "logs")
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOGS_FIELD_NUMBER: _ClassVar[int]
    first_seq: int
    logs: _containers.RepeatedCompositeFieldContainer[BehaviorLog]
    def __init__(self, first_seq: _Optional[int] = ..., logs: _Optional[_Iterable[_Union[BehaviorLog, _Mapping]]] = ...) -> None: ...

class SampleList(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ...) -> None: ...

class BatchInfo(_message.Message):
    __slots__ = ("batch_id", "count")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    count: int
    def __init__(self, batch_id: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class ListBatchesRequest(_message.Message):
    __slots__ = ("day",)
    DAY_FIELD_NUMBER: _ClassVar[int]
    day: int
    def __init__(self, day: _Optional[int] = ...) -> None: ...

class BatchList(_message.Message):
    __slots__ = ("day", "batches", "pulled_today", "daily_limit", "today")
    DAY_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    PULLED_TODAY_FIELD_NUMBER: _ClassVar[int]
    DAILY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    TODAY_FIELD_NUMBER: _ClassVar[int]
    day: int
    batches: _containers.RepeatedCompositeFieldContainer[BatchInfo]
    pulled_today: int
    daily_limit: int
    today: int
    def __init__(self, day: _Optional[int] = ..., batches: _Optional[_Iterable[_Union[BatchInfo, _Mapping]]] = ..., pulled_today: _Optional[int] = ..., daily_limit: _Optional[int] = ..., today: _Optional[int] = ...) -> None: ...

class PullBatchesRequest(_message.Message):
    __slots__ = ("day", "batch_ids", "max_batches")
    DAY_FIELD_NUMBER: _ClassVar[int]
    BATCH_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCHES_FIELD_NUMBER: _ClassVar[int]
    day: int
    batch_ids: _containers.RepeatedScalarFieldContainer[str]
    max_batches: int
    def __init__(self, day: _Optional[int] = ..., batch_ids: _Optional[_Iterable[str]] = ..., max_batches: _Optional[int] = ...) -> None: ...

class SampleBatch(_message.Message):
    __slots__ = ("batch_id", "day", "count", "zlib_samples")
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    ZLIB_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    batch_id: str
    day: int
    count: int
    zlib_samples: bytes
    def __init__(self, batch_id: _Optional[str] = ..., day: _Optional[int] = ..., count: _Optional[int] = ..., zlib_samples: _Optional[bytes] = ...) -> None: ...

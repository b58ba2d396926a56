from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetFederationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Federation(_message.Message):
    __slots__ = ("base_model", "base_fingerprint", "methods", "max_bundle_bytes", "chunk_bytes", "max_concurrent_uploads", "server_version", "bundle_format_version", "contributor")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    MAX_BUNDLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_UPLOADS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    base_fingerprint: str
    methods: _containers.RepeatedScalarFieldContainer[str]
    max_bundle_bytes: int
    chunk_bytes: int
    max_concurrent_uploads: int
    server_version: str
    bundle_format_version: int
    contributor: str
    def __init__(self, base_model: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., methods: _Optional[_Iterable[str]] = ..., max_bundle_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., max_concurrent_uploads: _Optional[int] = ..., server_version: _Optional[str] = ..., bundle_format_version: _Optional[int] = ..., contributor: _Optional[str] = ...) -> None: ...

class StartUploadRequest(_message.Message):
    __slots__ = ("size_bytes", "expert_id", "name")
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    expert_id: str
    name: str
    def __init__(self, size_bytes: _Optional[int] = ..., expert_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class StartUploadResponse(_message.Message):
    __slots__ = ("upload_id", "committed_bytes", "existing")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXISTING_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    committed_bytes: int
    existing: Expert
    def __init__(self, upload_id: _Optional[str] = ..., committed_bytes: _Optional[int] = ..., existing: _Optional[_Union[Expert, _Mapping]] = ...) -> None: ...

class WriteUploadRequest(_message.Message):
    __slots__ = ("upload_id", "offset", "data")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    offset: int
    data: bytes
    def __init__(self, upload_id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class QueryUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class UploadStatus(_message.Message):
    __slots__ = ("upload_id", "committed_bytes", "size_bytes")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    committed_bytes: int
    size_bytes: int
    def __init__(self, upload_id: _Optional[str] = ..., committed_bytes: _Optional[int] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class FinishUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class CancelUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class CancelUploadResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FinishUploadResponse(_message.Message):
    __slots__ = ("expert", "already_stored")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ALREADY_STORED_FIELD_NUMBER: _ClassVar[int]
    expert: Expert
    already_stored: bool
    def __init__(self, expert: _Optional[_Union[Expert, _Mapping]] = ..., already_stored: _Optional[bool] = ...) -> None: ...

class ListExpertsRequest(_message.Message):
    __slots__ = ("contributor",)
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    contributor: str
    def __init__(self, contributor: _Optional[str] = ...) -> None: ...

class ListExpertsResponse(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[Expert]
    def __init__(self, experts: _Optional[_Iterable[_Union[Expert, _Mapping]]] = ...) -> None: ...

class GetExpertRequest(_message.Message):
    __slots__ = ("expert_id",)
    EXPERT_ID_FIELD_NUMBER: _ClassVar[int]
    expert_id: str
    def __init__(self, expert_id: _Optional[str] = ...) -> None: ...

class Expert(_message.Message):
    __slots__ = ("expert_id", "name", "contributor", "method", "size_bytes", "created_at", "num_modules", "quarantine")
    EXPERT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTOR_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    NUM_MODULES_FIELD_NUMBER: _ClassVar[int]
    QUARANTINE_FIELD_NUMBER: _ClassVar[int]
    expert_id: str
    name: str
    contributor: str
    method: str
    size_bytes: int
    created_at: float
    num_modules: int
    quarantine: str
    def __init__(self, expert_id: _Optional[str] = ..., name: _Optional[str] = ..., contributor: _Optional[str] = ..., method: _Optional[str] = ..., size_bytes: _Optional[int] = ..., created_at: _Optional[float] = ..., num_modules: _Optional[int] = ..., quarantine: _Optional[str] = ...) -> None: ...

class AddTokenRequest(_message.Message):
    __slots__ = ("name", "admin", "rotate")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    ROTATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    admin: bool
    rotate: bool
    def __init__(self, name: _Optional[str] = ..., admin: _Optional[bool] = ..., rotate: _Optional[bool] = ...) -> None: ...

class AddTokenResponse(_message.Message):
    __slots__ = ("name", "role", "token")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    token: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: int
    def __init__(self, revoked: _Optional[int] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenHolder(_message.Message):
    __slots__ = ("name", "role", "live_tokens", "revoked_tokens")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LIVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    live_tokens: int
    revoked_tokens: int
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., live_tokens: _Optional[int] = ..., revoked_tokens: _Optional[int] = ...) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("holders",)
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    holders: _containers.RepeatedCompositeFieldContainer[TokenHolder]
    def __init__(self, holders: _Optional[_Iterable[_Union[TokenHolder, _Mapping]]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("version", "force")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    version: str
    force: bool
    def __init__(self, version: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class PromoteResponse(_message.Message):
    __slots__ = ("version_id", "sequence")
    VERSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    version_id: str
    sequence: int
    def __init__(self, version_id: _Optional[str] = ..., sequence: _Optional[int] = ...) -> None: ...

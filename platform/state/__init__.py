"""The platform's durable state: one interface (`PlatformState`), SQLite and PostgreSQL behind it."""
from .base import PlatformState, Transaction, UploadWrite
from .factory import ENV, open_state, state_url

__all__ = ["ENV", "PlatformState", "Transaction", "UploadWrite", "open_state", "state_url"]

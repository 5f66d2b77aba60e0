"""Sessions on a stage: one KV cache per generation, bounded in number and freed when the session ends or
falls idle. Pure: time is an argument.

A session is opened by its first step (step 0) and then advances one step at a time; a step out of order
(``STEP_MISMATCH``) or for a session this stage does not have (``UNKNOWN_SESSION``: never opened, ended,
or expired) is refused without touching any other session. When the table is full, idle sessions are
expired first; if none is idle the new one is refused (``TOO_MANY_SESSIONS``), never an old one dropped.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import PeerError
from mesh.ids import NodeId


class SessionError(PeerError):
    code = "UNKNOWN_SESSION"


@dataclass(slots=True)
class Session:
    id: str
    cache: Any  # the stage's DynamicCache (or None for a stage without blocks)
    created: float
    last_used: float
    next_step: int = 0
    info: dict[str, Any] = field(default_factory=dict)  # route, sampling parameters, ...


class SessionTable:
    def __init__(self, *, max_sessions: int = 64, idle_timeout: float = 120.0) -> None:
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def step(self, session_id: str, step: int, now: float, new_cache: Callable[[], Any],
             info: dict[str, Any] | None = None) -> Session:
        """The session for this step: opened on step 0, else it must exist and expect exactly ``step``.
        The caller runs the step and then calls ``done``."""
        s = self._sessions.get(session_id)
        if step == 0:
            if s is not None:
                raise SessionError(f"session {session_id} is already open here", code="SESSION_EXISTS")
            self.expire(now)
            if len(self._sessions) >= self.max_sessions:
                raise SessionError(f"{len(self._sessions)} sessions are running here, the most allowed",
                                   code="TOO_MANY_SESSIONS")
            s = Session(session_id, new_cache(), now, now, 0, dict(info or {}))
            self._sessions[session_id] = s
            return s
        if s is None:
            raise SessionError(f"no session {session_id} here (never opened, ended or expired)")
        if step != s.next_step:
            raise SessionError(f"session {session_id} expects step {s.next_step}, got {step}", code="STEP_MISMATCH")
        s.last_used = now
        return s

    def active(self, now: float, within: float) -> int:
        """Sessions that stepped within the last ``within`` seconds (not those left idle, to expire)."""
        return sum(1 for s in self._sessions.values() if now - s.last_used <= within)

    def done(self, s: Session, now: float) -> None:
        s.next_step += 1
        s.last_used = now

    def end(self, session_id: str) -> bool:
        """Free a session's cache; False if it was not here."""
        return self._sessions.pop(session_id, None) is not None

    def expire(self, now: float) -> list[str]:
        """End the sessions idle for longer than ``idle_timeout``; their ids."""
        old = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_timeout]
        for sid in old:
            del self._sessions[sid]
        return old


def new_session_id(node: NodeId) -> str:
    return f"{node[-6:]}-{secrets.token_hex(8)}"

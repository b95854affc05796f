"""The agent's HTTP proxy bounds: sizes and timeouts, in one place.

The engines read them as ``limits.NAME`` when they run (never copied at import), so a test or an
embedding program can shorten one with a single assignment.
"""

from __future__ import annotations

#: Bytes per read from either side; also the most one side buffers before waiting on the other.
CHUNK = 64 * 1024
#: Largest request or response head (h11's ``max_incomplete_event_size``); bigger heads get 431.
MAX_HEAD = 64 * 1024
#: How long a keep-alive connection may sit idle before its next request starts.
IDLE_TIMEOUT = 75.0
#: How long the rest of a request head may take once its first byte arrived (slowloris bound).
HEAD_TIMEOUT = 30.0
#: Longest silence inside a request body before the visitor is given up on.
BODY_TIMEOUT = 300.0
#: How long a visitor that sent ``Expect: 100-continue`` waits for the local service's 100 (or
#: its early refusal) before burrow sends one itself. The local service is next door, so one
#: that implements 100-continue answers well within this; one that does not costs only this.
CONTINUE_WAIT = 0.25
#: When a response ends before its request body, how long the body may take to finish.
BODY_GRACE = 1.0
#: After an early response, how much unread request body is discarded to keep the connection.
DISCARD_LIMIT = 1024 * 1024
#: Time allowed for that discarding, and for a lingering close (so the visitor reads our answer
#: instead of a reset).
LINGER = 2.0
#: A replayed exchange stops reading the response after this long (a replayed SSE never ends).
REPLAY_TIMEOUT = 60.0

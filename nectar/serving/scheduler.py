"""Continuous batching without a model: which request prefills or decodes in which KV-cache slot.

The KV cache has `batch_max` slots. Invariant: slot i is row i of the decode batch, and the B
decoding requests always hold slots 0..B-1, so a decode forward runs on the first B rows. At most one
request prefills at a time; it holds slot B, right after the decoding ones, and runs one chunk of at
most `prefill_chunk_tokens` prompt tokens per prefill step. When its last chunk runs it produces its
first token and joins the decode batch (B grows by one; it is already at slot B). A request finishes
once it has `output_tokens` generated tokens (the first one from prefill included). When the request
at slot i finishes, the request at the last decoding slot moves into slot i, and a prefilling request
moves down to the new slot B; the scheduler returns these moves as `SlotMove(src, dst)` in the order
the engine must copy KV-cache rows. Admission is FCFS by (arrival_s, request_id): the head of the
queue starts prefilling once it has arrived (arrival_s <= now_s), nobody else prefills, and a slot is
free (decoding + prefilling < batch_max).

Context limit: a request whose prompt + output exceeds `max_context_tokens` has its prompt cut from
the left (the most recent prompt tokens are kept) to max_context_tokens - output_tokens; its record
says how many tokens were cut (`prompt_cut_tokens`). `add` raises ValueError when output_tokens alone
leaves no room for a prompt token.

Context length of a decoding row (`context_lengths()`): the tokens already in its cache, which is
also the position the next decode step writes its input token at: prompt_tokens + generated - 1
(the newest generated token is the input of the next step and not yet in the cache).

The loop drives it with the backend's clock (seconds; the scheduler never reads a clock):

    while not sched.done():
        now_s = max(now_s, sched.next_event_s(now_s))      # jump over idle time (record an idle step)
        chunk = sched.plan_prefill(now_s)                  # admits the queue's head if it can
        if chunk:                                           # prefill chunk.n_tokens prompt tokens at
            now_s = run_prefill(chunk)                      # positions chunk.start.. into chunk.slot
            apply(sched.finish_prefill(chunk, now_s))
        if sched.decode_rows():                             # decode rows 0..B-1 at context_lengths()
            now_s = run_decode(sched.decode_rows(), sched.context_lengths())
            apply(sched.finish_decode(now_s))               # copy KV rows src -> dst, in order

`plan_prefill` may be called again before `finish_prefill` and returns the same chunk.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from nectar.serving.traces import RequestSpec


@dataclass(frozen=True)
class SlotMove:
    """Copy the KV-cache row of slot src into slot dst (src is then free)."""

    src: int
    dst: int


@dataclass(frozen=True)
class PrefillChunk:
    """Prefill prompt tokens [start, start + n_tokens) of a request into its slot; last: its final chunk."""

    request_id: int
    slot: int
    start: int
    n_tokens: int
    last: bool


@dataclass
class RequestRecord:
    """A request's life on the backend's clock (s); times are None until they happen."""

    request_id: int
    arrival_s: float
    prompt_tokens: int                  # after truncation to the context limit
    output_tokens: int
    prompt_cut_tokens: int = 0          # prompt tokens cut from the left to fit max_context_tokens
    t_admit_s: float | None = None      # when its prefill was admitted
    t_first_token_s: float | None = None
    t_done_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)

    @property
    def generated(self) -> int:
        return len(self.token_times_s)


class Scheduler:
    """Continuous batching with chunked prefill over a KV cache of batch_max slots (see the module docstring)."""

    def __init__(self, batch_max: int, prefill_chunk_tokens: int, max_context_tokens: int):
        for name, value in (("batch_max", batch_max), ("prefill_chunk_tokens", prefill_chunk_tokens),
                            ("max_context_tokens", max_context_tokens)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        self.batch_max, self.prefill_chunk_tokens = int(batch_max), int(prefill_chunk_tokens)
        self.max_context_tokens = int(max_context_tokens)
        self._records: dict[int, RequestRecord] = {}
        self._queue: deque[int] = deque()
        self._decoding: list[int] = []            # request ids in slot order 0..B-1
        self._prefilling: int | None = None
        self._prefilled = 0                       # prompt tokens of the prefilling request already in its slot

    # --- requests in ---------------------------------------------------------------------------
    def add(self, specs: Iterable[RequestSpec]) -> None:
        """Queue requests (any order; admission is FCFS by arrival, then id)."""
        for spec in specs:
            self._records[spec.request_id] = self._record(spec)
        waiting = set(self._queue) | {s.request_id for s in self._records.values() if s.t_admit_s is None}
        self._queue = deque(sorted(waiting, key=lambda rid: (self._records[rid].arrival_s, rid)))

    def _record(self, spec: RequestSpec) -> RequestRecord:
        if spec.request_id in self._records:
            raise ValueError(f"request {spec.request_id} was already added")
        if spec.prompt_tokens < 1 or spec.output_tokens < 1:
            raise ValueError(f"request {spec.request_id} needs >= 1 prompt and output token, got {spec.prompt_tokens}, {spec.output_tokens}")
        room = self.max_context_tokens - spec.output_tokens
        if room < 1:
            raise ValueError(f"request {spec.request_id}: output_tokens {spec.output_tokens} leaves no prompt room in max_context_tokens {self.max_context_tokens}")
        prompt = min(spec.prompt_tokens, room)
        return RequestRecord(spec.request_id, float(spec.arrival_s), prompt, spec.output_tokens,
                             prompt_cut_tokens=spec.prompt_tokens - prompt)

    # --- what to run next ----------------------------------------------------------------------
    def done(self) -> bool:
        return not self._queue and not self._decoding and self._prefilling is None

    def next_event_s(self, now_s: float) -> float | None:
        """now_s when there is work now; else the next arrival (all slots are then free); None when done."""
        if self.done():
            return None
        if self._decoding or self._prefilling is not None or self._can_admit(now_s):
            return now_s
        return self._records[self._queue[0]].arrival_s

    def _can_admit(self, now_s: float) -> bool:
        return (self._prefilling is None and bool(self._queue) and len(self._decoding) < self.batch_max
                and self._records[self._queue[0]].arrival_s <= now_s)

    def plan_prefill(self, now_s: float) -> PrefillChunk | None:
        """The next prompt chunk to run, admitting the queue's head at now_s if it can; None if none."""
        if self._can_admit(now_s):
            self._prefilling, self._prefilled = self._queue.popleft(), 0
            self._records[self._prefilling].t_admit_s = now_s
        if self._prefilling is None:
            return None
        prompt = self._records[self._prefilling].prompt_tokens
        n = min(self.prefill_chunk_tokens, prompt - self._prefilled)
        return PrefillChunk(self._prefilling, len(self._decoding), self._prefilled, n, self._prefilled + n == prompt)

    def decode_rows(self) -> list[int]:
        """Request ids of the decode batch in slot order 0..B-1."""
        return list(self._decoding)

    def context_lengths(self) -> list[int]:
        """Per decode row: tokens in its cache = prompt + generated - 1 = where the next token is written."""
        return [self._records[r].prompt_tokens + self._records[r].generated - 1 for r in self._decoding]

    def prefilling(self) -> int | None:
        """The id of the request being prefilled (at slot len(decode_rows())), or None."""
        return self._prefilling

    # --- what ran ------------------------------------------------------------------------------
    def finish_prefill(self, chunk: PrefillChunk, t_end_s: float) -> list[SlotMove]:
        """The chunk ran until t_end_s; after its last chunk the request has its first token and decodes."""
        if chunk.request_id != self._prefilling or chunk.start != self._prefilled:
            raise ValueError(f"chunk {chunk} is not the one planned for request {self._prefilling} at {self._prefilled}")
        self._prefilled += chunk.n_tokens
        if not chunk.last:
            return []
        record = self._records[chunk.request_id]
        record.t_first_token_s = t_end_s
        record.token_times_s.append(t_end_s)
        self._prefilling = None
        if record.generated >= record.output_tokens:
            record.t_done_s = t_end_s             # one-token request: done without joining (slot B stays free)
        else:
            self._decoding.append(record.request_id)
        return []

    def finish_decode(self, t_end_s: float) -> list[SlotMove]:
        """Every decode row generated one token at t_end_s; finished requests leave; the slot moves."""
        records = [self._records[r] for r in self._decoding]
        if any(r.token_times_s[-1] >= t_end_s for r in records):
            raise ValueError(f"decode step ending at {t_end_s} s does not come after every row's previous token")
        for r in records:
            r.token_times_s.append(t_end_s)
            if r.generated >= r.output_tokens:
                r.t_done_s = t_end_s
        return self._compact()

    def _compact(self) -> list[SlotMove]:
        """Fill finished slots with the last live rows; move a prefilling request down to the new slot B."""
        rows, moves, old_b = self._decoding, [], len(self._decoding)
        self._pop_finished_tail()
        i = 0
        while i < len(rows):
            if self._records[rows[i]].t_done_s is not None:
                moves.append(SlotMove(len(rows) - 1, i))
                rows[i] = rows.pop()
                self._pop_finished_tail()
            i += 1
        if self._prefilling is not None and len(rows) != old_b:
            moves.append(SlotMove(old_b, len(rows)))
        return moves

    def _pop_finished_tail(self) -> None:
        while self._decoding and self._records[self._decoding[-1]].t_done_s is not None:
            self._decoding.pop()

    def requests(self) -> list[RequestRecord]:
        """Copies of every added request's record, by request id."""
        return [dataclasses.replace(r, token_times_s=list(r.token_times_s)) for _, r in sorted(self._records.items())]

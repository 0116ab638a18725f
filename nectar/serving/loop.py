"""One policy serving one request trace on one backend: the continuous-batching loop.

Every step runs inside the backend's telemetry window (`backend.run_chunk`): a prefill chunk of
the admitted request, then one decode step of the batch, or an idle window up to the next arrival.
The clock is the backend's (the simulator's, or the GPU's wall clock, host time between windows
included), counted from the first window, so the same loop serves both backends.

Energy per step: a decode step is far shorter than one update of the GPU's energy counter, so
each step's energy is the backend's best short-window estimate (integrated power,
`window_energy_J`), and the steps of the run are then scaled together so that they add up to what
the counter measured from the first window's start to the last one's end. On the NVML backend the
whole run is one `step_windows` block: step edges read instant power alone (the counter costs ~3 ms
a read, more than a captured decode step) and the counter is read once at each end of the run. Requests' tokens come from the held-out stream: prompt, then the
reference continuation the decode steps are teacher-forced on (`nectar.serving.engine`).

Before a decode step's window opens the engine may prepare it (`prepare_decode`: the captured path
captures a graph it lacks there: in no step's window, though the clock runs on; `capture_s`).
The adaptive policy (`nectar`) gets its controller's `after_decode` call after every decode step;
the controller may run a ride-along quality check inside that step's window (its energy and time
count in the policy's totals) and move the routers' price once per window of decode steps. Such a
step's record says which share of its window was the check's (`StepRecord.check_share`: the check's
share of the step's predicted bytes, from the workload the window covers; `nectar.serving.step_cost`),
so the report can say what the checks cost inside those totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from nectar.serving.engine import ServingEngine, StepResult
from nectar.telemetry.energy import CounterSpan, step_windows, window_energy_J
from nectar.serving.metrics import StepRecord
from nectar.serving.scheduler import RequestRecord, Scheduler
from nectar.serving.step_cost import check_share
from nectar.serving.traces import RequestSpec


@dataclass
class RequestTokens:
    """A request's prompt and its reference continuation (token ids, host lists)."""

    prompt: list[int]
    reference: list[int]


@dataclass
class ServeLimits:
    batch_max: int = 16
    prefill_chunk_tokens: int = 256
    max_context_tokens: int = 1024


@dataclass
class PolicyServing:
    """What one policy's run produced: steps, requests, NLL totals and greedy tokens per request."""

    policy: str
    steps: list[StepRecord]
    requests: list[RequestRecord]
    nll_sum: float
    nll_tokens: int
    greedy: dict[int, list[int]]                       # request id → greedy token at each output index
    workloads: list = field(default_factory=list)      # the decode steps' workloads (the simulator replays them)
    controller: dict | None = None
    graphs: dict = field(default_factory=dict)          # how decode steps ran (`ServingEngine.graph_summary`)


def request_tokens(stream: torch.Tensor, records: list[RequestRecord], seed: int) -> dict[int, RequestTokens]:
    """Each request's window of the held-out stream (a seeded random offset per request)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for rec in records:
        need = rec.prompt_tokens + rec.output_tokens
        if stream.numel() <= need:
            raise ValueError(f"the held-out stream has {stream.numel()} tokens; request {rec.request_id} needs {need}")
        start = int(torch.randint(0, stream.numel() - need, (1,), generator=gen))
        ids = stream[start:start + need].tolist()
        out[rec.request_id] = RequestTokens(ids[: rec.prompt_tokens], ids[rec.prompt_tokens:])
    return out


class _Greedy:
    """Greedy tokens of every step, kept on the device; read back once at the end."""

    def __init__(self):
        self.pieces: list[torch.Tensor] = []
        self.index: list[list[tuple[int, int]]] = []   # per piece: (request id, output index) of each row

    def add(self, argmax_R: torch.Tensor, rows: list[tuple[int, int]]) -> None:
        self.pieces.append(argmax_R)
        self.index.append(rows)

    def by_request(self) -> dict[int, list[int]]:
        out: dict[int, dict[int, int]] = {}
        if not self.pieces:
            return {}
        values = torch.cat(self.pieces).tolist()
        flat = [row for rows in self.index for row in rows]
        for (rid, j), token in zip(flat, values):
            out.setdefault(rid, {})[j] = token
        return {rid: [seq[j] for j in sorted(seq)] for rid, seq in out.items()}


def serve(engine: ServingEngine, backend, specs: list[RequestSpec], stream: torch.Tensor, limits: ServeLimits,
          seed: int = 0, controller=None, progress: Callable[[int], None] | None = None) -> PolicyServing:
    """Serve `specs` with the routers installed in `engine.model`; one telemetry window per step."""
    with step_windows(backend) as span:
        run = _serve(engine, backend, specs, stream, limits, seed, controller, progress)
    _match_counter(run.serving.steps, run.windows, span)
    return run.serving


@dataclass
class _Served:
    """A run before its steps are scaled to the counter: the result and every window it measured."""

    serving: PolicyServing
    windows: list


def _serve(engine: ServingEngine, backend, specs: list[RequestSpec], stream: torch.Tensor, limits: ServeLimits,
           seed: int, controller, progress: Callable[[int], None] | None) -> _Served:
    """The continuous-batching loop itself (see `serve`)."""
    sched = Scheduler(limits.batch_max, limits.prefill_chunk_tokens, limits.max_context_tokens)
    sched.add(specs)
    tokens = request_tokens(stream, sched.requests(), seed)
    steps: list[StepRecord] = []
    greedy, nll = _Greedy(), []
    workloads, windows = [], []
    now_s, origin = 0.0, None

    def record(win, phase: str, rows: list[int], generated: int, tokens_in: int, workload=None) -> None:
        nonlocal now_s, origin
        origin = win.t_start_s if origin is None else origin
        windows.append(win)
        share = check_share(workload) if phase == "decode" else 0.0
        steps.append(StepRecord(phase, win.t_start_s - origin, win.t_end_s - origin, window_energy_J(win),
                                len(rows) if phase == "decode" else 0, tokens_in, generated, rows, share))
        now_s = win.t_end_s - origin

    def window(phase: str, run: Callable[[], StepResult], rows: list[int], generated: int, tokens_in: int) -> StepResult:
        held: dict = {}
        win = backend.run_chunk(lambda: held.setdefault("r", run()).workload)
        accounted = getattr(win, "workload", None) or held["r"].workload     # as the backend accounted it
        record(win, phase, rows, generated, tokens_in, accounted)
        return held["r"]

    while not sched.done():
        nxt = sched.next_event_s(now_s)
        if nxt is not None and nxt > now_s:
            record(backend.idle(nxt - now_s), "idle", [], 0, 0)
        chunk = sched.plan_prefill(now_s)
        if chunk is not None:
            req = tokens[chunk.request_id]
            part = req.prompt[chunk.start: chunk.start + chunk.n_tokens]
            result = window("prefill", lambda: engine.prefill(chunk.slot, part, chunk.start, req.reference[0]),
                            [chunk.request_id], int(chunk.last), len(part))
            if chunk.last:
                nll.append(result.nll_R)
                greedy.add(result.argmax_R, [(chunk.request_id, 0)])
            _apply(engine, sched.finish_prefill(chunk, now_s))
        rows = sched.decode_rows()
        if rows:
            positions = sched.context_lengths()                        # prompt + generated − 1 per row
            index = [p - len(tokens[rid].prompt) + 1 for rid, p in zip(rows, positions)]  # output index predicted
            feed = [tokens[rid].reference[j - 1] for rid, j in zip(rows, index)]
            targets = [tokens[rid].reference[j] for rid, j in zip(rows, index)]
            engine.prepare_decode(feed, positions, targets)            # outside the step's window
            run = lambda: engine.decode(feed, positions, targets)      # noqa: E731
            if controller is not None:
                run = controller.wrap_decode(engine, run, feed, positions, targets)
            result = window("decode", run, list(rows), len(rows), len(rows))
            nll.append(result.nll_R)
            greedy.add(result.argmax_R, list(zip(rows, index)))
            workloads.append(result.workload)
            if controller is not None:
                controller.after_decode(engine)
            _apply(engine, sched.finish_decode(now_s))
        if progress is not None:
            progress(sum(r.t_done_s is not None for r in sched.requests()))
    nll_R = torch.cat(nll).double().cpu() if nll else torch.zeros(0, dtype=torch.float64)
    return _Served(PolicyServing(engine.policy, steps, sched.requests(), float(nll_R.sum()), int(nll_R.numel()),
                                 greedy.by_request(), workloads, None if controller is None else controller.summary(),
                                 engine.graph_summary()), windows)


def _counted_J(windows: list, span: CounterSpan | None) -> float | None:
    """The counter's energy over the run: the span read around it, else from the first window's
    start to the last one's end (None when there is no counter)."""
    if span is not None:
        return span.energy_J()
    first, last = (windows[0], windows[-1]) if windows else (None, None)
    if first is None or first.energy_mJ_start is None or last.energy_mJ_end is None:
        return None
    return (last.energy_mJ_end - first.energy_mJ_start) / 1e3


def _match_counter(steps: list[StepRecord], windows: list, span: CounterSpan | None = None) -> None:
    """Scale the steps' energies to the counter's reading over the whole run (when it has one)."""
    counted_J = _counted_J(windows, span)
    if counted_J is None:
        return
    estimated_J = sum(s.energy_J for s in steps)
    if counted_J > 0 and estimated_J > 0:
        for step in steps:
            step.energy_J *= counted_J / estimated_J


def _apply(engine: ServingEngine, moves) -> None:
    for move in moves:
        engine.move(move.src, move.dst)

"""
The model thread's batch loop: steps, not jobs.

The worker (L{ds4tw._runtime.worker}, in the reactor) admits at most
C{engine.slots} jobs and hands each one's model side (L{ds4tw._runtime.job.Work}:
the request, and the one record of its stage, progress and outcome) to
this loop through a thread-safe inbox. The loop sees nothing else of a
job. It runs in the model thread, one engine step per iteration:

  1. take new jobs from the inbox and L{Engine.open} a sequence for each;
  2. release the sequence of every job whose cancel flag is set: a
     cancelled request leaves before the next step, the others go on;
  3. L{Engine.step} once: a token for every decoding sequence and prompt
     chunks for the prefilling ones (continuous batching);
  4. feed each sequence's events to its L{Run} (its text pipeline, stop
     strings, tool-call parsing, usage) and end the runs that are done;
  5. hand everything the step produced to the reactor in one call.

Step 4 is also where a reasoning budget is kept (L{Budget}): once a
reply has spent it inside its reasoning block, the engine is told to
write the block's closing text in the model's place from the next step.

Step 2 is where cancellation is enforced between steps; inside a step the
engine watches the worker's step flag, which the reactor sets only when
every running job is cancelled (L{ds4tw._runtime.worker.Worker}), so an
L{Aborted} step always holds cancelled jobs only.

The loop ends when it has nothing to run; the worker starts it again when
the next job arrives. Each iteration is one engine step, so
L{ds4tw.testing.SteppedThreads} can stop the world between any two.

Covered by tests/unit/test_scheduler.py, tests/unit/test_cancel.py and
tests/unit/test_reasoning_budget.py.
"""

from __future__ import annotations

import codecs
import functools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from twisted.logger import Logger
from twisted.python.failure import Failure

from .._engine.interface import (
    Aborted,
    AbortFlag,
    BackendLost,
    Engine,
    Failed,
    Finished,
    PrefillProgress,
    StepEvent,
    Token,
)
from .._formats.pipeline import OutputPipeline
from .._types import Finish, Stage, Timings, Usage
from .job import Work

log = Logger()


@dataclass(frozen=True)
class StepStats:
    """One engine step, as /metrics shows it."""

    sequences: int
    decode_tokens: int
    prefill_tokens: int
    seconds: float


class Delivery:
    """Everything one step has for the reactor, delivered in one call."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], object]] = []

    def add(self, f: Callable[..., object], *args: object) -> None:
        self.calls.append(functools.partial(f, *args))

    def __call__(self) -> None:
        for call in self.calls:
            call()


@dataclass
class Run:
    """
    One job's sequence on the model thread: its usage and timings. Its
    stage is the work's own (L{Work.stage}).
    """

    work: Work
    seq: int
    started: float
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    decode_started: float = 0.0
    peers: set[int] = field(default_factory=set)
    #: The reasoning budget's state (L{Budget}), when the request has one.
    budget: Budget | None = None

    @property
    def job_id(self) -> int:
        return id(self.work)


class Budget:
    """
    A request's reasoning budget (L{SamplingParams.reasoning_budget}), kept
    in the model thread: once the reply has spent it and is still inside a
    reasoning block, the engine writes the block's closing text in the
    model's place (L{Engine.force}), as llama.cpp's reasoning-budget
    sampler does. The closing text is forced once per block: if it does
    not end the block (a parser whose close the model's vocabulary hides),
    the model goes on rather than being closed again and again.
    """

    def __init__(self, limit: int, close: tuple[int, ...]) -> None:
        self.limit = limit
        self.close = close
        #: Forced tokens not yet seen come back as Token events.
        self.forcing = 0
        #: Forced in this reasoning block already.
        self.spent = False
        # The reply's bytes so far end inside a UTF-8 character: forcing
        # now would split it (llama.cpp waits for it to complete too).
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def due(self, pipeline: OutputPipeline, reasoning_tokens: int) -> bool:
        """Whether to force the closing text now (then it counts as forced)."""
        if not pipeline.in_reasoning:
            self.spent = False
            return False
        if self.spent or reasoning_tokens < self.limit or self._utf8.getstate()[0]:
            return False
        self.spent = True
        self.forcing = len(self.close)
        return True

    def token(self, piece: bytes) -> bool:
        """Take a token of the reply; True if it was the last forced one."""
        self._utf8.decode(piece)
        if not self.forcing:
            return False
        self.forcing -= 1
        return not self.forcing


class BatchLoop:
    """
    @param inbox: work admitted by the worker, not yet seen here.
    @param abort: the worker's step flag, watched inside each step.
    @param ended: called in the reactor with each job's work that ended
        here (L{Work.end} is the worker's to call).
    @param stepped: called in the reactor with each step's L{StepStats}.
    """

    def __init__(
        self,
        engine: Engine,
        to_reactor: Callable[..., None],
        inbox: deque[Work],
        abort: AbortFlag,
        ended: Callable[[Work], None],
        stepped: Callable[[StepStats], None],
        lost: Callable[[Failure], None] = lambda failure: None,
    ) -> None:
        self.engine = engine
        self.to_reactor = to_reactor
        self.inbox = inbox
        self.abort = abort
        self.ended = ended
        self.stepped = stepped
        #: Told (in the reactor, before the jobs' ends) that the model
        #: itself is gone (L{BackendLost}).
        self.lost = lost
        self.runs: dict[int, Run] = {}

    def steps(self) -> Iterator[None]:
        while True:
            out = Delivery()
            self._admit(out)
            self._drop_cancelled(out)
            self._deliver(out)
            if not self.runs:
                return
            # Admissions go out before the step, so that a progress stream
            # hears of its prefill at once, not after the first batch (seconds
            # on a slow CPU). Its keepalive does not wait for this: it reads
            # the stage the admission wrote (Work.stage).
            out = Delivery()
            self._step(out)
            self._deliver(out)
            yield

    def _deliver(self, out: Delivery) -> None:
        if out.calls:
            self.to_reactor(out)

    # -- the ends of a run ---------------------------------------------------

    def _admit(self, out: Delivery) -> None:
        while self.inbox:
            try:
                work = self.inbox.popleft()
            except IndexError:  # the reactor took it back (cancelled)
                break
            now = time.monotonic()
            if work.cancelled:
                work.stopped_at = now  # at its stage: queued
                out.add(self.ended, work)
                continue
            try:
                seq = self.engine.open(work.prompt, work.params)
            except Exception as e:
                work.failure = Failure()
                if isinstance(e, BackendLost):
                    out.add(self.lost, work.failure)
                out.add(self.ended, work)
                continue
            run = Run(work, seq, now, usage=Usage(prompt_tokens=len(work.prompt)))
            run.timings.queued = now - work.submitted_at
            work.started_at = now
            # The reactor reads it from here on (the keepalive says prefill).
            work.stage = Stage.PREFILL
            self.runs[seq] = run
            params = work.params
            if params.reasoning_budget is not None and params.reasoning_close:
                run.budget = Budget(params.reasoning_budget, params.reasoning_close)
                # A template that opens the block in the prompt with a
                # budget of 0: the first token is already the close.
                self._spend(run)
            out.add(work.tell_stage, Stage.PREFILL)

    def _drop_cancelled(self, out: Delivery) -> None:
        for run in list(self.runs.values()):
            if run.work.cancelled:
                self._cancelled(run, out)

    def _cancelled(self, run: Run, out: Delivery) -> None:
        run.work.stopped_at = time.monotonic()  # at its stage
        self._close(run, out, keep_output=False)

    def _close(self, run: Run, out: Delivery, *, keep_output: bool) -> None:
        del self.runs[run.seq]
        run.work.peers = len(run.peers)
        self.engine.release(run.seq, keep_output=keep_output)
        out.add(self.ended, run.work)

    def _fail(self, run: Run, out: Delivery, failure: Failure) -> None:
        run.work.failure = failure
        self._close(run, out, keep_output=False)

    def _finish(self, run: Run, out: Delivery, reason: str, stop: str | None) -> None:
        work = run.work
        pipeline = work.pipeline
        tail = pipeline.finish(stopped=stop is not None)
        if tail:
            out.add(work.tell_outputs, tail)
        if reason == "stop" and pipeline.calls:
            reason = "tool_calls"
        if work.stage is Stage.DECODE:
            run.timings.decode = time.monotonic() - run.decode_started
        work.finish = Finish(reason, run.usage, stop, run.timings)
        self._close(run, out, keep_output=True)

    # -- one step --------------------------------------------------------------

    def _step(self, out: Delivery) -> None:
        started = time.monotonic()
        try:
            result = self.engine.step(self.abort)
        except Aborted:
            # The step flag is set only when every running job is
            # cancelled: all of them stopped inside this step.
            self._drop_cancelled(out)
            return
        except Exception as e:
            failure = Failure()
            if isinstance(e, BackendLost):
                # First, so that the worker stops admitting before the
                # ends below move its queue.
                out.add(self.lost, failure)
            for run in list(self.runs.values()):
                self._fail(run, out, failure)
            return
        seconds = time.monotonic() - started
        if result.sequences:
            out.add(
                self.stepped,
                StepStats(
                    len(result.sequences), result.decode_tokens, result.prefill_tokens, seconds
                ),
            )
            if len(result.sequences) > 1:
                shared = {self.runs[s].job_id for s in result.sequences if s in self.runs}
                for s in result.sequences:
                    if s in self.runs:
                        self.runs[s].peers |= shared - {self.runs[s].job_id}
        for seq, event in result.events:
            target = self.runs.get(seq)
            if target is None:
                continue  # ended earlier in this step
            try:
                self._event(target, event, out)
            except Exception:
                self._fail(target, out, Failure())

    def _event(self, run: Run, event: StepEvent, out: Delivery) -> None:
        work = run.work
        if isinstance(event, PrefillProgress):
            # For the stream's progress comments (": prefill 1024/3641"),
            # read by the reactor as they are written: the total first.
            work.prefill_total = event.total
            work.prefill_done = event.done
            run.usage.cached_tokens = event.cached
            run.usage.cached_from = event.source if event.cached else None
            if event.done >= event.total and work.stage is Stage.PREFILL:
                run.decode_started = time.monotonic()
                run.timings.prefill = run.decode_started - run.started
                work.stage = Stage.DECODE
                out.add(work.tell_stage, Stage.DECODE)
        elif isinstance(event, Token):
            run.usage.completion_tokens += 1
            pipeline = work.pipeline
            thinking = pipeline.in_reasoning
            fed = pipeline.feed(event)
            # Tags count as reasoning: the token was inside the block
            # before or after it.
            if thinking or pipeline.in_reasoning:
                run.usage.reasoning_tokens += 1
            if run.budget is not None:
                if run.budget.token(event.piece) and pipeline.in_reasoning:
                    log.warn(
                        "ds4tw: the reasoning budget's closing text did not end the "
                        "reasoning block (are its special tokens kept?)"
                    )
                self._spend(run)
            if fed.outputs:
                out.add(work.tell_outputs, fed.outputs)
            if fed.stop is not None:
                self._finish(run, out, "stop", fed.stop)
            elif fed.call_done:
                # The one call this request allowed is complete.
                self._finish(run, out, "stop", None)
        elif isinstance(event, Finished):
            self._finish(run, out, event.reason, None)
        elif isinstance(event, Failed):
            self._fail(run, out, Failure(event.error))

    def _spend(self, run: Run) -> None:
        """Close the reasoning block in the model's place once its budget is spent."""
        budget = run.budget
        assert budget is not None
        if budget.due(run.work.pipeline, run.usage.reasoning_tokens):
            self.engine.force(run.seq, budget.close)

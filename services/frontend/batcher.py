"""Batch formation: queries in, lists of queries out (no grpc, no engine state)."""


class Batcher:
    """Forms batches of ``batch_size`` queries, flushed after ``timeout_s``.

    Algorithm: queries are appended to the forming list; the first one starts
    a timer; the list is flushed (``on_batch(queries)``) when it is full or
    the timer fires, whichever is first. ``batch_size == 1`` flushes at once
    with no timer. Caller guarantees: every call on the event loop thread;
    ``clock`` is a ``clock.Clock``.
    """

    def __init__(self, batch_size, timeout_s, clock, on_batch):
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.clock = clock
        self.on_batch = on_batch
        self._forming = []
        self._timer = None

    def add(self, query):
        if self.batch_size == 1:
            self.on_batch([query])
            return
        forming = self._forming
        forming.append(query)
        if len(forming) == 1:
            self._timer = self.clock.call_later(self.timeout_s, self._expire)
        if len(forming) >= self.batch_size:
            self.flush()

    def _expire(self):
        self._timer = None
        self.flush()

    def flush(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._forming:
            queries, self._forming = self._forming, []
            self.on_batch(queries)

    def forming(self):
        return len(self._forming)

"""Per-query records of a load-generator run, and their CSV form.

One ``Record`` per query that was sent (warm-up queries included, flagged).
Times: ``send_time_s`` is seconds since the generator's run started (its own
monotonic clock; merged records of several generators keep their own
origins), ``send_lag_ms`` is how late the send was against its scheduled
Poisson arrival, ``latency_ms`` runs from the send to the answer (or error).
``status`` is the gRPC status code name ("OK", "DEADLINE_EXCEEDED", ...).
``source`` is one of ``SOURCES`` for answered queries and "" for errors;
``predicted`` is the argmax of the output (-1 on error), ``label`` the true
label of the example that was sent. The source names are the proto's
``parm.v1.Source`` names in lower case (defined once, in the proto); this
module imports the generated message module for them, never grpc.
"""

import csv
import pathlib
from dataclasses import asdict, dataclass, fields

from parm.v1.frontend_pb2 import Source

# parm.v1.Source enum value -> record name (SOURCE_UNSPECIFIED -> "unspecified").
SOURCE_NAMES = {value: name.lower().removeprefix("source_") for name, value in Source.items()}
SOURCE_VALUES = {name: value for value, name in SOURCE_NAMES.items()}
# The sources reported in every breakdown, in this order.
SOURCES = ("original", "reconstructed", "backup", "default")

CSV_NAME = "records.csv"


@dataclass
class Record:
    request_id: str
    client_index: int
    send_time_s: float
    send_lag_ms: float
    latency_ms: float
    status: str
    source: str
    predicted: int
    label: int
    warmup: bool
    batch_id: int = 0
    group_id: int = 0
    frontend_latency_ms: float = 0.0

    @property
    def ok(self):
        return self.status == "OK"


COLUMNS = tuple(f.name for f in fields(Record))
_TYPES = {f.name: f.type for f in fields(Record)}


def _parse(name, text):
    kind = _TYPES[name]
    if kind in (int, "int"):
        return int(text)
    if kind in (float, "float"):
        return float(text)
    if kind in (bool, "bool"):
        return text.strip().lower() in ("1", "true", "yes")
    return text


def write_csv(records, path):
    """Writes records as CSV with a header row of ``COLUMNS``."""
    path = pathlib.Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in records:
            row = asdict(r)
            row["warmup"] = int(r.warmup)
            writer.writerow([row[c] for c in COLUMNS])
    return path


def read_csv(path):
    """Reads records written by ``write_csv`` (unknown columns are ignored)."""
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.append(Record(**{c: _parse(c, row[c]) for c in COLUMNS if c in row}))
    return out

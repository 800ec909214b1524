#!/usr/bin/env bash
# Side by side on this machine: `telcoflow bench` with echo agents on the official Python SDK
# and on the Rust SDK, same calls, same rate, one after the other (each run starts its own
# server and agent child processes, so both start from the same state). Prints both tables and
# then each figure with the ratio Python / Rust (> 1 means Rust is better for costs and
# latencies).
#
#   bench/compare.sh                  # 50 calls, 15 s, 24 kHz
#   CALLS=100 DURATION=20 bench/compare.sh
#   SIP=1 bench/compare.sh            # callers over SIP/RTP (8 kHz, G.711)
#
# Needs: a release build (built here if missing) and the venv with the Python SDK:
#   python3 -m venv .venv && .venv/bin/pip install telcoflow==1.0.0
set -euo pipefail
cd "$(dirname "$0")/.."

CALLS=${CALLS:-50}
DURATION=${DURATION:-15}
RAMP=${RAMP:-2}
SIP=${SIP:-0}
if [ "$SIP" = 1 ]; then
    RATE=8000 # G.711's rate: the only one `bench --sip` takes
else
    RATE=${RATE:-24000}
fi
BIN=${TELCOFLOW_BIN:-target/release/telcoflow}
PY=${TELCOFLOW_PYTHON:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"

if [ ! -x "$BIN" ]; then
    cargo build --release -p telcoflow-cli
fi
if [ ! -x "$PY" ]; then
    echo "compare.sh: $PY not found; run: python3 -m venv .venv && .venv/bin/pip install telcoflow==1.0.0" >&2
    exit 2
fi

common=(bench --calls "$CALLS" --duration "$DURATION" --ramp "$RAMP" --sample-rate "$RATE")
if [ "$SIP" = 1 ]; then
    common+=(--sip)
fi
"$BIN" "${common[@]}" --agent python --python "$PY" --json "$OUT/python.json"
"$BIN" "${common[@]}" --agent rust --json "$OUT/rust.json"

"$PY" - "$OUT/python.json" "$OUT/rust.json" <<'PYEOF'
import json, sys

py, rs = (json.load(open(p)) for p in sys.argv[1:3])

def get(d, path):
    for k in path.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d

# The user-space part: the kernel's part is the same system calls for both SDKs (one read and
# one write per frame), so the SDKs' own code differs only in this one.
for d in (py, rs):
    a = d.get("agent") or {}
    if isinstance(a.get("cpu_s_per_call_min"), (int, float)) and isinstance(a.get("kernel_cpu_s_per_call_min"), (int, float)):
        a["user_cpu_s_per_call_min"] = round(a["cpu_s_per_call_min"] - a["kernel_cpu_s_per_call_min"], 3)

rows = [
    ("calls answered", "calls_answered"),
    ("calls failed", "calls_failed"),
    ("frames sent", "frames_sent"),
    ("frames lost", "frames_lost"),
    ("frames late (>40 ms)", "frames_late"),
    ("setup p50 ms", "setup_ms.p50"),
    ("setup p99 ms", "setup_ms.p99"),
    ("round trip p50 ms", "round_trip_ms.p50"),
    ("round trip p99 ms", "round_trip_ms.p99"),
    ("server-added p99 ms", "server_added_ms.p99"),
    ("interrupt p50 ms", "interrupt_ms.p50"),
    ("interrupt p99 ms", "interrupt_ms.p99"),
    ("agent handling p50 us", "agent_handling.handle_us_p50"),
    ("agent CPU s/call-min", "agent.cpu_s_per_call_min"),
    ("  of it kernel", "agent.kernel_cpu_s_per_call_min"),
    ("  of it user space", "agent.user_cpu_s_per_call_min"),
    ("agent RSS MiB/call", "agent.rss_mib_per_call"),
    ("agent CPU cores", "agent.cpu_cores"),
    ("agent RSS MiB (loaded)", "agent.rss_mib_loaded"),
    ("server CPU s/call-min", "server.cpu_s_per_call_min"),
    ("server RSS MiB/call", "server.rss_mib_per_call"),
]
print()
print(f"side by side: {py['calls']} calls, {py['sample_rate']} Hz, {py['duration_s']:g} s, callers: {py.get('callers', 'sim')}")
print(f"{'figure':<24}{'python':>12}{'rust':>12}{'python/rust':>13}")
for name, path in rows:
    a, b = get(py, path), get(rs, path)
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    ratio = f"{a / b:.1f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"
    print(f"{name:<24}{fmt(a):>12}{fmt(b):>12}{ratio:>13}")
PYEOF
echo "JSON: $OUT/python.json $OUT/rust.json"

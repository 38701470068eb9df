#!/usr/bin/env bash
# One short preset probe: train NAME with the cpu preset plus the given overrides,
# then print valid/test perplexity of every exit. Usage:
#   bash experiments/studies/probe.sh NAME --steps 800 --d_model 128 ...
# Logs go to runs/probe_NAME/ (git-ignored); the summary line is appended to
# $PROBES_JSONL (default runs/probes.jsonl). The rows of the 800-step probes of
# 2026-11-29/30 are in docs/results/archive/preset-probes_d128-l6_2026-11-30/probes.jsonl.
set -euo pipefail
name=$1; shift
start=$(date +%s)
python experiments/train_wikitext2.py --preset cpu --workdir "runs/probe_$name" \
    --data_dir "${EE_JAX_DATA_DIR:-../shared/data/wikitext-2}" --report_test true "$@" \
    > "runs/probe_$name.log" 2>&1
end=$(date +%s)
python - "$name" "$((end - start))" "$*" "${PROBES_JSONL:-runs/probes.jsonl}" <<'PY'
import json, pathlib, sys
name, seconds, flags, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
run = pathlib.Path("runs") / f"probe_{name}"
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
rates = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
ppl = {s: json.loads((run / f"{s}_exit_ppl.json").read_text())["exit_ppl"] for s in ("valid", "test")}
row = {"name": name, "flags": flags, "wall_s": seconds,
       "median_tokens_per_s": round(sorted(rates)[len(rates) // 2]) if rates else None,
       "valid_exit_ppl": [round(p, 1) for p in ppl["valid"]],
       "test_exit_ppl": [round(p, 1) for p in ppl["test"]]}
print(json.dumps(row))
with open(out, "a") as f:
    f.write(json.dumps(row) + "\n")
PY
